"""The optimizer's layer table with kinds: registration, fallbacks, ``model.to``, ``torch.compile``.

Rules: runs that must be the same computation are compared bitwise
(``torch.equal``); the inductor comparison's bound is stated at the test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD, LayerKind, register_layer_kind, unregister_layer_kind
from singd.optim.kinds import LinearKind
from singd.structures.diagonal import Diagonal
from tests.tolerances import EPS


class Scaled(nn.Linear):
    """The registration example (singd.optim.kinds): ``forward`` is ``Linear`` on ``2x``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(2 * x, self.weight, self.bias)


class ScaledKind(LinearKind):
    name = "Scaled"

    def matches(self, module: nn.Module) -> bool:
        return type(module) is Scaled

    def input_shared(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return super().input_shared(module, 2 * x)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 3, generator=gen).to(dtype)
        model(x).square().mean().backward()
        opt.step()


def test_registered_kind_is_preconditioned_like_the_linear_it_equals():
    """A ``Scaled`` layer trains exactly like ``nn.Linear`` fed ``2x`` (same ``A``, same ``G``)."""
    torch.manual_seed(0)
    scaled = nn.Sequential(Scaled(3, 2))
    plain = nn.Sequential(nn.Linear(3, 2))
    plain.load_state_dict(scaled.state_dict())
    kind = ScaledKind()
    with pytest.warns(UserWarning, match="fallback"):
        assert SINGD(scaled).layer_names() == []  # not registered: falls back
    register_layer_kind(kind)
    try:
        opt = SINGD(scaled, lr=0.1, T=1)
    finally:
        unregister_layer_kind(kind)
    assert opt.layer_names() == ["0"]
    reference = SINGD(plain, lr=0.1, T=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, generator=gen)
        for model, optimizer, inputs in ((scaled, opt, x), (plain, reference, 2 * x)):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    assert torch.equal(scaled[0].weight, plain[0].weight)  # rule: module docstring (bitwise)
    assert torch.equal(
        opt.layer_state("0")["K"].to_dense(), reference.layer_state("0")["K"].to_dense()
    )


def test_registration_rejects_what_is_not_a_kind():
    with pytest.raises(ValueError, match="LayerKind"):
        register_layer_kind(LinearKind)  # the class, not an instance
    with pytest.raises(ValueError, match="not a registered"):
        unregister_layer_kind(ScaledKind())
    assert issubclass(ScaledKind, LayerKind)


def test_embedding_input_factor_is_diagonal_whatever_the_group_says():
    model = nn.Sequential(nn.Embedding(1000, 4), nn.Linear(4, 2))
    opt = SINGD(model, structures=("dense", "dense"), T=1)
    assert isinstance(opt.layer_state("0")["K"], Diagonal)
    assert opt.layer_state("0")["K"].dim == 1000  # stores 1000 numbers, never 1000 × 1000
    assert opt.layer_state("1")["K"].name == "dense"
    tokens = torch.randint(0, 1000, (3, 5))
    model(tokens).square().mean().backward()
    opt.step()
    assert isinstance(opt.layer_state("0")["K"], Diagonal)


def test_multihead_attention_projections_are_kronecker_layers():
    """``out_proj`` is read, not called, by MHA: it is the MHA kind's layer, never a Linear's."""
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = SINGD(model)
    names = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.out_proj"]
    assert opt.layer_names() == [*names, "linear1", "linear2"]


class _OwnAttention(nn.MultiheadAttention):
    def forward(self, query, key, value, **kwargs):
        return super().forward(query, key, value, **kwargs)


def test_multihead_attention_subclass_overriding_forward_falls_back_with_the_reason():
    model = nn.Sequential(_OwnAttention(8, 2))
    with pytest.warns(UserWarning, match="'0.q' falls back: its class overrides") as record:
        opt = SINGD(model)
    assert opt.layer_names() == []  # out_proj included: its hooks would never fire
    assert "0.out_proj.weight" in str(record[0].message)


def test_kfac_declines_embeddings():
    with pytest.warns(UserWarning, match="KFAC keeps dense factors"):
        opt = KFAC(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)))
    assert opt.layer_names() == ["1"]


# ------------------------------------------------------------------ model.to
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _dense(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value.to_dense()


@pytest.mark.parametrize("cls", [SINGD, KFAC])
def test_factors_follow_model_to_before_the_first_step(cls):
    """``model.to(float64)`` after construction = a float64 optimizer loading the state (bitwise).

    The move converts the float32 state (KFAC's ``(1 − λ)I`` keeps its float32
    rounding), exactly as loading its checkpoint into a float64 optimizer does.
    """
    moved = _mlp()
    opt = cls(moved, lr=0.1, T=1)
    saved = opt.state_dict()
    moved.to(torch.float64)
    direct = _mlp().to(torch.float64)
    reference = cls(direct, lr=0.1, T=1)
    reference.load_state_dict(saved)
    _train(moved, opt, 3, torch.float64)
    _train(direct, reference, 3, torch.float64)
    for name in opt.layer_names():
        for factor, value in opt.layer_state(name).items():
            expected = _dense(reference.layer_state(name)[factor])
            assert _dense(value).dtype == torch.float64
            assert torch.equal(_dense(value), expected), (name, factor)  # rule: bitwise
    assert torch.equal(moved[0].weight, direct[0].weight)


def test_state_follows_model_to_after_steps():
    """After steps in float32, ``model.to(float64)``: the next step = one from the loaded state."""
    moved = _mlp()
    opt = SINGD(moved, lr=0.1, T=1)
    _train(moved, opt, 2)
    saved = opt.state_dict()
    twin = _mlp()
    twin.load_state_dict(moved.state_dict())
    moved.to(torch.float64)
    twin.to(torch.float64)
    reference = SINGD(twin, lr=0.1, T=1)
    reference.load_state_dict(saved)  # converts the float32 factors like the move does
    _train(moved, opt, 1, torch.float64)
    _train(twin, reference, 1, torch.float64)
    assert opt.state[moved[0].weight]["momentum_buffer"].dtype == torch.float64
    assert torch.equal(moved[2].weight, twin[2].weight)  # rule: bitwise


def test_bfloat16_compensations_restart_when_the_dtype_changes():
    model = _mlp().to(torch.bfloat16)
    opt = SINGD(model, lr=0.1, T=1)
    _train(model, opt, 2, torch.bfloat16)
    model.to(torch.float32)
    _train(model, opt, 1)
    assert set(opt.layer_state("0")) == {"K", "C", "m_K", "m_C"}  # no c_K/c_C in float32


# ------------------------------------------------------------- torch.compile
def test_compiled_model_is_named_like_the_plain_one_and_checkpoints_move():
    plain = _mlp()
    compiled = torch.compile(_mlp(), backend="eager")
    opt_compiled = SINGD(compiled, lr=0.1, T=1)
    assert opt_compiled.layer_names() == ["0", "2"]
    _train(compiled, opt_compiled, 2)
    opt_plain = SINGD(plain, lr=0.1, T=1)
    opt_plain.load_state_dict(opt_compiled.state_dict())
    back = SINGD(torch.compile(_mlp(), backend="eager"), lr=0.1, T=1)
    back.load_state_dict(opt_plain.state_dict())
    for name in ("0", "2"):
        assert torch.equal(
            back.layer_state(name)["K"].to_dense(), opt_compiled.layer_state(name)["K"].to_dense()
        )


def _compiled_vs_eager_step(backend: str) -> tuple[float, float]:
    """Largest weight difference after 3 steps, ``backend`` vs eager, and ``max|W|``."""
    eager, plain = _mlp(), _mlp()
    compiled = torch.compile(plain, backend=backend)
    opt_eager = SINGD(eager, lr=0.1, T=1)
    opt_compiled = SINGD(compiled, lr=0.1, T=1)
    _train(eager, opt_eager, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's graph-break notes about the hooks
        _train(compiled, opt_compiled, 3)
    with torch.no_grad():
        pairs = zip(eager.parameters(), plain.parameters(), strict=True)
        error = max(float((a - b).abs().max()) for a, b in pairs)
        return error, max(float(p.abs().max()) for p in eager.parameters())


def test_eager_backend_with_hooks_equals_eager():
    """``backend="eager"`` runs the same kernels: bitwise."""
    error, _ = _compiled_vs_eager_step("eager")
    assert error == 0.0


@pytest.mark.slow
def test_inductor_with_hooks_equals_eager_within_rounding():
    """The default inductor backend (slow here: C++ compilation on CPU, ~1 min).

    Inductor fuses and reorders the forward/backward, so gradients differ by
    rounding: per step at most ``matmul_bound``-like ``n·eps`` relative, with
    ``n`` ≤ 16 (the batch × widths here); three steps of a map with Lipschitz
    constant ≈ 1 (lr 0.1) give ``3 · 16 · eps · max|W|`` — the stated bound.
    """
    error, magnitude = _compiled_vs_eager_step("inductor")
    assert error <= 3 * 16 * EPS[torch.float32] * magnitude
