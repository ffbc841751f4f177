"""Split a reference (+ query) AnnData into training and validation minibatches."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
from scvi import settings
from scvi.dataloaders import AnnDataLoader, DataSplitter

from labeltransfer._constants import LOADED_WITHOUT_DATA_KEY, REGISTRY_KEYS
from labeltransfer.nn._sparse import quiet_sparse_tensor_warnings

from ._distributed import rank_and_world_size, shard_size
from ._paired import PairedDataLoader

if TYPE_CHECKING:
    from scvi.data import AnnDataManager


#: Error of ``train()`` on a model loaded without data.
NO_TRAINING_DATA = (
    "This model was loaded without data, so it has no cells to train on. Load it with its "
    "reference (`Model.load(dir_path, adata=reference)`), or attach it "
    "(`model.adata = reference`), then train."
)


def labelled_mask(adata_manager: AnnDataManager) -> np.ndarray:
    """Boolean mask of the cells that carry a reference label (not the unlabeled category)."""
    codes = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
    mapping = adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
    unlabeled = adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).unlabeled_category
    unlabeled_code = int(np.flatnonzero(mapping == unlabeled)[0])
    return codes != unlabeled_code


def _stratified_validation(
    adata_manager: AnnDataManager,
    labelled_idx: np.ndarray,
    validation_size: float,
    shuffle: bool,
) -> np.ndarray:
    """Hold out ``floor(n * validation_size)`` cells of each type (seeded by scvi's seed)."""
    rng = np.random.RandomState(seed=settings.seed)
    codes = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
    codes = codes[labelled_idx]
    parts = []
    for code in np.unique(codes):
        members = labelled_idx[codes == code]
        if shuffle:
            members = rng.permutation(members)
        parts.append(members[: int(np.floor(members.size * validation_size))])
    return np.sort(np.concatenate(parts)) if parts else np.array([], dtype=int)


class RefQueryDataSplitter(DataSplitter):
    """Labelled reference + unlabelled query minibatches for every training step.

    The labelled cells are split per cell type into training and validation sets (the
    validation set is what early stopping, best-epoch selection, calibration and rejection
    thresholds use). With ``use_query=True`` the unlabelled (query) cells all go into training
    and a training batch is a tuple ``(reference_batch, query_batch)``; otherwise a training
    batch is a reference batch and the query cells are the test set. Validation batches are
    reference batches.

    The split is computed at construction (seeded by ``scvi.settings.seed``) and handed to
    :class:`~scvi.dataloaders.DataSplitter` as its ``external_indexing``, which checks it
    and gives ``setup()``, ``train_idx``, ``val_idx``, ``test_idx``, ``n_train`` and
    ``n_val`` their usual meaning; ``ref_train_idx`` holds the labelled training cells.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    train_size
        Fraction of the labelled cells used for training; the rest is validation.
    use_query
        Pair every reference minibatch with a query minibatch.
    shuffle_set_split
        Shuffle before splitting (seeded by ``scvi.settings.seed``).
    validation_in_query_stream
        With ``use_query``, the validation cells also go into the unlabelled (query)
        minibatches, without their labels: the model then treats them as it treats the query
        (pseudo-labels, consistency, the adversary), so the calibration and rejection
        thresholds fitted on them hold on the query. Their labels still serve validation.
    **kwargs
        Passed to :class:`~scvi.dataloaders.AnnDataLoader` (``batch_size``, ``drop_last``, ...).
        ``distributed_sampler=True`` (set by the models under a DDP strategy) gives each
        process a disjoint shard of every set (``DistributedSampler`` semantics: the
        training cells, the query cells and the validation cells are each padded to a
        multiple of the number of processes); ``batch_size`` is then per process.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_size: float = 0.9,
        *,
        use_query: bool = False,
        shuffle_set_split: bool = True,
        validation_in_query_stream: bool = False,
        load_sparse_tensor: bool = True,
        **kwargs,
    ):
        if not 0.0 < train_size <= 1.0:
            raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
        if adata_manager.adata.uns.get(LOADED_WITHOUT_DATA_KEY, False):
            raise ValueError(NO_TRAINING_DATA)
        if load_sparse_tensor:
            quiet_sparse_tensor_warnings()
        self.use_query = use_query
        self.validation_in_query_stream = validation_in_query_stream
        mask = labelled_mask(adata_manager)
        self.labelled_idx = np.flatnonzero(mask)
        self.query_idx = np.flatnonzero(~mask)
        if self.labelled_idx.size == 0:
            raise ValueError(
                "No labelled reference cell: every cell carries the unlabeled category. "
                "Set the reference labels in the registered `labels_key` column."
            )
        if use_query and self.query_idx.size == 0:
            raise ValueError(
                "This training step needs unlabelled query cells, but every registered cell is "
                "labelled. Concatenate reference and query with "
                "`lt.data.concat_reference_query` (query cells get the unlabeled category)."
            )
        validation = _stratified_validation(
            adata_manager, self.labelled_idx, 1.0 - float(train_size), shuffle_set_split
        )
        #: The labelled cells used for training.
        self.ref_train_idx = np.setdiff1d(self.labelled_idx, validation)
        empty = np.array([], dtype=int)
        query = self.query_idx if use_query else empty
        with warnings.catch_warnings():
            # DataSplitter warns of a last batch of 1-2 cells of one loader over all training
            # cells; the training loaders here are per set, and drop a last batch of one cell
            warnings.filterwarnings("ignore", message="Last batch will have a small size")
            super().__init__(
                adata_manager,
                train_size=train_size,
                shuffle_set_split=shuffle_set_split,
                # the cells a training step leaves out (the query of a reference-only
                # step) are the test set: DataSplitter checks that the three sets cover
                # every cell once
                external_indexing=[
                    np.concatenate([self.ref_train_idx, query]),
                    validation,
                    self.query_idx if not use_query else empty,
                ],
                load_sparse_tensor=load_sparse_tensor,
                **kwargs,
            )

    def _loader(self, indices: np.ndarray, *, shuffle: bool, drop_last: bool) -> AnnDataLoader:
        batch_size = self.data_loader_kwargs.get("batch_size") or settings.batch_size
        # this process's cells: a shard of the set under DDP
        n = indices.size
        if self.data_loader_kwargs.get("distributed_sampler", False):
            n = shard_size(n, rank_and_world_size()[1])
        # a last batch of one cell breaks batch norm: drop it when the set allows
        drop = drop_last or (shuffle and n > batch_size and n % batch_size == 1)
        return AnnDataLoader(
            self.adata_manager,
            indices=indices,
            shuffle=shuffle,
            drop_last=drop,
            load_sparse_tensor=self.load_sparse_tensor,
            pin_memory=self.pin_memory,
            **self.data_loader_kwargs,
        )

    def train_dataloader(self):
        """Return reference batches, paired with query batches when ``use_query``."""
        ref = self._loader(self.ref_train_idx, shuffle=True, drop_last=self.drop_last)
        if not self.use_query:
            return ref
        unlabelled = self.query_idx
        if self.validation_in_query_stream:
            unlabelled = np.concatenate([self.query_idx, self.val_idx])
        query = self._loader(unlabelled, shuffle=True, drop_last=self.drop_last)
        return PairedDataLoader(ref, query)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        """Return the batch as it is: sparse minibatches stay sparse (``load_sparse_tensor``).

        ``DataSplitter`` densifies them here, which would undo the point of reading them
        sparse (and expects a dict, where a paired training batch is a tuple).
        """
        return batch

    def val_dataloader(self):
        """Return reference validation batches (an empty list without a validation set)."""
        if self.val_idx.size == 0:
            return []
        return self._loader(self.val_idx, shuffle=False, drop_last=False)
