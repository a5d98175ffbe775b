"""The oracle's exact curvature of deep linear networks (SPEC §1.1, §3).

* vec convention: ``(S_K ⊗ S_C) vec(X) = vec(S_C X S_Kᵀ)`` (SPEC §3);
* batch size 1, one Linear layer: ``U ⊗ Gc`` = empirical Fisher (SPEC §3);
* KFAC-expand is exact in the expand setting and KFAC-reduce in the reduce
  setting for deep linear networks with MSE (Eschenhagen et al. 2023,
  arXiv 2311.00636), and the mismatched pairings are not;
* gradients and GGN blocks against torch autograd (for a deep *linear*
  network ``f`` is linear in each ``W~_l``, so the diagonal Hessian block of
  the loss w.r.t. ``W~_l`` *is* the GGN block — an independent check).

The scalings that make the KFAC comparisons exact, from SPEC §1.1 (MSE,
``Λ = 2I``, ``M`` the product of the weights above layer ``l``): the exact
GGN is ``(2/N) Σ_t J_tᵀ J_t``.  Expand setting: ``J_t = a~_tᵀ ⊗ M``, so the GGN
is ``(2/N)(Σ_t a~_t a~_tᵀ) ⊗ MᵀM``; KFAC-expand has ``U = (1/(B·S)) Σ_t a~ a~ᵀ``
and, with backprop vectors ``√2 Mᵀ e_c / N`` scaled by ``sqrt(N)``,
``Gc = Σ_c Σ_t (2/N) Mᵀ e_c e_cᵀ M = (2·B·S/N) MᵀM``: the product is the GGN.
Reduce setting (layer at or before the average): ``J_b = ā~_bᵀ ⊗ M`` with
``ā`` the mean over positions; the backprop vector at each position is
``√2 Mᵀ e_c / (N·S)``, summed over ``S`` positions by KFAC-reduce, so
``Gc = (2B/N) MᵀM`` and ``U = (1/B) Σ_b ā~ ā~ᵀ``: again the GGN.  KFAC-expand
there has ``U ⊗ Gc = (2/(B S²)) Σ_{b,s} a~ a~ᵀ ⊗ MᵀM ≠ (2/(B S²)) Σ_b (Σ_s a~)(Σ_s a~)ᵀ ⊗ MᵀM``.

Tolerance rule: both sides are sums of products of the same numbers along
chains of products: ``L`` forward products (reduction ``≤ d + 1``), ``L``
backward products (``≤ d``), the mean over ``S``, and the final sum over terms
and backprop columns; the bound is ``chain_bound`` of these lengths times the
same computation on absolute values (the *magnitude*, Higham §3.5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference.fisher import (
    DeepLinearProblem,
    empirical_fisher,
    exact_ggn,
    loss_hessian,
    loss_hessian_sqrt,
    loss_value,
    network_output,
    output_gradients,
    output_jacobians,
    per_sample_gradients,
    vec,
)
from reference.numbers import mpmath_numbers
from reference.statistics import kfac_factors, linear_statistics
from tests.reference.strategies import ENTRIES
from tests.tolerances import EPS, chain_bound, matmul_bound
from verification.selfcheck import absolute_problem, kfac_block

F64 = torch.float64


def arrays(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """float64 arrays of ``shape``, every entry drawn from ENTRIES (no constant fill)."""
    return hnp.arrays(np.float64, shape, elements=ENTRIES, fill=st.nothing())


@st.composite
def problems(
    draw: st.DrawFn,
    setting: str,
    losses: tuple[str, ...] = ("mse", "cross_entropy"),
    max_layers: int = 3,
) -> DeepLinearProblem:
    """A tiny deep linear problem in ``setting``: ``"plain"`` ([B, d]), expand or reduce."""
    n_layers = draw(st.integers(1, max_layers))
    widths = [draw(st.integers(1, 3)) for _ in range(n_layers + 1)]
    bias = tuple(draw(st.booleans()) for _ in range(n_layers))
    weights = [draw(arrays((widths[i + 1], widths[i] + bias[i]))) for i in range(n_layers)]
    batch = draw(st.integers(1, 3))
    shared = draw(st.integers(1, 3))
    x = draw(arrays((batch, widths[0]) if setting == "plain" else (batch, shared, widths[0])))
    reduce_after = draw(st.integers(0, n_layers - 1)) if setting == "reduce" else None
    averages = ["batch", None] if setting == "reduce" else ["batch", "batch+sequence", None]
    loss = draw(st.sampled_from(losses))
    out_shape = (batch, widths[-1]) if setting != "expand" else (batch, shared, widths[-1])
    if loss == "mse":
        y = draw(arrays(out_shape))
    else:
        y = draw(hnp.arrays(np.int64, out_shape[:-1], elements=st.integers(0, widths[-1] - 1)))
    return DeepLinearProblem(
        weights, bias, x, y, loss, draw(st.sampled_from(averages)), reduce_after
    )


def chain_lengths(problem: DeepLinearProblem, final_sum: int) -> list[int]:
    """Reduction lengths of forward + backward + mean + the final sum (module docstring)."""
    widths = [w.shape[1] for w in problem.weights] + [w.shape[0] for w in problem.weights]
    return [*widths, problem.shared, final_sum]


# ---------------------------------------------------------------------------
# vec convention and the batch-size-1 identity (SPEC §3)


@given(data=st.data(), m=st.integers(1, 4), n=st.integers(1, 4))
def test_kronecker_identity(data: st.DataObject, m: int, n: int) -> None:
    """``(S_K ⊗ S_C) vec(X) = vec(S_C X S_Kᵀ)`` with the column-major :func:`vec`."""
    s_k, s_c, x = data.draw(arrays((m, m))), data.draw(arrays((n, n))), data.draw(arrays((n, m)))
    left = np.kron(s_k, s_c) @ vec(x)
    right = vec(s_c @ x @ s_k.T)
    magnitude = np.kron(np.abs(s_k), np.abs(s_c)) @ np.abs(vec(x))
    # rule: one sum of m·n products against a chain of two products (lengths n, m)
    bound = (matmul_bound(F64, m * n) + chain_bound(F64, [n, m])) * magnitude
    assert np.all(np.abs(left - right) <= bound)


def test_vec_is_column_major() -> None:
    """``vec`` stacks columns (hand-checked)."""
    np.testing.assert_array_equal(vec(np.array([[1.0, 2.0], [3.0, 4.0]])), [1.0, 3.0, 2.0, 4.0])


@given(
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 4),
    bias=st.booleans(),
    loss=st.sampled_from(["mse", "cross_entropy"]),
    loss_average=st.sampled_from(["batch", "batch+sequence", None]),
    data=st.data(),
)
def test_batch_size_one_linear_layer_kfac_is_empirical_fisher(
    d_in: int, d_out: int, bias: bool, loss: str, loss_average: str | None, data: st.DataObject
) -> None:
    """SPEC §3: ``U ⊗ Gc`` from ``linear_statistics`` (B = 1) equals the empirical Fisher."""
    weights = [data.draw(arrays((d_out, d_in + bias)))]
    x = data.draw(arrays((1, d_in)))
    if loss == "mse":
        y = data.draw(arrays((1, d_out)))
    else:
        y = np.array([data.draw(st.integers(0, d_out - 1))])
    problem = DeepLinearProblem(weights, (bias,), x, y, loss, loss_average)
    g = output_gradients(problem)[0]
    a_stat, g_stat = linear_statistics(x, g, bias=bias, loss_average=loss_average)
    u, gc = kfac_factors(a_stat, g_stat)
    fisher = empirical_fisher(problem)[0]
    magnitude = np.kron(np.abs(u), np.abs(gc))
    # rule: both sides are products of the same four numbers a_i a_j g_k g_l, rounded in a
    # different order (reduction length 1, N = 1 for B = 1)
    assert np.all(np.abs(np.kron(u, gc) - fisher) <= matmul_bound(F64, 1) * magnitude)


# ---------------------------------------------------------------------------
# KFAC-expand / KFAC-reduce exactness (Eschenhagen et al. 2023)


def assert_kfac_exact(problem: DeepLinearProblem, approx: str) -> None:
    """``U ⊗ Gc`` (``approx``) equals the exact GGN block of every layer."""
    ggn = exact_ggn(problem)
    magnitude = exact_ggn(absolute_problem(problem))  # MSE: Λ = 2I, |J|ᵀΛ|J| bounds each term
    d_out = problem.weights[-1].shape[0]
    terms = problem.batch_size * problem.shared
    for layer in range(len(problem.weights)):
        ours = kfac_block(problem, layer, approx)
        # rule: chains of forward/backward products, the mean over S, and a final sum of
        # terms·d_L products (GGN) or terms·C products (KFAC, C = d_L columns)
        bound = chain_bound(F64, chain_lengths(problem, terms * d_out)) * magnitude[layer]
        assert np.all(np.abs(ours - ggn[layer]) <= bound), f"layer {layer}"


@given(problem=problems("expand", losses=("mse",)))
def test_kfac_expand_is_exact_in_expand_setting(problem: DeepLinearProblem) -> None:
    """Shared dim kept to the output, MSE: KFAC-expand = exact GGN block, every layer."""
    assert_kfac_exact(problem, "expand")


@given(problem=problems("reduce", losses=("mse",)))
def test_kfac_reduce_is_exact_in_reduce_setting(problem: DeepLinearProblem) -> None:
    """Shared dim averaged after a layer, MSE: KFAC-reduce = exact GGN block, every layer."""
    assert_kfac_exact(problem, "reduce")


@given(problem=problems("plain", losses=("mse",)))
def test_kfac_is_exact_without_weight_sharing(
    problem: DeepLinearProblem,
) -> None:
    """No shared dim: KFAC (expand == reduce) is exact for deep linear MSE as well."""
    assert_kfac_exact(problem, "expand")


def seeded_problem(reduce_after: int | None, seed: int = 0) -> DeepLinearProblem:
    """A fixed 2-layer MSE problem with ``B = 2``, ``S = 3`` and distinct positions."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((3, 5)), rng.standard_normal((2, 3))]
    x = rng.standard_normal((2, 3, 4))
    y_shape = (2, 3, 2) if reduce_after is None else (2, 2)
    return DeepLinearProblem(
        weights, (True, False), x, rng.standard_normal(y_shape), "mse", "batch", reduce_after
    )


@pytest.mark.parametrize(
    ("reduce_after", "approx"), [(0, "expand"), (1, "expand"), (None, "reduce")]
)
def test_mismatched_kfac_flavour_is_not_exact(reduce_after: int | None, approx: str) -> None:
    """Expand approx in the reduce setting (and vice versa) misses the GGN by more than rounding.

    Only the layers whose input has the shared dim differ (layer 0 always).
    """
    problem = seeded_problem(reduce_after)
    ggn = exact_ggn(problem)
    magnitude = exact_ggn(absolute_problem(problem))
    ours = kfac_block(problem, 0, approx)
    bound = chain_bound(F64, chain_lengths(problem, 6 * 2)) * magnitude[0]
    # the gap is O(1) relative (different matrices), the rounding bound ~1e-14 relative:
    # demand the gap exceed 10^6 × the bound somewhere
    assert np.max(np.abs(ours - ggn[0]) - 1e6 * bound) > 0


# ---------------------------------------------------------------------------
# against torch autograd


def torch_forward(problem: DeepLinearProblem, weights: list[torch.Tensor]):
    """The network and loss written with torch ops; returns ``(loss, layer outputs)``."""
    h = torch.tensor(problem.x)
    outputs = []
    for layer, (w, bias) in enumerate(zip(weights, problem.bias, strict=True)):
        h = h @ w[:, :-1].T + w[:, -1] if bias else h @ w.T
        if h.requires_grad:
            h.retain_grad()  # the gradient a backward hook on this layer would see
        outputs.append(h)
        if layer == problem.reduce_after:
            h = h.mean(dim=1)
    terms = h.numel() // h.shape[-1]
    n_loss = {"batch": h.shape[0], "batch+sequence": terms, None: 1}[problem.loss_average]
    if problem.loss == "mse":
        loss = ((h - torch.tensor(problem.y)) ** 2).sum() / n_loss
    else:
        logits = h.reshape(terms, h.shape[-1])
        loss = F.cross_entropy(logits, torch.tensor(problem.y).reshape(-1), reduction="sum")
        loss = loss / n_loss
    return loss, outputs


settings_st = st.sampled_from(["plain", "expand", "reduce"])


def gradient_magnitudes(problem: DeepLinearProblem) -> DeepLinearProblem:
    """An MSE problem whose gradients bound the terms of ``problem``'s gradients.

    ``|W~|``, ``|x|``, and a target making ``∂L/∂f`` non-negative and at least
    as large as the original's terms: ``y = −|y|`` (MSE: ``|f| + |y|``) or
    ``y = f − ½`` (CE: ``2·½/N ≥ |p − onehot|/N``).
    """
    magnitudes = absolute_problem(problem)
    if problem.loss == "mse":
        y = -np.abs(problem.y)
    else:
        y = network_output(magnitudes) - 0.5
    return DeepLinearProblem(
        magnitudes.weights,
        problem.bias,
        magnitudes.x,
        y,
        "mse",
        problem.loss_average,
        problem.reduce_after,
    )


@given(data=st.data(), setting=settings_st)
def test_gradients_equal_autograd(data: st.DataObject, setting: str) -> None:
    """Hook gradients and summed per-sample gradients equal torch autograd."""
    problem = data.draw(problems(setting))
    weights = [torch.tensor(w, requires_grad=True) for w in problem.weights]
    loss, outputs = torch_forward(problem, weights)
    loss.backward()
    bounding = gradient_magnitudes(problem)
    d_out = problem.weights[-1].shape[0]
    # rule: forward/backward chains, the mean over S, softmax (d_L terms + exp, log: 4
    # roundings) and the final sum over the B·S positions of a sample batch
    rule = chain_bound(
        F64, [*chain_lengths(problem, problem.batch_size * problem.shared), d_out + 4]
    )
    for ours, bound_g, theirs in zip(
        output_gradients(problem), output_gradients(bounding), outputs, strict=True
    ):
        assert np.all(np.abs(ours - theirs.grad.numpy()) <= rule * bound_g)
    for ours, bound_g, w in zip(
        per_sample_gradients(problem), per_sample_gradients(bounding), weights, strict=True
    ):
        assert np.all(np.abs(ours.sum(axis=0) - w.grad.numpy()) <= rule * bound_g.sum(axis=0))


@given(data=st.data(), setting=settings_st)
def test_exact_ggn_equals_autograd_hessian_block(data: st.DataObject, setting: str) -> None:
    """For a deep linear net the Hessian block of ``L`` w.r.t. ``W~_l`` is the GGN block."""
    problem = data.draw(problems(setting, max_layers=2))
    ggn = exact_ggn(problem)
    hessian_abs = np.abs(loss_hessian(problem))
    d_out = problem.weights[-1].shape[0]
    terms = problem.batch_size * problem.shared
    # rule: forward/backward chains, mean over S, softmax (d_L + 4 roundings) and the final
    # sum over terms·d_L·d_L products
    rule = chain_bound(F64, [*chain_lengths(problem, terms * d_out * d_out), d_out + 4])
    for layer, j_abs in enumerate(output_jacobians(absolute_problem(problem))):
        weights = [torch.tensor(w) for w in problem.weights]

        def loss_of(w: torch.Tensor, layer: int = layer, weights=weights) -> torch.Tensor:
            return torch_forward(problem, [*weights[:layer], w, *weights[layer + 1 :]])[0]

        block = torch.autograd.functional.hessian(loss_of, weights[layer]).numpy()
        rows, cols = problem.weights[layer].shape
        # column-major vec: index (col, row), so move cols before rows on both sides
        theirs = block.transpose(1, 0, 3, 2).reshape(rows * cols, rows * cols)
        magnitude = np.einsum("bsop,bsoq,bsqr->pr", j_abs, hessian_abs, j_abs)
        magnitude = magnitude / problem.loss_terms
        assert np.all(np.abs(ggn[layer] - theirs) <= rule * magnitude), f"layer {layer}"


@given(problem=st.one_of(problems("expand"), problems("reduce")))
def test_loss_value_equals_torch(problem: DeepLinearProblem) -> None:
    """``L`` equals torch's loss (same recipe, different code)."""
    loss, _ = torch_forward(problem, [torch.tensor(w) for w in problem.weights])
    d_out = problem.weights[-1].shape[0]
    if problem.loss == "mse":  # magnitude Σ_t ‖|f_t| + |y_t|‖² / N
        magnitude = loss_value(gradient_magnitudes(problem))
    else:  # log Σ exp f − f_y: terms of size |f| (twice) and log d_L <= d_L, per term
        f_abs = network_output(absolute_problem(problem))
        magnitude = (2 * f_abs.sum() + f_abs.size) / problem.loss_terms
    # rule: chain bound (forward chain, the sum over terms·d_L, softmax's d_L + 4 roundings)
    # times the magnitude of the summed terms
    lengths = chain_lengths(problem, problem.batch_size * problem.shared * d_out)
    rule = chain_bound(F64, [*lengths, d_out + 4])
    assert abs(loss_value(problem) - loss.item()) <= rule * magnitude


@given(problem=st.one_of(problems("expand"), problems("reduce")))
def test_loss_hessian_sqrt_factors_the_hessian(problem: DeepLinearProblem) -> None:
    """``R_t R_tᵀ = Λ_t`` (MSE: ``2I``; CE: ``diag(p) − ppᵀ``)."""
    root = loss_hessian_sqrt(problem)
    d_out = root.shape[-1]
    # rule: products of d_L terms, each |entry| <= 1 (p, √p <= 1) up to √2 for MSE: magnitude 2
    bound = matmul_bound(F64, d_out) * 2 * d_out
    product = root @ np.swapaxes(root, -1, -2)
    assert np.all(np.abs(product - loss_hessian(problem)) <= bound)


# ---------------------------------------------------------------------------
# float64 against mpmath


@pytest.mark.parametrize(("reduce_after", "approx"), [(None, "expand"), (0, "reduce")])
def test_kfac_exactness_holds_to_mpmath_precision(reduce_after: int | None, approx: str) -> None:
    """In 50-digit mpmath the exactness holds to ~1e-45 and float64 agrees to its bound."""
    numbers = mpmath_numbers(50)
    problem = seeded_problem(reduce_after)
    with numbers.context():
        mp_problem = DeepLinearProblem(
            [numbers.asarray(w) for w in problem.weights],
            problem.bias,
            numbers.asarray(problem.x),
            numbers.asarray(problem.y),
            "mse",
            problem.loss_average,
            reduce_after,
        )
        ggn_mp = exact_ggn(mp_problem)
        kfac_mp = [kfac_block(mp_problem, layer, approx) for layer in range(2)]
    ggn64 = exact_ggn(problem)
    magnitude = exact_ggn(absolute_problem(problem))
    for layer in range(2):
        # rule: exact identity, so only mpmath's rounding: 100 ulps of 1e-50 times magnitude
        gap = numbers.to_float64(kfac_mp[layer] - ggn_mp[layer])
        assert np.all(np.abs(gap) <= 100 * numbers.eps * magnitude[layer])
        # rule: float64's chain bound against the (effectively exact) mpmath value
        bound = chain_bound(F64, chain_lengths(problem, 6 * 2)) * magnitude[layer]
        assert np.all(np.abs(ggn64[layer] - numbers.to_float64(ggn_mp[layer])) <= bound)


def test_cross_entropy_runs_in_mpmath() -> None:
    """The CE path (exp, sqrt, log on ``mpf``) agrees with float64 on a tiny case."""
    numbers = mpmath_numbers(30)
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal((3, 2))]
    x, y = rng.standard_normal((2, 2)), np.array([0, 2])
    problem = DeepLinearProblem(weights, (False,), x, y, "cross_entropy")
    with numbers.context():
        mp_problem = DeepLinearProblem(
            [numbers.asarray(weights[0])], (False,), numbers.asarray(x), y, "cross_entropy"
        )
        root_mp = loss_hessian_sqrt(mp_problem)
        ggn_mp = exact_ggn(mp_problem)[0]
        loss_mp = loss_value(mp_problem)
    # rule: |entries| <= 1 after softmax; a few tens of roundings at eps64 (d_L = 3 terms,
    # exp, division, sqrt; the GGN sums 2·3·3 products of entries of size <= |x|·|Λ|)
    np.testing.assert_allclose(
        loss_hessian_sqrt(problem), numbers.to_float64(root_mp), rtol=0, atol=20 * EPS[F64]
    )
    scale = float(np.abs(x).max() ** 2)
    np.testing.assert_allclose(
        exact_ggn(problem)[0], numbers.to_float64(ggn_mp), rtol=0, atol=40 * EPS[F64] * scale
    )
    assert math.isclose(loss_value(problem), float(loss_mp), rel_tol=20 * EPS[F64])


# ---------------------------------------------------------------------------
# bad input


def _problem(**changes):
    base = {
        "weights": [np.ones((2, 3))],
        "bias": (False,),
        "x": np.ones((2, 4, 3)),
        "y": np.ones((2, 4, 2)),
        "loss": "mse",
        "loss_average": "batch",
        "reduce_after": None,
    }
    return DeepLinearProblem(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weights": [np.ones((2, 4))]}, "layer 0: weight must be d_out × 3"),
        ({"bias": (True,)}, "layer 0: weight must be d_out × 4"),
        ({"bias": (False, False)}, "one bias flag per layer"),
        ({"x": np.ones(3)}, "x must have shape"),
        ({"x": np.ones((2, 3)), "y": np.ones((2, 2)), "reduce_after": 0}, "needs a shared dim"),
        ({"reduce_after": 1, "y": np.ones((2, 2))}, "not a layer index"),
        (
            {"reduce_after": 0, "y": np.ones((2, 2)), "loss_average": "batch+sequence"},
            "reduce setting",
        ),
        ({"loss": "hinge"}, "loss must be one of"),
        ({"loss_average": "mean"}, "loss_average"),
        ({"y": np.ones((2, 2))}, "y must have shape"),
        ({"loss": "cross_entropy", "y": np.full((2, 4), 2)}, "labels must be integers in"),
        ({"loss": "cross_entropy", "y": np.ones((2, 4))}, "labels must be integers in"),
    ],
)
def test_bad_problem_raises_value_error(changes: dict, message: str) -> None:
    """Inconsistent problems raise a ``ValueError`` naming the problem."""
    with pytest.raises(ValueError, match=message):
        _problem(**changes)
