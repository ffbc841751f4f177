"""The query's kNN graph and the splitter that adds a kNN neighbour to every query cell."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import sparse
from scvi import settings

from labeltransfer.base._neighbors import knn
from labeltransfer.dataloaders import PairedDataLoader, RefQueryDataSplitter
from labeltransfer.dataloaders._distributed import rank_and_world_size, shard_size
from labeltransfer.nn._sparse import scipy_csr, torch_csr

from ._module import POSITIVE_KEY, TARGET_SUM

if TYPE_CHECKING:
    from anndata import AnnData
    from scvi.data import AnnDataManager


#: Query cells read and normalised at a time for the PCA of :func:`query_knn_graph`.
PCA_CHUNK_CELLS = 50_000


def _normalised_rows(
    adata: AnnData,
    rows: np.ndarray,
    feature_idx: np.ndarray,
    layer: str | None,
    input_type: str,
) -> sparse.csr_matrix:
    """Sparse float32 ``log1p`` CPM-like values of some cells and genes (as the module)."""
    X = adata.layers[layer] if layer is not None else adata.X
    X = sparse.csr_matrix(X[rows][:, feature_idx], dtype=np.float32)
    if input_type == "counts":
        totals = np.asarray(X.sum(axis=1)).ravel()
        totals[totals == 0] = 1.0
        X.data *= np.repeat((TARGET_SUM / totals).astype(np.float32), np.diff(X.indptr))
        X.data = np.log1p(X.data)
    return X


def query_knn_graph(
    adata: AnnData,
    query_idx: np.ndarray,
    *,
    feature_idx: np.ndarray,
    layer: str | None,
    input_type: str,
    n_neighbors: int = 10,
    n_pcs: int = 50,
    seed: int | None = 0,
) -> np.ndarray:
    """KNN graph of the query cells on the first ``n_pcs`` principal components of their data.

    The data are the model's input genes of the query cells, log-normalised to 10,000 counts
    per cell when they are counts (the model's own normalisation); PCA is computed on the
    sparse matrix with implicit centring (ARPACK), so the matrix is never densified, and
    neighbours are found by Euclidean distance (CellPredX: PCA to 50 components, then kNN; the
    reference implementation uses 10 neighbours): exactly up to 20,000 query cells, approximately
    above (:func:`labeltransfer.base._neighbors.knn`).

    Parameters
    ----------
    adata
        The registered AnnData.
    query_idx
        Positions of the query cells in ``adata``.
    feature_idx
        The model's input genes.
    layer
        Registered layer (``None``: ``X``).
    input_type
        ``"counts"`` or ``"lognorm"``.
    n_neighbors
        Neighbours per cell (the cell itself excluded).
    n_pcs
        Principal components (CellPredX: 50; fewer when the data are smaller).
    seed
        Seed of ARPACK's starting vector.

    Returns
    -------
    ``(n_query, k)`` int64 array of *positions in adata* of each query cell's neighbours.
    """
    from sklearn.decomposition import PCA

    n = len(query_idx)
    if n < 2:
        raise ValueError("The kNN contrastive loss needs at least two query cells.")
    X = sparse.vstack(
        [
            _normalised_rows(adata, rows, feature_idx, layer, input_type)
            for rows in np.array_split(query_idx, max(1, math.ceil(n / PCA_CHUNK_CELLS)))
        ],
        format="csr",
    )
    n_components = int(min(n_pcs, n - 1, X.shape[1] - 1))
    if n_components >= 1:
        pca = PCA(n_components=n_components, svd_solver="arpack", random_state=seed)
        embedding = pca.fit_transform(X)
    else:
        embedding = X.toarray()
    k = int(min(n_neighbors, n - 1))
    neighbours = knn(embedding, k, seed=0 if seed is None else seed)
    return np.asarray(query_idx, dtype=np.int64)[neighbours]


def _take_rows(values: Any, rows: np.ndarray) -> torch.Tensor:
    """``values[rows]`` as a tensor; a sparse CSR tensor stays one (reindexed by scipy)."""
    if isinstance(values, torch.Tensor) and values.layout == torch.sparse_csr:
        return torch_csr(scipy_csr(values)[rows])
    return torch.as_tensor(np.asarray(values)[rows])


class NeighbourQueryLoader:
    """Query minibatches with the expression of one random kNN neighbour of each cell.

    Each batch is the registry dict of the query cells plus ``"X_positive"``: the expression
    of a neighbour drawn uniformly among the cell's ``k`` neighbours (a new draw every epoch,
    as the reference implementation). Shuffling uses torch's global generator, which
    ``scvi.settings.seed`` seeds. With ``distributed=True`` (DDP) each process takes a
    disjoint shard of the query cells, as ``DistributedSampler`` does: one permutation per
    epoch, seeded by ``scvi.settings.seed`` and the epoch, padded to a multiple of the number
    of processes, every process taking every ``world_size``-th cell from its rank on.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    query_idx
        Positions of the query cells.
    knn
        ``(len(query_idx), k)`` neighbour positions (row ``r`` for cell ``query_idx[r]``).
    batch_size
        Cells per minibatch.
    drop_last
        Drop the last incomplete batch (a batch of one cell is always dropped when the set
        is larger than a batch: batch norm cannot train on it).
    distributed
        Shard the query cells across the DDP processes.
    load_sparse_tensor
        Read sparse data as torch sparse CSR minibatches (see
        :class:`~labeltransfer.dataloaders.RefQueryDataSplitter`).
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        query_idx: np.ndarray,
        knn: np.ndarray,
        *,
        batch_size: int,
        drop_last: bool = False,
        distributed: bool = False,
        load_sparse_tensor: bool = False,
    ):
        if knn.shape[0] != len(query_idx):
            raise ValueError(
                f"The kNN graph has {knn.shape[0]} rows for {len(query_idx)} query cells."
            )
        self.dataset = adata_manager.create_torch_dataset(load_sparse_tensor=load_sparse_tensor)
        self.query_idx = np.asarray(query_idx, dtype=np.int64)
        self.knn = np.asarray(knn, dtype=np.int64)
        self.batch_size = int(batch_size)
        self._drop_last = drop_last
        self.distributed = distributed
        self.epoch = 0

    def _n_cells(self) -> int:
        """Query cells this process iterates over per epoch (a shard under DDP)."""
        n = len(self.query_idx)
        return shard_size(n, rank_and_world_size()[1]) if self.distributed else n

    @property
    def drop_last(self) -> bool:
        """Whether the last incomplete batch is dropped (always for a batch of one cell)."""
        n = self._n_cells()
        return self._drop_last or (n > self.batch_size and n % self.batch_size == 1)

    def __len__(self) -> int:
        n = self._n_cells()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next distributed shuffle."""
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        """Return this process's query rows for the coming epoch, in random order."""
        n = len(self.query_idx)
        if not self.distributed:
            return torch.randperm(n).numpy()
        rank, world_size = rank_and_world_size()
        generator = torch.Generator().manual_seed((settings.seed or 0) + self.epoch)
        order = torch.randperm(n, generator=generator).numpy()
        # pad by repeating the head (DistributedSampler), then every world_size-th row
        return np.resize(order, shard_size(n, world_size) * world_size)[rank::world_size]

    def _fetch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        # sorted unique rows (backed data needs sorted indices), then back to the batch order
        unique, inverse = np.unique(positions, return_inverse=True)
        data = self.dataset[unique.tolist()]
        return {k: _take_rows(v, inverse) for k, v in data.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self._order()
        for b in range(len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            batch = self._fetch(self.query_idx[rows])
            pick = torch.randint(self.knn.shape[1], (len(rows),)).numpy()
            batch[POSITIVE_KEY] = self._fetch(self.knn[rows, pick])["X"]
            yield batch


class CellPredXDataSplitter(RefQueryDataSplitter):
    """Reference + query splitter whose query batches carry a kNN neighbour of each cell.

    A :class:`~labeltransfer.dataloaders.RefQueryDataSplitter` whose query minibatches also
    hold ``"X_positive"``, for CellPredX's contrastive loss.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    train_size
        Fraction of the labelled cells used for training.
    knn
        Neighbour positions of the query cells (rows in the order of the unlabelled cells), or
        ``None``: query batches without neighbours (the contrastive loss is then 0).
    **kwargs
        Passed to :class:`~labeltransfer.dataloaders.RefQueryDataSplitter`.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_size: float = 0.9,
        *,
        knn: np.ndarray | None = None,
        **kwargs,
    ):
        super().__init__(adata_manager, train_size, **kwargs)
        if knn is not None and knn.shape[0] != self.query_idx.size:
            raise ValueError(
                f"The kNN graph has {knn.shape[0]} rows but {self.query_idx.size} query cells "
                "are registered."
            )
        self.knn = knn

    def train_dataloader(self):
        """Return reference batches paired with query batches that carry kNN neighbours."""
        if not self.use_query or self.knn is None:
            return super().train_dataloader()
        ref = self._loader(self.ref_train_idx, shuffle=True, drop_last=self.drop_last)
        batch_size = self.data_loader_kwargs.get("batch_size") or settings.batch_size
        query = NeighbourQueryLoader(
            self.adata_manager,
            self.query_idx,
            self.knn,
            batch_size=batch_size,
            drop_last=self.drop_last,
            distributed=bool(self.data_loader_kwargs.get("distributed_sampler", False)),
            load_sparse_tensor=self.load_sparse_tensor,
        )
        return PairedDataLoader(ref, query)
