"""The oracle's SINGD / IKFAC stepper (``reference.updates``) against SPEC §1.3, §1.4, §1.4a.

Checks, each an invariant with a derived tolerance:

* one step equals the SPEC equations transcribed here with explicit loops,
  from non-symmetric structured factors (so ``K`` and ``Kᵀ`` differ);
* the first step from ``K = C = I`` has a closed form;
* float64 against mpmath (50 digits) along short trajectories, for every
  structure and mode (one case per structure by default, the grid under
  ``oracle``);
* the IKFAC fixed point ``K Kᵀ → (U + λI)⁻¹`` at the derived contraction rate;
* default-mode invariance under ``H_K → cH_K, H_C → H_C/c`` and its absence in IKFAC;
* ``T`` semantics, structure preservation, non-symmetric factors, bad input.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import zlib

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from reference.numbers import FLOAT64, mpmath_numbers
from reference.structures import STRUCTURE_NAMES, get_structure
from reference.updates import (
    SINGDHyperparameters,
    SINGDState,
    StepRecord,
    singd_init,
    singd_step,
    singd_trajectory,
)
from tests.reference.strategies import spd_matrices
from tests.tolerances import EPS_BY_NAME
from verification.selfcheck import (
    D_IN,
    D_OUT,
    MODES,
    N_ROWS,
    ikfac_fixed_point_bound,
    make_hyper,
    make_records,
    scaled_discrepancy,
    trajectory_bound,
)

EPS64 = EPS_BY_NAME["float64"]

MP50 = mpmath_numbers(50)


def state_arrays(state: SINGDState) -> dict[str, np.ndarray]:
    """The state's arrays as float64, by field name."""
    return {
        field.name: np.asarray(getattr(state, field.name), dtype=np.float64)
        for field in dataclasses.fields(state)
        if field.name != "steps"
    }


def max_discrepancy(a: list[SINGDState], b: list[SINGDState]) -> float:
    """Largest absolute entry difference between two trajectories (all fields, all steps)."""
    return max(
        float(np.abs(x[name] - y[name]).max())
        for sa, sb in zip(a, b, strict=True)
        for x, y in [(state_arrays(sa), state_arrays(sb))]
        for name in x
    )


def float64_vs_mpmath(structures: tuple[str, str], mode: str, seed: int) -> tuple[float, float]:
    """Run one case in float64 and mpmath(50); return (scaled discrepancy, its bound)."""
    rng = np.random.default_rng(seed)
    hyper = make_hyper(structures, mode)
    passes = 2 if mode == "accumulation" else 1
    steps = 4
    records = make_records(rng, steps, passes)
    w0 = rng.uniform(-1.0, 1.0, size=(D_OUT, D_IN))
    fast = singd_trajectory(w0, records, hyper, FLOAT64)
    exact = singd_trajectory(w0, records, hyper, MP50)
    return scaled_discrepancy(fast, exact), trajectory_bound(steps, passes)


# ----------------------------------------------------------- SPEC, by loops
def loop_matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``X Y`` by explicit loops (the test's own transcription)."""
    rows, inner, cols = x.shape[0], x.shape[1], y.shape[1]
    return np.array(
        [[sum(x[i, k] * y[k, j] for k in range(inner)) for j in range(cols)] for i in range(rows)]
    )


def loop_transpose(x: np.ndarray) -> np.ndarray:
    """``Xᵀ`` by explicit loops."""
    return np.array([[x[i, j] for i in range(x.shape[0])] for j in range(x.shape[1])])


def symmetrised(m: np.ndarray) -> np.ndarray:
    """``(M + Mᵀ)/2``: the loop products are symmetric only up to rounding."""
    return (m + m.T) / 2


def spec_step(
    k: np.ndarray,
    c: np.ndarray,
    m_k: np.ndarray,
    m_c: np.ndarray,
    w: np.ndarray,
    m_w: np.ndarray,
    record: StepRecord,
    hyper: SINGDHyperparameters,
    beta1: float,
) -> tuple[np.ndarray, ...]:
    """One update step of SPEC §1.3 + §1.4, written out with loops (float64)."""
    k_structure, c_structure = (get_structure(name) for name in hyper.structures)
    d_i, d_o = k.shape[0], c.shape[0]
    kt, ct = loop_transpose(k), loop_transpose(c)
    h_k = sum(
        k_structure.project(symmetrised(loop_matmul(loop_matmul(kt, loop_matmul(a.T, a)), k)))
        for a, _ in record.stats
    )
    h_c = sum(
        c_structure.project(symmetrised(loop_matmul(loop_matmul(ct, loop_matmul(g.T, g)), c)))
        for _, g in record.stats
    )
    gram_k = k_structure.project(symmetrised(loop_matmul(kt, k)))
    gram_c = c_structure.project(symmetrised(loop_matmul(ct, c)))
    lam, alpha1 = hyper.damping, hyper.alpha1
    half = (1 - alpha1) / 2 if hyper.normalize_lr_cov else 0.5
    if hyper.kfac_like:
        new_m_k = half * (h_k + lam * gram_k - np.eye(d_i))
        new_m_c = half * (h_c + lam * gram_c - np.eye(d_o))
    else:
        c_sq, kappa_sq = lam * np.trace(gram_c), lam * np.trace(gram_k)
        new_m_k = alpha1 * m_k + half / d_o * (
            np.trace(h_c) * h_k + c_sq * gram_k - d_o * np.eye(d_i)
        )
        new_m_c = alpha1 * m_c + half / d_i * (
            np.trace(h_k) * h_c + kappa_sq * gram_c - d_i * np.eye(d_o)
        )

    def step_size(m: np.ndarray) -> float:
        if not hyper.normalize_lr_cov:
            return beta1
        return beta1 / max(1.0, max(abs(v) for v in m.flat))

    new_k = k - step_size(new_m_k) * loop_matmul(k, new_m_k)
    new_c = c - step_size(new_m_c) * loop_matmul(c, new_m_c)
    c_ct = loop_matmul(new_c, loop_transpose(new_c))
    k_kt = loop_matmul(new_k, loop_transpose(new_k))
    g_hat = loop_matmul(loop_matmul(c_ct, record.grad), k_kt) + hyper.weight_decay * w
    new_m_w = hyper.momentum * m_w + g_hat
    return new_k, new_c, new_m_k, new_m_c, w - hyper.lr * new_m_w, new_m_w


def near_identity_member(name: str, d: int, rng: np.random.Generator) -> np.ndarray:
    """``I + 0.3 R`` with ``R`` a random non-symmetric member of the structure."""
    return np.eye(d) + 0.3 * get_structure(name).random_member(d, rng)


@pytest.mark.parametrize("mode", [m for m in MODES if m not in ("schedule", "period2")])
@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_step_matches_spec_loops(name: str, mode: str) -> None:
    """From non-symmetric structured factors, one step equals the loop transcription."""
    rng = np.random.default_rng(zlib.crc32(f"{name}-{mode}".encode()))
    hyper = make_hyper((name, name), mode)
    passes = 2 if mode == "accumulation" else 1
    record = make_records(rng, 1, passes)[0]
    k, c = near_identity_member(name, D_IN, rng), near_identity_member(name, D_OUT, rng)
    m_k = get_structure(name).random_member(D_IN, rng) * 0.1
    m_c = get_structure(name).random_member(D_OUT, rng) * 0.1
    w, m_w = rng.uniform(-1, 1, (D_OUT, D_IN)), rng.uniform(-1, 1, (D_OUT, D_IN))
    state = SINGDState(steps=0, K=k, C=c, m_K=m_k, m_C=m_c, W=w, m_W=m_w)
    got = singd_step(state, record, hyper)
    want = spec_step(k, c, m_k, m_c, w, m_w, record, hyper, beta1=hyper.lr_cov)
    got_arrays = (got.K, got.C, got.m_K, got.m_C, got.W, got.m_W)
    for field, g, v in zip(("K", "C", "m_K", "m_C", "W", "m_W"), got_arrays, want, strict=True):
        # Two float64 evaluations of the same one-step chain, in different
        # orders: each within trajectory_bound(1, passes) of the exact value
        # (relative to the field's scale; the loop factors are I + 0.3 R, near I).
        tolerance = 2 * trajectory_bound(1, passes) * max(1.0, float(np.abs(v).max()))
        assert np.abs(g - v).max() <= tolerance, field


@given(
    name=st.sampled_from(STRUCTURE_NAMES),
    mode=st.sampled_from(["default", "ikfac", "normalize"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_first_step_closed_form(name: str, mode: str, seed: int) -> None:
    """From K = C = I (Π̂(I) = I, zero momenta): SPEC §1.3 in closed form.

    ``m_K = ½/d_o (tr(Π̂(GᵀG)) Π̂(AᵀA) + λ d_o I − d_o I)`` (default),
    ``½ (Π̂(AᵀA) + (λ − 1) I)`` (IKFAC), and ``K = I − β1' m_K``.
    """
    rng = np.random.default_rng(seed)
    hyper = make_hyper((name, name), mode)
    record = make_records(rng, 1)[0]
    (a, g) = record.stats[0]
    structure = get_structure(name)
    u, gc = structure.project(a.T @ a), structure.project(g.T @ g)
    lam = hyper.damping
    half = (1 - hyper.alpha1) / 2 if hyper.normalize_lr_cov else 0.5
    if hyper.kfac_like:
        m_k = half * (u + (lam - 1) * np.eye(D_IN))
    else:
        m_k = half / D_OUT * (np.trace(gc) * u + (lam - 1) * D_OUT * np.eye(D_IN))
    beta1 = hyper.lr_cov
    if hyper.normalize_lr_cov:
        beta1 /= max(1.0, np.abs(m_k).max())
    state = singd_step(singd_init(record.grad, hyper), record, hyper)
    # One short chain (AᵀA: n, trace: d_o, products with I are exact):
    # (n + d_o + 4)·eps relative to magnitudes <= n·d_o (entries in [-1, 1]).
    tolerance = (N_ROWS + D_OUT + 4) * EPS64 * N_ROWS * D_OUT
    assert np.abs(state.m_K - m_k).max() <= tolerance
    assert np.abs(state.K - (np.eye(D_IN) - beta1 * m_k)).max() <= tolerance


# ------------------------------------------------------- float64 vs mpmath
@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_float64_matches_mpmath(name: str) -> None:
    """Fast tier: one default-mode case per structure, as both K and C."""
    error, bound = float64_vs_mpmath((name, name), "default", seed=0)
    # Rule: trajectory_bound = steps · (Σ(ℓ+2) + passes) · n · eps64, see its docstring.
    assert error <= bound


@pytest.mark.oracle
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", STRUCTURE_NAMES)
@pytest.mark.parametrize("role", ["K", "C", "both"])
def test_float64_matches_mpmath_grid(name: str, mode: str, role: str) -> None:
    """Slow tier: every structure (as K, as C, as both) × every mode."""
    structures = {"K": (name, "dense"), "C": ("dense", name), "both": (name, name)}[role]
    error, bound = float64_vs_mpmath(structures, mode, seed=1)
    # Rule: trajectory_bound = steps · (Σ(ℓ+2) + passes) · n · eps64, see its docstring.
    assert error <= bound


# ---------------------------------------------------------- IKFAC fixed point
def matrix_sqrt_factor(u: np.ndarray) -> np.ndarray:
    """``A`` with ``AᵀA = U`` (``Aᵀ`` = Cholesky factor of the SPD ``U``)."""
    return np.linalg.cholesky(u).T


@given(u=spd_matrices(4, cond=10.0, scale=1.5), gc=spd_matrices(3, cond=10.0, scale=1.5))
def test_ikfac_fixed_point(u: np.ndarray, gc: np.ndarray) -> None:
    """IKFAC, dense factors, constant statistics: ``K Kᵀ → (U + λI)⁻¹``, ``C Cᵀ → (Gc + λI)⁻¹``."""
    beta1, damping, steps = 0.5, 1e-3, 200
    hyper = SINGDHyperparameters(
        lr=0.0, kfac_like=True, alpha1=0.0, damping=damping, lr_cov=beta1, T=1
    )
    a, g = matrix_sqrt_factor(u), matrix_sqrt_factor(gc)
    record = StepRecord(grad=np.zeros((3, 4)), stats=((a, g),))
    state = singd_init(record.grad, hyper)
    for _ in range(steps):
        state = singd_step(state, record, hyper)
    for factor, stat in ((state.K, u), (state.C, gc)):
        b = np.linalg.eigvalsh(stat) + damping
        assert beta1 * b.max() <= 1  # the regime of ikfac_rate's derivation
        target = np.linalg.inv(stat + damping * np.eye(len(b)))
        residual = np.linalg.norm(factor @ factor.T - target, 2)
        # rule: contraction ρ^steps of the initial residual plus the rounding
        # floor 4(d+2)d·eps/(b_min(1 − ρ)) (derivation in ikfac_fixed_point_bound)
        assert residual <= ikfac_fixed_point_bound(beta1, b, steps)


@given(u=spd_matrices(4, cond=10.0, scale=1.5))
def test_ikfac_follows_its_scalar_recursion(u: np.ndarray) -> None:
    """Constant U, K₀ = I: K_t = k_t(B) in U's eigenbasis, ``k ← k (1 − β1 (b k² − 1)/2)``."""
    beta1, damping, steps = 0.5, 1e-3, 20
    hyper = SINGDHyperparameters(
        lr=0.0, kfac_like=True, alpha1=0.0, damping=damping, lr_cov=beta1, T=1
    )
    record = StepRecord(grad=np.zeros((1, 4)), stats=((matrix_sqrt_factor(u), np.ones((1, 1))),))
    states = singd_trajectory(record.grad, [record] * steps, hyper)
    eigenvalues, basis = np.linalg.eigh(u)
    b = eigenvalues + damping
    k = np.ones_like(b)
    for _ in range(steps):
        k = k * (1 - beta1 * (b * k**2 - 1) / 2)
    predicted = (basis * k**2) @ basis.T
    # Rounding: per step a chain of 4 products of length d, (d + 2)·eps each,
    # relative to |K|² <= 1/b_min; the scalar map's Lipschitz constant is at
    # most L = 1 + β1/2 (|1 − β1(3bk² − 1)/2| with bk² between b and 1), so the errors
    # of `steps` steps grow by at most L^steps.
    d = len(b)
    bound = steps * 4 * (d + 2) * EPS64 / b.min() * (1 + beta1 / 2) ** steps
    assert np.abs(states[-1].K @ states[-1].K.T - predicted).max() <= bound


# ------------------------------------------------------------- invariance
def scaled_records(records: list[StepRecord], c: float) -> list[StepRecord]:
    """``A → √c A``, ``G → G/√c`` (so ``H_K → cH_K``, ``H_C → H_C/c``)."""
    root = math.sqrt(c)
    return [
        StepRecord(grad=r.grad, stats=tuple((a * root, g / root) for a, g in r.stats))
        for r in records
    ]


@given(power=st.integers(-4, 4), seed=st.integers(0, 2**32 - 1))
@example(power=3, seed=0)
def test_default_mode_invariant_exactly_under_powers_of_four(power: int, seed: int) -> None:
    """c = 4^power: √c = 2^power, so scaling commutes with every rounding: bit-identical."""
    rng = np.random.default_rng(seed)
    records = make_records(rng, 4, passes=2)
    hyper = make_hyper(("tril", "dense"), "default")
    w0 = rng.uniform(-1, 1, (D_OUT, D_IN))
    plain = singd_trajectory(w0, records, hyper)
    scaled = singd_trajectory(w0, scaled_records(records, 4.0**power), hyper)
    # Exact: multiplying by powers of two is exact (no overflow/underflow here).
    assert max_discrepancy(plain, scaled) == 0.0


@given(
    c=st.floats(0.1, 10.0, width=64),
    name=st.sampled_from(STRUCTURE_NAMES),
    seed=st.integers(0, 2**32 - 1),
)
def test_default_mode_invariant_under_rescaling(c: float, name: str, seed: int) -> None:
    """General c: equal up to the rounding of both float64 runs."""
    rng = np.random.default_rng(seed)
    records = make_records(rng, 3)
    hyper = make_hyper((name, name), "normalize")
    w0 = rng.uniform(-1, 1, (D_OUT, D_IN))
    plain = singd_trajectory(w0, records, hyper)
    scaled = singd_trajectory(w0, scaled_records(records, c), hyper)
    # Each run within trajectory_bound of the exact (shared) trajectory; the
    # scaled inputs √c A, G/√c carry one more rounding per entry, counted as a
    # second pass of the H sums.
    assert scaled_discrepancy(scaled, plain) <= 2 * trajectory_bound(3, passes=2)


def test_ikfac_is_not_scale_invariant() -> None:
    """IKFAC drops the trace weights, so c = 4 must change the factors visibly."""
    rng = np.random.default_rng(3)
    records = make_records(rng, 3)
    hyper = make_hyper(("dense", "dense"), "ikfac")
    w0 = rng.uniform(-1, 1, (D_OUT, D_IN))
    plain = singd_trajectory(w0, records, hyper)
    scaled = singd_trajectory(w0, scaled_records(records, 4.0), hyper)
    # First step alone: ΔK = β1/2 · (c − 1) Π̂(AᵀA) = 0.15·AᵀA, entries O(1):
    # far above any rounding (1e-3 is ~1e12 eps).
    assert np.abs(plain[0].K - scaled[0].K).max() > 1e-3


# --------------------------------------------------- T, structure, symmetry
def test_factors_change_only_on_period_steps() -> None:
    """T = 3: K, C, m_K, m_C change at steps 0, 3, 6 and are untouched in between."""
    rng = np.random.default_rng(4)
    records = make_records(rng, 8)
    records = [r if i % 3 == 0 else StepRecord(grad=r.grad) for i, r in enumerate(records)]
    hyper = dataclasses.replace(make_hyper(("dense", "tril"), "default"), T=3)
    states = [
        singd_init(records[0].grad, hyper),
        *singd_trajectory(records[0].grad, records, hyper),
    ]
    for before, after in itertools.pairwise(states):
        changed = [
            not np.array_equal(getattr(before, f), getattr(after, f))
            for f in ("K", "C", "m_K", "m_C")
        ]
        assert all(changed) if before.steps % 3 == 0 else not any(changed)


@given(name=st.sampled_from(STRUCTURE_NAMES), seed=st.integers(0, 2**32 - 1))
def test_factors_stay_in_structure(name: str, seed: int) -> None:
    """Along a trajectory, K and C are members of their structures (SPEC §2 closure)."""
    rng = np.random.default_rng(seed)
    hyper = make_hyper((name, name), "default")
    states = singd_trajectory(rng.uniform(-1, 1, (D_OUT, D_IN)), make_records(rng, 4), hyper)
    structure = get_structure(name)
    for state in states:
        magnitude = max(1.0, float(np.abs(state.K).max()), float(np.abs(state.C).max()))
        # Off-pattern entries are exact zeros; Toeplitz diagonals are equal up
        # to the rounding of K m, trajectory_bound per step relative to the scale.
        atol = trajectory_bound(state.steps, passes=1) * magnitude
        assert structure.is_member(state.K, atol)
        assert structure.is_member(state.C, atol)


def test_factors_are_not_symmetric_after_second_update() -> None:
    """Dense: K₁ is symmetric, K₂ = K₁(I − β1 m) is not (SPEC §1.4a)."""
    rng = np.random.default_rng(5)
    hyper = make_hyper(("dense", "dense"), "default")
    states = singd_trajectory(rng.uniform(-1, 1, (D_OUT, D_IN)), make_records(rng, 2), hyper)
    # K₂ − K₂ᵀ = β1²(m₁m₂ − m₂m₁)/…: entries O(β1² ‖m‖²) ≈ 1e-3, vs rounding ~1e-15.
    assert np.abs(states[1].K - states[1].K.T).max() > 1e-6
    assert np.abs(states[1].C - states[1].C.T).max() > 1e-6


# ---------------------------------------------------------------- bad input
def test_record_shape_mismatches_raise() -> None:
    """grad, A and G must match W~'s (d_o, d_i)."""
    rng = np.random.default_rng(6)
    hyper = make_hyper(("dense", "dense"), "default")
    state = singd_init(np.zeros((D_OUT, D_IN)), hyper)
    good = make_records(rng, 1)[0]
    a, g = good.stats[0]
    with pytest.raises(ValueError, match="grad has shape"):
        singd_step(state, StepRecord(grad=good.grad.T, stats=good.stats), hyper)
    with pytest.raises(ValueError, match=r"stats\[0\]: A has shape"):
        singd_step(state, StepRecord(grad=good.grad, stats=((a[:, 1:], g),)), hyper)
    with pytest.raises(ValueError, match=r"stats\[1\]: G has shape"):
        singd_step(state, StepRecord(grad=good.grad, stats=((a, g), (a, g[:, 1:]))), hyper)
    with pytest.raises(ValueError, match="W0 must be"):
        singd_init(np.zeros(3), hyper)


def test_empty_stats_on_update_step_raises() -> None:
    """A step with steps % T == 0 needs statistics; other steps do not."""
    hyper = make_hyper(("dense", "dense"), "period2")
    state = singd_init(np.zeros((D_OUT, D_IN)), hyper)
    with pytest.raises(ValueError, match="stats is empty"):
        singd_step(state, StepRecord(grad=np.zeros((D_OUT, D_IN))), hyper)
    state = dataclasses.replace(state, steps=1)
    singd_step(state, StepRecord(grad=np.zeros((D_OUT, D_IN))), hyper)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", -0.1),
        ("momentum", 1.0),
        ("damping", -1e-3),
        ("alpha1", -0.5),
        ("weight_decay", -1.0),
        ("T", 0),
        ("T", 2.5),
        ("lr_cov", -0.1),
        ("structures", ("dense",)),
        ("structures", ("dense", "nonsense")),
    ],
)
def test_invalid_hyperparameters_raise(field: str, value: object) -> None:
    """Each invalid field raises ValueError naming it (or naming the bad structure)."""
    expected = "nonsense" if value == ("dense", "nonsense") else field
    with pytest.raises(ValueError, match=expected):
        SINGDHyperparameters(**{field: value})


def test_kfac_like_requires_alpha1_zero() -> None:
    """IKFAC has no factor momentum (SPEC §1.3)."""
    with pytest.raises(ValueError, match="alpha1"):
        SINGDHyperparameters(kfac_like=True, alpha1=0.5)


def test_negative_schedule_value_raises() -> None:
    """A β1 schedule is checked when used."""
    hyper = SINGDHyperparameters(lr_cov=lambda steps: -1.0, T=1)
    record = make_records(np.random.default_rng(7), 1)[0]
    with pytest.raises(ValueError, match="lr_cov schedule"):
        singd_step(singd_init(record.grad, hyper), record, hyper)
