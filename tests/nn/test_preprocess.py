"""The count normalisation equals log1p(x[:, features] / library * target_sum), bit for bit;
the CSR one equals it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse

from labeltransfer.nn import normalize_input
from labeltransfer.nn._sparse import torch_csr


@pytest.mark.parametrize("features", ["all", "subset"])
def test_counts_normalisation_is_the_formula(features):
    torch.manual_seed(0)
    x = (torch.rand(16, 50) * 8).round() * (torch.rand(16, 50) < 0.3)
    x[3] = 0  # an empty cell: library clamped to 1
    feature_idx = torch.arange(50) if features == "all" else torch.tensor([7, 2, 40, 2])
    x_in = x.clone().requires_grad_(True)
    out = normalize_input(x_in, feature_idx, "counts", 1e4)
    out.sum().backward()
    x_ref = x.clone().requires_grad_(True)
    library = x_ref.sum(dim=1, keepdim=True).clamp_min(1.0)
    expected = torch.log1p(x_ref.index_select(1, feature_idx) / library * 1e4)
    expected.sum().backward()
    assert torch.equal(out, expected)
    assert torch.equal(x_in.grad, x_ref.grad)
    assert torch.equal(x_in.detach(), x)  # the input is not written


@pytest.mark.parametrize("kind", ["counts", "lognorm", "peaks"])
@pytest.mark.parametrize("features", ["all", "subset"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_csr_normalisation_equals_the_dense_one(kind, features, dtype):
    """normalize_input of a CSR block gives that of its dense copy, the block unchanged."""
    rng = np.random.default_rng(0)
    dense = (rng.random((40, 60)) * 8).round() * (rng.random((40, 60)) < 0.2)
    dense[5] = 0  # an empty cell: library (or open peaks) clamped to 1
    block = sparse.csr_matrix(dense.astype(dtype))
    block.data[0] = 0  # an explicitly stored zero
    before = block.copy()
    feature_idx = torch.arange(60) if features == "all" else torch.tensor([7, 2, 40, 2, 59])
    weights = torch.rand(feature_idx.numel()) if kind == "peaks" else None
    input_type = "lognorm" if kind == "lognorm" else "counts"
    expected = normalize_input(
        torch.from_numpy(block.toarray().astype(np.float32)), feature_idx, input_type, 1e6, weights
    )
    out = normalize_input(block, feature_idx, input_type, 1e6, weights)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(block, name), getattr(before, name))


@pytest.mark.parametrize("kind", ["counts", "lognorm", "peaks"])
def test_sparse_tensor_normalisation_equals_the_csr_one(kind):
    """A torch CSR minibatch (as the training loaders read one) gives the scipy CSR result."""
    rng = np.random.default_rng(1)
    dense = (rng.random((30, 45)) * 8).round() * (rng.random((30, 45)) < 0.2)
    dense[4] = 0
    block = sparse.csr_matrix(dense.astype(np.float32))
    tensor = torch_csr(block)
    feature_idx = torch.tensor([3, 0, 44, 3])
    weights = torch.rand(4) if kind == "peaks" else None
    input_type = "lognorm" if kind == "lognorm" else "counts"
    expected = normalize_input(block, feature_idx, input_type, 1e6, weights)
    out = normalize_input(tensor, feature_idx, input_type, 1e6, weights)
    assert out.layout == torch.strided
    assert torch.equal(out, expected)
    assert torch.equal(tensor.to_dense(), torch.from_numpy(dense.astype(np.float32)))
