"""CSR minibatches between torch and scipy, sharing their arrays."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from scipy import sparse


def scipy_csr(x: torch.Tensor) -> sparse.csr_matrix:
    """Return a CPU torch sparse CSR tensor as a scipy CSR matrix on the same memory."""
    return sparse.csr_matrix(
        (x.values().numpy(), x.col_indices().numpy(), x.crow_indices().numpy()),
        shape=tuple(x.shape),
    )


def torch_csr(x: sparse.csr_matrix) -> torch.Tensor:
    """Return a scipy CSR matrix as a torch sparse CSR tensor on the same memory."""
    return torch.sparse_csr_tensor(
        torch.from_numpy(x.indptr),
        torch.from_numpy(x.indices),
        torch.from_numpy(x.data),
        size=x.shape,
    )


@functools.cache
def quiet_sparse_tensor_warnings() -> None:
    """Spend torch's one-time warnings about sparse CSR tensors where they are not shown.

    The first CSR tensor of a process warns that CSR support is in beta and that invariant
    checks are off (``TORCH_WARN_ONCE``): noise for a user, whose minibatches are built by
    scvi's loader from a valid scipy matrix. Building one empty tensor, with the warnings
    ignored, uses up both (once per process); torch's settings are not changed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_csr(sparse.csr_matrix((0, 0), dtype=np.float32))
