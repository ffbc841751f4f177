from __future__ import annotations

import pytest
import torch

from labeltransfer.nn import GeneMasking, mask_genes


@pytest.fixture
def log_cpm() -> torch.Tensor:
    torch.manual_seed(0)
    counts = torch.poisson(torch.rand(200, 500) * 3)
    counts[:, 0] += 1  # no empty cell
    cpm = counts / counts.sum(dim=1, keepdim=True) * 1e6
    return torch.log1p(cpm)


def test_masking_keeps_library_normalised_totals(log_cpm):
    torch.manual_seed(1)
    out = mask_genes(log_cpm, 0.1)
    torch.testing.assert_close(
        torch.expm1(out).sum(dim=1), torch.full((200,), 1e6), rtol=1e-4, atol=0
    )
    assert out.shape == log_cpm.shape
    assert (out >= 0).all()


def test_masking_zeroes_about_the_rate(log_cpm):
    torch.manual_seed(2)
    out = mask_genes(log_cpm, 0.1)
    expressed = log_cpm > 0
    newly_zero = (out == 0) & expressed
    assert newly_zero.sum() / expressed.sum() == pytest.approx(0.1, abs=0.01)
    # surviving genes are scaled up by the same factor within a cell
    ratio = torch.expm1(out) / torch.expm1(log_cpm)
    kept = ratio[0][out[0] > 0]
    torch.testing.assert_close(kept, kept[0].expand_as(kept), rtol=1e-4, atol=0)
    assert kept[0] > 1


def test_masking_is_random_and_rate_zero_is_identity(log_cpm):
    a, b = mask_genes(log_cpm, 0.1), mask_genes(log_cpm, 0.1)
    assert not torch.equal(a == 0, b == 0)
    assert mask_genes(log_cpm, 0.0) is log_cpm


def test_masking_linear_scale_preserves_totals():
    x = torch.rand(10, 50) + 0.1
    out = mask_genes(x, 0.3, log1p_input=False)
    torch.testing.assert_close(out.sum(dim=1), x.sum(dim=1))


def test_masking_rate_checked(log_cpm):
    with pytest.raises(ValueError, match="rate"):
        mask_genes(log_cpm, 1.0)
    with pytest.raises(ValueError, match="rate"):
        GeneMasking(-0.1)


def test_gene_masking_module_only_in_training(log_cpm):
    layer = GeneMasking(0.1)
    assert not torch.equal(layer(log_cpm), log_cpm)
    layer.eval()
    assert torch.equal(layer(log_cpm), log_cpm)
