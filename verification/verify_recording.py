"""``singd-verify-recording PATH [--json OUT]``: verify a recorded run against the float64 oracle.

The recording (:mod:`verification.recording_format`, from this project's
optimizer or from any other SINGD implementation) is replayed through the
float64 oracle (:func:`verification.replay.replay_singd`) and compared twice:
along the whole trajectory (:func:`verification.comparison.compare_singd`,
propagated bound) and one step at a time from the recorded state
(:func:`verification.comparison.compare_singd_local`).  The bounds use the
``eps`` of the coarsest of the model and factor dtypes.  For every layer and
state entry the command prints the worst ``error / bound`` and the largest
error in units of ``eps · max|entry|``.

Exit status: 0 iff every ratio is at most 1, 1 if any exceeds it, 2 if the
file cannot be read or does not follow the format.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from verification.recording_format import FORMAT_VERSION, RecordingError, load_recording

#: Exit statuses.
PASSED, FAILED, INVALID = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="singd-verify-recording",
        description=(
            "Replay a recorded SINGD run (recording format version "
            f"{FORMAT_VERSION}, docs/verification.md) through the float64 oracle and compare "
            "every state entry after every step, along the trajectory and one step at a time "
            "from the recorded state, against eps-derived bounds. Exit status 0 iff every "
            "error is within its bound, 1 otherwise, 2 for an unreadable or invalid file."
        ),
    )
    parser.add_argument("path", type=Path, metavar="PATH", help="the recording (.npz)")
    parser.add_argument(
        "--json", type=Path, metavar="OUT", help="also write the result as JSON to OUT"
    )
    return parser


def _rows(deviations: list[Any], comparison: str, eps: float) -> list[dict[str, Any]]:
    """One JSON-ready row per layer and entry: the step with the worst ratio, largest eps error."""
    from verification.grid import error_in_eps, ratio

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for deviation in deviations:
        key = (deviation.layer, deviation.key)
        current = rows.get(key)
        error_eps = error_in_eps(deviation, eps)
        if current is None or ratio(deviation) > current["ratio"]:
            rows[key] = {
                "comparison": comparison,
                "layer": deviation.layer,
                "key": deviation.key,
                "step": deviation.step,
                "error": deviation.error,
                "bound": deviation.bound,
                "ratio": ratio(deviation),
                "error_eps": max(error_eps, current["error_eps"] if current else 0.0),
            }
        else:
            current["error_eps"] = max(current["error_eps"], error_eps)
    return list(rows.values())


def verify(path: Path) -> dict[str, Any]:
    """Load, replay and compare the recording at ``path``.

    Returns:
        JSON-ready result: ``passed``, ``worst_ratio``, ``local_worst_ratio``,
        the hyper-parameters, the dtypes and one row per comparison, layer and entry.

    Raises:
        RecordingError: If the file is unreadable or invalid.
    """
    import torch

    from verification.comparison import compare_singd, compare_singd_local
    from verification.replay import replay_singd
    from verification.tolerances import EPS

    run, hyper, meta = load_recording(path)
    dtype = getattr(torch, meta.bound_dtype)
    settings = (dtype, meta.kfac_approx, meta.loss_average)
    try:
        oracle = replay_singd(run, hyper, meta.kfac_approx, meta.loss_average)
    except ValueError as error:
        raise RecordingError(f"{path}: the oracle rejects the recorded data: {error}") from error
    history: list[Any] = []
    compare_singd(run, oracle, hyper, *settings, history)
    local_history: list[Any] = []
    compare_singd_local(run, hyper, *settings, local_history)
    eps = EPS[dtype]
    rows = _rows(history, "trajectory", eps) + _rows(local_history, "one-step", eps)
    worst = max((row["ratio"] for row in rows if row["comparison"] == "trajectory"), default=0.0)
    local = max((row["ratio"] for row in rows if row["comparison"] == "one-step"), default=0.0)
    return {
        "path": str(path),
        "version": meta.version,
        "model_dtype": meta.model_dtype,
        "factor_dtypes": list(meta.factor_dtypes),
        "bound_dtype": meta.bound_dtype,
        "bound_eps": eps,
        "loss_average": meta.loss_average,
        "kfac_approx": meta.kfac_approx,
        "hyper": {**asdict(hyper), "structures": list(hyper.structures)},
        "meta": meta.extra,
        "steps": len(run.steps),
        "passed": all(row["ratio"] <= 1 for row in rows),
        "worst_ratio": worst,
        "local_worst_ratio": local,
        "entries": rows,
    }


def format_result(result: dict[str, Any]) -> str:
    """The human-readable table of :func:`verify`'s result."""
    hyper = result["hyper"]
    lines = [
        f"{result['path']}: format v{result['version']}, {result['steps']} steps, "
        f"model {result['model_dtype']}, factors {'/'.join(result['factor_dtypes'])}, "
        f"structures {'/'.join(hyper['structures'])}, bound eps = eps({result['bound_dtype']})",
        f"{'comparison':<11} {'layer':<14} {'entry':<5} {'step':>4}  {'error':>10}  "
        f"{'bound':>10}  {'err/bound':>10}  {'max err [eps]':>13}",
    ]
    for row in result["entries"]:
        verdict = "" if row["ratio"] <= 1 else "  FAIL"
        lines.append(
            f"{row['comparison']:<11} {row['layer']:<14} {row['key']:<5} {row['step']:>4}  "
            f"{row['error']:>10.3g}  {row['bound']:>10.3g}  {row['ratio']:>10.3g}  "
            f"{row['error_eps']:>13.3g}{verdict}"
        )
    verdict = "PASS" if result["passed"] else "FAIL"
    lines.append(
        f"{verdict}: worst error/bound {result['worst_ratio']:.3g} (trajectory), "
        f"{result['local_worst_ratio']:.3g} (one step)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Verify one recording; return 0 (pass), 1 (an error above its bound) or 2 (invalid file).

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when None).
    """
    args = build_parser().parse_args(argv)
    try:
        result = verify(args.path)
    except RecordingError as error:
        print(f"singd-verify-recording: invalid recording: {error}", file=sys.stderr)
        return INVALID
    print(format_result(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return PASSED if result["passed"] else FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
