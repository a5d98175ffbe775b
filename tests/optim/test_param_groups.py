"""Param groups with their own hyper-parameters and structures; lr schedulers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _step(model: nn.Module, opt, step: int) -> None:
    opt.zero_grad()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
    model(x).square().mean().backward()
    opt.step()


def test_groups_carry_their_own_structures_and_T():
    model = _model()
    opt = SINGD(
        model,
        params=[
            {"params": model[0].parameters(), "structures": ("diagonal", "tril"), "T": 1},
            {"params": model[2].parameters(), "T": 3, "lr": 0.5},
        ],
        lr=0.1,
    )
    assert opt.layer_state("0")["K"].name == "diagonal"
    assert opt.layer_state("0")["C"].name == "tril"
    assert opt.layer_state("2")["K"].name == "dense"
    changed = {"0": [], "2": []}
    for step in range(5):
        previous = {name: opt.layer_state(name)["K"].to_dense() for name in changed}
        _step(model, opt, step)
        for name in changed:
            after = opt.layer_state(name)["K"].to_dense()
            changed[name].append(not torch.equal(previous[name], after))
    assert changed["0"] == [True] * 5
    assert changed["2"] == [True, False, False, True, False]  # steps % 3 == 0


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_weight_and_bias_in_different_groups_is_rejected(cls):
    model = _model()
    with pytest.raises(ValueError, match="same param group"):
        cls(
            model,
            params=[
                {"params": [model[0].weight, model[2].weight, model[2].bias]},
                {"params": [model[0].bias]},
            ],
        )


def test_bias_left_out_while_it_requires_grad_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match=r"'0'.*same param group"):
        SINGD(model, params=[model[0].weight])


def test_frozen_bias_is_not_a_column():
    model = _model()
    model[0].bias.requires_grad_(False)
    opt = SINGD(model, params=[p for p in model.parameters() if p.requires_grad])
    assert opt.layer_state("0")["K"].dim == 4 and opt.layer_state("2")["K"].dim == 4


def test_subset_of_layers_and_add_param_group():
    model = _model()
    opt = SINGD(model, params=model[0].parameters(), lr=0.1)
    assert opt.layer_names() == ["0"]
    frozen = [p.detach().clone() for p in model[2].parameters()]
    _step(model, opt, 0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[2].parameters(), strict=True))
    opt.add_param_group({"params": model[2].parameters(), "structures": ("diagonal", "diagonal")})
    assert opt.layer_names() == ["0", "2"]
    assert opt.layer_state("2")["K"].name == "diagonal"
    _step(model, opt, 1)
    assert not torch.equal(frozen[0], model[2].weight)


def test_lr_scheduler_drives_the_group_lr():
    """With momentum 0 and a schedule that sets lr = 0 from step 2, parameters freeze."""
    model = _model()
    opt = SINGD(model, lr=0.1, momentum=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 2 else 0.0)
    for step in range(2):
        _step(model, opt, step)
        scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters(), strict=True))
    assert opt.steps == 3


def test_lr_cov_schedule_receives_completed_steps():
    seen: list[int] = []
    model = _model()
    opt = SINGD(model, T=2, lr_cov=lambda step: seen.append(step) or 0.01)
    for step in range(5):
        _step(model, opt, step)
    assert seen == [0, 0, 2, 2, 4, 4]  # once per layer at every statistics step
