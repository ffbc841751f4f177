"""Domain-specific batch normalisation: every domain is normalised with its own statistics.

A network with :class:`~torch.nn.BatchNorm1d` layers (scNym's and scDET's encoders, CellPredX's
attention context) keeps running means and variances of its hidden units. Used as they come
out of training, they normalise a query with the *reference's* statistics (or with a mixture
of reference and query batches when the model co-trains), so a query whose genes are shifted
gene by gene (another species, platform or protocol) reaches the classifier far off the
reference's scale: on ``cellbench_c2d_strongshift`` scNym then calls 0.41 of the cells right
and with each domain normalised by its own statistics 0.96 (issue 14).

So, as AdaBN (Li et al. 2016) and domain-specific batch normalisation (Chang et al. 2019) do:

- after training, the running statistics are recomputed on the reference cells
  (:func:`fit_statistics`): they are the reference's, saved with the model;
- the unlabelled (query) cells of every inference call are normalised with statistics
  computed on those query cells (:func:`query_statistics`, from at most
  :data:`STATISTICS_CELLS` of them, evenly spaced), restored afterwards. A query of fewer than
  :data:`MIN_STATISTICS_CELLS` cells keeps the reference's statistics.

A cell's call therefore depends on the query it is annotated with, as for any transductive
method: the same cell annotated in another query gets the same call only when the queries'
statistics agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

#: At most this many query cells, evenly spaced, give the query's statistics.
STATISTICS_CELLS = 20_000
#: A query of fewer cells keeps the reference's statistics (too few for stable moments).
MIN_STATISTICS_CELLS = 32


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Return the batch-normalisation layers of ``module`` (empty: nothing to adapt)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def statistics_rows(rows: np.ndarray) -> np.ndarray:
    """At most :data:`STATISTICS_CELLS` of ``rows``, evenly spaced (deterministic)."""
    if rows.size <= STATISTICS_CELLS:
        return rows
    return rows[np.linspace(0, rows.size - 1, STATISTICS_CELLS).round().astype(int)]


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


@contextmanager
def query_statistics(
    module: nn.Module, batches: Iterable[dict[str, torch.Tensor]] | None
) -> Iterator[None]:
    """Within the block, ``module``'s batch norms use the statistics of ``batches``.

    ``None`` (too few query cells, or a network without batch norm) changes nothing. The
    reference's statistics are restored on leaving, also after an error.
    """
    norms = batch_norms(module)
    if batches is None or not norms:
        yield
        return
    saved = [{k: v.clone() for k, v in norm.state_dict().items()} for norm in norms]
    fit_statistics(module, batches)
    try:
        yield
    finally:
        for norm, state in zip(norms, saved, strict=True):
            norm.load_state_dict(state)
