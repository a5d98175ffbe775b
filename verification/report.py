"""The ``singd-verify`` report: ``report.md`` (for people), ``report.json`` (for machines).

Both hold the same numbers: the oracle self-check (:mod:`verification.selfcheck`)
and the implementation-vs-oracle comparison grid (:mod:`verification.grid`),
with the tolerance rule, verdicts and the environment they were measured in.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from verification.grid import BLOCK, KEYS, CaseResult, EntryResult
from verification.probe import Calibration
from verification.scenarios import DTYPES, SCENARIOS, VARIANTS, Case
from verification.selfcheck import Check
from verification.tolerances import EPS

TOLERANCE_RULE = (
    "Bound per state entry and step, entrywise, from a second float64 evaluation of the step "
    "on (value, error bound) pairs that follows the implementation's order of operations "
    "(verification/bounds.py) under the run's arithmetic model (verification/arithmetic.py, "
    "checked by the probe below): a product of reduction length n adds γ_n(u_a)·|A||B| for "
    "its accumulation in the model's accumulation dtype and one rounding u_s·|AB| to the "
    "storage dtype (bf16/fp16 on CPU: float32 accumulation, one rounding, i.e. about half an "
    "ulp of the result); an elementwise kernel adds one rounding of its result; sums and "
    "traces add γ_n of their terms; kernels that add several rounded block products "
    "(hierarchical, recursive structures) charge each; the Toeplitz FFT path uses Higham's "
    "normwise FFT bound per column and per lag; errors already in the operands propagate "
    "exactly (|x|e_y + e_x|y| + e_x e_y), and the float64 oracle's own rounding is added. "
    "u = eps/2 of the dtype that stores the value (factors: the factor dtype; W~, m_W~: the "
    "model dtype). Nothing is fitted to the data. Three checks: the whole trajectory from the "
    "initial weights; blocks of 5 steps, each restarted from the implementation's own recorded "
    "state (a trajectory check that cannot compound over more than 5 steps); and every single "
    "step from the recorded state. A case passes iff |torch − oracle| ≤ bound for every "
    "entry, layer and step, in all three (error/bound ≤ 1). A probabilistic bound "
    "(Higham & Mary 2019, λ = 7: γ̃_n = λ√n·u per inner product, failure probability "
    "≤ 2n·exp(−λ²/2) each) is reported beside it for float32/float64 and never decides."
)

_NAMES_OF = {dtype: name for name, dtype in DTYPES.items()}

#: The Python distributions whose versions the report names.
#: Label in the report -> distribution whose version it gives.  This project's
#: distribution is ``singd-verified`` (the import name stays ``singd``; the
#: index's ``singd`` is the public package).
PACKAGES = {
    "torch": "torch",
    "numpy": "numpy",
    "scipy": "scipy",
    "mpmath": "mpmath",
    "matplotlib": "matplotlib",
    "singd": "singd-verified",
}


@dataclass(frozen=True)
class Report:
    """Everything ``singd-verify`` measured.

    Attributes:
        checks: The oracle self-check.
        results: The comparison grid.
        grid: The grid's name.
        seconds: Wall time of the whole run.
        plots: File names of the written PNGs (empty without matplotlib).
        plot_note: Why there are no plots, if there are none.
        calibrations: The arithmetic models in force and the probe's measurements.
        mutations: :func:`verification.mutants.mutation_table`, or ``None`` if not run.
        env: :func:`environment` at the time of the run.
        stability: :func:`verification.stability.stability_map` (with its ``plot``), or
            ``None`` if not run; descriptive, never part of the verdict.
        training: :func:`verification.training.summary`, or ``None`` if not run
            (``--training``); descriptive, never part of the verdict.
        long_horizon: :func:`verification.longhorizon.summary`, or ``None`` if not
            run (``--long-horizon``); when run, every case must pass its block bound.
    """

    checks: list[Check]
    results: list[CaseResult]
    grid: str
    seconds: float
    plots: tuple[str, ...] = ()
    plot_note: str = ""
    calibrations: tuple[Calibration, ...] = ()
    mutations: dict[str, object] | None = None
    env: dict[str, str] = field(default_factory=lambda: environment())
    stability: dict[str, object] | None = None
    training: dict[str, object] | None = None
    long_horizon: dict[str, object] | None = None

    @property
    def passed(self) -> bool:
        """Whether every self-check, probe, comparison and (if run) mutant and long-horizon
        verdict passed."""
        return (
            all(check.passed for check in self.checks)
            and all(calibration.passed for calibration in self.calibrations)
            and all(result.passed for result in self.results)
            and (self.mutations is None or bool(self.mutations["ok"]))
            and (
                self.long_horizon is None
                or self.long_horizon["passed"] == self.long_horizon["cases"]
            )
        )


def environment() -> dict[str, str]:
    """Versions, interpreter, CPU and date of this run."""
    versions = {}
    for label, distribution in PACKAGES.items():
        try:
            versions[label] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[label] = "not installed"
    return {
        **versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": str(os.cpu_count()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` where there is one, else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def by_precision(results: list[CaseResult]) -> dict[str, list[CaseResult]]:
    """The results grouped by precision label, in first-seen order."""
    groups: dict[str, list[CaseResult]] = {}
    for result in results:
        groups.setdefault(result.case.precision, []).append(result)
    return groups


def _worst_per_entry(entries: list[EntryResult]) -> dict[str, float]:
    """The worst ratio per state key, in :data:`KEYS` order."""
    return {
        key: max(entry.ratio for entry in entries if entry.key == key)
        for key in KEYS
        if any(entry.key == key for entry in entries)
    }


def precision_summary(results: list[CaseResult]) -> dict[str, object]:
    """Counts, eps and the worst/median ratios (trajectory and one-step) of one precision."""
    ratios = [result.worst_ratio for result in results]
    local_ratios = [result.local_worst_ratio for result in results]
    return {
        "eps": EPS[results[0].case.bound_dtype],
        "cases": len(results),
        "passed": sum(result.passed for result in results),
        "worst_ratio": max(ratios),
        "median_ratio": statistics.median(ratios),
        "worst_error_eps": max(result.worst_error_eps for result in results),
        "worst_ratio_per_entry": _worst_per_entry([e for r in results for e in r.entries]),
        "local_worst_ratio": max(local_ratios),
        "local_median_ratio": statistics.median(local_ratios),
        "local_worst_error_eps": max(result.local_worst_error_eps for result in results),
        "local_worst_ratio_per_entry": _worst_per_entry(
            [e for r in results for e in r.local_entries]
        ),
        "block_worst_ratio": max(result.block_worst_ratio for result in results),
        "probabilistic_local_worst_ratio": _max_or_none(
            [r.probabilistic_ratio for r in results if r.probabilistic_ratio is not None]
        ),
        "emulated_worst_ratio": _max_or_none(
            [r.emulated["worst_ratio"] for r in results if r.emulated is not None]
        ),
        "emulated_max_ulps": _max_or_none(
            [r.emulated["max_ulps"] for r in results if r.emulated is not None]
        ),
        "emulated_min_bitwise_fraction": _min_or_none(
            [r.emulated["bitwise_fraction"] for r in results if r.emulated is not None]
        ),
    }


def _min_or_none(values: list[float]) -> float | None:
    return min(values) if values else None


def _max_or_none(values: list[float]) -> float | None:
    return max(values) if values else None


def as_json(report: Report) -> dict[str, object]:
    """The machine-readable report."""
    groups = by_precision(report.results)
    return {
        "passed": report.passed,
        "grid": report.grid,
        "seconds": report.seconds,
        "environment": report.env,
        "tolerance_rule": TOLERANCE_RULE,
        "selfcheck": {
            "passed": all(check.passed for check in report.checks),
            "checks": [check.as_dict() for check in report.checks],
        },
        "comparison": {
            "passed": all(result.passed for result in report.results),
            "summary": {label: precision_summary(group) for label, group in groups.items()},
            "cases": [result.as_dict() for result in report.results],
        },
        "arithmetic_models": [calibration.as_dict() for calibration in report.calibrations],
        "mutations": report.mutations,
        "plots": list(report.plots),
        "plot_note": report.plot_note,
        "stability": report.stability,
        "training": report.training,
        "long_horizon": report.long_horizon,
    }


# ---------------------------------------------------------------- Markdown
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "**FAIL**"


def _emulated_cell(summary: dict[str, object]) -> str:
    """``max ulps / worst ratio to the allowance, smallest bitwise fraction`` or a dash."""
    if summary["emulated_worst_ratio"] is None:
        return "–"
    return (
        f"{summary['emulated_max_ulps']:.2g} ulps / {summary['emulated_worst_ratio']:.2g}, "
        f"{100 * summary['emulated_min_bitwise_fraction']:.0f} %"
    )


def _optional(value: float | None) -> str:
    """A ratio, or a dash where it was not computed."""
    return "–" if value is None else f"{value:.2g}"


def _ratio_cell(value: float) -> str:
    """A ratio, bold when it exceeds 1."""
    return f"{value:.2g}" if value <= 1 else f"**{value:.3g}**"


def _grid_description(results: list[CaseResult]) -> list[str]:
    """What the grid covers: scenarios, variants, structure pairs, precisions, steps."""
    cases: list[Case] = [result.case for result in results]
    scenarios = dict.fromkeys(case.scenario for case in cases)
    variants = dict.fromkeys(case.variant for case in cases)
    pairs = dict.fromkeys(case.structures for case in cases)
    precisions = dict.fromkeys(case.precision for case in cases)
    steps = sorted({case.steps for case in cases})
    lines = ["Layers (scenarios):", ""]
    lines += [f"* `{name}`: {SCENARIOS[name].description}" for name in scenarios]
    lines += ["", "Modes (overrides of the base hyper-parameters):", ""]
    lines += [f"* `{name}`: `{_overrides(VARIANTS[name])}`" for name in variants]
    lines += [
        "",
        "Structures `(K, C)`: " + ", ".join(f"`{k}`/`{c}`" for k, c in pairs) + ".",
        "",
        f"Precisions: {', '.join(precisions)}; {'/'.join(map(str, steps))} optimizer steps "
        f"per case; {len(cases)} cases.",
    ]
    return lines


def _overrides(overrides: dict[str, object]) -> str:
    """Hyper-parameter overrides, callables by name."""
    shown = {key: getattr(value, "__name__", value) for key, value in overrides.items()}
    return str(shown) if shown else "{} (SINGD default)"


def _precision_section(label: str, results: list[CaseResult]) -> list[str]:
    """Worst error/bound per (layer, mode) × structure pair, then per entry, then every case."""
    summary = precision_summary(results)
    lines = [
        f"### {label} (eps = {summary['eps']:.3g})",
        "",
        f"{summary['passed']}/{summary['cases']} cases pass; worst error/bound "
        f"{summary['worst_ratio']:.3g}, median {summary['median_ratio']:.3g}; largest error "
        f"{summary['worst_error_eps']:.3g} eps·max|entry|. One-step check: worst error/bound "
        f"{summary['local_worst_ratio']:.3g}, median {summary['local_median_ratio']:.3g}; "
        f"largest error {summary['local_worst_error_eps']:.3g} eps·max|entry|.",
        "",
        "Worst error/bound over all entries, layers and steps, trajectory / one-step "
        "(rows: layer/mode, columns: structures of K / C):",
        "",
    ]
    pairs = list(dict.fromkeys(result.case.structures for result in results))
    rows_by_name: dict[str, dict[tuple[str, str], str]] = {}
    for result in results:
        row = rows_by_name.setdefault(f"{result.case.scenario}/{result.case.variant}", {})
        row[result.case.structures] = (
            f"{_ratio_cell(result.worst_ratio)} / {_ratio_cell(result.local_worst_ratio)}"
        )
    header = ["layer/mode", *(f"{k}<br>{c}" for k, c in pairs)]
    rows = [[name, *(row.get(pair, "–") for pair in pairs)] for name, row in rows_by_name.items()]
    lines += _table(header, rows)
    lines += ["", "Per state entry: worst error/bound and largest error in eps·max|entry|:", ""]
    lines += _per_entry_table(results)
    lines += ["", "<details><summary>Every case</summary>", ""]
    header = ["case", *KEYS, "one-step", "verdict"]
    rows = []
    for result in results:
        cells = {e.key: f"{_ratio_cell(e.ratio)} ({e.error_eps:.2g})" for e in result.entries}
        local = f"{_ratio_cell(result.local_worst_ratio)} ({result.local_worst_error_eps:.2g})"
        rows.append(
            [
                result.case.name,
                *(cells.get(key, "–") for key in KEYS),
                local,
                _verdict(result.passed),
            ]
        )
    lines += [
        "Cells: trajectory error/bound (error in eps·max|entry|) per entry; one-step: the "
        "worst over the entries.",
        "",
    ]
    lines += _table(header, rows)
    return [*lines, "", "</details>", ""]


def _per_entry_table(results: list[CaseResult]) -> list[str]:
    """Worst ratio and largest error in eps per state entry, trajectory and one-step."""
    rows = []
    for key in KEYS:
        entries = [e for result in results for e in result.entries if e.key == key]
        local = [e for result in results for e in result.local_entries if e.key == key]
        if entries:
            rows.append(
                [
                    f"`{key}`",
                    _ratio_cell(max(e.ratio for e in entries)),
                    f"{max(e.error_eps for e in entries):.3g}",
                    _ratio_cell(max(e.ratio for e in local)),
                    f"{max(e.error_eps for e in local):.3g}",
                ]
            )
    header = [
        "entry",
        "worst error/bound",
        "largest error [eps]",
        "one-step error/bound",
        "one-step error [eps]",
    ]
    return _table(header, rows)


def _model_section(calibrations: tuple[Calibration, ...]) -> list[str]:
    """The arithmetic model of each dtype and what the probe measured."""
    if not calibrations:
        return []
    lines = [
        "## Arithmetic model in force",
        "",
        "The bounds assume, per dtype on this device, where results are rounded and in which "
        "precision reductions accumulate. A probe measures torch's real errors on adversarial "
        "inputs (sums that stall in a narrow accumulator, cancellation, near-ties, long "
        "reductions, the Toeplitz FFT) against the model's bound; a model any probe "
        "contradicts (error/bound > 1) fails the run (`verification/probe.py`).",
        "",
    ]
    rows = [
        [
            calibration.model.label,
            f"{calibration.worst_ratio:.3g}",
            _verdict(calibration.passed),
        ]
        for calibration in calibrations
    ]
    lines += _table(["model", "worst probe error/bound", "verdict"], rows)
    lines += ["", "<details><summary>Every probe</summary>", ""]
    rows = [
        [
            _NAMES_OF[calibration.model.storage],
            result.name,
            f"{result.error:.3g}",
            f"{result.ratio:.3g}",
        ]
        for calibration in calibrations
        for result in calibration.results
    ]
    lines += _table(["dtype", "probe", "max error", "error/bound"], rows)
    return [*lines, "", "</details>", ""]


def _mutation_section(mutations: dict[str, object] | None) -> list[str]:
    """The mutant table and the resolution per precision (``verification.mutants``)."""
    if mutations is None:
        return ["## Mutation check", "", "_Not run (`--no-mutants`)._", ""]
    from verification.mutants import format_markdown

    return ["## Mutation check", "", format_markdown(mutations), ""]


def _stability_section(stability: dict[str, object] | None) -> list[str]:
    """The stability map (``verification.stability``), or a note that it was not run."""
    if stability is None:
        return ["## Stability map", "", "_Not run (`--stability off`)._", ""]
    from verification.stability import markdown

    return markdown(stability)


def _selfcheck_section(checks: list[Check]) -> list[str]:
    """The oracle self-check as a table."""
    passed = sum(check.passed for check in checks)
    lines = [
        "## Oracle self-check (float64 vs mpmath, SPEC laws)",
        "",
        f"{passed}/{len(checks)} checks pass. Each measured number is compared with a bound "
        "derived from rounding-error analysis or the algorithm's maths "
        "(`verification/selfcheck.py`).",
        "",
    ]
    rows = [
        [
            check.name,
            f"{check.measured:.4g}",
            f"{'≥' if check.lower else '≤'} {check.bound:.4g}",
            check.unit,
            check.rule,
            _verdict(check.passed),
        ]
        for check in checks
    ]
    return [*lines, *_table(["check", "measured", "bound", "unit", "rule", "verdict"], rows), ""]


def as_markdown(report: Report) -> str:
    """The readable report."""
    env = report.env
    failed_cases = [result for result in report.results if not result.passed]
    failed_checks = [check for check in report.checks if not check.passed]
    lines = [
        "# SINGD verification report",
        "",
        f"**Verdict: {_verdict(report.passed)}.** "
        f"{len(report.results) - len(failed_cases)}/{len(report.results)} implementation-vs-"
        f"oracle comparisons and {len(report.checks) - len(failed_checks)}/{len(report.checks)} "
        f"oracle self-checks within their bounds (grid `{report.grid}`, "
        f"{report.seconds:.0f} s, {env['date']}).",
        "",
        "## What is compared",
        "",
        "The torch optimizer `singd.SINGD` trains a small model; hooks of the verifier's own "
        "(not the optimizer's) record every layer's inputs `a`, output gradients `g` and "
        "`∇W~` before each step, and the optimizer's state after it. The independent oracle "
        "`reference/` (numpy, float64) is fed the *same* recorded tensors, upcast exactly, "
        "and runs SPEC §1.1–§1.4 from the same initial weights. After every step the "
        "Kronecker factors `K`, `C`, their momenta `m_K`, `m_C` (with α1 > 0), the "
        "parameters `W~ = [W, b]` and their momentum `m_W` are compared entry-wise.",
        "",
        "Two numbers per entry: **error/bound** (the verdict: ≤ 1 passes) and the error in "
        "units of **eps·max|entry|** (how many machine epsilons of the entry's scale the "
        "implementation is off). The bound is entrywise and follows the arithmetic model "
        "stated below (where torch rounds, and in which precision it accumulates), so in "
        "bfloat16/float16 it is about half an ulp per rounding, not a worst case for sums "
        "kept in the narrow dtype. It is checked three ways: along the whole trajectory, in "
        "teacher-forced blocks, and one step at a time from the implementation's own state. "
        "The mutation check below shows what the verifier can catch in each precision.",
        "",
        "### Tolerance rule",
        "",
        TOLERANCE_RULE,
        "",
        "### Grid",
        "",
        *_grid_description(report.results),
        "",
        "## Implementation vs oracle",
        "",
    ]
    groups = by_precision(report.results)
    summary_rows = []
    for label, group in groups.items():
        summary = precision_summary(group)
        summary_rows.append(
            [
                label,
                f"{summary['eps']:.3g}",
                f"{summary['passed']}/{summary['cases']}",
                _ratio_cell(summary["worst_ratio"]),
                f"{summary['median_ratio']:.2g}",
                f"{summary['worst_error_eps']:.3g}",
                _ratio_cell(summary["local_worst_ratio"]),
                f"{summary['local_worst_error_eps']:.3g}",
                _ratio_cell(summary["block_worst_ratio"]),
                _optional(summary["probabilistic_local_worst_ratio"]),
                _emulated_cell(summary),
            ]
        )
    header = [
        "precision",
        "eps",
        "pass",
        "trajectory err/bound",
        "median",
        "largest err [eps]",
        "one-step err/bound",
        "one-step err [eps]",
        f"blocks of {BLOCK} err/bound",
        "one-step vs probabilistic bound (not in verdict)",
        "vs emulated oracle: worst ulps / allowance, min bitwise (not in verdict)",
    ]
    lines += [*_table(header, summary_rows), ""]
    if report.plots:
        lines += [f"![{name}]({name})" for name in report.plots] + [""]
    else:
        lines += [f"_No plots: {report.plot_note}_", ""]
    for label, group in groups.items():
        lines += _precision_section(label, group)
    lines += _model_section(report.calibrations)
    lines += _mutation_section(report.mutations)
    lines += _stability_section(report.stability)
    if report.long_horizon is not None:
        from verification.longhorizon import markdown as long_horizon_markdown

        lines += long_horizon_markdown(report.long_horizon)
    if report.training is not None:
        from verification.training import markdown as training_markdown

        lines += training_markdown(report.training)
    lines += _selfcheck_section(report.checks)
    lines += ["## Environment", ""]
    lines += _table(["", ""], [[key, value] for key, value in env.items()])
    lines += [
        "",
        "eps per dtype: " + ", ".join(f"{name} {EPS[dtype]:.3g}" for name, dtype in DTYPES.items()),
        "",
    ]
    return "\n".join(lines)


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    markdown, machine = out / "report.md", out / "report.json"
    markdown.write_text(as_markdown(report))
    machine.write_text(json.dumps(as_json(report), indent=2, ensure_ascii=False) + "\n")
    return markdown, machine
