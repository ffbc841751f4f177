from __future__ import annotations

import pytest
import torch

from labeltransfer.nn import GradientReversal, grad_reverse


@pytest.mark.parametrize("weight", [0.0, 0.1, 1.0, 2.5])
def test_grad_reverse_flips_and_scales_gradient(weight):
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    out = grad_reverse(x, weight)
    torch.testing.assert_close(out, x)  # identity forward
    out.backward(upstream)
    torch.testing.assert_close(x.grad, -weight * upstream)


def test_module_weight_is_settable_and_adversary_gets_full_gradient():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(5, 4)
    adversary = torch.nn.Linear(4, 2)
    layer = GradientReversal(weight=1.0)
    x = torch.randn(8, 5)

    def grads(weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        encoder.zero_grad()
        adversary.zero_grad()
        layer.weight = weight
        adversary(layer(encoder(x))).pow(2).sum().backward()
        return encoder.weight.grad.clone(), adversary.weight.grad.clone()

    enc_plain = torch.autograd.grad(adversary(encoder(x)).pow(2).sum(), encoder.weight)[0]
    enc_1, adv_1 = grads(1.0)
    enc_01, adv_01 = grads(0.1)
    torch.testing.assert_close(enc_1, -enc_plain)
    torch.testing.assert_close(enc_01, -0.1 * enc_plain)
    torch.testing.assert_close(adv_01, adv_1)  # the adversary is trained at full strength
    assert "weight=0.1" in repr(layer)
