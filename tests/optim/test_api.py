"""Public API and behaviour: drop-in signatures, layers, T semantics, accumulation, closures."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from singd import KFAC, SINGD, get_structure
from tests.tolerances import matmul_bound

SINGD_SIGNATURE = [
    ("model", inspect.Parameter.empty),
    ("params", None),
    ("lr", 0.001),
    ("momentum", 0.9),
    ("damping", 0.001),
    ("alpha1", 0.5),
    ("weight_decay", 0.0),
    ("T", 10),
    ("loss_average", "batch"),
    ("lr_cov", 1e-2),
    ("structures", ("dense", "dense")),
    ("kfac_approx", "expand"),
    ("warn_unsupported", True),
    ("kfac_like", False),
    ("preconditioner_dtype", (None, None)),
    ("init_grad_scale", 1.0),
    ("normalize_lr_cov", False),
    ("factor_guard", "compensated"),  # ours, after the public package's arguments
]
KFAC_SIGNATURE = [
    ("model", inspect.Parameter.empty),
    ("params", None),
    ("lr", 0.001),
    ("momentum", 0.9),
    ("damping", 0.001),
    ("weight_decay", 0.0),
    ("T", 10),
    ("loss_average", "batch"),
    ("lr_cov", 1e-2),
    ("kfac_approx", "expand"),
    ("warn_unsupported", True),
    ("preconditioner_dtype", None),
    ("upcast_half", False),
]


@pytest.mark.parametrize(("cls", "expected"), [(SINGD, SINGD_SIGNATURE), (KFAC, KFAC_SIGNATURE)])
def test_constructor_is_a_drop_in(cls, expected):
    parameters = list(inspect.signature(cls).parameters.values())
    assert [(p.name, p.default) for p in parameters] == expected
    assert issubclass(cls, torch.optim.Optimizer)
    assert cls._step_supports_amp_scaling is True
    assert callable(get_structure)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2, bias=False))


def _x(step: int, batch: int = 6) -> torch.Tensor:
    return torch.randn(batch, 4, generator=torch.Generator().manual_seed(step))


def test_layer_names_state_keys_and_shapes():
    opt = SINGD(_mlp())
    assert opt.layer_names() == ["0", "2"]
    state = opt.layer_state("0")
    assert set(state) == {"K", "C", "m_K", "m_C"}
    assert state["K"].dim == 5 and state["C"].dim == 3  # d_i + bias column, d_o
    assert opt.layer_state("2")["K"].dim == 3
    assert torch.equal(state["K"].to_dense(), torch.eye(5))
    assert torch.equal(state["m_C"].to_dense(), torch.zeros(3, 3))
    assert set(KFAC(_mlp()).layer_state("0")) == {"S_K", "S_C"}
    assert opt.steps == 0


def test_first_step_is_preconditioned_momentum_sgd_with_identity_factors_when_lr_cov_zero():
    """β1 = 0 keeps K = C = I: the update is momentum SGD; the buffer starts at ĝ (+ γW)."""
    model = _mlp()
    opt = SINGD(model, lr=0.1, lr_cov=0.0, T=1, weight_decay=0.01)
    model(_x(0)).square().mean().backward()
    weight = model[0].weight.detach().clone()
    grad = model[0].weight.grad.clone()
    opt.step()
    buffer = opt.state[model[0].weight]["momentum_buffer"]
    assert torch.equal(buffer, grad.add(weight, alpha=0.01))  # identity factors: exact
    assert torch.equal(model[0].weight, weight - 0.1 * buffer)


def test_factors_update_only_every_T_steps_and_become_non_symmetric():
    model = _mlp()
    opt = SINGD(model, T=3, lr=0.05, lr_cov=0.2)
    changed = []
    for step in range(7):
        before = opt.layer_state("0")["K"].to_dense()
        opt.zero_grad()
        model(_x(step)).square().mean().backward()
        opt.step()
        changed.append(not torch.equal(before, opt.layer_state("0")["K"].to_dense()))
    assert changed == [True, False, False, True, False, False, True]
    K = opt.layer_state("0")["K"].to_dense()
    assert not torch.allclose(K, K.T)  # K is not symmetric after two updates (SPEC §1.4a)


def test_no_statistics_in_eval_mode_or_without_grad():
    model = _mlp()
    opt = SINGD(model, T=1, lr=0.05)
    model.eval()
    model(_x(0)).square().mean().backward()
    opt.step()
    assert torch.equal(opt.layer_state("0")["K"].to_dense(), torch.eye(5))
    model.train()
    with torch.no_grad():
        model(_x(1))
    assert not opt._collector.pop_all()


@given(parts=st.sampled_from([2, 3, 6]), structure=st.sampled_from(["dense", "diagonal", "tril"]))
def test_gradient_accumulation_matches_the_full_batch(parts, structure):
    """Micro-batches with loss/parts summed over passes == one full-batch pass (SPEC §1.4a).

    Tolerance: the two runs differ only by rounding in the sums over rows:
    ``matmul_bound(float32, batch)`` relative per statistic, amplified by the
    two steps taken, relative to ``max|W|``.
    """
    batch = 6
    results = []
    for micro in (1, parts):
        model = _mlp()
        opt = SINGD(model, T=1, lr=0.05, lr_cov=0.1, structures=(structure, structure))
        for step in range(2):
            opt.zero_grad()
            for chunk in _x(step, batch).chunk(micro):
                (model(chunk).square().mean() / micro).backward()
            opt.step()
        results.append([p.detach() for p in model.parameters()])
    scale = max(float(p.abs().max()) for p in results[0])
    error = max(float((a - b).abs().max()) for a, b in zip(*results, strict=True))
    assert error <= 2 * matmul_bound(torch.float32, batch) * scale  # rule: docstring


def test_closure_is_evaluated_with_grad():
    model = _mlp()
    opt = SINGD(model, T=1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(_x(0)).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.steps == 1


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_linear_with_leading_dims_and_conv_variants(cls, kfac_approx):
    torch.manual_seed(0)
    convs = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same", dilation=2, bias=False),
        nn.Conv2d(4, 4, (3, 2), stride=(2, 1), padding=(1, 0), groups=2),
        nn.Conv2d(4, 2, 1, padding="valid", padding_mode="zeros"),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
    )
    sequence = nn.Linear(5, 3)
    opt = cls(
        nn.ModuleList([convs, sequence]),
        T=1,
        lr=0.05,
        kfac_approx=kfac_approx,
        loss_average="batch+sequence",
    )
    assert opt.layer_names() == ["0.0", "0.1", "0.2", "0.3", "1"]
    for step in range(2):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(step)
        image = torch.randn(3, 2, 6, 5, generator=gen)
        tokens = torch.randn(3, 4, 2, 5, generator=gen)  # two weight-sharing dims
        (convs(image).square().mean() + sequence(tokens).square().mean()).backward()
        opt.step()
    assert opt.steps == 2
    for name in opt.layer_names():
        for factor in opt.layer_state(name).values():
            dense = factor if isinstance(factor, torch.Tensor) else factor.to_dense()
            assert torch.isfinite(dense).all()
