from __future__ import annotations

import math

import pytest
import torch

from labeltransfer.nn import mixup, mixup_weights, sharpen, sigmoid_ramp


@pytest.fixture
def probabilities() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.softmax(torch.randn(64, 5) * 2, dim=1)


@pytest.mark.parametrize("temperature", [0.0, 1e-3, 0.25, 0.5, 1.0, 2.0])
def test_sharpen_rows_sum_to_one_and_keep_argmax(probabilities, temperature):
    out = sharpen(probabilities, temperature)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(64))
    assert torch.equal(out.argmax(dim=1), probabilities.argmax(dim=1))
    assert torch.isfinite(out).all()


def test_sharpen_lowers_entropy_and_matches_formula(probabilities):
    def entropy(p):
        return -(p * p.clamp_min(1e-12).log()).sum(dim=1)

    out = sharpen(probabilities, 0.5)
    expected = probabilities**2 / (probabilities**2).sum(dim=1, keepdim=True)
    torch.testing.assert_close(out, expected)
    assert (entropy(out) <= entropy(probabilities) + 1e-6).all()
    torch.testing.assert_close(sharpen(probabilities, 1.0), probabilities)


@pytest.mark.parametrize("temperature", [0.0, 1e-5])
def test_sharpen_zero_temperature_is_one_hot(probabilities, temperature):
    out = sharpen(probabilities, temperature)
    one_hot = torch.nn.functional.one_hot(probabilities.argmax(dim=1), 5).float()
    torch.testing.assert_close(out, one_hot, atol=1e-5, rtol=0)


def test_sharpen_rejects_negative_temperature(probabilities):
    with pytest.raises(ValueError, match="temperature"):
        sharpen(probabilities, -1.0)


def test_mixup_weights_are_dominant_and_beta_distributed():
    torch.manual_seed(0)
    lam = mixup_weights(20000, alpha=0.3)
    assert lam.shape == (20000,)
    assert (lam >= 0.5).all()
    assert (lam <= 1.0).all()
    # E[max(L, 1 - L)] for L ~ Beta(0.3, 0.3) computed by Monte Carlo with numpy-free torch
    reference = torch.distributions.Beta(0.3, 0.3).sample((200000,))
    expected = torch.maximum(reference, 1 - reference).mean()
    assert lam.mean().item() == pytest.approx(expected.item(), abs=0.01)
    assert torch.equal(mixup_weights(5, alpha=0.0), torch.ones(5))


def test_mixup_rows_sum_to_one_and_lean_to_first_argument():
    torch.manual_seed(1)
    n, k = 128, 4
    x = torch.zeros(n, 2)
    x[:, 0] = 1.0
    x_other = torch.zeros(n, 2)
    x_other[:, 1] = 1.0
    y = torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), k).float()
    y_other = torch.softmax(torch.randn(n, k), dim=1)
    mixed_x, mixed_y, lam = mixup(x, y, x_other, y_other, alpha=0.3)
    torch.testing.assert_close(mixed_y.sum(dim=1), torch.ones(n))
    assert (lam >= 0.5).all()
    # the first argument dominates every mixed sample
    assert (mixed_x[:, 0] >= mixed_x[:, 1]).all()
    assert (mixed_y[:, 0] >= 0.5).all()
    torch.testing.assert_close(mixed_x[:, 0], lam)
    torch.testing.assert_close(mixed_y, lam[:, None] * y + (1 - lam[:, None]) * y_other)


def test_mixup_explicit_weights_and_shape_checks():
    x, y = torch.randn(3, 2), torch.softmax(torch.randn(3, 4), dim=1)
    x2, y2 = torch.randn(3, 2), torch.softmax(torch.randn(3, 4), dim=1)
    mixed_x, _, lam = mixup(x, y, x2, y2, weights=torch.ones(3))
    torch.testing.assert_close(mixed_x, x)
    torch.testing.assert_close(lam, torch.ones(3))
    with pytest.raises(ValueError, match="equal shapes"):
        mixup(x, y, x2[:2], y2)


def test_sigmoid_ramp():
    assert sigmoid_ramp(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_ramp(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_ramp(100, 100) == 1.0
    assert sigmoid_ramp(400, 100) == 1.0
    assert sigmoid_ramp(20, 20, 0.1) == pytest.approx(0.1)
    assert sigmoid_ramp(0, 0, 0.1) == pytest.approx(0.1)
    values = [sigmoid_ramp(t, 20, 0.1) for t in range(25)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert max(values) == pytest.approx(0.1)
