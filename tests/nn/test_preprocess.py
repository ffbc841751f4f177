"""The count normalisation equals log1p(x[:, features] / library * target_sum), bit for bit."""

from __future__ import annotations

import pytest
import torch

from labeltransfer.nn import normalize_input


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
