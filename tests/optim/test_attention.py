"""``nn.MultiheadAttention`` as four canonical layers (SPEC §1.6, docs/SPEC.md).

Checks per variant (``batch_first``, ``need_weights``, self / key-is-value /
cross attention, ``kdim``/``vdim`` ≠ ``E``, no bias, ``key_padding_mask``,
unbatched, ``add_bias_kv``/``add_zero_attn``, dropout: not for the oracle,
whose mask would be torch's random draw):

* **Gradient identity** (every dtype: the model and its statistics in the
  dtype): the implementation's ``A``, ``G`` (expand, sum loss) give
  ``sqrt(n)·GᵀA = ∇W~`` of each projection's block, as autograd computes it.
  This is the check that, in bfloat16/float16, ties each captured row block
  to its own projection (the oracle comparison's bound there carries the
  half model's attention rounding).  Rule (tests/optim/test_layer_kinds.py):
  autograd's product in the dtype and ours in float64, each of reduction
  length ``n`` (``matmul_bound(dtype, n) + matmul_bound(float64, n)``), plus
  one rounding each of the scaled rows of ``A`` and ``G`` below float64,
  times ``sqrt(n)·|G|ᵀ|A|``.
* **Statistics vs the oracle** (:mod:`reference.attention`, its own forward
  and backward from the module's inputs and ``∂L/∂out``), the statistics
  formed in every dtype from the float64 model's tensors.  Rule: the rows of
  the two sides differ by the two float64 computations of the attention
  (``2·chain_bound(float64, chain)`` relative to the oracle's magnitudes,
  ``chain`` the reduction lengths along the longest path: in-projection,
  scores, softmax sum, ``P v`` and back), then the statistic rounds in the
  dtype (``matmul_bound(dtype, S)``: a mean or sum over ``S`` positions, the
  scaling, the input's rounding); both relative to the statistic of the
  magnitudes.
* the model's output and gradients are bitwise those without the optimizer.

``test_*_catch_*`` show wrong variants caught.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from reference.attention import AttentionParameters, additive_mask, projection_rows
from reference.statistics import linear_statistics
from singd import KFAC, SINGD
from singd.optim.hooks import CurvatureCollector, HookSettings
from singd.optim.kinds import (
    AttentionProjectionKind,
    MultiheadAttentionKind,
    layer_input_statistic,
)
from tests.tolerances import EPS, chain_bound, matmul_bound

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
E, HEADS, BATCH, LENGTH, SOURCE = 6, 2, 3, 4, 5

#: id → (constructor options, call: "self" | "kv" | "cross", need_weights, masked, unbatched)
VARIANTS: dict[str, tuple[dict[str, Any], str, bool, bool, bool]] = {
    "self": ({}, "self", True, False, False),
    "self-batch-first-no-weights": ({"batch_first": True}, "self", False, False, False),
    "key-is-value": ({}, "kv", False, False, False),
    "cross-batch-first": ({"batch_first": True}, "cross", True, False, False),
    "kdim-vdim": ({"kdim": 4, "vdim": 5, "batch_first": True}, "cross", False, False, False),
    "no-bias": ({"bias": False}, "cross", True, False, False),
    "key-padding-mask": ({"batch_first": True}, "kv", False, True, False),
    "unbatched": ({}, "cross", True, False, True),
    "bias-kv-zero-attn": (
        {"add_bias_kv": True, "add_zero_attn": True},
        "cross",
        False,
        True,
        False,
    ),
    "dropout": ({"dropout": 0.5}, "kv", True, False, False),
    "dropout-batch-first-no-weights": (
        {"dropout": 0.5, "batch_first": True},
        "self",
        False,
        False,
        False,
    ),
}
#: The variants the oracle computes (no dropout: its mask is torch's random draw).
ORACLE_VARIANTS = [name for name in VARIANTS if "dropout" not in VARIANTS[name][0]]


# ------------------------------------------------------------------ helpers
def _module(variant: str, dtype: torch.dtype = torch.float64) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    module = nn.MultiheadAttention(E, HEADS, dtype=dtype, **VARIANTS[variant][0])
    with torch.no_grad():  # biases start at zero: make them count
        for name, param in module.named_parameters():
            if "bias" in name:
                param.normal_()
    return module


def _call(variant: str, module: nn.MultiheadAttention, seed: int = 1) -> dict[str, Any]:
    """The forward's keyword arguments: batch-first inputs transposed as the module wants."""
    _, call, need_weights, masked, unbatched = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    dtype = module.out_proj.weight.dtype

    def draw(length: int, dim: int) -> Tensor:
        x = torch.randn(BATCH, length, dim, generator=gen, dtype=dtype)
        if unbatched:
            return x[0]
        return x if module.batch_first else x.transpose(0, 1)

    query = draw(LENGTH, E)
    key = query if call == "self" else draw(SOURCE, module.kdim)
    value = key if call in ("self", "kv") else draw(SOURCE, module.vdim)
    kwargs: dict[str, Any] = {"query": query, "key": key, "value": value}
    kwargs["need_weights"] = need_weights
    if masked:
        mask = torch.zeros(BATCH, key.shape[-2] if module.batch_first else key.shape[0])
        mask[0, -2:] = 1
        kwargs["key_padding_mask"] = mask.bool()
    return kwargs


def _batch_first(module: nn.MultiheadAttention, x: Tensor) -> np.ndarray:
    """A module input or output as the oracle's ``[B, S, d]`` float64 array."""
    if x.ndim == 2:
        x = x.unsqueeze(0)
    elif not module.batch_first:
        x = x.transpose(0, 1)
    return x.detach().double().numpy()


def _oracle_params(module: nn.MultiheadAttention) -> AttentionParameters:
    def array(t: Tensor | None) -> np.ndarray | None:
        return None if t is None else t.detach().double().numpy().reshape(t.shape[0], -1)

    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = np.split(array(module.in_proj_weight), 3)
    else:
        w_q, w_k, w_v = (
            array(w) for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        )
    b = array(module.in_proj_bias)
    b_q, b_k, b_v = (None,) * 3 if b is None else (b[:E, 0], b[E : 2 * E, 0], b[2 * E :, 0])
    b_o = array(module.out_proj.bias)
    extra = (
        (None, None)
        if module.bias_k is None
        else (
            module.bias_k.detach().double().numpy().reshape(-1),
            module.bias_v.detach().double().numpy().reshape(-1),
        )
    )
    return AttentionParameters(
        w_q,
        w_k,
        w_v,
        array(module.out_proj.weight),
        b_q,
        b_k,
        b_v,
        None if b_o is None else b_o[:, 0],
        HEADS,
        *extra,
        module.add_zero_attn,
    )


def _oracle(module, kwargs, grad_out, approx, loss_average):
    """``role → ((A, G), (A_magnitude, G_magnitude))`` from the oracle's own MHA backward."""
    query, key, value = (_batch_first(module, kwargs[k]) for k in ("query", "key", "value"))
    padding = kwargs.get("key_padding_mask")
    mask = additive_mask(
        query.shape[0],
        query.shape[1],
        key.shape[1],
        key_padding_mask=None if padding is None else padding.numpy().reshape(query.shape[0], -1),
    )
    rows = projection_rows(
        _oracle_params(module), query, key, value, _batch_first(module, grad_out), mask
    )
    result = {}
    for role, r in rows.items():
        bias = (
            module.in_proj_bias is not None
            if role != "out_proj"
            else (module.out_proj.bias is not None)
        )
        settings = {"bias": bias, "approx": approx, "loss_average": loss_average}
        result[role] = (
            linear_statistics(r.inputs, r.grads, **settings),
            linear_statistics(r.inputs_magnitude, r.grads_magnitude, **settings),
        )
    return result


def _implementation(module, kwargs, grad_out_seed, approx, loss_average, dtype):
    """``role → (A, G)`` (float64; ``G`` with the hook's ``2^k`` removed) and the output
    gradient, from the implementation's collector with statistics in ``dtype``."""
    has_bias = {
        role: (module.out_proj.bias if role == "out_proj" else module.in_proj_bias) is not None
        for role in ("q", "k", "v", "out_proj")
    }
    collector = CurvatureCollector(
        is_active=lambda name: True,
        settings=lambda name: HookSettings(approx, loss_average, dtype, dtype, has_bias[name]),
        summarise_input=lambda name, A: A,
        summarise_grad=lambda name, G: G,
        backward_scale=lambda: None,
    )
    for suffix, kind in MultiheadAttentionKind().parts(module):
        collector.add_layer(suffix[1:], module, kind)
    try:
        out = module(**kwargs)[0]
        gen = torch.Generator().manual_seed(grad_out_seed)
        grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        out.backward(grad_out)
    finally:
        collector.remove()
    result = {}
    for name, pending in collector.pop_all().items():
        k = int(pending.grad_scale.log2_factor) // 2
        result[name] = (
            pending.input_summary.double(),
            torch.ldexp(pending.grad_summary.double(), torch.tensor(-k)),
        )
    return result, grad_out


def _chain(module: nn.MultiheadAttention) -> list[int]:
    """Reduction lengths along the attention's longest path (module docstring)."""
    source = SOURCE + (module.bias_k is not None) + module.add_zero_attn
    head = E // HEADS
    widest = max(E, module.kdim, module.vdim) + 1
    return [widest, head, source, source, E + 1, head, source, source]


def _block_grad(module: nn.MultiheadAttention, role: str) -> Tensor:
    """``∇W~`` of ``role``'s block from ``.grad`` (autograd)."""
    kind = AttentionProjectionKind(role)
    weight, bias = kind.weight(module), kind.bias(module)
    rows, bias_rows = kind.weight_rows(module), kind.bias_rows(module)
    grad = weight.grad if rows is None else weight.grad[rows[0] : rows[1]]
    if bias is None:
        return grad
    b = bias.grad if bias_rows is None else bias.grad[bias_rows[0] : bias_rows[1]]
    return torch.cat([grad, b.reshape(-1, 1)], dim=1)


def identity_ratios(
    variant: str,
    rows: Callable[[str, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """``max |sqrt(n)·GᵀA − ∇W~| / bound`` per role (module docstring); ≤ 1 passes.

    The model runs in ``dtype`` and its statistics are formed in ``dtype``;
    ``sqrt(n)·GᵀA`` is then taken in float64.  ``rows(role, A, G)`` may
    rearrange the statistics (the wrong variants).
    """
    module = _module(variant, dtype)
    kwargs = _call(variant, module)
    stats, _ = _implementation(module, kwargs, 2, "expand", None, dtype)
    ratios = {}
    for role, (A, G) in stats.items():
        if rows is not None:
            A, G = rows(role, A, G)
        n = A.shape[0]
        error = (math.sqrt(n) * G.T @ A - _block_grad(module, role).double()).abs()
        # autograd's product in dtype, ours in float64, each of reduction length n; the
        # scaled rows of A and G one rounding each in dtype (float64: inside the products)
        rule = matmul_bound(dtype, n) + matmul_bound(torch.float64, n)
        if dtype != torch.float64:
            rule += 2 * EPS[dtype]
        bound = rule * math.sqrt(n) * (G.abs().T @ A.abs())
        ratios[role] = float((error / bound.clamp_min(torch.finfo(torch.float64).tiny)).max())
    return ratios


def oracle_ratios(variant: str, dtype: torch.dtype, approx: str, loss_average) -> dict[str, float]:
    """``max |implementation − oracle| / bound`` over ``A`` and ``G`` per role (docstring)."""
    module = _module(variant)
    kwargs = _call(variant, module)
    stats, grad_out = _implementation(module, kwargs, 2, approx, loss_average, dtype)
    oracle = _oracle(module, kwargs, grad_out, approx, loss_average)
    attention = 2 * chain_bound(torch.float64, _chain(module))
    ratios = {}
    for role, (A, G) in stats.items():
        (A_ref, G_ref), (A_mag, G_mag) = oracle[role]
        positions = LENGTH if role in ("q", "out_proj") else SOURCE
        rule = attention + matmul_bound(dtype, positions)
        worst = 0.0
        for actual, expected, magnitude in ((A, A_ref, A_mag), (G, G_ref, G_mag)):
            assert tuple(actual.shape) == expected.shape
            error = np.abs(actual.numpy() - expected)
            worst = max(worst, float(np.max(error / np.maximum(rule * magnitude, 1e-300))))
        ratios[role] = worst
    return ratios


# ------------------------------------------------------------------ the checks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_identity(variant: str, dtype: torch.dtype) -> None:
    ratios = identity_ratios(variant, dtype=dtype)
    assert set(ratios) == {"q", "k", "v", "out_proj"}
    assert max(ratios.values()) <= 1, ratios  # rule: module docstring


@pytest.mark.parametrize("approx,loss_average", [("expand", "batch"), ("reduce", "batch+sequence")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ORACLE_VARIANTS)
def test_statistics_match_oracle(variant: str, dtype: torch.dtype, approx: str, loss_average):
    ratios = oracle_ratios(variant, dtype, approx, loss_average)
    assert max(ratios.values()) <= 1, ratios  # rule: module docstring


#: A margin each wrong variant must clear beyond its bound (> 1 is caught), per dtype.
#: Measured (ratio to the bound; correct statistics 0.03-0.11 over every variant):
#: q/k swapped 1.0e15 / 9.2e5 / 11.7 / 94.6, G doubled 6.0e13 / 2.0e5 / 2.9 / 22.9 in
#: float64 / float32 / bfloat16 / float16.  n = 12 rows make the halves' bounds
#: 0.12 (bfloat16) and 0.016 (float16) of sqrt(n)·|G|ᵀ|A|.
CAUGHT_BY = {torch.float64: 1e6, torch.float32: 1e3, torch.bfloat16: 1.5, torch.float16: 10}


@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_catches_swapped_blocks_and_wrong_scale(dtype: torch.dtype) -> None:
    """q given k's gradient rows (q/k blocks swapped), or ``G`` twice too large: caught,
    in every dtype the identity is checked in."""
    stats = {}

    def keep(role: str, A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        stats[role] = (A, G)
        return A, G

    assert max(identity_ratios("self", keep, dtype).values()) <= 1
    swapped = identity_ratios(
        "self", lambda role, A, G: (A, stats["k"][1] if role == "q" else G), dtype
    )
    assert swapped["q"] > CAUGHT_BY[dtype]
    doubled = identity_ratios("self", lambda role, A, G: (A, 2 * G), dtype)
    assert min(doubled.values()) > CAUGHT_BY[dtype]


def test_oracle_catches_wrong_batch_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """``[L, B, d]`` read as ``[B, L, d]``: expand sees the same rows, reduce is caught."""
    assert max(oracle_ratios("self", torch.float64, "reduce", None).values()) <= 1
    monkeypatch.setattr(
        AttentionProjectionKind,
        "input_shared",
        lambda self, module, x: x.reshape(x.shape[1], x.shape[0], x.shape[2]),
    )
    wrong = oracle_ratios("self", torch.float64, "reduce", None)
    assert min(wrong[role] for role in ("q", "k", "v", "out_proj")) > 1e3


# ------------------------------------------------------------ the optimizer
def _encoder(batch_first: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(
        8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first, dtype=dtype
    )


def _loss(model: nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return model(x).square().mean()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_backward_bitwise_unchanged(variant: str) -> None:
    plain = _module(variant)
    hooked = copy.deepcopy(plain)
    opt = SINGD(hooked, lr=0.1, T=1, warn_unsupported=False)
    outs = []
    for model in (plain, hooked):
        torch.manual_seed(5)  # the same dropout masks
        out = model(**_call(variant, model))[0]
        out.square().sum().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), hooked.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    opt.step()  # the statistics of that pass arrived
    assert not torch.equal(opt.layer_state("q")["K"].to_dense(), torch.eye(E + 1).double())


@pytest.mark.parametrize("optimizer", [SINGD, KFAC])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_is_all_kronecker(optimizer, batch_first: bool) -> None:
    model = _encoder(batch_first)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = optimizer(model, lr=0.1, T=1)
    # SINGD takes every parameter (the norms elementwise); KFAC leaves only the norms
    fallback = [] if optimizer is SINGD else ["norm1.weight, norm1.bias, norm2.weight, norm2.bias"]
    assert [str(w.message).rsplit(": ", 1)[1] for w in record] == fallback
    attention = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.out_proj"]
    assert opt.layer_names()[:4] == attention
    before = {name: copy.deepcopy(opt.layer_state(name)) for name in attention}
    _loss(model, 0).backward()
    opt.step()
    key = "K" if optimizer is SINGD else "S_K"
    for name in attention:
        old, new = before[name][key], opt.layer_state(name)[key]
        if optimizer is SINGD:
            old, new = old.to_dense(), new.to_dense()
        assert not torch.equal(old, new), name


def test_checkpoint_round_trip_continues_bitwise() -> None:
    model = _encoder(True)
    opt = SINGD(model, lr=0.1, T=1, structures=("dense", "dense"))
    for step in range(2):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    restored = _encoder(True)
    restored.load_state_dict(saved_model)
    opt_restored = SINGD(restored, lr=0.1, T=1, structures=("dense", "dense"))
    opt_restored.load_state_dict(saved_opt)
    for m, o in ((model, opt), (restored, opt_restored)):
        o.zero_grad()
        _loss(m, 9).backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), restored.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_model_to_dtype_after_construction() -> None:
    model = _encoder(False)
    opt = SINGD(model, lr=0.1, T=1)
    model.to(torch.float64)
    _loss(model, 0, torch.float64).backward()
    opt.step()
    assert opt.layer_state("self_attn.v")["K"].to_dense().dtype == torch.float64
    assert all(p.isfinite().all() for p in model.parameters())


def test_partly_frozen_projections_fall_back_with_the_reason() -> None:
    module = nn.MultiheadAttention(E, HEADS, kdim=4, vdim=5)
    module.q_proj_weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="'k' falls back: some of its projections are frozen"):
        opt = SINGD(module)
    assert opt.layer_names() == []


def test_bias_kv_falls_back_and_projections_stay_kronecker() -> None:
    module = nn.MultiheadAttention(E, HEADS, add_bias_kv=True)
    with pytest.warns(UserWarning, match="bias_k, bias_v"):
        opt = SINGD(module)
    assert opt.layer_names() == ["q", "k", "v", "out_proj"]


def test_mha_kind_itself_has_no_statistics() -> None:
    module = nn.MultiheadAttention(E, HEADS)
    with pytest.raises(ValueError, match="four canonical layers"):
        MultiheadAttentionKind().grad_shared(module, torch.zeros(1, 1, E))
    with pytest.raises(ValueError, match="four canonical layers"):
        layer_input_statistic(module, torch.zeros(1, 1, E), approx="expand")
    with pytest.raises(ValueError, match="role must be one of"):
        AttentionProjectionKind("o")


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_with_attention(backend: str) -> None:
    """``backend="eager"`` keeps the eager autograd graph: the same factors bitwise;
    AOT backends (``aot_eager``, ``inductor``) replace it: a clear error at the forward."""
    plain, model = _encoder(True), _encoder(True)
    opt_plain, opt = SINGD(plain, lr=0.1, T=1), SINGD(model, lr=0.1, T=1)
    compiled = torch.compile(model, backend=backend)
    if backend != "eager":
        with pytest.raises(RuntimeError, match="could not find a projection of"):
            _loss(compiled, 0)
        return
    for m, o in ((plain, opt_plain), (compiled, opt)):
        _loss(m, 0).backward()
        o.step()
    for name in opt.layer_names():
        assert torch.equal(
            opt.layer_state(name)["C"].to_dense(), opt_plain.layer_state(name)["C"].to_dense()
        ), name


def test_autocast_statistics_arrive() -> None:
    """Under CPU bfloat16 autocast the weights reach the linears through a cast node."""
    model = _encoder(True)
    opt = SINGD(model, lr=0.1, T=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, 0)
    loss.backward()
    opt.step()
    for name in ("self_attn.q", "self_attn.out_proj"):
        K = opt.layer_state(name)["K"].to_dense()
        assert not torch.equal(K, torch.eye(K.shape[0])), name


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
@pytest.mark.parametrize("variant", ["self", "kdim-vdim"])
def test_row_block_directions_land_in_their_rows(variant: str, structure: str) -> None:
    """``lr = 1``, no momentum: each role's rows of its parameters move by
    ``−(C Cᵀ) ∇W~ (K Kᵀ)`` of that role's factors (the diagonal path too).  Rule: a
    chain of four products (reduction lengths ``d_o, d_o, d_i, d_i``) relative to the
    product of magnitudes, plus the update's own rounding (one eps of ``|W| + |ĝ|``)."""
    module = _module(variant)
    opt = SINGD(module, lr=1.0, momentum=0.0, T=1, structures=(structure, structure))
    module(**_call(variant, module))[0].square().sum().backward()
    grads = {role: _block_grad(module, role) for role in ("q", "k", "v", "out_proj")}
    before = {role: _block_weight(module, role) for role in grads}
    opt.step()
    for role, grad in grads.items():
        K = opt.layer_state(role)["K"].to_dense()
        C = opt.layer_state(role)["C"].to_dense()
        expected = C @ C.T @ grad @ K @ K.T
        magnitude = C.abs() @ C.abs().T @ grad.abs() @ K.abs() @ K.abs().T
        d_o, d_i = grad.shape
        rule = chain_bound(torch.float64, [d_o, d_o, d_i, d_i])
        moved = before[role] - _block_weight(module, role)
        bound = rule * magnitude + EPS64 * (before[role].abs() + expected.abs())
        assert ((moved - expected).abs() <= bound).all(), role  # rule: docstring


EPS64 = 2.0**-52


def _block_weight(module: nn.MultiheadAttention, role: str) -> Tensor:
    """``W~`` of ``role``'s block (a copy)."""
    kind = AttentionProjectionKind(role)
    rows, bias_rows = kind.weight_rows(module), kind.bias_rows(module)
    weight = kind.weight(module).detach()
    weight = weight if rows is None else weight[rows[0] : rows[1]]
    bias = kind.bias(module)
    if bias is None:
        return weight.clone()
    b = bias.detach() if bias_rows is None else bias.detach()[bias_rows[0] : bias_rows[1]]
    return torch.cat([weight, b.reshape(-1, 1)], dim=1)
