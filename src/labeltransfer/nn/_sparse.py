"""CSR minibatches between torch and scipy, sharing their arrays."""

from __future__ import annotations

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
