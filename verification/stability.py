"""Stability map: ``lr_cov × damping (× structure)`` in bf16/fp16 on the digits MLP.

Each cell trains a fresh ``64 → 64 → 10`` MLP (:mod:`verification.experiments.
digits`: data, model, mini-batches of 64, seed 0) entirely in the cell's dtype
for a fixed number of steps and is labelled, in this order of precedence:

* ``skipped``: at least half of the steps were skipped by the optimizer
  (non-finite gradients, statistics or results);
* ``diverged``: the final training loss or a parameter is non-finite, or the
  final loss exceeds the initial loss ``L0`` (the method made things worse);
* ``converged``: ``L ≤ L0 − ½(L0 − L_ref)``, i.e. at least half of the loss
  reduction that float32 AdamW (lr 1e-2, the digits experiment's tuned
  setting) reaches in the same steps from the same initialisation;
* ``stagnated``: everything else — finite, not worse, but less than half of
  the reference's progress (e.g. factor steps swamped: ``K`` moves by less than
  one rounding ``u`` relative and the preconditioner never adapts).

The thresholds are definitions relative to a measured reference, not
tolerances fitted to a method: "half the reference's progress" separates a
method that learns at a useful rate from one that barely moves; ``L > L0``
is the plain meaning of divergence; "half the steps" is a majority.  Losses
are the cross-entropy over the whole training set, computed in float32 from
the model's logits.

Methods are data: :data:`SINGD_VARIANTS` maps a name to ``SINGD`` constructor
arguments (the guarded variant slots in there), plus KFAC with float32 linear
algebra (``upcast_half=True``) and AdamW (which has no ``lr_cov``/``damping``:
one cell per dtype).  ``python -m verification.stability [--full]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from singd import KFAC, SINGD
from verification.experiments.digits import BATCH_SIZE, SEED, DigitsData, load_data, make_model

#: Hyper-parameters shared by the Kronecker methods (the digits experiment's, minus the map's axes).
KRONECKER = {"lr": 0.03, "momentum": 0.9, "T": 1}

#: SINGD variants as constructor arguments.
SINGD_VARIANTS: dict[str, dict[str, object]] = {
    "singd": {"factor_guard": None},
    "singd+guard": {"factor_guard": "compensated"},  # SINGD's default for bf16/fp16 factors
    "ikfac": {"kfac_like": True, "alpha1": 0.0},
}

#: Cell labels, in precedence order.
LABELS = ("skipped", "diverged", "converged", "stagnated")

#: The grids: axes of the map and the number of training steps.
GRIDS: dict[str, dict[str, Sequence[object]]] = {
    "default": {
        "lr_cov": (0.05, 0.5),
        "damping": (1e-3, 0.1),
        "structures": ("dense",),
        "dtypes": ("bfloat16", "float16"),
        "steps": (15,),
    },
    "medium": {
        "lr_cov": (0.01, 0.05, 0.2, 0.5),
        "damping": (1e-4, 1e-2, 1.0),
        "structures": ("dense",),
        "dtypes": ("bfloat16", "float16"),
        "steps": (60,),
    },
    "full": {
        "lr_cov": (0.01, 0.05, 0.2, 0.5),
        "damping": (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        "structures": ("dense", "diagonal", "block16diagonal"),
        "dtypes": ("bfloat16", "float16"),
        "steps": (200,),
    },
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: AdamW's setting (digits experiment).
ADAMW = {"lr": 1e-2, "weight_decay": 1e-2}


@dataclass(frozen=True)
class Cell:
    """One cell of the map.

    Attributes:
        method: ``"adamw"``, ``"kfac_f32"`` or a key of :data:`SINGD_VARIANTS`.
        dtype: ``"bfloat16"`` or ``"float16"``.
        structure: ``K``/``C`` structure (Kronecker SINGD methods), else ``"-"``.
        lr_cov: ``β1`` (``nan`` for AdamW).
        damping: ``λ`` (``nan`` for AdamW).
        label: One of :data:`LABELS`.
        initial_loss: ``L0``.
        final_loss: ``L`` after the last step.
        skipped: Steps the optimizer skipped.
        steps: Steps attempted.
        accuracy: Test accuracy.
        error: An exception's message, if the optimizer raised.
    """

    method: str
    dtype: str
    structure: str
    lr_cov: float
    damping: float
    label: str
    initial_loss: float
    final_loss: float
    skipped: int
    steps: int
    accuracy: float
    error: str | None = None


def _loss_and_accuracy(model: nn.Module, data: DigitsData) -> tuple[float, float]:
    """Whole-training-set cross-entropy (float32 logits) and test accuracy."""
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(data.x_train).float(), data.y_train).item()
        accuracy = (model(data.x_test).argmax(1) == data.y_test).double().mean().item()
    return loss, accuracy


def train_cell(
    factory: Callable[[nn.Module], torch.optim.Optimizer], data: DigitsData, dtype: str, steps: int
) -> tuple[float, float, float, int, str | None, bool]:
    """Train one model; returns ``L0``, ``L``, accuracy, skipped steps, error, finite params."""
    model = make_model(_DTYPES[dtype], SEED)
    initial, _ = _loss_and_accuracy(model, data)
    generator = torch.Generator().manual_seed(SEED)
    loss_function = nn.CrossEntropyLoss()
    error = None
    skipped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            optimizer = factory(model)
            for _ in range(steps):
                batch = torch.randint(len(data.y_train), (BATCH_SIZE,), generator=generator)
                optimizer.zero_grad()
                loss_function(model(data.x_train[batch]), data.y_train[batch]).backward()
                optimizer.step()
            skipped = steps - getattr(optimizer, "steps", steps)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
    final, accuracy = _loss_and_accuracy(model, data)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return initial, final, accuracy, skipped, error, finite


def label(
    initial: float, final: float, reference: float, skipped: int, steps: int, finite: bool
) -> str:
    """The cell label of the module docstring."""
    if 2 * skipped >= steps:
        return "skipped"
    if not (finite and math.isfinite(final)) or final > initial:
        return "diverged"
    if final <= initial - 0.5 * (initial - reference):
        return "converged"
    return "stagnated"


def _factories(
    lr_cov: float, damping: float, structure: str
) -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    """The Kronecker methods of one ``(lr_cov, damping, structure)`` point."""
    common = {**KRONECKER, "lr_cov": lr_cov, "damping": damping}
    methods: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        name: (
            lambda model, extra=extra: SINGD(
                model, structures=(structure, structure), **common, **extra
            )
        )
        for name, extra in SINGD_VARIANTS.items()
    }
    if structure == "dense":
        methods["kfac_f32"] = lambda model: KFAC(model, upcast_half=True, **common)
    return methods


def reference_loss(data32: DigitsData, steps: int) -> float:
    """Final training loss of float32 AdamW after ``steps`` (the "converged" yardstick)."""
    factory = lambda model: torch.optim.AdamW(model.parameters(), **ADAMW)  # noqa: E731
    return train_cell(factory, data32, "float32", steps)[1]


def stability_map(grid: str = "default") -> dict[str, object]:
    """Every cell of ``grid``: JSON-ready (``cells``, ``reference_loss``, the grid, ``seconds``)."""
    start = time.perf_counter()
    axes = GRIDS[grid]
    (steps,) = axes["steps"]
    reference = reference_loss(load_data(torch.float32), steps)
    cells: list[Cell] = []
    for dtype in axes["dtypes"]:
        data = load_data(_DTYPES[dtype])
        adamw = lambda model: torch.optim.AdamW(model.parameters(), **ADAMW)  # noqa: E731
        l0, final, accuracy, skipped, error, finite = train_cell(adamw, data, dtype, steps)
        tag = label(l0, final, reference, skipped, steps, finite)
        cells.append(
            Cell("adamw", dtype, "-", math.nan, math.nan, tag, l0, final, 0, steps, accuracy, error)
        )
        for structure, lr_cov, damping in itertools.product(
            axes["structures"], axes["lr_cov"], axes["damping"]
        ):
            for method, factory in _factories(lr_cov, damping, structure).items():
                l0, final, accuracy, skipped, error, finite = train_cell(
                    factory, data, dtype, steps
                )
                tag = label(l0, final, reference, skipped, steps, finite)
                shown = structure if method in SINGD_VARIANTS else "-"
                cells.append(
                    Cell(
                        method,
                        dtype,
                        shown,
                        lr_cov,
                        damping,
                        tag,
                        l0,
                        final,
                        skipped,
                        steps,
                        accuracy,
                        error,
                    )
                )
    return {
        "grid": grid,
        "steps": steps,
        "reference_loss": reference,
        "axes": {key: list(value) for key, value in axes.items()},
        "singd_variants": {name: dict(extra) for name, extra in SINGD_VARIANTS.items()},
        "cells": [asdict(cell) for cell in cells],
        "counts": _counts(cells),
        "seconds": time.perf_counter() - start,
    }


def _counts(cells: Sequence[Cell]) -> dict[str, dict[str, int]]:
    """Per ``method/dtype``: how many cells carry each label."""
    counts: dict[str, dict[str, int]] = {}
    for cell in cells:
        row = counts.setdefault(f"{cell.method}/{cell.dtype}", dict.fromkeys(LABELS, 0))
        row[cell.label] += 1
    return counts


# --------------------------------------------------------------------- output
_SYMBOL = {"converged": "C", "stagnated": "S", "diverged": "D", "skipped": "K"}


def _panels(result: dict[str, object]) -> dict[str, list[dict[str, object]]]:
    """Cells grouped by ``method / dtype / structure`` (AdamW apart)."""
    panels: dict[str, list[dict[str, object]]] = {}
    for cell in result["cells"]:
        if cell["method"] != "adamw":
            key = f"{cell['method']} / {cell['dtype']} / {cell['structure']}"
            panels.setdefault(key, []).append(cell)
    return panels


def markdown(result: dict[str, object]) -> list[str]:
    """The report section: summary counts first, then one label table per panel."""
    axes = result["axes"]
    lines = [
        "## Stability map (digits MLP, bf16/fp16)",
        "",
        f"Grid `{result['grid']}`, {result['steps']} steps per cell, {len(result['cells'])} "
        f"cells, {result['seconds']:.0f} s. Labels: **C** converged (at least half of the loss "
        f"reduction of float32 AdamW, L_ref = {result['reference_loss']:.3f}), **S** stagnated "
        "(finite, not worse, less progress), **D** diverged (non-finite or final loss > "
        "initial), **K** skipped (≥ 50 % of steps skipped). Definitions and their reasons: "
        "`verification/stability.py`. Not part of the verdict.",
        "",
    ]
    rows = [
        [name, *(str(counts[key]) for key in LABELS)] for name, counts in result["counts"].items()
    ]
    lines += _table(["method / dtype", *LABELS], rows)
    lines += [""]
    if result.get("plot"):
        lines += [f"![stability map]({result['plot']})", ""]
    for name, cells in _panels(result).items():
        lookup = {(c["lr_cov"], c["damping"]): _SYMBOL[c["label"]] for c in cells}
        header = [f"{name}: lr_cov \\ damping", *(f"{d:g}" for d in axes["damping"])]
        body = [
            [f"{b:g}", *(lookup.get((b, d), "–") for d in axes["damping"])] for b in axes["lr_cov"]
        ]
        lines += [*_table(header, body), ""]
    adamw = [c for c in result["cells"] if c["method"] == "adamw"]
    lines += [
        "AdamW (no lr_cov/damping): "
        + ", ".join(
            f"{c['dtype']} {_SYMBOL[c['label']]} (loss {c['final_loss']:.3f})" for c in adamw
        ),
        "",
    ]
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_plot(result: dict[str, object], out: Path) -> str | None:
    """A PNG heatmap (one panel per method/dtype/structure) in ``out``; its name, or ``None``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        return None
    panels = _panels(result)
    axes_info = result["axes"]
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    colours = ListedColormap(["#7f7f7f", "#d62728", "#2ca02c", "#ff7f0e"])  # LABELS order
    for axis in grid.flat:
        axis.set_visible(False)
    for axis, (name, cells) in zip(grid.flat, panels.items(), strict=False):
        axis.set_visible(True)
        values = [
            [
                next(
                    (
                        LABELS.index(c["label"])
                        for c in cells
                        if (c["lr_cov"], c["damping"]) == (b, d)
                    ),
                    math.nan,
                )
                for d in axes_info["damping"]
            ]
            for b in axes_info["lr_cov"]
        ]
        axis.imshow(values, cmap=colours, vmin=-0.5, vmax=len(LABELS) - 0.5, aspect="auto")
        axis.set_xticks(range(len(axes_info["damping"])), [f"{d:g}" for d in axes_info["damping"]])
        axis.set_yticks(range(len(axes_info["lr_cov"])), [f"{b:g}" for b in axes_info["lr_cov"]])
        axis.set_xlabel("damping")
        axis.set_ylabel("lr_cov")
        axis.set_title(name, fontsize=8)
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    axis.text(j, i, _SYMBOL[LABELS[int(value)]], ha="center", va="center")
    figure.suptitle("C converged · S stagnated · D diverged · K skipped", fontsize=9)
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    name = "stability_map.png"
    figure.savefig(out / name, dpi=90)
    plt.close(figure)
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m verification.stability [--full] [--out DIR]``: print and write the map."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default")
    parser.add_argument("--full", action="store_true", help="the full grid (about an hour)")
    parser.add_argument("--out", type=Path, default=Path("stability-report"))
    args = parser.parse_args(argv)
    result = stability_map("full" if args.full else args.grid)
    result["plot"] = write_plot(result, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stability.json").write_text(json.dumps(result, indent=1) + "\n")
    text = "\n".join(markdown(result))
    (args.out / "stability.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
