"""Write the figures of ``singd-verify``'s ``report.json`` into the marked blocks of the docs.

Usage::

    singd-verify                      # writes verification-report/report.json
    python scripts/update_figures.py  # rewrites the blocks in README.md, docs/verification.md

A block is the text between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``;
each is regenerated whole, with the machine, date and run time it was measured
with, so no figure in a block is ever typed by hand.  ``--check`` exits 1 when a
block differs from what the report gives (nothing is written then).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "verification.md")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _stamp(report: dict) -> str:
    env = report["environment"]
    return (
        f"_Measured by `singd-verify` (grid `{report['grid']}`, {report['seconds']:.0f} s) on "
        f"{env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, {env['date']}._"
    )


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def summary_block(report: dict) -> list[str]:
    """Cases passing and worst ratios per precision (trajectory, blocks, one step, emulated)."""
    rows = []
    for label, summary in report["comparison"]["summary"].items():
        emulated = "–"
        if summary.get("emulated_worst_ratio") is not None:
            share = _ratio(summary["emulated_worst_ratio"])
            emulated = (
                f"{summary['emulated_max_ulps']:.2g} ulps ({share} of the rule), "
                f"{100 * summary['emulated_min_bitwise_fraction']:.0f} % bitwise"
            )
        rows.append(
            [
                label,
                f"{summary['passed']}/{summary['cases']}",
                _ratio(summary["worst_ratio"]),
                _ratio(summary["block_worst_ratio"]),
                _ratio(summary["local_worst_ratio"]),
                f"{summary['local_worst_error_eps']:.2g}",
                _ratio(summary.get("probabilistic_local_worst_ratio")),
                emulated,
            ]
        )
    header = [
        "precision",
        "cases passing",
        "worst error/bound: trajectory",
        "blocks of 5",
        "one step",
        "largest one-step error [eps·max|entry|]",
        "one step, probabilistic bound",
        "vs emulated oracle",
    ]
    return [*_table(header, rows), "", _stamp(report)]


def models_block(report: dict) -> list[str]:
    """The arithmetic model of every dtype and the probe's worst error/bound."""
    rows = [
        [
            model["model"]["label"],
            f"{model['worst_ratio']:.3g}",
            "holds" if model["passed"] else "**contradicted**",
        ]
        for model in report["arithmetic_models"]
    ]
    return [*_table(["model", "worst probe error/bound", "verdict"], rows), "", _stamp(report)]


def mutation_block(report: dict) -> list[str]:
    """Mutant × precision visibility and verdict, then the resolution."""
    mutations = report.get("mutations")
    if mutations is None:
        return ["_The report was made with `--no-mutants`._"]
    precisions = mutations["precisions"]
    rows = []
    for name, row in mutations["mutants"].items():
        cells = []
        for precision in precisions:
            result = row["results"][precision]
            visible = result["visibility_ulps"] >= mutations["visible_ulps"]
            verdict = "killed" if result["killed"] else ("**survives**" if visible else "–")
            cells.append(f"{result['visibility_ulps']:.2g} {verdict}")
        rows.append([f"`{name}`", *cells])
    lines = _table(["mutant", *precisions], rows)
    lines += [
        "",
        "Resolution: the smallest relative perturbation δ of the preconditioned "
        "gradient (and of H_K) that the verifier kills:",
        "",
    ]
    resolution_rows = []
    for precision, found in mutations["resolution"].items():
        families = found["families"]
        resolution_rows.append(
            [
                precision,
                *(
                    f"{families[name]['delta']:.2g} ({families[name]['visibility_ulps']:.2g} ulps)"
                    if families[name]["delta"] is not None
                    else "not killed"
                    for name in ("precondition", "H_K")
                ),
            ]
        )
    lines += _table(["precision", "ĝ × (1 + δ)", "H_K × (1 + δ)"], resolution_rows)
    return [*lines, "", _stamp(report)]


BLOCKS = {
    "verification-summary": summary_block,
    "arithmetic-models": models_block,
    "mutation-table": mutation_block,
}


def rewrite(text: str, report: dict) -> str:
    """``text`` with every known block regenerated from ``report``."""
    for name, block in BLOCKS.items():
        pattern = re.compile(
            rf"(<!-- figures:{name} -->\n)(?:.*?\n)?(<!-- /figures:{name} -->)", flags=re.DOTALL
        )
        text = pattern.sub(
            lambda m, b=block: m.group(1) + "\n".join(b(report)) + "\n" + m.group(2), text
        )
    return text


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with ``--check`` compare) the figure blocks; exit 1 on a stale block."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=ROOT / "verification-report/report.json")
    parser.add_argument("--check", action="store_true", help="only report stale blocks")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    stale = []
    for document in DOCUMENTS:
        text = document.read_text()
        new = rewrite(text, report)
        if new != text:
            stale.append(document)
            if not args.check:
                document.write_text(new)
    for document in stale:
        print(f"{'stale' if args.check else 'updated'}: {document.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
