"""Every invalid argument raises a ``ValueError`` naming it (constructor and param groups)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD

#: (argument, bad value) for both optimizers.
COMMON_BAD = [
    ("lr", -0.1),
    ("lr", math.nan),
    ("lr", "0.1"),
    ("lr", True),
    ("momentum", -0.1),
    ("momentum", 1.0),
    ("momentum", math.inf),
    ("damping", -1e-3),
    ("damping", math.nan),
    ("weight_decay", -1.0),
    ("weight_decay", None),
    ("T", 0),
    ("T", -1),
    ("T", 2.0),
    ("T", True),
    ("loss_average", "mean"),
    ("loss_average", "sum"),
    ("loss_average", False),
    ("lr_cov", -0.01),
    ("lr_cov", 1.5),
    ("lr_cov", math.nan),
    ("lr_cov", "0.1"),
    ("kfac_approx", "full"),
    ("kfac_approx", None),
    ("warn_unsupported", 1),
    ("warn_unsupported", None),
]
SINGD_BAD = [
    ("alpha1", -0.5),
    ("alpha1", 1.0),
    ("alpha1", math.nan),
    ("structures", "dense"),
    ("structures", ("dense",)),
    ("structures", ("dense", "sparse")),
    ("structures", ("block0diagonal", "dense")),
    ("structures", ("dense", 3)),
    ("kfac_like", "yes"),
    ("normalize_lr_cov", 0),
    ("preconditioner_dtype", torch.float32),
    ("preconditioner_dtype", (torch.int32, None)),
    ("preconditioner_dtype", (None, "float32")),
    ("preconditioner_dtype", (None,)),
    ("init_grad_scale", 0.0),
    ("init_grad_scale", -1.0),
    ("init_grad_scale", math.inf),
]
KFAC_BAD = [
    ("damping", 1.5),
    ("preconditioner_dtype", (None, None)),
    ("preconditioner_dtype", torch.int64),
    ("upcast_half", "no"),
]


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _argument_named(message: str, name: str) -> bool:
    return message.startswith(name) or f" {name}" in message or f"{name}[" in message


@pytest.mark.parametrize(("name", "value"), COMMON_BAD + SINGD_BAD)
def test_singd_rejects(name, value):
    with pytest.raises(ValueError) as info:
        SINGD(_model(), **{name: value})
    assert _argument_named(str(info.value), name), str(info.value)


@pytest.mark.parametrize(("name", "value"), COMMON_BAD + KFAC_BAD)
def test_kfac_rejects(name, value):
    with pytest.raises(ValueError) as info:
        KFAC(_model(), **{name: value})
    assert _argument_named(str(info.value), name), str(info.value)


def test_kfac_like_requires_alpha1_zero():
    with pytest.raises(ValueError, match="alpha1"):
        SINGD(_model(), kfac_like=True)  # default alpha1 = 0.5
    SINGD(_model(), kfac_like=True, alpha1=0.0)


def test_model_must_be_a_module():
    with pytest.raises(ValueError, match="model"):
        SINGD([nn.Parameter(torch.ones(2))])


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_kfac_half_precision_needs_explicit_upcast(half):
    """KFAC cannot invert in half precision: clear error, or float32 with ``upcast_half``."""
    model = _model().to(half)
    with pytest.raises(ValueError, match="upcast_half"):
        KFAC(model)
    opt = KFAC(model, upcast_half=True, T=1)
    assert opt.layer_state("0")["S_K"].dtype == torch.float32
    model(torch.randn(5, 3, dtype=half)).square().mean().backward()
    opt.step()
    assert opt.steps == 1 and model[0].weight.dtype == half


@pytest.mark.parametrize(
    ("name", "value"), [("lr", -1.0), ("structures", ("x", "dense")), ("T", 0)]
)
def test_bad_param_group_is_not_added(name, value):
    model = _model()
    opt = SINGD(model, params=model[0].parameters())
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": list(model[2].parameters()), name: value})
    assert len(opt.param_groups) == 1 and opt.layer_names() == ["0"]


def test_bad_lr_cov_schedule_output_leaves_state_untouched():
    model = _model()
    opt = SINGD(model, lr_cov=lambda step: 2.0, T=1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3)).square().mean().backward()
    with pytest.raises(ValueError, match="lr_cov"):
        opt.step()
    assert opt.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert torch.equal(opt.layer_state("0")["K"].to_dense(), torch.eye(4))


def test_unknown_layer_name():
    with pytest.raises(ValueError, match="nope"):
        SINGD(_model()).layer_state("nope")


def test_attach_grad_scaler_rejects_other_objects():
    with pytest.raises(ValueError, match="scaler"):
        SINGD(_model()).attach_grad_scaler(object())
