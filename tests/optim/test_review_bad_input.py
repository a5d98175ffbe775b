"""Adversarial review: bad input to the optimizers gets a clear error or a tested behaviour.

Each test names one case the other bad-input tests (``test_validation``,
``test_nonfinite``, ``test_checkpoint``, ``test_unsupported``,
``test_param_groups``) do not cover.  Where an error is expected, the test also
checks that no optimizer or model state changed.  Comparisons are bitwise
(``torch.equal``): nothing is computed, only kept or not.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from tests.optim.nested import nested_tensors, same_state, state_snapshot


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _train(model: nn.Module, opt: Any, steps: int, batch: int = 5) -> None:
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(batch, 3, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()


def _hook_counts(model: nn.Module) -> list[int]:
    return [len(module._forward_hooks) for module in model.modules()]


# ------------------------------------------------------------- construction
def test_failed_construction_leaves_no_hooks_on_the_model():
    """KFAC rejects a half-precision layer after a float32 one: the model keeps no hook."""
    model = _model()
    model[2].to(torch.bfloat16)
    with pytest.raises(ValueError, match="upcast_half"):
        KFAC(model)
    assert _hook_counts(model) == [0] * len(list(model.modules()))


def test_failed_construction_by_warning_as_error_leaves_no_hooks():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.PReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="momentum SGD"):
            SINGD(model)
    assert _hook_counts(model) == [0, 0, 0, 0]


def test_failed_add_param_group_registers_no_layer():
    """A group rejected half-way through its layers leaves no layer, state or hook behind."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2).to(torch.bfloat16))
    opt = KFAC(model, params=model[0].parameters(), T=1)
    hooks = _hook_counts(model)
    with pytest.raises(ValueError, match="upcast_half"):
        opt.add_param_group({"params": [*model[1].parameters(), *model[2].parameters()]})
    assert len(opt.param_groups) == 1 and opt.layer_names() == ["0"]
    assert _hook_counts(model) == hooks
    model[0](torch.randn(2, 3)).sum().backward()  # still trains
    opt.step()
    assert opt.steps == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lr", 10**400),  # int too large for a float
        ("loss_average", np.array(["batch", "batch"])),
        ("kfac_approx", np.array(["expand", "reduce"])),
    ],
    ids=["huge-int", "array", "array"],
)
def test_odd_hyper_parameter_types_name_the_argument(name, value):
    with pytest.raises(ValueError, match=f"^{name}"):
        SINGD(_model(), **{name: value})


def test_odd_preconditioner_dtype_names_the_argument():
    with pytest.raises(ValueError, match=r"^preconditioner_dtype\[0\]"):
        SINGD(_model(), preconditioner_dtype=(np.array([1, 2]), None))


# ------------------------------------------------------------ frozen params
def test_frozen_weight_with_trainable_bias_falls_back():
    """Weight frozen (BitFit): the layer is not Kronecker-preconditioned, the bias gets SGD."""
    model = _model()
    model[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"0\.bias"):
        opt = SINGD(model, lr=0.5, momentum=0.0, T=1)
    assert opt.layer_names() == ["2"]
    weight, bias = model[0].weight.clone(), model[0].bias.detach().clone()
    model(torch.randn(5, 3)).square().mean().backward()
    grad = model[0].bias.grad.clone()
    opt.step()
    assert torch.equal(model[0].weight, weight)
    assert torch.equal(model[0].bias.detach(), bias - 0.5 * grad)  # one rounding either way


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_frozen_parameter_passed_explicitly_is_never_changed(frozen):
    """A parameter with ``requires_grad=False`` keeps its value, like in torch's SGD."""
    model = _model()
    getattr(model[0], frozen).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SINGD(model, params=list(model.parameters()), lr=0.1, T=1, weight_decay=0.1)
    value = getattr(model[0], frozen).detach().clone()
    _train(model, opt, 2)
    assert torch.equal(getattr(model[0], frozen), value)


def test_complex_layers_fall_back_to_sgd():
    """The factor algebra is real (transposes, not adjoints): complex layers fall back."""
    model = nn.Linear(3, 2, dtype=torch.complex64)
    with pytest.warns(UserWarning, match="momentum SGD"):
        opt = SINGD(model, T=1)
    assert opt.layer_names() == []
    model(torch.randn(4, 3, dtype=torch.complex64)).abs().sum().backward()
    opt.step()
    assert opt.steps == 1


# ------------------------------------------------------------------- steps
@pytest.mark.parametrize("structure", ["dense", "triltoeplitz", "hierarchical2_3"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_empty_batch_forward_and_step_work(structure, layer):
    """A batch of 0 samples must not break the forward pass through the hooks."""
    if layer == "linear":
        model: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        x = torch.zeros(0, 3)
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 2))
        x = torch.zeros(0, 2, 4, 4)
    opt = SINGD(model, T=1, structures=(structure, structure))
    model(x).sum().backward()
    opt.step()
    assert opt.steps == 1
    assert all(torch.isfinite(t).all() for t in nested_tensors(opt.state_dict()))


def test_sparse_gradient_is_a_clear_error_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Linear(3, 2))
    opt = SINGD(model, T=1, warn_unsupported=False)
    before = state_snapshot(opt, model)
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"sparse.*'0\.weight'"):
        opt.step()
    assert opt.steps == 0
    assert same_state(before, state_snapshot(opt, model))


# -------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("key", ["lr", "T", "params", "damping"])
def test_checkpoint_group_missing_a_key_is_a_value_error(key):
    model = _model()
    opt = SINGD(model, T=1, lr=0.05)
    _train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0].pop(key)
    before = state_snapshot(opt, model)
    with pytest.raises(ValueError, match=f"load_state_dict.*{key}"):
        opt.load_state_dict(saved)
    assert opt.steps == 2 and same_state(before, state_snapshot(opt, model))


@pytest.mark.parametrize("params", [[0, 1, 3, 2], [0, 0, 1, 2], [1, 2, 3, 4]])
def test_checkpoint_param_indices_must_match_the_buffers(params):
    """Torch maps buffers to parameters through the saved ``params`` lists; a permuted or
    duplicated list would attach a ``(2,)`` buffer to a ``(2, 4)`` weight."""
    model = _model()
    opt = SINGD(model, T=1, lr=0.05)
    _train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["params"] = params
    before = state_snapshot(opt, model)
    with pytest.raises(ValueError, match="load_state_dict"):
        opt.load_state_dict(saved)
    assert opt.steps == 2 and same_state(before, state_snapshot(opt, model))


def test_kfac_checkpoint_with_indefinite_factor_is_rejected():
    """A finite but indefinite ``S_K`` would make every later step fail in Cholesky."""
    model = _model()
    opt = KFAC(model, T=1, lr=0.05, damping=1e-3)
    _train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    saved["kronecker"]["layers"]["0"]["factors"]["S_K"]["matrix"].neg_()
    before = state_snapshot(opt, model)
    with pytest.raises(ValueError, match=r"load_state_dict.*0\.S_K.*positive definite"):
        opt.load_state_dict(saved)
    assert opt.steps == 2 and same_state(before, state_snapshot(opt, model))
    _train(model, opt, 1)


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_frozen_bias_layer_trains(cls):
    """A frozen bias is not a column of ``W~`` (tested in ``test_param_groups``); the
    statistics must agree, or the first training forward raises."""
    model = _model()
    model[0].bias.requires_grad_(False)
    bias = model[0].bias.clone()
    opt = cls(model, params=[p for p in model.parameters() if p.requires_grad], T=1)
    _train(model, opt, 2)
    assert opt.steps == 2 and torch.equal(model[0].bias, bias)


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_weight_frozen_after_construction_is_not_moved(cls):
    """A parameter without a gradient is not updated (as in torch's SGD), even when the
    other half of its ``W~`` has one: the preconditioner must not leak into it."""
    model = _model()
    opt = cls(model, T=1, lr=0.1)
    _train(model, opt, 1)
    model[0].weight.requires_grad_(False)
    weight = model[0].weight.clone()
    _train(model, opt, 2)
    assert torch.equal(model[0].weight, weight)
