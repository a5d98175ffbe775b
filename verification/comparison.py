"""Compare a recorded torch run with its oracle replay against a propagated rounding bound.

Tolerance rule (first-order rounding-error analysis, as in :mod:`verification.tolerances`):
the bound on every state entry is *propagated along the oracle trajectory*.
Each operation of SPEC §1.1–§1.4 adds its own rounding error, ``(n + 2)·eps``
times the magnitude of its result evaluated on absolute values (Higham: error
relative to ``|A||B|``, never to ``|AB|``; ``n`` the reduction length), and
passes on the errors already in its operands to first order
(``|X1|…(δ_i 𝟙)…|Xk|`` for a perturbed factor of a product).  So the factor
errors grow with ``β1 |m|`` per update, the parameter error with ``β2`` times
the momentum error, and every stored number adds ``eps`` of its magnitude
(in bf16, updates below half an ulp are lost: that is this ``eps`` per step).
Π̂ is accounted as at most doubling an entry (tril/triu/hierarchical coupling
blocks) plus a ``d``-term average (Toeplitz).  Nothing is fitted to the data.

The propagated bound compounds over the steps, so late steps are held only
loosely.  The one-step ("teacher-forced") comparisons :func:`compare_singd_local`
and :func:`compare_kfac_local` restart the oracle at every step from the
implementation's own recorded state and apply the same per-step rules with
zero incoming error, a bound that does not grow with the step count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from reference.kfac import KFACHyperparameters, KFACState, kfac_init, kfac_step
from reference.numbers import FLOAT64
from reference.updates import (
    SINGDHyperparameters,
    SINGDState,
    StepRecord,
    lr_cov_at,
    singd_init,
    singd_step,
)
from verification.recording import RecordedRun
from verification.replay import step_records
from verification.tolerances import EPS, chain_bound, matmul_bound

#: Π̂ at most doubles an entry (tril/triu/hierarchical coupling blocks, SPEC §2).
PROJECTION_GAIN = 2.0


@dataclass(frozen=True)
class Deviation:
    """Largest deviation (relative to its bound) of one state entry over a trajectory.

    Attributes:
        layer: The layer name.
        key: The state entry (``"K"``, ``"W"``, …).
        step: The step (0-based) where ``error / bound`` is largest.
        error: ``max |torch − oracle|`` at that step.
        bound: The propagated first-order bound at that step.
        magnitude: The entry's magnitude at that step (for reports in eps units).
    """

    layer: str
    key: str
    step: int
    error: float
    bound: float
    magnitude: float


def _abs_chain(*matrices: np.ndarray) -> np.ndarray:
    """``|X1| |X2| … |Xk|``: the magnitude of a product for rounding-error bounds."""
    result = np.abs(matrices[0])
    for matrix in matrices[1:]:
        result = result @ np.abs(matrix)
    return result


def _perturbed(matrices: Sequence[np.ndarray], errors: Sequence[float]) -> float:
    """First-order bound on ``max |δ(X1 … Xk)|`` when ``Xi`` has entry errors ``<= errors[i]``.

    ``Σ_i |X1| … |X_{i-1}| (errors[i] · 𝟙) |X_{i+1}| … |Xk|``, largest entry.
    """
    total = 0.0
    for index, error in enumerate(errors):
        if error == 0:
            continue
        factors = [np.abs(m) for m in matrices]
        factors[index] = np.full(np.shape(matrices[index]), error)
        total = total + _abs_chain(*factors)
    return float(np.max(total))


@dataclass
class _FactorBound:
    """Running bounds for one factor ``K`` (or ``C``) and its momentum.

    Attributes:
        factor: Bound on ``max |δK|``.
        momentum: Bound on ``max |δm_K|``.
        momentum_magnitude: Magnitude of the latest ``m_K`` (for reports).
    """

    factor: float = 0.0
    momentum: float = 0.0
    momentum_magnitude: float = 0.0


def _inner_bound(
    dtype: torch.dtype,
    factor: np.ndarray,
    error: float,
    statistics: Sequence[np.ndarray],
    shared: int,
) -> tuple[np.ndarray, float]:
    """Magnitude and error bound of ``H = Σ_passes Π̂(Kᵀ AᵀA K)`` (SPEC §1.1).

    Rounding: the statistic itself (averaging over ``shared`` positions and
    the scaling, once per appearance), ``Kᵀ Aᵀ`` (``d``), the Gram product
    (``n``), Π̂ (at most a ``d``-term average) and the sum over passes; plus
    the propagated ``δK`` (first order).
    """
    d = factor.shape[0]
    magnitude = np.zeros_like(factor)
    error_h = 0.0
    for a in statistics:
        rho = chain_bound(dtype, [shared, shared, d, a.shape[0], d, len(statistics)])
        chain = [factor.T, a.T, a, factor]
        term = PROJECTION_GAIN * _abs_chain(*chain)
        magnitude = magnitude + term
        error_h += rho * float(term.max()) + PROJECTION_GAIN * _perturbed(
            chain, [error, 0, 0, error]
        )
    return magnitude, error_h


def _gram_bound(dtype: torch.dtype, factor: np.ndarray, error: float) -> tuple[np.ndarray, float]:
    """Magnitude and error bound of ``Π̂(KᵀK)`` (product ``d``, Π̂ ``d``, propagated ``δK``)."""
    d = factor.shape[0]
    magnitude = PROJECTION_GAIN * _abs_chain(factor.T, factor)
    error_gram = chain_bound(dtype, [d, d]) * float(magnitude.max())
    error_gram += PROJECTION_GAIN * _perturbed([factor.T, factor], [error, error])
    return magnitude, error_gram


def _trace_bound(dtype: torch.dtype, magnitude: np.ndarray, error: float) -> tuple[float, float]:
    """Magnitude and error bound of ``tr(X)`` from entry magnitude/error bounds of ``X``."""
    d = magnitude.shape[0]
    trace = float(np.trace(magnitude))
    return trace, d * error + chain_bound(dtype, [d]) * trace


def _momentum_bound(
    dtype: torch.dtype,
    hyper: SINGDHyperparameters,
    own: tuple[np.ndarray, float, np.ndarray, float],
    other: tuple[np.ndarray, float, np.ndarray, float],
    old_momentum: np.ndarray,
    old_error: float,
) -> tuple[float, float]:
    """Magnitude and error bound of the new ``m_K`` (SPEC §1.3; ``m_C`` with roles swapped).

    Args:
        dtype: The dtype whose rounding is bounded.
        hyper: The hyper-parameters.
        own: ``(|H_K|, δH_K, |Π̂(KᵀK)|, δΠ̂(KᵀK))``.
        other: The same for ``C``.
        old_momentum: The oracle's previous ``m_K``.
        old_error: Bound on the previous ``δm_K``.
    """
    h, error_h, gram, error_gram = own
    h_other, error_h_other, gram_other, error_gram_other = other
    d_other = h_other.shape[0]
    if hyper.kfac_like:
        terms = float(h.max()) + hyper.damping * float(gram.max()) + 1
        error = error_h + hyper.damping * error_gram
        divisor = 1
    else:
        trace_h, error_trace_h = _trace_bound(dtype, h_other, error_h_other)
        trace_gram, error_trace_gram = _trace_bound(dtype, gram_other, error_gram_other)
        terms = trace_h * float(h.max()) + hyper.damping * trace_gram * float(gram.max()) + d_other
        error = error_trace_h * float(h.max()) + trace_h * error_h
        error += hyper.damping * (error_trace_gram * float(gram.max()) + trace_gram * error_gram)
        divisor = d_other
    # Three additions, the scaling and the storage of the bracket round once each.
    error += 4 * EPS[dtype] * terms
    old = hyper.alpha1 * float(np.abs(old_momentum).max())
    magnitude = 0.5 * terms / divisor + old
    return magnitude, 0.5 * error / divisor + hyper.alpha1 * old_error + 2 * EPS[dtype] * (
        old + magnitude
    )


def _factor_step_bound(
    dtype: torch.dtype,
    factor: np.ndarray,
    new_factor: np.ndarray,
    momentum: np.ndarray,
    bounds: _FactorBound,
    beta1: float,
    normalize: bool,
) -> float:
    """Bound on ``δK`` after ``K ← K − β K m`` (SPEC §1.4a).

    ``β = β1 / max(1, ‖m‖_∞)`` with ``normalize_lr_cov``; ``1/max(1, x)`` is
    1-Lipschitz, so ``δβ ≤ β1 δm``.
    """
    d = factor.shape[0]
    step = beta1 / max(1.0, float(np.abs(momentum).max())) if normalize else beta1
    error_step = beta1 * bounds.momentum if normalize else 0.0
    product = float(_abs_chain(factor, momentum).max())
    error = bounds.factor + step * _perturbed([factor, momentum], [bounds.factor, bounds.momentum])
    error += step * matmul_bound(dtype, d) * product + error_step * product
    return error + EPS[dtype] * (float(np.abs(new_factor).max()) + step * product)


@dataclass(frozen=True)
class _SINGDBounds:
    """Error bounds of one layer's SINGD state (all zero: an exactly known state).

    Attributes:
        k: Bounds of ``K`` and ``m_K``.
        c: Bounds of ``C`` and ``m_C``.
        w: Bound on ``max |δW~|``.
        m_w: Bound on ``max |δm_W~|``.
    """

    k: _FactorBound = field(default_factory=_FactorBound)
    c: _FactorBound = field(default_factory=_FactorBound)
    w: float = 0.0
    m_w: float = 0.0


def _factor_bounds(
    dtype: torch.dtype,
    hyper: SINGDHyperparameters,
    before: SINGDState,
    after: SINGDState,
    record: StepRecord,
    shared: int,
    incoming: _SINGDBounds,
) -> tuple[_FactorBound, _FactorBound]:
    """Bounds of ``K``, ``m_K``, ``C``, ``m_C`` after a factor step (SPEC §1.3)."""
    own_k = (
        *_inner_bound(dtype, before.K, incoming.k.factor, [a for a, _ in record.stats], shared),
        *_gram_bound(dtype, before.K, incoming.k.factor),
    )
    own_c = (
        *_inner_bound(dtype, before.C, incoming.c.factor, [g for _, g in record.stats], shared),
        *_gram_bound(dtype, before.C, incoming.c.factor),
    )
    beta1 = lr_cov_at(hyper.lr_cov, before.steps)
    bounds = []
    for own, other, old, new, old_m, new_m, bound in (
        (own_k, own_c, before.K, after.K, before.m_K, after.m_K, incoming.k),
        (own_c, own_k, before.C, after.C, before.m_C, after.m_C, incoming.c),
    ):
        magnitude, momentum = _momentum_bound(dtype, hyper, own, other, old_m, bound.momentum)
        with_momentum = _FactorBound(bound.factor, momentum, magnitude)
        factor = _factor_step_bound(
            dtype, old, new, new_m, with_momentum, beta1, hyper.normalize_lr_cov
        )
        bounds.append(_FactorBound(factor, momentum, magnitude))
    return bounds[0], bounds[1]


def _parameter_bounds(
    dtype: torch.dtype,
    hyper: SINGDHyperparameters | KFACHyperparameters,
    before: SINGDState | KFACState,
    after: SINGDState | KFACState,
    preconditioned: tuple[float, float],
    incoming: tuple[float, float],
) -> tuple[float, float]:
    """Bounds of ``W~`` and ``m_W~`` after SPEC §1.4's update.

    Args:
        dtype: The dtype whose rounding is bounded.
        hyper: Supplies ``β2``, ``α2`` and ``γ``.
        before: The oracle state before the step.
        after: The oracle state after it.
        preconditioned: Magnitude and error bound of the preconditioned gradient.
        incoming: Bounds of ``δW~`` and ``δm_W~`` before the step.
    """
    eps = EPS[dtype]
    magnitude_g, error_g = preconditioned
    error_w, error_m_w = incoming
    w_old = float(np.abs(before.W).max())
    error_g += hyper.weight_decay * (error_w + eps * w_old) + eps * (
        magnitude_g + hyper.weight_decay * w_old
    )
    m_w_old = hyper.momentum * float(np.abs(before.m_W).max())
    m_w = float(np.abs(after.m_W).max())
    error_m_w = hyper.momentum * error_m_w + error_g + eps * (m_w_old + m_w)
    w = float(np.abs(after.W).max())
    return error_w + hyper.lr * error_m_w + eps * (hyper.lr * m_w + w), error_m_w


@dataclass(frozen=True)
class _Method:
    """One optimizer's oracle stepper and rounding bounds, for the shared comparison loops.

    Attributes:
        init: The oracle's initial state, ``init(W~, hyper, numbers)``.
        step: One oracle step, ``step(state, record, hyper, numbers)``.
        state_type: The oracle's state class (for :func:`_recorded_state`).
        exact: The bounds of an exactly known state (all zero).
        step_bounds: The bounds after one step,
            ``step_bounds(dtype, hyper, before, after, record, shared, incoming)``.
        entry_bounds: ``(bound, magnitude)`` per compared entry,
            ``entry_bounds(bounds, state, hyper)``.
    """

    init: Callable[..., Any]
    step: Callable[..., Any]
    state_type: type[SINGDState] | type[KFACState]
    exact: Callable[[], Any]
    step_bounds: Callable[..., Any]
    entry_bounds: Callable[[Any, Any, Any], dict[str, tuple[float, float]]]


def _recorded_state(
    state_type: type[SINGDState] | type[KFACState], recorded: dict[str, np.ndarray], steps: int
) -> SINGDState | KFACState:
    """The implementation's own recorded state as oracle input (exact float64 copies).

    With ``α1 = 0`` SINGD's recorded momenta are zeros, which the oracle step
    never reads (it multiplies them by ``α1``).
    """
    names = [f.name for f in fields(state_type) if f.name != "steps"]
    return state_type(steps, **{key: recorded[key] for key in names})


def _compare(
    method: _Method,
    run: RecordedRun,
    oracle: dict[str, list[SINGDState]] | dict[str, list[KFACState]],
    hyper: SINGDHyperparameters | KFACHyperparameters,
    dtype: torch.dtype,
    approx: str,
    loss_average: str | None,
    per_step: list[Deviation] | None,
) -> list[Deviation]:
    """Worst deviation per layer and entry, bounds propagated along the ``oracle`` trajectory.

    Shared by :func:`compare_singd` (SPEC §1.3/§1.4) and :func:`compare_kfac`
    (SPEC §1.2/§1.4); ``method`` supplies the per-step and per-entry bounds.
    """
    deviations = []
    for name, states in oracle.items():
        records = step_records(run, name, approx, loss_average)
        shared = _shared_positions(run, name, approx)
        bounds = method.exact()
        before = method.init(run.initial_weights[name], hyper, FLOAT64)
        worst: dict[str, Deviation] = {}
        for t, (state, record) in enumerate(zip(states, records, strict=True)):
            bounds = method.step_bounds(dtype, hyper, before, state, record, shared, bounds)
            entries = method.entry_bounds(bounds, state, hyper)
            _record_worst(worst, name, t, run.steps[t][name].state, state, entries, per_step)
            before = state
        deviations.extend(worst.values())
    return deviations


def _compare_local(
    method: _Method,
    run: RecordedRun,
    hyper: SINGDHyperparameters | KFACHyperparameters,
    dtype: torch.dtype,
    approx: str,
    loss_average: str | None,
    per_step: list[Deviation] | None,
) -> list[Deviation]:
    """Worst one-step deviation per layer and entry, each step from the recorded state.

    Shared by :func:`compare_singd_local` and :func:`compare_kfac_local`: one
    float64 ``method.step`` per step, bounded with zero incoming error.
    """
    deviations = []
    for name in run.layers:
        records = step_records(run, name, approx, loss_average)
        shared = _shared_positions(run, name, approx)
        before = method.init(run.initial_weights[name], hyper, FLOAT64)
        worst: dict[str, Deviation] = {}
        for t, record in enumerate(records):
            state = method.step(before, record, hyper, FLOAT64)
            bounds = method.step_bounds(dtype, hyper, before, state, record, shared, method.exact())
            entries = method.entry_bounds(bounds, state, hyper)
            recorded = run.steps[t][name].state
            _record_worst(worst, name, t, recorded, state, entries, per_step)
            before = _recorded_state(method.state_type, recorded, t + 1)
        deviations.extend(worst.values())
    return deviations


def _singd_step_bounds(
    dtype: torch.dtype,
    hyper: SINGDHyperparameters,
    before: SINGDState,
    after: SINGDState,
    record: StepRecord,
    shared: int,
    incoming: _SINGDBounds,
) -> _SINGDBounds:
    """Bounds after one oracle step ``before → after``, given the bounds ``incoming`` of ``before``.

    Each operation of SPEC §1.3/§1.4 adds its rounding error
    ``(n + 2) · eps · |magnitude|`` and passes on the errors of its inputs to
    first order (:func:`_perturbed`).
    """
    k, c = incoming.k, incoming.c
    if before.steps % hyper.T == 0:
        k, c = _factor_bounds(dtype, hyper, before, after, record, shared, incoming)
    d_o, d_i = after.W.shape
    chain = [after.C, after.C.T, record.grad, after.K, after.K.T]
    magnitude_g = float(_abs_chain(*chain).max())
    error_g = chain_bound(dtype, [d_o, d_o, d_i, d_i]) * magnitude_g
    error_g += _perturbed(chain, [c.factor] * 2 + [0] + [k.factor] * 2)
    w, m_w = _parameter_bounds(
        dtype, hyper, before, after, (magnitude_g, error_g), (incoming.w, incoming.m_w)
    )
    return _SINGDBounds(k, c, w, m_w)


def _singd_entry_bounds(
    bounds: _SINGDBounds, state: SINGDState, hyper: SINGDHyperparameters
) -> dict[str, tuple[float, float]]:
    """``(bound, magnitude)`` per compared entry; ``m_K``/``m_C`` not with ``α1 = 0``.

    With ``α1 = 0`` the momenta are never read, so the optimizer need not store
    them (SPEC §1.4a).
    """
    entries = {
        "K": (bounds.k.factor, float(np.abs(state.K).max())),
        "C": (bounds.c.factor, float(np.abs(state.C).max())),
        "m_K": (bounds.k.momentum, bounds.k.momentum_magnitude),
        "m_C": (bounds.c.momentum, bounds.c.momentum_magnitude),
        "W": (bounds.w, float(np.abs(state.W).max())),
        "m_W": (bounds.m_w, float(np.abs(state.m_W).max())),
    }
    if hyper.alpha1 == 0:
        del entries["m_K"], entries["m_C"]
    return entries


_SINGD = _Method(
    init=singd_init,
    step=singd_step,
    state_type=SINGDState,
    exact=_SINGDBounds,
    step_bounds=_singd_step_bounds,
    entry_bounds=_singd_entry_bounds,
)


def compare_singd(
    run: RecordedRun,
    oracle: dict[str, list[SINGDState]],
    hyper: SINGDHyperparameters,
    dtype: torch.dtype,
    approx: str = "expand",
    loss_average: str | None = "batch",
    per_step: list[Deviation] | None = None,
) -> list[Deviation]:
    """Worst deviation (relative to its bound) of every layer's K, C, m_K, m_C, W~, m_W~.

    The bound of every entry is propagated step by step along the oracle
    trajectory (module docstring, :func:`_singd_step_bounds`).  ``m_K``/``m_C``
    are not compared with ``α1 = 0``, where the optimizer need not store them.
    ``per_step``, when given, receives the deviation of every entry at every step.
    """
    return _compare(_SINGD, run, oracle, hyper, dtype, approx, loss_average, per_step)


def compare_singd_local(
    run: RecordedRun,
    hyper: SINGDHyperparameters,
    dtype: torch.dtype,
    approx: str = "expand",
    loss_average: str | None = "batch",
    per_step: list[Deviation] | None = None,
) -> list[Deviation]:
    """One-step ("teacher-forced") comparison: every step from the implementation's own state.

    For every step ``t`` one float64 oracle step starts from the recorded
    state after step ``t − 1`` (the initial state for ``t = 0``) with the record
    of step ``t``, and the recorded state after step ``t`` is compared with it
    against the one-step bound: :func:`_singd_step_bounds` with zero incoming
    error.  Unlike :func:`compare_singd`, the bound does not compound, so a
    late-step error is held to the tolerance of a single step.
    """
    return _compare_local(_SINGD, run, hyper, dtype, approx, loss_average, per_step)


def _solve_error(matrix: np.ndarray, dtype: torch.dtype) -> tuple[float, float]:
    """``‖M⁻¹‖₂`` and the relative 2-norm error of a Cholesky solve with ``M`` (SPD).

    Higham Thm. 10.4: the solve is backward stable with ``|ΔM| ≤ γ_{3d+1} |R̂ᵀ||R̂|``
    and ``‖|R̂ᵀ||R̂|‖₂ ≤ d ‖M‖₂``, so the relative error is at most
    ``κ₂(M) · d · (3d + 3) · eps`` (first order).
    """
    d = matrix.shape[0]
    eigenvalues = np.linalg.eigvalsh(matrix)
    inverse_norm = 1 / float(eigenvalues.min())
    condition = float(eigenvalues.max()) * inverse_norm
    return inverse_norm, condition * d * matmul_bound(dtype, 3 * d + 1)


@dataclass(frozen=True)
class _KFACBounds:
    """Error bounds of one layer's KFAC state (all zero: an exactly known state).

    Attributes:
        s_k: Bound on ``max |δS_K|``.
        s_c: Bound on ``max |δS_C|``.
        w: Bound on ``max |δW~|``.
        m_w: Bound on ``max |δm_W~|``.
    """

    s_k: float = 0.0
    s_c: float = 0.0
    w: float = 0.0
    m_w: float = 0.0


def _kfac_step_bounds(
    dtype: torch.dtype,
    hyper: KFACHyperparameters,
    before: KFACState,
    after: KFACState,
    record: StepRecord,
    shared: int,
    incoming: _KFACBounds,
) -> _KFACBounds:
    """Bounds after one KFAC oracle step ``before → after`` (see :func:`compare_kfac`)."""
    eps = EPS[dtype]
    errors = {"S_K": incoming.s_k, "S_C": incoming.s_c}
    if before.steps % hyper.T == 0:
        beta1 = lr_cov_at(hyper.lr_cov, before.steps)
        for key, index in (("S_K", 0), ("S_C", 1)):
            statistics = [pair[index] for pair in record.stats]
            rho = chain_bound(dtype, [shared, shared, statistics[0].shape[0]])
            rho += matmul_bound(dtype, len(statistics))
            gram = float(sum(_abs_chain(s.T, s) for s in statistics).max())
            new = float(np.abs(getattr(after, key)).max())
            errors[key] = (1 - beta1) * errors[key] + beta1 * rho * gram + 2 * eps * new
    d_o, d_i = after.W.shape
    damped_k = after.S_K + hyper.damping * np.eye(d_i)
    damped_c = after.S_C + hyper.damping * np.eye(d_o)
    inverse_k, solve_k = _solve_error(damped_k, dtype)
    inverse_c, solve_c = _solve_error(damped_c, dtype)
    right = np.linalg.norm(record.grad @ np.linalg.inv(damped_k))
    left = np.linalg.norm(np.linalg.solve(damped_c, record.grad))
    preconditioned = np.linalg.solve(damped_c, record.grad) @ np.linalg.inv(damped_k)
    magnitude_g = float(np.linalg.norm(preconditioned))
    error_g = (solve_k + solve_c + eps) * magnitude_g
    error_g += inverse_c**2 * d_o * errors["S_C"] * right
    error_g += inverse_k**2 * d_i * errors["S_K"] * left
    w, m_w = _parameter_bounds(
        dtype, hyper, before, after, (magnitude_g, error_g), (incoming.w, incoming.m_w)
    )
    return _KFACBounds(errors["S_K"], errors["S_C"], w, m_w)


def _kfac_entry_bounds(bounds: _KFACBounds, state: KFACState) -> dict[str, tuple[float, float]]:
    """``(bound, magnitude)`` of ``S_K``, ``S_C``, ``W~``, ``m_W~``."""
    return {
        "S_K": (bounds.s_k, float(np.abs(state.S_K).max())),
        "S_C": (bounds.s_c, float(np.abs(state.S_C).max())),
        "W": (bounds.w, float(np.abs(state.W).max())),
        "m_W": (bounds.m_w, float(np.abs(state.m_W).max())),
    }


_KFAC = _Method(
    init=kfac_init,
    step=kfac_step,
    state_type=KFACState,
    exact=_KFACBounds,
    step_bounds=_kfac_step_bounds,
    entry_bounds=lambda bounds, state, _hyper: _kfac_entry_bounds(bounds, state),
)


def compare_kfac(
    run: RecordedRun,
    oracle: dict[str, list[KFACState]],
    hyper: KFACHyperparameters,
    dtype: torch.dtype,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> list[Deviation]:
    """Worst deviation (relative to its bound) of every layer's S_K, S_C, W~, m_W~ (SPEC §1.2).

    Factors: ``S ← (1 − β1) S + β1 Σ AᵀA`` adds the rounding of the statistic
    (averaging over shared positions, scaling), of the Gram product (``n``)
    and of the sum over passes, relative to ``Σ |A|ᵀ|A|``, plus ``2 eps |S|``
    for the interpolation.  Preconditioning (normwise, then ``max ≤ ‖·‖_F``):
    each Cholesky solve adds ``κ₂ · d · (3d + 3) eps`` relative error
    (:func:`_solve_error`), and a factor error ``δS`` adds
    ``‖M⁻¹‖₂² ‖δS‖₂ ‖rest‖_F`` with ``‖δS‖₂ ≤ d max|δS|``.  Momentum and
    parameter updates as in :func:`compare_singd`.
    """
    return _compare(_KFAC, run, oracle, hyper, dtype, approx, loss_average, None)


def compare_kfac_local(
    run: RecordedRun,
    hyper: KFACHyperparameters,
    dtype: torch.dtype,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> list[Deviation]:
    """One-step comparison of KFAC, as :func:`compare_singd_local` (zero incoming error)."""
    return _compare_local(_KFAC, run, hyper, dtype, approx, loss_average, None)


def _record_worst(
    worst: dict[str, Deviation],
    name: str,
    step: int,
    torch_state: dict[str, np.ndarray],
    oracle_state: object,
    bounds: dict[str, tuple[float, float]],
    per_step: list[Deviation] | None = None,
) -> None:
    """Update ``worst`` with this step's deviations of the entries in ``bounds`` (and log them)."""
    for key, (bound, magnitude) in bounds.items():
        if key not in torch_state:
            continue
        error = float(np.abs(torch_state[key] - getattr(oracle_state, key)).max())
        candidate = Deviation(name, key, step, error, bound, magnitude)
        if per_step is not None:
            per_step.append(candidate)
        if key not in worst or error * worst[key].bound > worst[key].error * bound:
            worst[key] = candidate


def _shared_positions(run: RecordedRun, name: str, approx: str) -> int:
    """Positions averaged into one row of ``A`` (reduce) or 1 (expand), plus conv groups."""
    module = run.layers[name]
    first = run.steps[0][name].passes[0]
    groups = module.groups if isinstance(module, nn.Conv2d) else 1
    if approx == "expand":
        return groups
    if isinstance(module, nn.Conv2d):
        locations = first.output_grads[0, 0].numel()
    else:
        locations = first.inputs[0].numel() // first.inputs.shape[-1]
    return groups * locations


def violations(deviations: Sequence[Deviation]) -> list[Deviation]:
    """The deviations above their bounds."""
    return [d for d in deviations if not d.error <= d.bound]
