"""The step-ratio models (asv_benches/benchmarks/ratios.py): the like-for-like transformer row.

On ``transformer-linear`` every optimizer is given the ``nn.Linear`` parameters only, the
public package's set (it leaves the LayerNorms untrained), so that ours / public compares
the same work.  Exact: which parameters a step moves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "asv_benches"))
from benchmarks.ratios import _model_and_batch, _stepper, _trained

from singd.optim.optimizer import SINGD


def _moved(kind: str, make: str) -> dict[str, bool]:
    """Which parameters of ``kind``'s model one step of ``make`` changes."""
    model, inputs, targets = _model_and_batch(kind)
    trained = _trained(kind, model)
    if make == "singd":
        optimizer = SINGD(model, trained, warn_unsupported=False, T=1, structures=("diagonal",) * 2)
    else:
        optimizer = torch.optim.AdamW(trained or model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _stepper(model, optimizer, inputs, targets)()
    return {name: not torch.equal(p, before[name]) for name, p in model.named_parameters()}


@pytest.mark.parametrize("make", ["singd", "adamw"])
def test_the_like_for_like_row_trains_the_linear_parameters_only(make: str) -> None:
    model, _, _ = _model_and_batch("transformer-linear")
    linear = {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        for name, _ in module.named_parameters()
    }
    moved = _moved("transformer-linear", make)
    assert {name for name, changed in moved.items() if changed} == linear
    everything = _moved("transformer", make)  # the other row trains the LayerNorms too
    assert all(everything.values())
