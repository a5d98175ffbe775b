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


def main(argv: list[str] | None = None) -> int:
    """Print the table; exit 0 iff every recording passes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--json", type=Path, help="also write the summaries as JSON")
    args = parser.parse_args(argv)
    summaries = summarize(args.directory)
    print(markdown(summaries))
    if args.json is not None:
        args.json.write_text(json.dumps(summaries, indent=2) + "\n")
    return 0 if all(s["verdict"] == "pass" for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
