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
    ],
)
def test_outer_formed_once_per_factor_step(monkeypatch, structures, T, per_factor_step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = SINGD(model, T=T, structures=structures)
    calls = _count_self_outer(monkeypatch)
    _train(opt, model, 7)  # factor steps at steps 0, 3, 6 (T = 3)
    assert len(calls) == 2 * per_factor_step * len(range(0, 7, T))  # two layers
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


@pytest.mark.parametrize(
    ("structures", "formed"),
    [
        # 30 → 40: K is 31 × 31, C 40 × 40.  Block3 K: n_K = 10·9 + 1 = 91, 2·91 ≤ 31·40;
        # a dense C (2·40 > 31) and a dense K (2·31 > 40) keep their two products.
        (("block3diagonal", "dense"), ["block3diagonal"]),
        (("dense", "dense"), []),
        (("dense", "block3diagonal"), ["block3diagonal"]),  # n_C = 13·9 + 1, 2·118 ≤ 40·31
        (("tril", "diagonal"), []),  # not closed under K Kᵀ; k² ⊙ X needs none
    ],
)
def test_outer_formed_every_step_at_t1_where_it_pays(monkeypatch, structures, formed):
    """``T = 1``: ``P`` only where it costs at most half the product it saves, every step,
    and never kept (``outer_pays_for_one_product``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40))
    opt = SINGD(model, T=1, structures=structures)
    calls = _count_self_outer(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 30, generator=generator)).square().mean().backward()
        opt.step()
    assert calls == formed * 3
    assert not opt._preconditioner._outer_cache


def test_outer_pays_for_one_product_at_its_break_even():
    """``2 n_F ≤ d · m``: the dense rule is ``2d ≤ m`` exactly, block sizes count per row."""
    from singd.optim.updates import outer_pays_for_one_product
    from singd.structures import get_structure

    dense, block = get_structure("dense"), get_structure("block30diagonal")
    assert outer_pays_for_one_product(dense, 256, 512)
    assert not outer_pays_for_one_product(dense, 256, 511)
    assert outer_pays_for_one_product(block, 513, 60)  # n = 17·900 + 9: 2n = 30 618 ≤ 30 780
    assert not outer_pays_for_one_product(block, 513, 59)
    for name in ("diagonal", "tril", "hierarchical15_15", "triltoeplitz"):
        assert not outer_pays_for_one_product(get_structure(name), 513, 10_000)
