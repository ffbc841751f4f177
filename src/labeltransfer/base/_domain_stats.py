"""Domain-specific batch normalisation: every domain is normalised with its own statistics.

A network with :class:`~torch.nn.BatchNorm1d` layers on its inference path (scNym's and scDET's
encoders; CellPredX's only one sits in its attention network, which inference skips, so
:meth:`~labeltransfer.base.AnnotationModule.inference_norms` lists none for it) keeps running
means and variances of its hidden units. Used as they come
out of training, they normalise a query with the *reference's* statistics (or with a mixture
of reference and query batches when the model co-trains), so a query whose genes are shifted
gene by gene (another species, platform or protocol) reaches the classifier far off the
reference's scale: on ``cellbench_c2d_strongshift`` scNym then calls 0.41 of the cells right
and with each domain normalised by its own statistics 0.96 (issue 14).

So, as AdaBN (Li et al. 2016) and domain-specific batch normalisation (Chang et al. 2019) do:

- after training, the running statistics are recomputed on the reference cells
  (:func:`fit_statistics`): they are the reference's, saved with the model;
- the unlabelled (query) cells of every inference call are normalised with statistics
  computed on those query cells (``_query_statistics``, from at most
  :data:`STATISTICS_CELLS` of them, evenly spaced), restored afterwards. A query of fewer than
  :data:`MIN_STATISTICS_CELLS` cells keeps the reference's statistics.
- those query cells are weighted to the reference's type proportions (:func:`balanced_rows`,
  by the types the model calls, :data:`BALANCE_ROUNDS` times, starting from the query's
  unweighted statistics): the statistics should differ from the reference's by the shift, not
  by the query's composition. A query of mostly one type (a sorted population) otherwise moves
  every cell by that type's profile: a reference-only scNym called a Kang query of 80% one
  type 0.667 right with its unweighted statistics, 0.895 weighted and 0.915 with the
  reference's; on ``cellbench_c2d_strongshift`` weighting changed 0.973 to 0.969 and 0.982 to
  0.978 (seeds 0, 1; the reference's: 0.707, 0.920).

A cell's call therefore depends on the query it is annotated with, as for any transductive
method: the same cell annotated in another query gets the same call only when the queries'
statistics agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from scipy import sparse
from torch import nn

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.dataloaders import labelled_mask

from ._batches import (
    COVERAGE_KEY,
    INFERENCE_BATCH_SIZE,
    NORMALIZED_KEY,
    ExpressionBatches,
    readable,
)
from ._module import AnnotationModule, all_batch_norms
from ._reference_space import expression_features

#: At most this many query cells, evenly spaced, give the query's statistics. Their passes
#: (up to :data:`BALANCE_ROUNDS` pairs and one more) are the fixed cost of annotating a large
#: query: with 20,000 they took two thirds of scNym's time on 50,000 cells. On a synthetic
#: 50,000-cell query (scNym) 5,000 cells changed 0.22% of the calls made with 20,000 and the
#: accuracy not at all (0.903); every real benchmark query has fewer cells.
STATISTICS_CELLS = 5_000
#: A query of fewer cells keeps the reference's statistics (too few for stable moments).
MIN_STATISTICS_CELLS = 32
#: Cells per minibatch of the statistics' pass.
STATISTICS_BATCH_SIZE = 1024
#: Largest factor by which the cells of a called type are weighted up or down to match the
#: reference's type proportions in the query's statistics.
MAX_REWEIGHT = 5.0
#: Most rounds of calling the query's types and weighting its statistics by them (fewer when
#: a round calls every cell as the one before): on a Kang query of 80% one type (scNym, seed
#: 0) one round called 0.791 right, three 0.895, five 0.895 (the reference's statistics:
#: 0.915, the query's unweighted: 0.667).
BALANCE_ROUNDS = 3


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Return the batch norms of ``module`` that inference passes through (empty: none to adapt).

    An annotation module lists them (:meth:`~labeltransfer.base.AnnotationModule.
    inference_norms`); of any other module, every batch norm.
    """
    if isinstance(module, AnnotationModule):
        return module.inference_norms()
    return all_batch_norms(module)


def statistics_rows(rows: np.ndarray) -> np.ndarray:
    """At most :data:`STATISTICS_CELLS` of ``rows``, evenly spaced (deterministic)."""
    if rows.size <= STATISTICS_CELLS:
        return rows
    return rows[np.linspace(0, rows.size - 1, STATISTICS_CELLS).round().astype(int)]


def balanced_rows(rows: np.ndarray, called: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """``rows`` resampled so their called types follow ``proportions`` (deterministic).

    Each called type's cells are repeated or thinned, evenly spaced, to its share of
    ``proportions`` (renormalised over the types called at all), by a factor within
    ``1 / MAX_REWEIGHT .. MAX_REWEIGHT``; the result is sorted and may repeat rows.
    """
    counts = np.bincount(called, minlength=proportions.size)
    present = counts > 0
    share = np.where(present, proportions, 0.0)
    target = share / share.sum() * rows.size if share.sum() > 0 else counts.astype(float)
    target = np.clip(target, counts / MAX_REWEIGHT, counts * MAX_REWEIGHT)
    kept = []
    for label in np.flatnonzero(present):
        members = rows[called == label]
        n = max(int(round(target[label])), 1)
        kept.append(members[np.arange(n) * members.size // n])
    return np.sort(np.concatenate(kept))


@torch.no_grad()
def fit_statistics(module: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    """Replace the running statistics of ``module``'s batch norms by those of ``batches``.

    The rest of the network stays in evaluation mode (no dropout); each layer's statistics are
    the average over the batches (``momentum=None``). Batches of one cell are skipped (a batch
    norm cannot take their variance).
    """
    norms = batch_norms(module)
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    module.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        for tensors in batches:
            inputs = module._get_inference_input(tensors)
            if inputs["x"].shape[0] > 1:
                module.inference(**inputs)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
            norm.eval()


#: The statistics of every batch norm of a network: each layer's state (means, variances,
#: batches tracked), in :func:`batch_norms` order.
Statistics = list[dict[str, torch.Tensor]]


def norm_states(module: nn.Module) -> Statistics:
    """Return a copy of the statistics of ``module``'s batch norms."""
    return [{k: v.clone() for k, v in norm.state_dict().items()} for norm in batch_norms(module)]


def load_statistics(module: nn.Module, statistics: Statistics) -> None:
    """Put ``statistics`` (from :func:`norm_states`) into ``module``'s batch norms."""
    for norm, state in zip(batch_norms(module), statistics, strict=True):
        norm.load_state_dict(state)


@contextmanager
def using_statistics(module: nn.Module, statistics: Statistics | None) -> Iterator[None]:
    """Within the block, ``module``'s batch norms hold ``statistics``.

    ``None`` (too few query cells, or a network without batch norm) changes nothing. The
    statistics they held are restored on leaving, also after an error.
    """
    if statistics is None or not batch_norms(module):
        yield
        return
    saved = norm_states(module)
    load_statistics(module, statistics)
    try:
        yield
    finally:
        load_statistics(module, saved)


class DomainStatisticsMixin:
    """The model side: which cells give the statistics, and inference by domain."""

    def _batches(
        self,
        adata: AnnData,
        indices: Sequence[int] | None = None,
        batch_size: int = INFERENCE_BATCH_SIZE,
        *,
        normalized: bool = False,
        coverage: bool = False,
    ) -> Iterable[dict[str, torch.Tensor]]:
        """Inference minibatches of the expression of registered ``adata`` (``indices``' rows).

        Read straight from an in-memory matrix (:class:`~labeltransfer.base._batches.
        ExpressionBatches`); anything else through scvi's data loader. ``normalized``: a CSR
        minibatch comes as the model's input instead (:meth:`_prepared_batch`), with its
        coverage-space features if ``coverage``; the network reads either.
        """
        manager = self.get_anndata_manager(adata, required=True)
        matrix = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        if readable(matrix):
            prepare = partial(self._prepared_batch, coverage=coverage) if normalized else None
            return ExpressionBatches(matrix, indices, batch_size, prepare)
        return self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)

    def _prepared_batch(
        self, block: sparse.csr_matrix, coverage: bool = False
    ) -> dict[str, torch.Tensor]:
        """Return a CSR minibatch as the network reads it: ``module.transform`` of it.

        With ``coverage``, also the open-set layer's features (:func:`~labeltransfer.base.
        _reference_space.expression_features`). Both are normalised on the stored values.
        """
        batch = {NORMALIZED_KEY: self.module.transform(block)}
        if coverage:
            batch[COVERAGE_KEY] = expression_features(block, self.module)
        return batch

    def _statistics_loader(
        self, registered: AnnData, rows: np.ndarray
    ) -> Iterable[dict[str, torch.Tensor]] | None:
        """Minibatches of the cells that give the batch norms' statistics (None: too few)."""
        rows = statistics_rows(rows)
        if rows.size < MIN_STATISTICS_CELLS:
            return None
        return self._batches(registered, rows, STATISTICS_BATCH_SIZE, normalized=True)

    def _query_statistics(self, registered: AnnData, rows: np.ndarray) -> Statistics | None:
        """Batch-norm statistics of query ``rows`` weighted to the reference's type proportions.

        The types are those the model calls with the rows' plain statistics
        (:func:`balanced_rows`); a model saved without the proportions uses the rows as they
        are. ``None``: too few rows. The module's own statistics are left as they were.

        A round whose calls repeat the round before's would weight the rows as its own
        statistics already are: they are kept (on Kang, one pass of the sample fewer than
        fitting them again).
        """
        sample = statistics_rows(rows)
        loader = self._statistics_loader(registered, sample)
        if loader is None:
            return None
        proportions = getattr(self, "reference_proportions_", None)
        saved = norm_states(self.module)
        try:
            fit_statistics(self.module, loader)
            previous = None
            for _ in range(BALANCE_ROUNDS if proportions is not None else 0):
                logits = self._forward(registered, indices=sample, return_latent=False).logits
                called = logits[:, : len(proportions)].argmax(axis=1)
                if previous is not None and np.array_equal(called, previous):
                    break  # the same weights as the round before: the same statistics
                previous = called
                rows = balanced_rows(sample, called, np.asarray(proportions, dtype=float))
                fit_statistics(
                    self.module,
                    self._batches(registered, rows, STATISTICS_BATCH_SIZE, normalized=True),
                )
            return norm_states(self.module)
        finally:
            load_statistics(self.module, saved)

    def _fit_statistics(self, rows: np.ndarray, *, query: bool = False) -> None:
        """Make the batch norms' running statistics those of ``rows`` of the model's data.

        ``query=True``: the rows are query cells, weighted as :meth:`_query_statistics`.
        """
        if not query:
            loader = self._statistics_loader(self.adata, rows)
            if loader is not None:
                fit_statistics(self.module, loader)
            return
        statistics = self._query_statistics(self.adata, rows)
        if statistics is not None:
            load_statistics(self.module, statistics)

    def _fit_reference_statistics(self) -> None:
        """Make the batch norms' running statistics the reference cells' (after training).

        Also keeps the reference's type proportions (``reference_proportions_``, saved with
        the model), to which the query's statistics are weighted.
        """
        if not batch_norms(self.module):
            return
        labelled = np.flatnonzero(labelled_mask(self.adata_manager))
        codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
        n_labels = int(self.module.n_labels)
        counts = np.bincount(codes[labelled], minlength=n_labels)[:n_labels]
        self.reference_proportions_ = counts / max(counts.sum(), 1)
        self._fit_statistics(labelled)

    def _forward_by_domain(
        self,
        registered: AnnData,
        indices: Sequence[int] | None,
        query: np.ndarray,
        forward: dict[str, Any],
    ) -> tuple:
        """:meth:`_forward`, the query cells normalised with their own statistics.

        ``query`` marks the query cells among ``indices`` (all cells if ``None``).
        """
        if not batch_norms(self.module):
            return self._forward(registered, indices=indices, **forward)
        rows = np.arange(registered.n_obs) if indices is None else np.asarray(indices)
        if not query.any():
            return self._forward(registered, indices=indices, **forward)
        statistics = self._query_statistics(registered, rows[query])
        with using_statistics(self.module, statistics):
            if query.all():
                return self._forward(registered, indices=indices, **forward)
            query_part = self._forward(registered, indices=rows[query], **forward)
        reference_part = self._forward(registered, indices=rows[~query], **forward)
        merged = []
        for ours, theirs in zip(query_part, reference_part, strict=True):
            if ours is None:
                merged.append(None)
                continue
            values = np.empty((rows.size, ours.shape[1]), dtype=ours.dtype)
            values[query], values[~query] = ours, theirs
            merged.append(values)
        return type(query_part)(*merged)

    @contextmanager
    def _chunked_query_statistics(
        self, adata: AnnData, positions: np.ndarray, harmonize_kwargs: dict[str, Any]
    ) -> Iterator[None]:
        """Batch-norm statistics of a query read by chunks, from a subset of all its cells.

        The sample is released once the statistics are set, before the chunks are read.
        """
        if not batch_norms(self.module):
            yield
            return
        rows = statistics_rows(positions)
        with ExitStack() as statistics:
            with self._registered_sample(adata, rows, harmonize_kwargs) as registered:
                fitted = self._query_statistics(registered, np.arange(registered.n_obs))
                statistics.enter_context(using_statistics(self.module, fitted))
                del registered  # the sample's last reference
            yield
