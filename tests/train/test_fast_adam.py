"""fast_adam: PyTorch's fused Adam on a CPU, the same updates as the default one."""

from __future__ import annotations

import torch

from labeltransfer.train._trainingplan import fast_adam


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape)) for shape in ((64, 30), (64,), (5, 64))]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return torch.cat([p.detach().ravel() for p in params])


def test_fused_on_cpu_and_same_updates():
    params = _params()
    optimizer = fast_adam(params, lr=1e-2, eps=1e-8, weight_decay=1e-4)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.defaults["fused"] is True
    reference = _params()
    expected = _train(torch.optim.Adam(reference, lr=1e-2, eps=1e-8, weight_decay=1e-4), reference)
    torch.testing.assert_close(_train(optimizer, params), expected, rtol=0, atol=1e-5)


def test_parameter_groups_and_adamw():
    encoder, head = _params()[:2], _params()[2:]
    optimizer = fast_adam(
        [{"params": iter(encoder)}, {"params": iter(head), "lr": 0.5}], adamw=True, lr=1e-3
    )
    assert type(optimizer) is torch.optim.AdamW
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 1]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 0.5]
