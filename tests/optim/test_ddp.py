"""``DistributedDataParallel``/``DataParallel`` models are accepted; hooks go on the inner module.

A one-process gloo group on CPU: DDP averages gradients over one rank
(division by 1, exact) and statistics are not reduced, so the wrapped run
equals the plain run bitwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from singd import KFAC, SINGD


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    )


def _train(model: nn.Module, opt, steps: int = 3) -> None:
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()


@pytest.fixture
def gloo_group(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_ddp_wrapped_model_trains_like_the_plain_model(gloo_group, cls):
    plain = _model()
    plain_opt = cls(plain, lr=0.05, T=1)
    _train(plain, plain_opt)

    inner = _model()
    wrapped = nn.parallel.DistributedDataParallel(inner)
    opt = cls(wrapped, lr=0.05, T=1)
    assert opt.layer_names() == ["0", "3"]  # names of the unwrapped model
    _train(wrapped, opt)
    for a, b in zip(plain.parameters(), inner.parameters(), strict=True):
        assert torch.equal(a, b)  # rule: module docstring (bitwise)


def test_data_parallel_wrapped_model_is_accepted():
    inner = _model()
    opt = SINGD(nn.DataParallel(inner), lr=0.05, T=1)
    assert opt.layer_names() == ["0", "3"]
    before = opt.layer_state("3")["K"].to_dense()
    _train(nn.DataParallel(inner), opt, steps=1)
    assert not torch.equal(before, opt.layer_state("3")["K"].to_dense())
