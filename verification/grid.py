"""Run a grid of :class:`~verification.scenarios.Case` through implementation and oracle.

Each case is recorded (torch ``SINGD``), replayed (float64 oracle) and compared
three times under the case's arithmetic model (:func:`case_precision`): along
the whole trajectory (:func:`verification.comparison.compare_singd`), in
teacher-forced blocks of :data:`BLOCK` steps
(:func:`~verification.comparison.compare_singd_blocks`) and one step at a time
from the implementation's own state
(:func:`~verification.comparison.compare_singd_local`).  For every state entry
(``K``, ``C``, ``m_K``, ``m_C``, ``W~``, ``m_W~``) and each comparison: the
largest ``error / bound`` over layers and steps, and the largest error in
units of ``eps · max|entry|`` of the coarsest dtype.  A case passes iff every
ratio of all three comparisons is at most 1 (worst-case bounds).  Beside them,
labelled, the one-step ratio under the probabilistic bound (Higham & Mary,
λ = 7), which never enters the verdict.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from verification.arithmetic import Precision, precision_for
from verification.comparison import (
    Deviation,
    compare_singd,
    compare_singd_blocks,
    compare_singd_local,
)
from verification.emulated import EmulatedAgreement, compare_emulated_local
from verification.scenarios import (
    DTYPES,
    FACTOR_GUARD,
    SCENARIOS,
    VARIANTS,
    Case,
    run_and_replay,
)
from verification.tolerances import EPS

#: Steps per teacher-forced block of the non-compounding trajectory check.
BLOCK = 5

#: State entries in display order (``m_K``/``m_C`` only with ``α1 > 0``, ``c_K``/``c_C`` only with
#: the compensated factor step of bf16/fp16 factors).
KEYS = ("K", "C", "m_K", "m_C", "W", "m_W", "c_K", "c_C")


@dataclass(frozen=True)
class EntryResult:
    """The worst deviation of one state entry over the layers and steps of a case.

    Attributes:
        key: The entry (``"K"``, ``"W"``, …).
        layer: The layer where ``error / bound`` is largest.
        step: The step (0-based) where it is largest.
        ratio: ``error / bound`` there (passes iff ``<= 1``).
        error_eps: Largest ``error / (eps · max|entry|)`` over layers and steps.
    """

    key: str
    layer: str
    step: int
    ratio: float
    error_eps: float


@dataclass(frozen=True)
class CaseResult:
    """The comparison of one case.

    Attributes:
        case: The case.
        entries: Worst deviation per state entry along the trajectory, in :data:`KEYS` order.
        history: Every entry's trajectory deviation at every step (for growth plots).
        local_entries: Worst one-step deviation per state entry, in :data:`KEYS` order.
        local_history: Every entry's one-step deviation at every step.
        block_entries: Worst deviation per entry in teacher-forced blocks of :data:`BLOCK`.
        emulated: Against the emulated bf16/fp16 oracle restarted from the recording every
            step (:func:`verification.emulated.compare_emulated_local`): the fraction
            of entries bitwise equal, the largest difference in ulps of the entry's
            scale and the largest ratio to the rule's allowance; ``None`` for other
            precisions.  Reported beside the verdict, not in it.
        probabilistic_ratio: Worst one-step ``error / bound`` under the probabilistic
            bound (reported, never part of the verdict); ``None`` where products
            accumulate in a wider dtype than they store (bf16/fp16 on CPU), so the
            accumulation term it shrinks is negligible beside the final rounding.
        seconds: Wall time of record + replay + the comparisons.
    """

    case: Case
    entries: tuple[EntryResult, ...]
    history: tuple[Deviation, ...]
    local_entries: tuple[EntryResult, ...]
    local_history: tuple[Deviation, ...]
    block_entries: tuple[EntryResult, ...]
    probabilistic_ratio: float | None
    seconds: float
    emulated: dict[str, float] | None = None

    @property
    def worst_ratio(self) -> float:
        """The largest ``error / bound`` over the entries."""
        return max(entry.ratio for entry in self.entries)

    @property
    def worst_error_eps(self) -> float:
        """The largest error in units of ``eps · max|entry|`` over the entries."""
        return max(entry.error_eps for entry in self.entries)

    @property
    def local_worst_ratio(self) -> float:
        """The largest one-step ``error / bound`` over the entries."""
        return max(entry.ratio for entry in self.local_entries)

    @property
    def local_worst_error_eps(self) -> float:
        """The largest one-step error in units of ``eps · max|entry|`` over the entries."""
        return max(entry.error_eps for entry in self.local_entries)

    @property
    def block_worst_ratio(self) -> float:
        """The largest ``error / bound`` of the block check over the entries."""
        return max(entry.ratio for entry in self.block_entries)

    @property
    def passed(self) -> bool:
        """Whether every entry stays within its bound: trajectory, blocks and per step."""
        return max(self.worst_ratio, self.local_worst_ratio, self.block_worst_ratio) <= 1.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields (the history is left out)."""
        case = self.case
        return {
            "name": case.name,
            "precision": case.precision,
            "scenario": case.scenario,
            "variant": case.variant,
            "structures": list(case.structures),
            "dtype": case.dtype,
            "factor_dtype": case.factor_dtype,
            "bound_eps": EPS[case.bound_dtype],
            "steps": case.steps,
            "worst_ratio": self.worst_ratio,
            "worst_error_eps": self.worst_error_eps,
            "local_worst_ratio": self.local_worst_ratio,
            "local_worst_error_eps": self.local_worst_error_eps,
            "block_worst_ratio": self.block_worst_ratio,
            "probabilistic_local_worst_ratio": self.probabilistic_ratio,
            "emulated": self.emulated,
            "model": case_precision(case).label,
            "passed": self.passed,
            "seconds": self.seconds,
            "entries": _entries_dict(self.entries),
            "local_entries": _entries_dict(self.local_entries),
        }


def _entries_dict(entries: tuple[EntryResult, ...]) -> dict[str, dict[str, object]]:
    """JSON-ready fields of ``entries`` by key."""
    return {
        entry.key: {
            "ratio": entry.ratio,
            "error_eps": entry.error_eps,
            "layer": entry.layer,
            "step": entry.step,
        }
        for entry in entries
    }


def ratio(deviation: Deviation) -> float:
    """``error / bound`` (0 for an exact zero error, ``inf`` for a nonzero error over 0)."""
    if deviation.error == 0:
        return 0.0
    return deviation.error / deviation.bound if deviation.bound > 0 else float("inf")


def error_in_eps(deviation: Deviation, eps: float) -> float:
    """``error / (eps · max|entry|)`` (0 for a zero entry)."""
    return deviation.error / (eps * deviation.magnitude) if deviation.magnitude > 0 else 0.0


def _worst_entries(history: list[Deviation], eps: float) -> tuple[EntryResult, ...]:
    """Per state entry in :data:`KEYS` order: the worst ratio and the largest error in eps."""
    entries = []
    for key in KEYS:
        of_key = [deviation for deviation in history if deviation.key == key]
        if not of_key:
            continue
        worst = max(of_key, key=ratio)
        entries.append(
            EntryResult(
                key=key,
                layer=worst.layer,
                step=worst.step,
                ratio=ratio(worst),
                error_eps=max(error_in_eps(deviation, eps) for deviation in of_key),
            )
        )
    return tuple(entries)


def case_precision(case: Case, device: str = "cpu") -> Precision:
    """The arithmetic model of a case: its model dtype, its factor dtype, on ``device``."""
    factor_dtype = None if case.factor_dtype is None else DTYPES[case.factor_dtype]
    return precision_for(DTYPES[case.dtype], factor_dtype, device, FACTOR_GUARD)


def run_case(case: Case) -> CaseResult:
    """Record, replay and compare one case (trajectory, blocks, one step)."""
    start = time.perf_counter()
    scenario = SCENARIOS[case.scenario]
    overrides = {**VARIANTS[case.variant], "structures": case.structures}
    factor_dtype = None if case.factor_dtype is None else DTYPES[case.factor_dtype]
    run, oracle, hyper = run_and_replay(
        scenario, overrides, DTYPES[case.dtype], factor_dtype, case.steps
    )
    precision = case_precision(case)
    settings = (scenario.approx, scenario.loss_average)
    history: list[Deviation] = []
    compare_singd(run, oracle, hyper, precision, *settings, history)
    local_history: list[Deviation] = []
    compare_singd_local(run, hyper, precision, *settings, local_history)
    blocks = compare_singd_blocks(run, hyper, precision, *settings, block=BLOCK)
    probabilistic_ratio = None
    if precision.factors.accumulation == precision.factors.storage:
        probabilistic = compare_singd_local(run, hyper, precision.probabilistic(), *settings)
        probabilistic_ratio = max(map(ratio, probabilistic))
    eps = EPS[case.bound_dtype]
    emulated = None
    if case.factor_dtype is None and case.dtype in STORAGE_OF_NAME:
        emulated = _emulated_summary(
            compare_emulated_local(run, hyper, case.dtype, *settings).values()
        )
    return CaseResult(
        case,
        _worst_entries(history, eps),
        tuple(history),
        _worst_entries(local_history, eps),
        tuple(local_history),
        _worst_entries(list(blocks), eps),
        probabilistic_ratio,
        time.perf_counter() - start,
        emulated,
    )


#: Precisions with an emulated oracle (``reference.numbers.emulated_numbers``).
STORAGE_OF_NAME = ("bfloat16", "float16")


def _emulated_summary(agreements: Iterable[EmulatedAgreement]) -> dict[str, float]:
    """Bitwise fraction (smallest), ulps and ratio to the allowance (largest) over the entries."""
    agreements = list(agreements)
    return {
        "bitwise_fraction": min(a.bitwise_fraction for a in agreements),
        "max_ulps": max(a.max_ulps for a in agreements),
        "worst_ratio": max(a.worst_ratio for a in agreements),
    }


def run_grid(
    cases: Sequence[Case], progress: Callable[[int, CaseResult], None] | None = None
) -> list[CaseResult]:
    """Run every case; ``progress(index, result)`` is called after each."""
    results = []
    for index, case in enumerate(cases):
        results.append(run_case(case))
        if progress is not None:
            progress(index, results[-1])
    return results
