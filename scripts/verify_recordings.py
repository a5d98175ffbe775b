"""Verify every recording in a directory and print one Markdown table row per file.

``python scripts/verify_recordings.py recordings/public [--json OUT]`` runs, in
one process, what ``python -m verification.verify_recording FILE`` runs for
each ``*.npz`` of the directory (:func:`verification.verify_recording.verify`),
and prints a table: scenario, mode, structures, dtype, verdict, the worst
error/bound along the trajectory and one step at a time, and the entry where
the one-step ratio is worst.  Files listed in ``refused.json`` (cases the
recorded package refused to run) are listed as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from verification.recording_format import RecordingError
from verification.verify_recording import verify


def _worst(result: dict[str, Any], comparison: str) -> dict[str, Any]:
    """The row of ``comparison`` with the largest ratio."""
    rows = [row for row in result["entries"] if row["comparison"] == comparison]
    return max(rows, key=lambda row: row["ratio"])


def summarize(directory: Path) -> list[dict[str, Any]]:
    """One summary per recording (and per refused case) in ``directory``, sorted by name."""
    summaries = []
    for path in sorted(directory.glob("*.npz")):
        try:
            result = verify(path)
        except RecordingError as error:
            summaries.append({"file": path.name, "verdict": "invalid", "error": str(error)})
            continue
        worst, local = _worst(result, "trajectory"), _worst(result, "one-step")
        summaries.append(
            {
                "file": path.name,
                "scenario": result["meta"].get("scenario", "?"),
                "mode": result["meta"].get("mode", result["meta"].get("variant", "?")),
                "structures": "/".join(result["hyper"]["structures"]),
                "dtype": result["model_dtype"],
                "verdict": "pass" if result["passed"] else "FAIL",
                "worst_ratio": worst["ratio"],
                "worst_at": f"{worst['layer']}.{worst['key']}@{worst['step']}",
                "local_worst_ratio": local["ratio"],
                "local_worst_at": f"{local['layer']}.{local['key']}@{local['step']}",
                "local_error_eps": local["error_eps"],
            }
        )
    refused = directory / "refused.json"
    if refused.exists():
        for name, reason in json.loads(refused.read_text()).items():
            summaries.append({"file": name, "verdict": "refused", "error": reason})
    return sorted(summaries, key=lambda summary: summary["file"])


def markdown(summaries: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`summarize`'s result."""
    lines = [
        "| file | verdict | err/bound trajectory (where) | err/bound one step (where) |",
        "|---|---|---|---|",
    ]
    for s in summaries:
        if "error" in s:
            lines.append(f"| {s['file']} | {s['verdict']} | {s['error'][:80]} | |")
            continue
        lines.append(
            f"| {s['file']} | {s['verdict']} | {s['worst_ratio']:.3g} ({s['worst_at']}) | "
            f"{s['local_worst_ratio']:.3g} ({s['local_worst_at']}) |"
        )
    return "\n".join(lines)


def _parts(file: str) -> tuple[str, str, str, str]:
    """``scenario, mode, structures, dtype`` from ``scenario_mode_K-C_dtype.npz``."""
    scenario, mode, rest = file.removesuffix(".npz").split("_", 2)
    structures, dtype = rest.rsplit("_", 1)
    pair = structures.split("-")
    return scenario, mode, pair[0] if pair[0] == pair[1] else " / ".join(pair), dtype


def pivot(summaries: list[dict[str, Any]]) -> str:
    """One table per scenario: rows (K, C), columns mode × dtype, cells verdict and worst ratio.

    The ratio is the larger of the trajectory and one-step worst error/bound.
    """
    cells: dict[str, dict[str, dict[str, str]]] = {}
    for s in summaries:
        scenario, mode, structures, dtype = _parts(s["file"])
        short = {"float64": "f64", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}[dtype]
        if s["verdict"] == "refused":
            cell = "refused"
        elif "error" in s:
            cell = "invalid"
        else:
            ratio = max(s["worst_ratio"], s["local_worst_ratio"])
            cell = f"pass {ratio:.2g}" if s["verdict"] == "pass" else f"**FAIL {ratio:.2g}**"
        cells.setdefault(scenario, {}).setdefault(structures, {})[f"{mode} {short}"] = cell
    tables = []
    for scenario, rows in cells.items():
        columns = list(dict.fromkeys(column for row in rows.values() for column in row))
        lines = [f"`{scenario}`:", "", "| (K, C) | " + " | ".join(columns) + " |"]
        lines.append("|---|" + "---|" * len(columns))
        for structures, row in rows.items():
            values = [row.get(column, "") for column in columns]
            lines.append(f"| {structures} | " + " | ".join(values) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    """Print the table; exit 0 iff every recording passes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--json", type=Path, help="also write the summaries as JSON")
    parser.add_argument(
        "--pivot", action="store_true", help="tables of structures × (mode, dtype) per scenario"
    )
    args = parser.parse_args(argv)
    summaries = summarize(args.directory)
    print(pivot(summaries) if args.pivot else markdown(summaries))
    if args.json is not None:
        args.json.write_text(json.dumps(summaries, indent=2) + "\n")
    return 0 if all(s["verdict"] == "pass" for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
