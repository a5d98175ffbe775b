"""Public API and behaviour: drop-in signatures, layers, T semantics, accumulation, closures."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from singd import KFAC, SINGD, get_structure, structures
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
    ("telemetry", False),  # ours
    ("fallback", "sgd"),
    ("fallback_betas", (0.9, 0.999)),
    ("fallback_eps", 1e-8),
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
    ("fallback", "sgd"),
    ("fallback_betas", (0.9, 0.999)),
    ("fallback_eps", 1e-8),
]


@pytest.mark.parametrize(("cls", "expected"), [(SINGD, SINGD_SIGNATURE), (KFAC, KFAC_SIGNATURE)])
def test_constructor_is_a_drop_in(cls, expected):
    parameters = list(inspect.signature(cls).parameters.values())
    assert [(p.name, p.default) for p in parameters] == expected
    assert issubclass(cls, torch.optim.Optimizer)
    assert cls._step_supports_amp_scaling is True


@pytest.mark.parametrize("name", ["dense", "diagonal", "block30diagonal", "hierarchical15_15"])
def test_get_structure_from_the_package_root_is_the_registry(name: str) -> None:
    """``singd.get_structure`` is the registry's lookup: the class, named as asked, one per name."""
    cls = get_structure(name)
    assert cls is structures.get_structure(name)
    assert cls.name == name and issubclass(cls, structures.StructuredMatrix)
    assert cls.eye(3).to_dense().equal(torch.eye(3))  # identity in every structure: exact


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


def test_closure_is_evaluated_once_with_grad_and_steps_like_backward_then_step():
    """``step(closure)`` runs the closure once, with grad enabled, returns its loss, and takes
    the same step as ``backward()`` then ``step()``: the same operations on the same
    numbers, so parameters and factors are compared bitwise."""
    model, reference = _mlp(), _mlp()
    opt = SINGD(model, T=1, lr=0.05, lr_cov=0.1)
    reference_opt = SINGD(reference, T=1, lr=0.05, lr_cov=0.1)
    grad_enabled: list[bool] = []

    def closure() -> torch.Tensor:
        grad_enabled.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model(_x(0)).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    reference_opt.zero_grad()
    expected = reference(_x(0)).square().mean()
    expected.backward()
    reference_opt.step()
    assert grad_enabled == [True]
    assert opt.steps == 1
    assert torch.equal(loss, expected)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(reference_opt.layer_state("0")["K"].to_dense(), torch.eye(5))
    for name in opt.layer_names():
        for key, factor in opt.layer_state(name).items():
            assert torch.equal(
                factor.to_dense(), reference_opt.layer_state(name)[key].to_dense()
            ), (name, key)


def _variant_layers() -> tuple[nn.Sequential, nn.Linear]:
    """Convolutions with every padding variant, and a Linear fed two weight-sharing dims."""
    torch.manual_seed(0)
    convs = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same", dilation=2, bias=False),
        nn.Conv2d(4, 4, (3, 2), stride=(2, 1), padding=(1, 0), groups=2),
        nn.Conv2d(4, 2, 1, padding="valid", padding_mode="zeros"),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
    )
    return convs, nn.Linear(5, 3)


def _explicit_layers(convs: nn.Sequential, sequence: nn.Linear) -> tuple[nn.Sequential, nn.Linear]:
    """The same layers and weights with every padding written out: ``"same"`` with dilation 2
    and kernel 3 is 2 on each side, ``"valid"`` is 0, reflect padding is a
    ``ReflectionPad2d`` in front of an unpadded convolution."""
    explicit = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=2, dilation=2, bias=False),
        nn.Conv2d(4, 4, (3, 2), stride=(2, 1), padding=(1, 0), groups=2),
        nn.Conv2d(4, 2, 1, padding=0),
        nn.ReflectionPad2d(1),
        nn.Conv2d(2, 2, 3, padding=0),
    )
    for target, source in zip((0, 1, 2, 4), convs, strict=True):
        explicit[target].load_state_dict(source.state_dict())
    linear = nn.Linear(5, 3)
    linear.load_state_dict(sequence.state_dict())
    return explicit, linear


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_conv_variants_and_two_sharing_dims_match_their_explicit_forms(cls, kfac_approx):
    """Padding ``"same"``/``"valid"``/reflect and a Linear on ``[B, 4, 2, d]`` give the state
    of the same layers with the padding written out and the input flattened to
    ``[B, 8, d]``: the same patches in the same order, so the same operations on the same
    numbers — compared bitwise after two steps (a padding mode the statistics ignored would
    change every patch on the border)."""
    convs, sequence = _variant_layers()
    explicit, flat = _explicit_layers(convs, sequence)
    hyper = {"T": 1, "lr": 0.05, "kfac_approx": kfac_approx, "loss_average": "batch+sequence"}
    opt = cls(nn.ModuleList([convs, sequence]), **hyper)
    reference = cls(nn.ModuleList([explicit, flat]), **hyper)
    assert opt.layer_names() == ["0.0", "0.1", "0.2", "0.3", "1"]
    assert reference.layer_names() == ["0.0", "0.1", "0.2", "0.4", "1"]
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        image = torch.randn(3, 2, 6, 5, generator=gen)
        tokens = torch.randn(3, 4, 2, 5, generator=gen)  # two weight-sharing dims
        opt.zero_grad()
        (convs(image).square().mean() + sequence(tokens).square().mean()).backward()
        opt.step()
        reference.zero_grad()
        flat_tokens = tokens.reshape(3, 8, 5)
        (explicit(image).square().mean() + flat(flat_tokens).square().mean()).backward()
        reference.step()
    assert opt.steps == reference.steps == 2
    for name, explicit_name in zip(opt.layer_names(), reference.layer_names(), strict=True):
        state, expected = opt.layer_state(name), reference.layer_state(explicit_name)
        assert set(state) == set(expected)
        for key, factor in state.items():
            dense = factor if isinstance(factor, torch.Tensor) else factor.to_dense()
            want = expected[key]
            want = want if isinstance(want, torch.Tensor) else want.to_dense()
            assert torch.equal(dense, want), (name, key)
    fresh = cls(nn.ModuleList(_variant_layers()), **hyper)
    for name in opt.layer_names():  # not vacuous: every factor has left its initial value
        for key, factor in opt.layer_state(name).items():
            start = fresh.layer_state(name)[key]
            dense = factor if isinstance(factor, torch.Tensor) else factor.to_dense()
            start = start if isinstance(start, torch.Tensor) else start.to_dense()
            assert not torch.equal(dense, start), (name, key)
    for p, q in zip(convs.parameters(), (p for m in explicit for p in m.parameters()), strict=True):
        assert torch.equal(p, q)
