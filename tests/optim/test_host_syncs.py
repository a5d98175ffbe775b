"""Host syncs of a step do not grow with the number of layers (reads are batched)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD

READS = ("tolist", "item", "__float__", "__bool__", "__int__")


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every tensor → Python conversion from now on."""
    calls: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("depth", [1, 4])
@pytest.mark.parametrize(
    "make",
    [
        lambda m: SINGD(m, T=1, structures=("tril", "diagonal")),
        lambda m: SINGD(m, T=1, kfac_like=True, alpha1=0.0),
        lambda m: SINGD(m, T=1, telemetry=True),  # telemetry records on the device
        lambda m: KFAC(m, T=1),
    ],
)
def test_a_statistics_step_reads_the_host_twice(monkeypatch, make, depth):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(depth)])
    opt = make(model)
    model(torch.randn(4, 3)).square().mean().backward()
    calls = _count_reads(monkeypatch)
    opt.step()
    assert calls == ["tolist", "tolist"]  # flags + traces; the results' flags
