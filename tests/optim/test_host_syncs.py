"""Host syncs of a step do not grow with the number of layers (reads are batched).

Besides the reads into Python, a CUDA step would wait for the device at every
operator whose output size or value on the host depends on the device's data
(``masked_select``, ``nonzero``, boolean indexing, ``item``): torch tags those
operators ``dynamic_output_shape`` or ``data_dependent_output`` in its own
operator registry, and a dispatch mode sees every operator the step runs, so
the check holds on the CPU by construction.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from singd import KFAC, SINGD
from singd.structures import STRUCTURE_NAMES

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


#: torch's tags of operators whose output size or host value depends on device data.
DATA_DEPENDENT_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)


class DataDependentOps(TorchDispatchMode):
    """Records the name of every dispatched operator tagged with a :data:`DATA_DEPENDENT_TAGS`."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        if any(tag in func.tags for tag in DATA_DEPENDENT_TAGS):
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
def test_a_statistics_step_runs_no_data_dependent_operator(structure):
    """Exact: a second statistics step (every lazy path taken) runs no such operator."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))
    opt = SINGD(model, T=1, structures=(structure, structure))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        with DataDependentOps() as recorded:
            opt.step()
    assert recorded.names == []


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_a_step_without_statistics_reads_the_host_once(monkeypatch, structure):
    """Without statistics the gradients' finiteness is read with the results' (one read)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    opt = SINGD(model, T=2, structures=(structure, structure))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).square().mean().backward()
        if opt.steps == 1:
            calls = _count_reads(monkeypatch)
        opt.step()
    assert calls == ["tolist"]
