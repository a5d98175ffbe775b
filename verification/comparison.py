"""Compare a recorded torch run with its float64 oracle replay against derived rounding bounds.

SINGD (SPEC §1.3–§1.4): the bound of every state entry is entrywise and
comes from :mod:`verification.bounds`, which evaluates each step a second
time under the run's arithmetic model (:mod:`verification.arithmetic`:
where torch rounds and in which precision it accumulates) plus the float64
oracle's own rounding.  Three checks use it: the whole trajectory
(:func:`compare_singd`, bounds propagated from the initial ``W~``), blocks
(:func:`compare_singd_blocks`: the oracle restarts from the
implementation's recorded state every ``block`` steps, so no bound
compounds over more than ``block`` steps) and one step at a time
(:func:`compare_singd_local`, ``block = 1``).

KFAC (SPEC §1.2) keeps the scalar first-order rule of
:mod:`verification.tolerances`: every product of reduction length ``n`` adds
``(n + 2)·eps`` times the magnitude of its result evaluated on absolute
values, and errors already in its operands pass on to first order; the
Cholesky solves add ``κ₂·d·(3d + 3)·eps`` (Higham Thm. 10.4).  Nothing is
fitted to the data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from reference.kfac import KFACHyperparameters, KFACState, kfac_init, kfac_step
from reference.numbers import FLOAT64
from reference.statistics import linear_statistics
from reference.updates import (
    SINGDHyperparameters,
    SINGDState,
    StepRecord,
    lr_cov_at,
    singd_init,
    singd_step,
)
from verification.arithmetic import Precision, precision_for
from verification.bounds import StatisticPass, singd_step_bounds
from verification.recording import LayerPass, RecordedRun
from verification.replay import (
    attention_bias,
    attention_row_errors,
    attention_rows,
    layer_statistics,
    step_records,
)
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
            ``step_bounds(dtype, hyper, before, after, record, shared, incoming, distance)``
            (``distance``: :func:`gram_distances` of that step).
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
        distances = gram_distances(run, name, approx, loss_average)
        bounds = method.exact()
        before = method.init(run.initial_weights[name], hyper, FLOAT64)
        worst: dict[str, Deviation] = {}
        for t, (state, record) in enumerate(zip(states, records, strict=True)):
            bounds = method.step_bounds(
                dtype, hyper, before, state, record, shared, bounds, distances[t]
            )
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
        distances = gram_distances(run, name, approx, loss_average)
        before = method.init(run.initial_weights[name], hyper, FLOAT64)
        worst: dict[str, Deviation] = {}
        for t, record in enumerate(records):
            state = method.step(before, record, hyper, FLOAT64)
            bounds = method.step_bounds(
                dtype, hyper, before, state, record, shared, method.exact(), distances[t]
            )
            entries = method.entry_bounds(bounds, state, hyper)
            recorded = run.steps[t][name].state
            _record_worst(worst, name, t, recorded, state, entries, per_step)
            before = _recorded_state(method.state_type, recorded, t + 1)
        deviations.extend(worst.values())
    return deviations


def gram_distances(
    run: RecordedRun, name: str, approx: str, loss_average: str | None
) -> list[tuple[float, float]]:
    """Per step, bounds on ``max |Σ ÂᵀÂ − Σ AᵀA|`` and the same for ``G`` over the passes,
    ``Â`` the statistic of the model's rows, ``A`` the oracle's: zero unless they
    differ (an MHA's internal rows, :func:`attention_row_errors`).

    Rule: with ``|Â − A| ≤ δ`` entrywise, ``|ÂᵀÂ − AᵀA| ≤ |A|ᵀδ + δᵀ|A| + δᵀδ``.
    """
    if all(p.attention is None for step in run.steps for p in step[name].passes):
        return [(0.0, 0.0)] * len(run.steps)
    return [
        (
            _gram_distance([(p.a_abs, p.a_error) for p in passes]),
            _gram_distance([(p.g_abs, p.g_error) for p in passes]),
        )
        for passes in statistic_passes(run, name, approx, loss_average)
    ]


def _gram_distance(pairs: list[tuple[np.ndarray, np.ndarray | float]]) -> float:
    """``max Σ (|A|ᵀδ + δᵀ|A| + δᵀδ)`` over ``(|A|, δ)`` pairs (:func:`gram_distances`)."""
    total: np.ndarray | float = 0.0
    for magnitude, error in pairs:
        error = np.broadcast_to(error, magnitude.shape)
        total = total + magnitude.T @ error + error.T @ magnitude + error.T @ error
    return float(np.max(total, initial=0.0))


def statistic_passes(
    run: RecordedRun, name: str, approx: str, loss_average: str | None
) -> list[list[StatisticPass]]:
    """Per step, the oracle's ``A``, ``G`` of every pass with the magnitudes they average.

    ``|A|`` bounds the magnitude when no positions are averaged (expand without
    groups); otherwise the statistics of ``|a|`` and ``|g|`` do (a mean of
    absolute values bounds the terms a mean of values sums).
    """
    module = run.layers[name]
    shared = _shared_positions(run, name, approx)
    result = []
    for step in run.steps:
        passes = []
        for layer_pass in step[name].passes:
            a, g = layer_statistics(module, layer_pass, approx, loss_average)
            if layer_pass.attention is not None:
                passes.append(_attention_pass(layer_pass, a, g, approx, loss_average))
                continue
            if shared == 1:
                a_abs, g_abs = np.abs(a), np.abs(g)
            else:
                absolute = LayerPass(layer_pass.inputs.abs(), layer_pass.output_grads.abs())
                a_abs, g_abs = layer_statistics(module, absolute, approx, loss_average)
            passes.append(StatisticPass(a, g, a_abs, g_abs))
        result.append(passes)
    return result


#: The SINGD state entries compared, in report order.
SINGD_KEYS = ("K", "C", "m_K", "m_C", "W", "m_W")

#: The compensation terms of ``SINGD(factor_guard="compensated")`` (bf16/fp16 factors):
#: after a factor step compared with the oracle's 0 (exact arithmetic drops nothing)
#: against their own bound; on other steps they must equal the previous ones bitwise.
COMPENSATION_KEYS = ("c_K", "c_C")


def _compensations(
    run: RecordedRun, name: str, step: int, state: SINGDState
) -> tuple[np.ndarray, np.ndarray]:
    """The implementation's ``(c_K, c_C)`` before ``step`` (zeros before the first)."""
    if step == 0:
        return np.zeros_like(state.K), np.zeros_like(state.C)
    recorded = run.steps[step - 1][name].state
    return recorded["c_K"], recorded["c_C"]


def _singd_blocks(
    run: RecordedRun,
    hyper: SINGDHyperparameters,
    precision: Precision,
    approx: str,
    loss_average: str | None,
    block: int | None,
    per_step: list[Deviation] | None,
    oracle: dict[str, list[SINGDState]] | None = None,
) -> list[Deviation]:
    """Worst deviation per layer and entry; the oracle restarts from the recording every ``block``.

    At steps ``t`` with ``t % block == 0`` the float64 oracle starts again
    from the implementation's own recorded state after step ``t − 1`` (exactly
    known: zero incoming error); in between, bounds propagate entrywise
    through :func:`verification.bounds.singd_step_bounds`.  ``block=None``
    never restarts (the whole trajectory from the initial ``W~``; an already
    replayed ``oracle`` trajectory is used instead of stepping again);
    ``block=1`` is the one-step check.
    """
    keys = [key for key in SINGD_KEYS if hyper.alpha1 != 0 or key not in ("m_K", "m_C")]
    if precision.compensated:
        keys += list(COMPENSATION_KEYS)
    deviations = []
    for name in run.layers:
        records = step_records(run, name, approx, loss_average)
        passes = statistic_passes(run, name, approx, loss_average)
        shared = _shared_positions(run, name, approx)
        state = singd_init(run.initial_weights[name], hyper, FLOAT64)
        errors = None
        worst: dict[str, Deviation] = {}
        for t, record in enumerate(records):
            if block is not None and t > 0 and t % block == 0:
                state = _recorded_state(SINGDState, run.steps[t - 1][name].state, t)
                errors = None
            compensations = _compensations(run, name, t, state) if precision.compensated else None
            bounds = singd_step_bounds(
                precision, hyper, state, errors, record, passes[t], shared, compensations
            )
            replayed = oracle is not None and block is None
            state = oracle[name][t] if replayed else singd_step(state, record, hyper, FLOAT64)
            recorded = run.steps[t][name].state
            for key in keys:
                # compensations: 0 after a factor step (exact arithmetic drops nothing),
                # else the value carried from the step before, bitwise (bound 0)
                bounded = getattr(bounds, key)
                expected = bounded.value if key in COMPENSATION_KEYS else getattr(state, key)
                candidate = _entry_deviation(name, key, t, recorded[key], expected, bounded.error)
                if per_step is not None:
                    per_step.append(candidate)
                if key not in worst or _ratio(candidate) > _ratio(worst[key]):
                    worst[key] = candidate
            errors = bounds
        deviations.extend(worst.values())
    return deviations


def _entry_deviation(
    layer: str, key: str, step: int, computed: np.ndarray, oracle: np.ndarray, bound: np.ndarray
) -> Deviation:
    """Entrywise comparison folded into one :class:`Deviation`.

    ``error`` is the largest ``|computed − oracle|``; ``bound`` is chosen so that
    ``error / bound`` is the largest *entrywise* ratio (``inf`` where a nonzero
    error meets a zero bound).
    """
    difference = np.abs(computed - oracle)
    error = float(difference.max(initial=0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(difference == 0, 0.0, difference / bound)
    worst = float(ratios.max(initial=0.0))
    effective = error / worst if worst > 0 else float(bound.max(initial=0.0))
    magnitude = float(np.abs(oracle).max(initial=0.0))
    return Deviation(layer, key, step, error, effective, magnitude)


def _ratio(deviation: Deviation) -> float:
    if deviation.error == 0:
        return 0.0
    return deviation.error / deviation.bound if deviation.bound > 0 else float("inf")


def compare_singd(
    run: RecordedRun,
    oracle: dict[str, list[SINGDState]] | None,
    hyper: SINGDHyperparameters,
    dtype: torch.dtype | Precision,
    approx: str = "expand",
    loss_average: str | None = "batch",
    per_step: list[Deviation] | None = None,
) -> list[Deviation]:
    """Whole-trajectory comparison of every layer's K, C, m_K, m_C, W~, m_W~ (never restarted).

    The bound of every entry propagates entrywise along the float64 oracle
    trajectory from the initial ``W~`` (:func:`verification.bounds.
    singd_step_bounds`); it compounds over the steps.  ``dtype`` is the
    run's dtype (CPU model, factors alike) or a
    :class:`~verification.arithmetic.Precision`.  ``oracle`` is the replayed
    trajectory (:func:`verification.replay.replay_singd`), or ``None`` to step
    the oracle here.  ``m_K``/``m_C`` are not compared with ``α1 = 0``.
    """
    precision = precision_for(dtype)
    return _singd_blocks(run, hyper, precision, approx, loss_average, None, per_step, oracle)


def compare_singd_blocks(
    run: RecordedRun,
    hyper: SINGDHyperparameters,
    dtype: torch.dtype | Precision,
    approx: str = "expand",
    loss_average: str | None = "batch",
    block: int = 5,
    per_step: list[Deviation] | None = None,
) -> list[Deviation]:
    """Teacher-forced comparison in blocks of ``block`` steps (a non-compounding trajectory check).

    Every ``block`` steps the oracle restarts from the implementation's own
    recorded state, so a bound compounds over at most ``block`` steps however
    long the run, and every step is judged within the rounding of a short
    stretch of the trajectory.
    """
    precision = precision_for(dtype)
    return _singd_blocks(run, hyper, precision, approx, loss_average, block, per_step)


def compare_singd_local(
    run: RecordedRun,
    hyper: SINGDHyperparameters,
    dtype: torch.dtype | Precision,
    approx: str = "expand",
    loss_average: str | None = "batch",
    per_step: list[Deviation] | None = None,
) -> list[Deviation]:
    """One-step ("teacher-forced") comparison: every step from the implementation's own state.

    :func:`compare_singd_blocks` with ``block = 1``: the bound of a single
    step from an exactly known state, which does not grow with the step count.
    """
    precision = precision_for(dtype)
    return _singd_blocks(run, hyper, precision, approx, loss_average, 1, per_step)


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
    distance: tuple[float, float],
) -> _KFACBounds:
    """Bounds after one KFAC oracle step ``before → after`` (see :func:`compare_kfac`);
    ``distance``: how far the model's ``Σ AᵀA``, ``Σ GᵀG`` may lie from the oracle's
    (:func:`gram_distances`)."""
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
            spread = beta1 * (rho * gram + distance[index])
            errors[key] = (1 - beta1) * errors[key] + spread + 2 * eps * new
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
    ``‖M⁻¹‖₂² ‖δS‖₂ ‖rest‖_F`` with ``‖δS‖₂ ≤ d max|δS|``; where the model's rows
    are not the oracle's (an MHA's), ``β1`` times their Gram distance
    (:func:`gram_distances`) enters ``δS``.  Momentum and parameter updates as in
    :func:`compare_singd`.
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


def _attention_pass(
    layer_pass: LayerPass, a: np.ndarray, g: np.ndarray, approx: str, loss_average: str | None
) -> StatisticPass:
    """An MHA projection's pass: magnitudes from the oracle's running bound, and the
    distance of the model's rows from the oracle's (:func:`attention_row_errors`) through
    the statistic, which is linear in the rows (the bias column is exact)."""
    rows = attention_rows(layer_pass)
    bias = attention_bias(layer_pass)
    settings = {"bias": bias, "approx": approx, "loss_average": loss_average}
    a_abs, g_abs = linear_statistics(rows.inputs_magnitude, rows.grads_magnitude, **settings)
    a_error, g_error = linear_statistics(*attention_row_errors(layer_pass), **settings)
    if bias:
        a_error[:, -1] = 0.0
    return StatisticPass(a, g, a_abs, g_abs, a_error, g_error)


def _shared_positions(run: RecordedRun, name: str, approx: str) -> int:
    """Positions averaged into one row of ``A`` (reduce) or 1 (expand), plus conv groups."""
    module = run.layers[name]
    first = run.steps[0][name].passes[0]
    convolution = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    groups = module.groups if convolution else 1
    if approx == "expand":
        return groups
    if first.attention is not None:
        return attention_rows(first).inputs.shape[1]
    if convolution:
        locations = first.output_grads[0, 0].numel()
    elif isinstance(module, nn.Embedding):
        locations = first.inputs[0].numel()
    else:
        locations = first.inputs[0].numel() // first.inputs.shape[-1]
    return groups * locations


def violations(deviations: Sequence[Deviation]) -> list[Deviation]:
    """The deviations above their bounds."""
    return [d for d in deviations if not d.error <= d.bound]
