"""The engine's AdamW: the fused kernel where torch has one, the same update as the per-tensor loop."""
import torch

from kdistill.engine.schedule import fused_adamw_available, make_adamw


def test_fused_adamw_makes_the_same_updates_as_the_plain_loop():
    start = [torch.randn(300, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(16)]
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.01}, {"params": ps[1:], "weight_decay": 0.0}]
    runs = []
    for make in (lambda ps: make_adamw(groups(ps), 1e-2), lambda ps: torch.optim.AdamW(groups(ps), lr=1e-2)):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer, g = make(params), torch.Generator().manual_seed(1)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            optimizer.step()
        runs.append((optimizer, params))
    (fused, a), (_, b) = runs
    assert fused.defaults["fused"] == fused_adamw_available()  # where torch has the CPU kernel, it is used
    for x, y in zip(a, b):
        assert not torch.equal(x, start[0] if x.shape == start[0].shape else start[1])  # it did move
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_plain_adamw_where_there_is_no_fused_kernel():
    params = (torch.nn.Parameter(torch.zeros(3)) for _ in range(2))  # a generator, as model.parameters()
    optimizer = make_adamw(params, 1e-3, device="meta")
    assert not optimizer.defaults["fused"] and len(optimizer.param_groups[0]["params"]) == 2
