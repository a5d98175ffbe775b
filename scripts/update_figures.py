"""Write every command-produced figure of the docs into its marked block, or check them.

Usage::

    python scripts/update_figures.py --run          # run the commands, then rewrite the blocks
    python scripts/update_figures.py                # rewrite from the last run's JSON
    python scripts/update_figures.py --run --check  # tox -e docs: exit 1 on a stale figure

A block is the text between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``
in README.md or docs/*.md; each is regenerated whole from one command's JSON,
with the command, machine and date stamped under it, so no figure in a block
is typed by hand.  The commands (:data:`SOURCES`; ``--run`` runs them, about
fifteen minutes on two cores, six of them case3 and training, and keeps their
JSON in ``verification-report/``):

* ``report``: ``python -m verification --out verification-report`` (``singd-verify``);
* ``digits``: ``python -m verification.experiments.digits --seed N --json`` for N = 0, 1, 2;
* ``structure-costs``: ``python scripts/structure_costs.py --json``;
* ``optimizer-costs``: ``python scripts/optimizer_costs.py --json`` (the asv benchmark's code);
* ``step-costs``: ``python scripts/step_costs.py --json`` (the asv cost tracks: operators, host
  syncs and bytes of one step on 1, 2, 4 equal layers);
* ``step-ratios``: ``python scripts/step_ratio.py [--compare-python $SINGD_PUBLIC_PYTHON] --json``
  (ratios to AdamW, and the public package's in the same windows when
  ``SINGD_PUBLIC_PYTHON`` names its Python);
* ``compiled-updates``: ``python scripts/step_ratio.py --no-extra --structures diagonal dense
  triltoeplitz --steps 15 --threads 1 --compile-updates --json`` (the opt-in compiled
  parameter update; one thread: less exposed to other work on a shared machine);
* ``case3``: ``python -m verification.fixed_point --json`` (the IKFAC fixed point, before/after);
* ``training``: ``python -m verification.training --json`` (digits, 1000 steps per precision);
* ``layer-coverage``: ``python scripts/layer_coverage.py --json`` (which parameters of two
  transformer models are preconditioned how, and their iteration time against AdamW).

``--check`` compares the committed blocks with the regenerated ones, number by
number, and exits 1 when one differs by more than what legitimately varies
between machines (nothing is written then).  Text, names, verdicts, counts,
bytes, free entries and bounds must match exactly; the stamp line is not
compared; timings are reported, never compared.  Rounding-dependent figures
vary because BLAS kernels (and so the order of every sum) differ between
CPUs and builds: an error/bound ratio, an error in eps or a probe ratio may
move by ``RTOL_ROUNDING`` = 25 % relative plus ``0.05`` (ratios) or one eps /
one ulp (errors, visibilities, resolutions) absolute; a digits accuracy by
0.015 (8 of the 540 test images) and a final training loss by a factor 2
(400 bf16 steps amplify a changed rounding); for the same reason a 1000-step
training run's preconditioner deviation, condition number and a fixed-point
residual (a stationary fluctuation) by a factor 2, its share of swamped factor
entries by 0.1.  A block whose rows or text
differ is stale whatever the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
#: Where ``--run`` keeps each command's output.
OUTPUT = ROOT / "verification-report"
DIGITS_SEEDS = (0, 1, 2)
#: The Python whose ``singd`` the step-ratio table compares with (unset: ours only).
PUBLIC_PYTHON = os.environ.get("SINGD_PUBLIC_PYTHON")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; a ``|`` inside a cell is escaped."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


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


# --------------------------------------------------------------- more figures
def _source_stamp(source: dict) -> str:
    """Command, seconds, machine and date of one ``--run`` output."""
    env = source["environment"]
    return (
        f"_Measured by `{source['command']}` ({source['seconds']:.0f} s) on {env['cpu']} "
        f"({env['cpu_count']} cores), torch {env['torch']}, numpy {env['numpy']}, {env['date']}._"
    )


def selfcheck_block(report: dict) -> list[str]:
    """Every check of the oracle's self-check: measured, bound, verdict."""
    rows = [
        [
            check["name"],
            f"{check['measured']:.2g}",
            f"{'≥' if check['lower'] else '≤'} {check['bound']:.3g}",
            check["unit"],
            "pass" if check["passed"] else "**FAIL**",
        ]
        for check in report["selfcheck"]["checks"]
    ]
    header = ["check", "measured", "required", "unit", "verdict"]
    return [*_table(header, rows), "", _stamp(report)]


def counts_block(report: dict) -> list[str]:
    """How many self-checks, comparison cases and mutants the run had."""
    summary = report["comparison"]["summary"]
    cases = sum(entry["cases"] for entry in summary.values())
    passed = sum(entry["passed"] for entry in summary.values())
    mutations = report.get("mutations") or {"mutants": {}}
    checks = report["selfcheck"]["checks"]
    return [
        f"* oracle self-check: {sum(c['passed'] for c in checks)} of {len(checks)} checks pass;",
        f"* implementation vs oracle: {passed} of {cases} cases pass;",
        f"* mutation check: {len(mutations['mutants'])} wrong optimizers.",
        "",
        _stamp(report),
    ]


def resolution_summary_block(report: dict) -> list[str]:
    """The smallest relative error in ĝ the verifier catches, per precision."""
    mutations = report.get("mutations")
    if mutations is None:
        return ["_The report was made with `--no-mutants`._"]
    parts = []
    for precision, found in mutations["resolution"].items():
        delta = found["families"]["precondition"]["delta"]
        parts.append(f"{precision} {'not killed' if delta is None else f'{delta:.2g}'}")
    return [
        "Resolution (smallest δ in ĝ × (1 + δ) caught): " + "; ".join(parts) + ".",
        "",
        _stamp(report),
    ]


DIGITS_LABELS = {
    "singd_dense": "SINGD dense",
    "singd_diagonal": "SINGD diagonal",
    "adamw": "AdamW",
    "kfac": "KFAC (bfloat16)",
    "kfac_upcast": "KFAC, `upcast_half=True` (factors in float32)",
}


#: Labels in the one-sentence summary.
DIGITS_SHORT = {
    "singd_dense": "SINGD dense",
    "singd_diagonal": "SINGD diagonal",
    "adamw": "AdamW",
    "kfac": "plain KFAC in bfloat16",
    "kfac_upcast": "KFAC with float32 factors",
}


def _digits_runs(digits: dict) -> dict[str, list[dict]]:
    """Optimizer -> its result for every seed, in seed order."""
    runs: dict[str, list[dict]] = {}
    for seed in DIGITS_SEEDS:
        for entry in digits["result"][str(seed)]:
            runs.setdefault(entry["optimizer"], []).append(entry)
    return runs


def digits_block(digits: dict) -> list[str]:
    """Test accuracy and final training loss of every optimizer and seed."""
    seeds = " / ".join(str(seed) for seed in DIGITS_SEEDS)
    rows = []
    for name, entries in _digits_runs(digits).items():
        errors = {entry["error"].split(":")[0] for entry in entries if entry["error"]}
        if errors:
            rows.append([DIGITS_LABELS[name], f"raises `{', '.join(sorted(errors))}`", "—", "—"])
            continue
        accuracies = [entry["test_accuracy"] for entry in entries]
        rows.append(
            [
                DIGITS_LABELS[name],
                " / ".join(f"{value:.3f}" for value in accuracies),
                f"{sum(accuracies) / len(accuracies):.3f}",
                " / ".join(f"{entry['final_train_loss']:.4f}" for entry in entries),
            ]
        )
    header = [
        "optimizer",
        f"test accuracy, seeds {seeds}",
        "mean",
        f"final train loss, seeds {seeds}",
    ]
    return [*_table(header, rows), "", _source_stamp(digits)]


def digits_summary_block(digits: dict) -> list[str]:
    """One sentence: mean test accuracies over the seeds, and what KFAC does."""
    parts = []
    for name, entries in _digits_runs(digits).items():
        if any(entry["error"] for entry in entries):
            kind = entries[0]["error"].split(":")[0]
            parts.append(f"{DIGITS_SHORT[name]} raises `{kind}`")
        else:
            mean = sum(entry["test_accuracy"] for entry in entries) / len(entries)
            parts.append(f"{DIGITS_SHORT[name]} {100 * mean:.1f} %")
    seeds = ", ".join(str(seed) for seed in DIGITS_SEEDS)
    return [
        f"Mean test accuracy over seeds {seeds}: " + "; ".join(parts) + ".",
        "",
        _source_stamp(digits),
    ]


def structure_costs_block(costs: dict) -> list[str]:
    """Storage and median time (ms) of every per-step operation, per structure."""
    result = costs["result"]
    structures = result["structures"]
    operations = list(next(iter(structures.values()))["seconds"])
    rows = [
        [
            name,
            str(entry["free_entries"]),
            str(entry["bytes"]),
            f"{100 * entry['free_entries'] / result['dim'] ** 2:.2f}",
            *(f"{1e3 * entry['seconds'][op]:.2f}" for op in operations),
        ]
        for name, entry in structures.items()
    ]
    header = ["structure", "free entries", "bytes (fp32)", "% of dense", *operations]
    lines = _table(header, rows)
    lines[1] = "|---|" + "---:|" * (len(header) - 1)
    settings = f"d = {result['dim']}, m = {result['cols']}, float32, {result['threads']} thread(s)"
    return [
        f"{settings}, median of {result['repeats']} runs, times in ms:",
        "",
        *lines,
        "",
        _source_stamp(costs),
    ]


OPTIMIZER_LABELS = {
    "adamw": "AdamW",
    "singd_diagonal_T10": "SINGD diagonal, T = 10 (default)",
    "singd_dense_T10": "SINGD dense, T = 10 (default)",
    "singd_diagonal": "SINGD diagonal, T = 1",
    "singd_block32": "SINGD block32diagonal, T = 1",
    "singd_dense": "SINGD dense, T = 1",
}


def _bytes(count: int) -> str:
    return f"{count / 1e3:.0f} kB" if count < 1e6 else f"{count / 1e6:.2f} MB"


def optimizer_costs_block(costs: dict) -> list[str]:
    """Step time (mean) and optimizer-state bytes of the benchmark MLP."""
    optimizers = costs["result"]["optimizers"]
    rows = [
        [label, f"{1e3 * optimizers[n]['seconds']:.3g} ms", _bytes(optimizers[n]["state_bytes"])]
        for n, label in OPTIMIZER_LABELS.items()
    ]
    return [*_table(["optimizer", "step time", "optimizer state"], rows), "", _source_stamp(costs)]


def step_costs_block(costs: dict) -> list[str]:
    """Operators (CPU / device path), host syncs and bytes of one step, by structure."""
    rows = []
    for structure, by_layers in costs["result"].items():
        counts = list(by_layers.values())
        rows.append(
            [
                structure,
                " / ".join(str(c["launches"]) for c in counts),
                " / ".join(str(c["launches_device_path"]) for c in counts),
                " / ".join(str(c["host_syncs"]) for c in counts),
                " / ".join(_bytes(c["allocated_bytes"]) for c in counts),
            ]
        )
    header = [
        "structure",
        "operators, CPU: 1 / 2 / 4 layers",
        "operators, device path",
        "host syncs",
        "bytes allocated",
    ]
    return [*_table(header, rows), "", _source_stamp(costs)]


#: Issue 9's targets for the MLP, T = 1 (``None``: only "faster than the public package").
RATIO_TARGETS_T1 = {
    "diagonal": 1.15,
    "block30diagonal": 1.5,
    "dense": 8.0,
    "hierarchical15_15": 2.0,
    "triltoeplitz": 2.0,
}
#: ... and at T = 10.
RATIO_TARGETS_T10 = {"dense": 3.0}


def _ratio_cell(results: dict | None, key: str, field: str = "ratio") -> str:
    if results is None or key not in results or field not in results[key]:
        return "–"
    return f"{results[key][field]:.2f}" + ("" if field == "vs_rival" else "×")


def step_ratios_block(source: dict) -> list[str]:
    """SINGD step / AdamW step, ours and the compared (public) package in the same windows."""
    result = source["result"]
    ours = result["results"]
    other = result["compared"] or "the public package (not measured)"
    keys = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in ours))  # model/structure, in order
    rows = []
    for key in keys:
        model, structure = key.split("/")
        targets = [
            RATIO_TARGETS_T1.get(structure) if model == "mlp" else None,
            RATIO_TARGETS_T10.get(structure) if model == "mlp" else None,
        ]
        target = " / ".join("–" if t is None else f"≤ {t:g}×" for t in targets)
        cells = [
            _ratio_cell(ours, f"{key}/T={T}", field)
            for T in (1, 10)
            for field in ("rival_ratio", "ratio", "vs_rival")
        ]
        rows.append([model, structure, *cells, target])
    header = ["model", "structure"]
    header += [f"T = {T}: {c}" for T in (1, 10) for c in ("public", "ours", "ours / public")]
    header += ["target T = 1 / T = 10"]
    note = (
        f"_public = {other}; ours = {result['singd']}; both and AdamW on copies of one "
        f"model in one process, the order rotating window by window; median of "
        f"{result['steps']} windows, {result['threads']} threads._"
    )
    return [*_table(header, rows), "", note, "", _source_stamp(source)]


def compiled_updates_block(source: dict) -> list[str]:
    """SINGD step / AdamW step with the eager and the compiled parameter update (ratios only)."""
    result = source["result"]
    eager, compiled = result["results"], result["compiled"]
    rows = [
        [
            *key.split("/"),
            _ratio_cell(eager, key),
            _ratio_cell(compiled, key),
            f"{compiled[key]['ratio'] / eager[key]['ratio']:.2f}",
        ]
        for key in eager
    ]
    header = ["model", "structure", "T", "eager", "compiled", "compiled / eager"]
    note = (
        f"_SINGD step / AdamW step, alternating (scripts/step_ratio.py); median of "
        f"{result['steps']} windows, {result['threads']} thread(s)._"
    )
    return [*_table(header, rows), "", note, "", _source_stamp(source)]


def case3_block(source: dict) -> list[str]:
    """The case-3 cells: residual per dtype, system and order (``verification.fixed_point``)."""
    rows = [
        [
            f"{cell['cond']:.0e}",
            f"{cell['damping']:.0e}",
            cell["dtype"],
            cell["system"],
            cell["order"] if cell["system"] == "torch" else "paper",  # the oracle's order
            f"{cell['residual']:.2g}",
            f"{cell['tail_median']:.2g}",
            f"{cell['floor']:.2g}",
            str(cell["skipped"]),
        ]
        for cell in source["result"]
    ]
    header = [
        "cond(U)",
        "λ",
        "dtype",
        "system",
        "order",
        "residual",
        "tail median",
        "derived level",
        "skipped",
    ]
    return [*_table(header, rows), "", _source_stamp(source)]


def training_block(source: dict) -> list[str]:
    """The digits training runs (``verification.training``)."""
    from verification.training import TABLE_HEADER, table_rows

    return [*_table(TABLE_HEADER, table_rows(source["result"]["runs"])), "", _source_stamp(source)]


def layer_coverage_block(coverage: dict) -> list[str]:
    """Per model: the parameters of each preconditioning role, and iteration times vs AdamW."""
    rows = []
    for model, entry in coverage["result"]["models"].items():
        by_role: dict[str, list[str]] = {}
        for name, role in entry["parameters"].items():
            by_role.setdefault(role, []).append(name)
        seconds = entry["seconds"]
        times = ", ".join(
            f"{name} {1e3 * value:.3g} ms ({value / seconds['AdamW']:.2f}×)"
            for name, value in seconds.items()
        )
        for role, names in sorted(by_role.items()):
            rows.append([model, role, str(len(names)), ", ".join(f"`{n}`" for n in names)])
        rows.append([model, "iteration time", "", times])
    return [*_table(["model", "role", "parameters", "which"], rows), "", _source_stamp(coverage)]


# ------------------------------------------------------------ blocks, sources
@dataclass(frozen=True)
class Rule:
    """How far a regenerated number may lie from the committed one (module docstring).

    Attributes:
        rtol: Relative part, of the larger magnitude.
        atol: Absolute part.
        timing: A timing: reported, never compared.
    """

    rtol: float = 0.0
    atol: float = 0.0
    timing: bool = False

    def holds(self, old: float, new: float) -> bool:
        """Whether ``new`` is within this rule of ``old``."""
        return self.timing or abs(old - new) <= self.rtol * max(abs(old), abs(new)) + self.atol


EXACT = Rule()
TIMING = Rule(timing=True)
#: Rounding-dependent figures: 25 % relative (module docstring).
RTOL_ROUNDING = 0.25
RATIO = Rule(RTOL_ROUNDING, 0.05)
IN_EPS = Rule(RTOL_ROUNDING, 1.0)


@dataclass(frozen=True)
class Block:
    """One marked block: its source, generator and comparison rules.

    Attributes:
        source: Key of :data:`SOURCES` whose JSON the block is made from.
        make: The JSON -> the block's lines.
        default: Rule for numbers outside a table, and for table columns not named.
        columns: Header cell -> rule for that table column (the first column is text).
    """

    source: str
    make: Callable[[dict], list[str]]
    default: Rule = EXACT
    columns: dict[str, Rule] = field(default_factory=dict)


BLOCKS: dict[str, Block] = {
    "verification-summary": Block(
        "report",
        summary_block,
        columns={
            "worst error/bound: trajectory": RATIO,
            "blocks of 5": RATIO,
            "one step": RATIO,
            "largest one-step error [eps·max|entry|]": IN_EPS,
            "one step, probabilistic bound": RATIO,
            "vs emulated oracle": IN_EPS,
        },
    ),
    "arithmetic-models": Block("report", models_block, columns={"worst probe error/bound": RATIO}),
    "mutation-table": Block("report", mutation_block, default=IN_EPS),
    "selfcheck": Block("report", selfcheck_block, columns={"measured": IN_EPS}),
    "verification-counts": Block("report", counts_block),
    "resolution-summary": Block("report", resolution_summary_block, default=Rule(RTOL_ROUNDING)),
    "digits": Block(
        "digits",
        digits_block,
        columns={
            "test accuracy, seeds 0 / 1 / 2": Rule(atol=0.015),
            "mean": Rule(atol=0.015),
            "final train loss, seeds 0 / 1 / 2": Rule(rtol=0.5),
        },
    ),
    "digits-summary": Block("digits", digits_summary_block, default=Rule(atol=1.5)),
    "structure-costs": Block(
        "structure-costs",
        structure_costs_block,
        columns={
            "K X": TIMING,
            "Kᵀ X": TIMING,
            "Π̂(KᵀXXᵀK)": TIMING,
            "Π̂(KᵀK)": TIMING,
            "K L": TIMING,
            "K += αL": TIMING,
            "K += vI": TIMING,
            "tr K": TIMING,
            "max|K|": TIMING,
        },
    ),
    "optimizer-costs": Block(
        "optimizer-costs", optimizer_costs_block, columns={"step time": TIMING}
    ),
    "step-costs": Block("step-costs", step_costs_block),
    "step-ratios": Block("step-ratios", step_ratios_block, default=TIMING),
    "compiled-updates": Block("compiled-updates", compiled_updates_block, default=TIMING),
    "case3": Block(
        "case3",
        case3_block,
        columns={
            "residual": Rule(rtol=0.5),
            "tail median": Rule(rtol=0.5),
            "derived level": Rule(RTOL_ROUNDING),
        },
    ),
    "training": Block(
        "training",
        training_block,
        columns={
            "test accuracy": Rule(atol=0.015),
            "final train loss": Rule(rtol=0.5),
            "KKᵀ deviation: final / max": Rule(rtol=0.5),
            "CCᵀ deviation: final / max": Rule(rtol=0.5),
            "rounded to nothing, last step: K / C": Rule(atol=0.1),
            "cond(KKᵀ)": Rule(rtol=0.5),
        },
    ),
    "layer-coverage": Block("layer-coverage", layer_coverage_block, columns={"which": TIMING}),
}

#: Source -> the commands ``--run`` runs (``{out}``: where the JSON goes).
SOURCES: dict[str, list[list[str]]] = {
    "report": [[sys.executable, "-m", "verification", "--out", "{out}"]],
    "digits": [
        [
            sys.executable,
            "-m",
            "verification.experiments.digits",
            "--seed",
            str(seed),
            "--json",
            f"{{out}}/digits-{seed}.json",
        ]
        for seed in DIGITS_SEEDS
    ],
    "structure-costs": [
        [sys.executable, "scripts/structure_costs.py", "--json", "{out}/structure-costs.json"]
    ],
    "optimizer-costs": [
        [sys.executable, "scripts/optimizer_costs.py", "--json", "{out}/optimizer-costs.json"]
    ],
    "step-costs": [[sys.executable, "scripts/step_costs.py", "--json", "{out}/step-costs.json"]],
    # SINGD_PUBLIC_PYTHON: a Python with the public singd (README, "Speed and memory")
    "step-ratios": [
        [
            sys.executable,
            "scripts/step_ratio.py",
            *(["--compare-python", PUBLIC_PYTHON] if PUBLIC_PYTHON else []),
            "--json",
            "{out}/step-ratios.json",
        ]
    ],
    "compiled-updates": [
        [
            sys.executable,
            "scripts/step_ratio.py",
            "--no-extra",
            "--structures",
            "diagonal",
            "dense",
            "triltoeplitz",
            "--steps",
            "15",
            "--threads",
            "1",
            "--compile-updates",
            "--json",
            "{out}/compiled-updates.json",
        ]
    ],
    "case3": [[sys.executable, "-m", "verification.fixed_point", "--json", "{out}/case3.json"]],
    "training": [[sys.executable, "-m", "verification.training", "--json", "{out}/training.json"]],
    "layer-coverage": [
        [sys.executable, "scripts/layer_coverage.py", "--json", "{out}/layer-coverage.json"]
    ],
}


def run_sources(names: list[str], out: Path) -> None:
    """Run the commands of ``names``; wrap each non-report result with its stamp data."""
    from verification.report import environment

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        for command in SOURCES[name]:
            argv = [part.format(out=figures if name != "report" else out) for part in command]
            print("+", " ".join(argv), flush=True)
            subprocess.run(argv, cwd=ROOT, check=True)
        if name == "report":
            continue
        shown = " ".join(Path(p).name if p == sys.executable else p for p in SOURCES[name][0])
        shown = shown.replace("{out}", "verification-report/figures")
        if name == "digits":
            shown = shown.replace("--seed 0", "--seed N").replace("digits-0", "digits-N")
            result: object = {
                str(seed): json.loads((figures / f"digits-{seed}.json").read_text())
                for seed in DIGITS_SEEDS
            }
        else:
            result = json.loads((figures / f"{name}.json").read_text())
        wrapped = {
            "command": shown.replace(Path(sys.executable).name, "python"),
            "seconds": time.perf_counter() - start,
            "environment": environment(),
            "result": result,
        }
        (figures / f"{name}.source.json").write_text(json.dumps(wrapped, indent=2))


def load_sources(out: Path) -> dict[str, dict]:
    """Every source whose output exists under ``out``."""
    sources = {}
    if (out / "report.json").exists():
        sources["report"] = json.loads((out / "report.json").read_text())
    for name in SOURCES:
        path = out / "figures" / f"{name}.source.json"
        if name != "report" and path.exists():
            sources[name] = json.loads(path.read_text())
    return sources


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- figures:{name} -->\n)(.*?\n)?(<!-- /figures:{name} -->)", flags=re.DOTALL
    )


def rewrite(text: str, sources: dict[str, dict]) -> str:
    """``text`` with every block whose source is known regenerated."""
    for name, block in BLOCKS.items():
        if block.source not in sources:
            continue
        lines = block.make(sources[block.source])
        text = _pattern(name).sub(
            lambda m, ls=lines: m.group(1) + "\n".join(ls) + "\n" + m.group(3), text
        )
    return text


NUMBER = re.compile(r"(?<![\w.])([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w.])")


def _cells(line: str) -> list[str]:
    """The cells of a table row, ``\\|`` unescaped."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def _compare_text(old: str, new: str, rule: Rule) -> bool:
    """Same text around the numbers, and every number within ``rule``."""
    if rule.timing:
        return True
    old_parts, new_parts = NUMBER.split(old), NUMBER.split(new)
    if len(old_parts) != len(new_parts):
        return False
    for index, (a, b) in enumerate(zip(old_parts, new_parts, strict=True)):
        if index % 2 == 0:
            if a != b:
                return False
        elif not rule.holds(float(a), float(b)):
            return False
    return True


def stale_lines(block: Block, old: list[str], new: list[str]) -> list[str]:
    """Committed lines of a block that the regenerated block contradicts (module docstring)."""
    old = [line for line in old if not line.startswith("_Measured")]
    new = [line for line in new if not line.startswith("_Measured")]
    if len(old) != len(new):
        return [f"{len(old)} lines committed, {len(new)} regenerated"]
    problems, header = [], []
    for index, (a, b) in enumerate(zip(old, new, strict=True)):
        is_table = a.startswith("|") and b.startswith("|")
        if is_table and index + 1 < len(new) and new[index + 1].startswith("|-"):
            header = _cells(b)
        if is_table and not b.startswith("|-"):
            ca, cb = _cells(a), _cells(b)
            ok = len(ca) == len(cb) and ca[0] == cb[0]
            for column, (x, y) in enumerate(zip(ca[1:], cb[1:], strict=False), start=1):
                title = header[column] if column < len(header) else ""
                ok = ok and _compare_text(x, y, block.columns.get(title, block.default))
        else:
            ok = _compare_text(a, b, block.default)
        if not ok:
            problems.append(f"committed: {a}\n    now:       {b}")
    return problems


def check(sources: dict[str, dict]) -> list[str]:
    """Every stale figure of every document, as messages."""
    messages = []
    for document in DOCUMENTS:
        text = document.read_text()
        for name, block in BLOCKS.items():
            match = _pattern(name).search(text)
            if match is None:
                continue
            if block.source not in sources:
                messages.append(f"{document.name} [{name}]: no output of `{block.source}` (--run)")
                continue
            old = (match.group(2) or "").splitlines()
            for problem in stale_lines(block, old, block.make(sources[block.source])):
                messages.append(f"{document.relative_to(ROOT)} [{name}]: {problem}")
    return messages


def main(argv: list[str] | None = None) -> int:
    """Run the commands (``--run``), then rewrite the blocks or (``--check``) compare them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT, help="the commands' output directory")
    parser.add_argument("--run", action="store_true", help="run the commands first")
    parser.add_argument("--only", nargs="*", choices=sorted(SOURCES), default=None)
    parser.add_argument("--check", action="store_true", help="only report stale figures")
    args = parser.parse_args(argv)
    if args.run:
        run_sources(args.only or list(SOURCES), args.out)
    sources = load_sources(args.out)
    if args.only is not None:
        sources = {name: value for name, value in sources.items() if name in args.only}
    if args.check:
        messages = check(sources)
        if args.only is not None:
            messages = [m for m in messages if "(--run)" not in m]
        for message in messages:
            print("stale:", message)
        print(f"{len(messages)} stale figure(s)" if messages else "every figure is current")
        return 1 if messages else 0
    for document in DOCUMENTS:
        text = document.read_text()
        new = rewrite(text, sources)
        if new != text:
            document.write_text(new)
            print(f"updated: {document.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
