"""Minibatches of expression for inference, read straight from the registered matrix."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from scipy import sparse

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.data._checks import _csr_rows, _is_csr

#: Cells per inference minibatch: memory stays bounded by the batch, not the data set.
INFERENCE_BATCH_SIZE = 1024
#: Minibatch keys of the expression read as the model's input, and as the open-set layer's
#: coverage-space features (both normalised on the stored values of a CSR minibatch).
NORMALIZED_KEY, COVERAGE_KEY = "X_normalized", "X_coverage"


def readable(matrix: Any) -> bool:
    """Whether :class:`ExpressionBatches` reads ``matrix``: a CSR matrix or ndarray in memory."""
    return _is_csr(matrix) or isinstance(matrix, np.ndarray)


class ExpressionBatches:
    """Minibatches ``{"X": cells x genes float32 tensor}`` of rows of a registered matrix.

    What inference needs of scvi's ``AnnDataLoader`` (the rows in order, densified as float32,
    the same values), without its per-batch machinery: a batch of consecutive rows of a CSR
    matrix shares its arrays until it is densified. ``module._get_inference_input`` reads only
    the expression. Re-iterable, like a data loader.

    Parameters
    ----------
    matrix
        The registered expression (CSR matrix or ndarray, see :func:`readable`).
    indices
        Rows to read, in this order; all by default.
    batch_size
        Cells per minibatch.
    prepare
        Turns a CSR minibatch into the tensors yielded instead of its densified expression
        (e.g. the model's input, normalised on the stored values by
        :func:`~labeltransfer.nn.normalize_input`); dense minibatches are yielded as above.
    """

    def __init__(
        self,
        matrix: Any,
        indices: Sequence[int] | None = None,
        batch_size: int = INFERENCE_BATCH_SIZE,
        prepare: Callable[[sparse.csr_matrix], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.matrix = matrix
        self.indices = None if indices is None else np.asarray(indices)
        self.batch_size = batch_size
        self.prepare = prepare
        self.n_rows = matrix.shape[0] if indices is None else self.indices.size

    def __len__(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        matrix, step = self.matrix, self.batch_size
        for start in range(0, self.n_rows, step):
            stop = min(start + step, self.n_rows)
            # one new array per batch: the module never sees the caller's memory
            if self.indices is not None:
                block = matrix[self.indices[start:stop]]  # fancy indexing copies
            elif _is_csr(matrix):
                block = _csr_rows(matrix, start, stop)
            else:
                block = np.array(matrix[start:stop], dtype=np.float32)
            if self.prepare is not None and sparse.issparse(block):
                yield self.prepare(block)
                continue
            dense = block.toarray() if sparse.issparse(block) else block
            yield {REGISTRY_KEYS.X_KEY: torch.from_numpy(dense.astype(np.float32, copy=False))}
