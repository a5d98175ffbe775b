"""``SingdPreconditioner.outers``: the kept ``K Kᵀ``, ``C Cᵀ`` of ``T > 1``, once a factor step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singd import SINGD
from singd.structures.base import StructuredMatrix


def _count_self_outer(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for cls in {type(m) for m in _structures()}:
        original = cls.self_outer

        def counted(self, _original=original):
            result = _original(self)
            if result is not None:  # the structure keeps K Kᵀ
                calls.append(self.name)
            return result

        monkeypatch.setattr(cls, "self_outer", counted)
    return calls


def _structures() -> list[StructuredMatrix]:
    from singd.structures import get_structure

    return [get_structure(name).eye(2) for name in ("dense", "block3diagonal", "tril")]


def _train(opt: SINGD, model: nn.Module, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=generator)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize(
    ("structures", "T", "per_factor_step"),
    [
        (("dense", "dense"), 3, 2),  # K Kᵀ and C Cᵀ after each factor step
        (("block3diagonal", "dense"), 3, 2),
        (("tril", "dense"), 3, 1),  # a triangular K Kᵀ is dense: not kept
        (("diagonal", "dense"), 3, 1),  # k² ⊙ X needs no cache
        (("dense", "dense"), 1, 0),  # T = 1: P would cost what it saves
    ],
)
def test_outer_formed_once_per_factor_step(monkeypatch, structures, T, per_factor_step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = SINGD(model, T=T, structures=structures)
    calls = _count_self_outer(monkeypatch)
    _train(opt, model, 7)  # factor steps at steps 0, 3, 6 (T = 3)
    factor_steps = len(range(0, 7, T)) if T > 1 else 0
    assert len(calls) == 2 * per_factor_step * factor_steps  # two layers
    assert not any("outer" in key for key in opt.state_dict()["kronecker"]["layers"]["0"])


def test_outer_refreshed_after_load_state_dict(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = SINGD(model, T=3)
    _train(opt, model, 2)
    calls = _count_self_outer(monkeypatch)
    opt.load_state_dict(opt.state_dict())  # new K, C objects: the kept products are stale
    _train(opt, model, 1)  # step 2: no factor step, but the factors were replaced
    assert calls == ["dense", "dense"]
