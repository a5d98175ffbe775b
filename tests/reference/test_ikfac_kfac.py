"""The oracle's KFAC baseline (``reference.kfac``) and IKFAC ≈ KFAC (SPEC §1.2, §1.3).

* KFAC's first step in closed form, float64 against mpmath, ``T`` semantics,
  bad input;
* IKFAC tracks KFAC to first order in ``β1``: over a fixed horizon
  ``β1 · steps``, the gap between ``K Kᵀ`` and ``(S_K + λI)⁻¹`` (and ``C Cᵀ``,
  and the parameters) shrinks like ``β1``.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.kfac import (
    KFACHyperparameters,
    KFACState,
    kfac_init,
    kfac_step,
    kfac_trajectory,
)
from reference.numbers import FLOAT64, mpmath_numbers
from reference.updates import SINGDHyperparameters, StepRecord, singd_trajectory
from tests.tolerances import EPS_BY_NAME

EPS64 = EPS_BY_NAME["float64"]
D_OUT, D_IN, N_ROWS = 3, 4, 3


def uniform(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Entries uniform in [-1, 1]."""
    return rng.uniform(-1.0, 1.0, size=shape)


def make_records(rng: np.random.Generator, steps: int, passes: int = 1) -> list[StepRecord]:
    """Random records: ``passes`` (A, G) pairs per step, entries in [-1, 1]."""
    return [
        StepRecord(
            grad=uniform(rng, D_OUT, D_IN),
            stats=tuple(
                (uniform(rng, N_ROWS, D_IN), uniform(rng, N_ROWS, D_OUT)) for _ in range(passes)
            ),
        )
        for _ in range(steps)
    ]


# ------------------------------------------------------------------ KFAC
@given(seed=st.integers(0, 2**32 - 1), passes=st.integers(1, 2))
def test_kfac_first_step_closed_form(seed: int, passes: int) -> None:
    """From S = (1 − λ)I: S' = (1 − β1)(1 − λ)I + β1 ΣAᵀA, W' = W − β2 (S'_C+λI)⁻¹∇W(S'_K+λI)⁻¹."""
    rng = np.random.default_rng(seed)
    hyper = KFACHyperparameters(lr=0.1, damping=0.1, lr_cov=0.2, T=1)
    record = make_records(rng, 1, passes)[0]
    w0 = uniform(rng, D_OUT, D_IN)
    state = kfac_step(kfac_init(w0, hyper), record, hyper)
    lam, beta1 = hyper.damping, hyper.lr_cov
    u = sum(a.T @ a for a, _ in record.stats)
    gc = sum(g.T @ g for _, g in record.stats)
    s_k = (1 - beta1) * (1 - lam) * np.eye(D_IN) + beta1 * u
    s_c = (1 - beta1) * (1 - lam) * np.eye(D_OUT) + beta1 * gc
    delta = np.linalg.solve(s_c + lam * np.eye(D_OUT), record.grad)
    delta = np.linalg.solve((s_k + lam * np.eye(D_IN)).T, delta.T).T
    # Factors: one product of length n per pass plus 3 additions, entries of
    # magnitude <= passes·n: (passes·(n + 2) + 3)·eps·passes·n.
    factor_tol = (passes * (N_ROWS + 2) + 3) * EPS64 * passes * N_ROWS
    assert np.abs(state.S_K - s_k).max() <= factor_tol
    assert np.abs(state.S_C - s_c).max() <= factor_tol
    # W: two d×d inverses of matrices with eigenvalues in [λ, 1 + passes·n]
    # (condition κ <= (1 + passes·n)/λ): inverse vs solve differ by
    # O(d·eps·κ) relative each; |∇W| <= 1 and ‖(S + λI)⁻¹‖ <= 1/λ, times β2.
    kappa = (1 + passes * N_ROWS) / lam
    w_tol = hyper.lr * 2 * 2 * D_IN * EPS64 * kappa / lam**2
    assert np.abs(state.W - (w0 - hyper.lr * delta)).max() <= w_tol


def test_kfac_initial_preconditioner_is_identity() -> None:
    """With β1 = 0 at the first step (a schedule), (S + λI)⁻¹ = ((1 − λ) + λ) I = I."""
    hyper = KFACHyperparameters(
        lr=0.5, momentum=0.0, damping=0.25, lr_cov=lambda s: 0.0 if s == 0 else 0.1
    )
    rng = np.random.default_rng(1)
    record = make_records(rng, 1)[0]
    w0 = uniform(rng, D_OUT, D_IN)
    state = kfac_step(kfac_init(w0, hyper), record, hyper)
    # (1 − λ) + λ = 1 exactly for λ = 1/4; the inverse of I is exact: W' = W − β2 ∇W,
    # one rounding of the product and one of the difference.
    assert np.abs(state.W - (w0 - hyper.lr * record.grad)).max() <= 2 * EPS64 * 2


def test_kfac_float64_matches_mpmath() -> None:
    """KFAC trajectory (T = 2, accumulation, weight decay, momentum) in float64 vs mpmath(50)."""
    rng = np.random.default_rng(2)
    hyper = KFACHyperparameters(
        lr=0.1, momentum=0.5, damping=0.1, weight_decay=0.1, T=2, lr_cov=0.1
    )
    records = make_records(rng, 4, passes=2)
    w0 = uniform(rng, D_OUT, D_IN)
    fast = kfac_trajectory(w0, records, hyper, FLOAT64)
    exact = kfac_trajectory(w0, records, hyper, mpmath_numbers(50))
    lam = hyper.damping
    kappa = (1 + 2 * N_ROWS) / lam  # eigenvalues of S + λI lie in [λ, 1 + passes·n]
    for f, e in zip(fast, exact, strict=True):
        for field in ("S_K", "S_C", "W", "m_W"):
            exact_value = np.asarray(getattr(e, field), dtype=np.float64)
            error = np.abs(getattr(f, field) - exact_value).max()
            # Per step: factors as in the closed-form test, (2(n + 2) + 3)·eps·2n;
            # the preconditioned gradient: two inverses, d·eps·κ each relative
            # to ‖(S + λI)⁻¹‖ <= 1/λ; errors add over steps (β's keep it contractive).
            per_step = (2 * (N_ROWS + 2) + 3) * 2 * N_ROWS + 2 * D_IN * kappa / lam**2
            assert error <= f.steps * per_step * EPS64 * max(1.0, np.abs(exact_value).max()), field


def test_kfac_factors_change_only_on_period_steps() -> None:
    """T = 3: S_K and S_C change at steps 0 and 3 only."""
    rng = np.random.default_rng(3)
    hyper = KFACHyperparameters(T=3, lr_cov=0.1)
    records = [
        r if i % 3 == 0 else StepRecord(grad=r.grad) for i, r in enumerate(make_records(rng, 5))
    ]
    w0 = uniform(rng, D_OUT, D_IN)
    states: list[KFACState] = [kfac_init(w0, hyper), *kfac_trajectory(w0, records, hyper)]
    for before, after in itertools.pairwise(states):
        changed = not np.array_equal(before.S_K, after.S_K) and not np.array_equal(
            before.S_C, after.S_C
        )
        assert changed == (before.steps % 3 == 0)


def test_kfac_bad_input_raises() -> None:
    """Invalid hyper-parameters, shapes and empty statistics raise ValueError naming them."""
    with pytest.raises(ValueError, match="momentum"):
        KFACHyperparameters(momentum=1.5)
    with pytest.raises(ValueError, match="T must"):
        KFACHyperparameters(T=0)
    hyper = KFACHyperparameters(T=1)
    state = kfac_init(np.zeros((D_OUT, D_IN)), hyper)
    with pytest.raises(ValueError, match="stats is empty"):
        kfac_step(state, StepRecord(grad=np.zeros((D_OUT, D_IN))), hyper)
    with pytest.raises(ValueError, match="grad has shape"):
        kfac_step(state, StepRecord(grad=np.zeros((D_IN, D_OUT))), hyper)


# ------------------------------------------------------------ IKFAC ≈ KFAC
#: β1 values of the order study and the fixed horizon β1 · steps.
BETA1S = (0.1, 0.05, 0.025, 0.0125)
HORIZON = 0.4
DAMPING = 0.1


def ikfac_kfac_gaps(beta1: float, seed: int) -> tuple[float, float, float]:
    """Max-entry gaps ``(K Kᵀ vs (S_K+λI)⁻¹, C Cᵀ vs (S_C+λI)⁻¹, W vs W)`` at the horizon.

    The statistics and gradients are smooth in the time ``t = β1 · step``
    (``A(t) = A₀ + t A₁``, likewise ``G`` and ``∇W``), and ``β2 = β1`` with no
    momentum, so both methods discretise the same ODE in ``t`` (SPEC §1.3:
    ``X ← X − β1 (X U X + λX² − X) + O(β1²)``) and ``W`` follows it too.
    """
    rng = np.random.default_rng(seed)
    a0, a1 = uniform(rng, N_ROWS, D_IN), uniform(rng, N_ROWS, D_IN)
    g0, g1 = uniform(rng, N_ROWS, D_OUT), uniform(rng, N_ROWS, D_OUT)
    grad0, grad1 = uniform(rng, D_OUT, D_IN), uniform(rng, D_OUT, D_IN)
    w0 = uniform(rng, D_OUT, D_IN)
    records = [
        StepRecord(grad=grad0 + t * grad1, stats=((a0 + t * a1, g0 + t * g1),))
        for t in (beta1 * step for step in range(round(HORIZON / beta1)))
    ]
    common = {"lr": beta1, "momentum": 0.0, "damping": DAMPING, "lr_cov": beta1, "T": 1}
    ikfac = singd_trajectory(
        w0, records, SINGDHyperparameters(**common, kfac_like=True, alpha1=0.0)
    )[-1]
    kfac = kfac_trajectory(w0, records, KFACHyperparameters(**common))[-1]
    gap_k = np.abs(ikfac.K @ ikfac.K.T - np.linalg.inv(kfac.S_K + DAMPING * np.eye(D_IN))).max()
    gap_c = np.abs(ikfac.C @ ikfac.C.T - np.linalg.inv(kfac.S_C + DAMPING * np.eye(D_OUT))).max()
    return float(gap_k), float(gap_c), float(np.abs(ikfac.W - kfac.W).max())


def empirical_orders(seed: int) -> np.ndarray:
    """Least-squares slopes of log(gap) against log(β1) over BETA1S, for (K, C, W)."""
    gaps = np.log([ikfac_kfac_gaps(beta1, seed) for beta1 in BETA1S])
    return np.array([np.polyfit(np.log(BETA1S), gaps[:, j], 1)[0] for j in range(3)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ikfac_tracks_kfac_to_first_order(seed: int) -> None:
    """The IKFAC–KFAC gap at a fixed horizon is O(β1): empirical order >= 0.9.

    Both methods have local error O(β1²) against the common ODE and take
    ``HORIZON/β1`` steps of a stable map, so the gap is ``c₁β1 + c₂β1² + …``:
    slope 1 on a log-log plot, bent below 1 by ``c₂β1/c₁`` at the largest β1.
    An update inconsistent to first order (a missing λ term, a wrong ½, K for
    Kᵀ) leaves an O(1) gap: slope ≈ 0.  0.9 separates the two with room for
    the O(β1²) bend over β1 ∈ [0.0125, 0.1].
    """
    orders = empirical_orders(seed)
    assert (orders >= 0.9).all(), orders


def test_ikfac_and_kfac_agree_after_one_step_to_second_order() -> None:
    """After one step from the common start, the factor gap is O(β1²): at most β1² ‖U + λI − I‖²."""
    rng = np.random.default_rng(9)
    record = make_records(rng, 1)[0]
    a, _ = record.stats[0]
    w0 = uniform(rng, D_OUT, D_IN)
    for beta1 in (1e-2, 1e-3):
        common = {"lr": beta1, "momentum": 0.0, "damping": DAMPING, "lr_cov": beta1, "T": 1}
        ikfac = singd_trajectory(
            w0, [record], SINGDHyperparameters(**common, kfac_like=True, alpha1=0.0)
        )[0]
        kfac = kfac_trajectory(w0, [record], KFACHyperparameters(**common))[0]
        gap = np.abs(ikfac.K @ ikfac.K.T - np.linalg.inv(kfac.S_K + DAMPING * np.eye(D_IN))).max()
        # With E = U + λ − I: K Kᵀ = (I − β1 E/2)² = I − β1E + β1²E²/4 and
        # (I + β1E)⁻¹ = I − β1E + β1²E² − …: gap = β1² ‖¾E² + O(β1 E³)‖ <= β1² ‖E‖²
        # (the series tail is at most β1³‖E‖³/(1 − β1‖E‖) <= β1²‖E‖²/4 when
        # β1‖E‖ <= 1/5; rounding, ~d·eps, is far below β1²).
        e_norm = np.linalg.norm(a.T @ a + (DAMPING - 1) * np.eye(D_IN), 2)
        assert beta1 * e_norm <= 1 / 5
        assert gap <= beta1**2 * e_norm**2


def test_kfac_hyperparameters_are_frozen() -> None:
    """Hyper-parameter objects are immutable (shared between runs)."""
    hyper = KFACHyperparameters()
    with pytest.raises(dataclasses.FrozenInstanceError):
        hyper.lr = 1.0  # type: ignore[misc]
