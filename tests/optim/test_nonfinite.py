"""Non-finite gradients or statistics (no scaler): the step is skipped, nothing changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from tests.optim.nested import nested_tensors, same_state, state_snapshot

OPTIMIZERS: dict[str, Callable[[nn.Module], Any]] = {
    "singd": lambda m: SINGD(
        m, lr=0.05, T=1, lr_cov=0.1, weight_decay=1e-2, warn_unsupported=False
    ),
    "singd-structured": lambda m: SINGD(
        m, lr=0.05, T=1, structures=("tril", "diagonal"), warn_unsupported=False
    ),
    "kfac": lambda m: KFAC(m, lr=0.05, T=1, lr_cov=0.1, warn_unsupported=False),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), nn.LayerNorm(2))


def _inputs(step: int) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(step))


def _warm_up(name: str) -> tuple[nn.Module, Any]:
    model = _model()
    opt = OPTIMIZERS[name](model)
    for step in range(2):
        opt.zero_grad()
        model(_inputs(step)).square().mean().backward()
        opt.step()
    return model, opt


def _poison_gradient(model: nn.Module, opt: Any) -> None:
    model(_inputs(2)).square().mean().backward()
    model[2].bias.grad[0] = float("nan")


def _poison_fallback_gradient(model: nn.Module, opt: Any) -> None:
    model(_inputs(2)).square().mean().backward()
    model[3].weight.grad[1] = float("inf")


def _poison_statistics(model: nn.Module, opt: Any) -> None:
    """Finite gradients, non-finite statistics: an inf input whose gradient path is cut."""
    x = _inputs(2)
    hidden = model[1](model[0](x))
    model[2](hidden + torch.where(torch.arange(3) == 0, float("inf"), 0.0)).sum().mul(0).backward()
    for p in model.parameters():  # gradients are zero or NaN here; make them finite
        if p.grad is not None:
            p.grad.nan_to_num_(0.0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize(
    "poison",
    [_poison_gradient, _poison_fallback_gradient, _poison_statistics],
    ids=["layer-grad", "fallback-grad", "statistics"],
)
def test_nonfinite_step_is_skipped_and_changes_nothing(name, poison):
    model, opt = _warm_up(name)
    before = state_snapshot(opt, model)
    opt.zero_grad()
    poison(model, opt)
    with pytest.warns(UserWarning, match="skipped"):
        opt.step()
    assert same_state(before, state_snapshot(opt, model))
    assert opt.steps == 2

    opt.zero_grad()  # the statistics were dropped: the next step uses only its own pass
    model(_inputs(3)).square().mean().backward()
    opt.step()
    assert opt.steps == 3
    assert all(torch.isfinite(t).all() for t in nested_tensors(opt.state_dict()))


def test_each_skip_warns():
    model, opt = _warm_up("singd")
    for _ in range(2):
        opt.zero_grad()
        _poison_gradient(model, opt)
        with pytest.warns(UserWarning, match="non-finite gradients"):
            opt.step()


def _poison_output_gradient(model: nn.Module, opt: Any) -> None:
    """Finite parameter gradients, a non-finite output gradient of layer '2' (so ``H_C``).

    The optimizer's tensor hook on the layer output runs first (registered at
    its construction) and sees the inf/NaN gradient; a later hook zeroes it
    for the rest of the backward.
    """

    def zero_later(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        output.register_hook(torch.zeros_like)

    handle = model[2].register_forward_hook(zero_later)
    try:
        model(_inputs(2)).sum().mul(float("inf")).backward()
    finally:
        handle.remove()
    for p in model.parameters():  # the LayerNorm's gradients are NaN: make them finite
        p.grad.nan_to_num_(0.0)


@pytest.mark.parametrize(
    ("name", "poison", "expected"),
    [
        ("singd", _poison_gradient, "non-finite gradients: layer '2': bias gradient non-finite"),
        ("kfac", _poison_gradient, "non-finite gradients: layer '2': bias gradient non-finite"),
        ("singd", _poison_fallback_gradient, "elementwise layer '3': weight gradient non-finite"),
        ("kfac", _poison_fallback_gradient, "parameter '3.weight' gradient non-finite"),
        (
            "singd",
            _poison_statistics,
            "non-finite curvature statistics: "
            "layer '2': H_K (curvature statistic of the layer inputs) non-finite",
        ),
        ("kfac", _poison_statistics, "layer '2': U (curvature statistic of the layer inputs)"),
        (
            "singd-structured",
            _poison_output_gradient,
            "non-finite curvature statistics: "
            "layer '2': H_C (curvature statistic of the output gradients) non-finite",
        ),
        ("kfac", _poison_output_gradient, "layer '2': Gc (curvature statistic of the output"),
    ],
)
def test_skip_warning_names_the_layer_and_tensor(name, poison, expected):
    model, opt = _warm_up(name)
    before = state_snapshot(opt, model)
    opt.zero_grad()
    poison(model, opt)
    with pytest.warns(UserWarning, match="skipped") as caught:
        opt.step()
    assert [expected in str(w.message) for w in caught] == [True], [str(w.message) for w in caught]
    assert same_state(before, state_snapshot(opt, model))


def test_overflowing_update_is_named():
    """A gradient of 2^20 × order one is finite in float32 but overflows float16 factors'
    preconditioning (on a step without statistics, T = 2): the update is named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = SINGD(model, T=2, preconditioner_dtype=(torch.float16, torch.float16))
    model(_inputs(0)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    model(_inputs(1)).square().mean().mul(2.0**20).backward()
    with pytest.warns(UserWarning, match="skipped") as caught:
        opt.step()
    (message,) = [str(w.message) for w in caught]
    assert "non-finite factors or update after the factor step: " in message
    assert "layer '0': weight update non-finite" in message and opt.steps == 1


@pytest.mark.parametrize(
    "preconditioner",
    [
        "dense",
        "diagonal",
        "block3diagonal",
        "hierarchical2_3",
        "tril",
        "triltoeplitz",
        "triubottomrightdiagonal",
        "kfac",
    ],
)
@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["weight", "bias"])
@pytest.mark.parametrize("statistics", [True, False], ids=["statistics-step", "plain-step"])
def test_a_nonfinite_gradient_is_named_through_its_direction(
    preconditioner, special, where, statistics
):
    """The gradients are checked through the directions (a taken step never reads them):
    a non-finite entry still skips the step as ``non-finite gradients``, named, state
    unchanged — on steps with statistics (T = 1, their factor step runs on finite
    statistics) and without (the second step of T = 2), through every structure's
    preconditioner and KFAC's, also where ``K``, ``C`` hold exact zeros (``inf · 0`` is NaN)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))
    T = 1 if statistics else 2
    if preconditioner == "kfac":
        opt: Any = KFAC(model, T=T, lr=0.1)
    else:
        opt = SINGD(model, T=T, structures=(preconditioner, preconditioner), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 5)).square().mean().backward()
        if opt.steps == 1:
            getattr(model[2], where).grad.view(-1)[1] = special
            before = state_snapshot(opt, model)
            with pytest.warns(UserWarning, match="non-finite gradients") as caught:
                opt.step()
            assert [
                f"layer '2': {where} gradient non-finite" in str(w.message) for w in caught
            ] == [True]
            assert same_state(before, state_snapshot(opt, model))
        else:
            opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_nonfinite_gradient_takes_precedence_over_the_statistics(name):
    """Non-finite gradients and statistics in one step: the skip names the gradients
    (read only after the statistics' check failed), as if they had been checked first."""
    model, opt = _warm_up(name)
    before = state_snapshot(opt, model)
    opt.zero_grad()
    _poison_statistics(model, opt)
    model[0].weight.grad[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="skipped") as caught:
        opt.step()
    (message,) = [str(w.message) for w in caught]
    assert "(non-finite gradients: layer '0': weight gradient non-finite)" in message, message
    assert same_state(before, state_snapshot(opt, model))
