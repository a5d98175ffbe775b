"""``singd-verify`` (also ``python -m verification``): self-check, comparison grid, report.

Runs (a) the oracle self-check (:mod:`verification.selfcheck`), (b) the
arithmetic-model probe of every dtype (:mod:`verification.probe`), (c) a grid
of implementation-vs-oracle comparisons (:mod:`verification.grid`) and (d)
the mutation check (:mod:`verification.mutants`), prints the summaries and a
progress line while the grid runs, writes ``report.md``, ``report.json`` and
PNG plots into ``--out``, and exits 0 iff every check passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from verification.grid import CaseResult, run_grid
from verification.mutants import mutation_table
from verification.plots import matplotlib_missing, write_plots
from verification.probe import calibrate
from verification.report import Report, as_json, by_precision, precision_summary, write_report
from verification.scenarios import GRIDS
from verification.selfcheck import format_table, run_selfcheck


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="singd-verify",
        description=(
            "Verify SINGD: (a) self-check of the float64 oracle against mpmath(50) and the "
            "SPEC laws; (b) run a grid of scenarios (structure × dtype × layer × mode) "
            "through the torch implementation and the oracle and compare every state entry "
            "after every step against a propagated eps-derived bound, and every single step "
            "from the implementation's own state against a one-step bound. Writes report.md, "
            "report.json and PNG plots to --out. Exit code 0 iff every check passes."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("verification-report"),
        metavar="DIR",
        help="directory for report.md, report.json and the PNGs (default: verification-report/)",
    )
    parser.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        help="comparison grid: quick (5 cases), default (~600 cases, two minutes on two "
        "cores), full (the product of every scenario, mode, structure pair and dtype)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: self-check in its default mode only and --grid quick "
        "(unless --grid is given)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the machine-readable report (the same as DIR/report.json) to PATH",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the self-check's random data (default 0)"
    )
    parser.add_argument(
        "--no-mutants",
        action="store_true",
        help="skip the mutation check (about 30 s; it is skipped with --quick too)",
    )
    parser.add_argument(
        "--stability",
        choices=("off", "default", "medium", "full"),
        default=None,
        help="stability map on the digits MLP (verification/stability.py): default (~30 s), "
        "medium, full (about an hour); off by default with --quick, else default",
    )
    parser.add_argument(
        "--long-horizon",
        choices=("off", "default", "medium", "full"),
        default="off",
        help="long-horizon factor dynamics on a fixed statistics stream "
        "(verification/longhorizon.py): default (8 cases × 100 steps), medium (120 × 1000), "
        "full (336 × 1000, hours); off by default; in the verdict when run",
    )
    parser.add_argument(
        "--training",
        type=int,
        default=0,
        metavar="STEPS",
        help="also train the digits MLP and conv net for STEPS steps in every precision "
        "against float64 (verification/training.py; 1000 steps: about 2 minutes); off by default",
    )
    return parser


def _progress(total: int, start: float) -> Callable[[int, CaseResult], None]:
    """A callback printing ``done/total``, elapsed time and an estimate, every ~5 % of cases."""
    every = max(1, total // 20)

    def report(index: int, result: CaseResult) -> None:
        done = index + 1
        if done % every and done != total and result.passed:
            return
        elapsed = time.perf_counter() - start
        remaining = elapsed / done * (total - done)
        status = "" if result.passed else f"  FAIL {result.case.precision} {result.case.name}"
        print(
            f"  {done:>4}/{total} cases, {elapsed:5.0f} s, ~{remaining:4.0f} s left{status}",
            flush=True,
        )

    return report


def _print_comparison(results: list[CaseResult]) -> None:
    """One line per precision, then every failing case."""
    print(
        f"{'precision':<28} {'pass':>9}  {'worst err/bound':>15}  {'largest err [eps]':>17}  "
        f"{'one-step err/bound':>18}  {'one-step err [eps]':>18}"
    )
    for label, group in by_precision(results).items():
        summary = precision_summary(group)
        print(
            f"{label:<28} {summary['passed']:>4}/{summary['cases']:<4}  "
            f"{summary['worst_ratio']:>15.3g}  {summary['worst_error_eps']:>17.3g}  "
            f"{summary['local_worst_ratio']:>18.3g}  {summary['local_worst_error_eps']:>18.3g}"
        )
    for result in results:
        if not result.passed:
            print(
                f"FAIL {result.case.precision} {result.case.name}: trajectory "
                f"{result.worst_ratio:.3g}, one-step {result.local_worst_ratio:.3g}"
            )


def _stability(grid: str, out: Path) -> dict[str, object] | None:
    """The stability map of ``grid`` with its PNG written to ``out`` (``None`` for ``off``)."""
    if grid == "off":
        return None
    from verification.stability import stability_map, write_plot

    print(f"\nstability map, grid {grid!r} ...", flush=True)
    stability = stability_map(grid)
    stability["plot"] = write_plot(stability, out)
    for name, counts in stability["counts"].items():
        print(f"  {name:<24} " + ", ".join(f"{key} {value}" for key, value in counts.items()))
    return stability


def main(argv: list[str] | None = None) -> int:
    """Run self-check and comparison grid, write the report; return 0 iff all pass.

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when None).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.training < 0:
        parser.error(f"--training must be a number of steps >= 0, got {args.training}")
    grid = args.grid or ("quick" if args.quick else "default")
    start = time.perf_counter()
    print("oracle self-check ...", flush=True)
    checks = run_selfcheck(quick=args.quick, seed=args.seed)
    print(format_table(checks))
    print("\narithmetic models (probe error/bound, > 1 refuses the model):", flush=True)
    calibrations = tuple(calibrate())
    for calibration in calibrations:
        verdict = "ok" if calibration.passed else "CONTRADICTED"
        print(f"  {calibration.worst_ratio:6.3f}  {verdict:<12} {calibration.model.label}")
    cases = GRIDS[grid]()
    print(f"\nimplementation vs oracle, grid {grid!r} ({len(cases)} cases):", flush=True)
    results = run_grid(cases, _progress(len(cases), time.perf_counter()))
    _print_comparison(results)
    mutations = None
    if not (args.quick or args.no_mutants):
        print("\nmutation check ...", flush=True)
        mutations = mutation_table()
        print(
            f"  every mutant visible by >= {mutations['visible_ulps']:g} ulps killed: "
            f"{'yes' if mutations['ok'] else 'NO'}"
        )
        for precision, found in mutations["resolution"].items():
            print(f"  resolution {precision:<26} δ = {found['delta']:.2g}")
    args.out.mkdir(parents=True, exist_ok=True)
    stability = _stability(args.stability or ("off" if args.quick else "default"), args.out)
    long_horizon = None
    if args.long_horizon != "off":
        from verification import longhorizon

        cases = longhorizon.grid_cases(args.long_horizon)
        print(f"\nlong horizon, grid {args.long_horizon!r} ({len(cases)} cases) ...", flush=True)
        begin = time.perf_counter()
        found = longhorizon.run_cases(cases, progress=True)
        long_horizon = longhorizon.summary(found, args.long_horizon, time.perf_counter() - begin)
    training = None
    if args.training > 0:
        from verification import training as training_runs

        print(f"\ntraining on digits, {args.training} steps per run ...", flush=True)
        begin = time.perf_counter()
        runs = training_runs.run_all(args.training, progress=True)
        training = training_runs.summary(runs, time.perf_counter() - begin)
    note = matplotlib_missing()
    plots = () if note else write_plots(results, args.out)
    report = Report(
        checks,
        results,
        grid,
        time.perf_counter() - start,
        plots,
        note,
        calibrations,
        mutations,
        stability=stability,
        training=training,
        long_horizon=long_horizon,
    )
    markdown, _ = write_report(report, args.out)
    if args.json is not None:
        args.json.write_text(json.dumps(as_json(report), indent=2, ensure_ascii=False) + "\n")
    verdict = "PASS" if report.passed else "FAIL"
    print(f"\n{verdict} ({report.seconds:.1f} s); report: {markdown}")
    return 0 if report.passed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
