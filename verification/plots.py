"""PNG figures of the comparison grid (needs matplotlib; the report notes its absence).

* ``ratio_by_precision.png``: every case's worst error/bound (left) and its
  largest error in eps·max|entry| (right), per precision, coloured by layer;
  filled dots: trajectory, open circles: one-step check;
* ``ratio_heatmap.png``: worst error/bound per layer/mode × structure pair,
  one panel per precision that ran the full set of layer/mode rows;
* ``growth.png``: error and bound of ``K`` and ``W~`` over the steps of one
  case per precision (the first layer): propagated bound and one-step bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from verification.grid import CaseResult, error_in_eps
from verification.report import by_precision
from verification.tolerances import EPS

#: The case whose per-step history ``growth.png`` shows, per precision.
GROWTH_CASE = ("mlp", "singd", ("dense", "dense"))


def matplotlib_missing() -> str:
    """Empty when matplotlib imports, else the reason to put in the report."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (`pip install singd-verified[report]`)"
    return ""


def write_plots(results: list[CaseResult], out: Path) -> tuple[str, ...]:
    """Write the PNGs into ``out``; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_precision(results)
    written = []
    for name, draw in (
        ("ratio_by_precision.png", _ratio_strips),
        ("ratio_heatmap.png", _heatmaps),
        ("growth.png", _growth),
    ):
        figure = draw(plt, groups)
        if figure is not None:
            figure.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(figure)
            written.append(name)
    return tuple(written)


def scenario_colours(scenarios: list[str], palette: Sequence[object]) -> dict[str, object]:
    """A colour per scenario, the palette repeated when there are more scenarios than colours."""
    return {scenario: palette[i % len(palette)] for i, scenario in enumerate(scenarios)}


def _ratio_strips(plt, groups: dict[str, list[CaseResult]]):
    """Strip plots of the worst error/bound and error in eps per case, per precision."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    scenarios = list(dict.fromkeys(r.case.scenario for rs in groups.values() for r in rs))
    colours = scenario_colours(scenarios, plt.get_cmap("tab20").colors)
    rng = np.random.default_rng(0)
    for position, results in enumerate(groups.values()):
        for scenario in scenarios:
            chosen = [r for r in results if r.case.scenario == scenario]
            if not chosen:
                continue
            x = position + rng.uniform(-0.3, 0.3, len(chosen))
            label = scenario if position == 0 else None
            ratios = [max(r.worst_ratio, 1e-6) for r in chosen]
            errors = [max(r.worst_error_eps, 1e-3) for r in chosen]
            left.scatter(x, ratios, s=9, color=colours[scenario], alpha=0.7, label=label)
            right.scatter(x, errors, s=9, color=colours[scenario], alpha=0.7)
            local_ratios = [max(r.local_worst_ratio, 1e-6) for r in chosen]
            local_errors = [max(r.local_worst_error_eps, 1e-3) for r in chosen]
            for axis, values in ((left, local_ratios), (right, local_errors)):
                axis.scatter(x, values, s=12, facecolors="none", edgecolors=colours[scenario])
    left.axhline(1.0, color="red", linewidth=1.2, linestyle="--", label="bound (ratio 1)")
    for axis, title, ylabel in (
        (left, "worst error / propagated bound per case (≤ 1 passes)", "error / bound"),
        (right, "largest error per case in units of eps·max|entry|", "error [eps·max|entry|]"),
    ):
        axis.set_yscale("log")
        axis.set_xticks(range(len(groups)), [_wrap(label) for label in groups])
        axis.set_title(title, fontsize=10)
        axis.set_ylabel(ylabel)
        axis.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8, loc="lower left")
    figure.suptitle(
        "SINGD (torch) vs float64 oracle: one dot per case, coloured by layer "
        "(filled: trajectory, open: one-step)"
    )
    return figure


def _heatmaps(plt, groups: dict[str, list[CaseResult]]):
    """Worst error/bound per layer/mode × structure pair, one panel per precision."""

    def row_names(results: list[CaseResult]) -> list[str]:
        return list(dict.fromkeys(f"{r.case.scenario}/{r.case.variant}" for r in results))

    largest = max(groups.values(), key=len)
    rows, columns = row_names(largest), list(dict.fromkeys(r.case.structures for r in largest))
    # Only precisions that ran the same layer/mode rows share the panel layout.
    panels = {label: results for label, results in groups.items() if row_names(results) == rows}
    if len(largest) < 2:
        return None
    figure, axes = plt.subplots(
        1, len(panels), figsize=(3.4 * len(panels) + 2, 6), squeeze=False, sharey=True
    )
    image = None
    for axis, (label, results) in zip(axes[0], panels.items(), strict=True):
        values = np.full((len(rows), len(columns)), np.nan)
        for r in results:
            if r.case.structures in columns:
                row = rows.index(f"{r.case.scenario}/{r.case.variant}")
                values[row, columns.index(r.case.structures)] = r.worst_ratio
        image = axis.imshow(
            np.log10(np.maximum(values, 1e-4)), cmap="viridis", vmin=-4, vmax=0.5, aspect="auto"
        )
        for (i, j), value in np.ndenumerate(values):
            if not np.isnan(value):
                colour = "red" if value > 1 else "white"
                axis.text(j, i, f"{value:.1g}", ha="center", va="center", fontsize=6, color=colour)
        # anchored at the tick's right end, so a rotated label ends under its column
        axis.set_xticks(
            range(len(columns)),
            ["/".join(c) for c in columns],
            rotation=70,
            ha="right",
            rotation_mode="anchor",
            fontsize=7,
        )
        axis.set_title(label, fontsize=10)
    axes[0][0].set_yticks(range(len(rows)), rows, fontsize=7)
    bar = figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    bar.set_label("log10(worst error / bound)   (0 = at the bound)")
    figure.suptitle("Worst error/bound per layer/mode (rows) × structures K/C (columns)")
    return figure


def _growth(plt, groups: dict[str, list[CaseResult]]):
    """Error and bound of ``K`` and ``W~`` (first layer) over the steps, per precision."""
    shown = {}
    for label, results in groups.items():
        for r in results:
            if (r.case.scenario, r.case.variant, r.case.structures) == GROWTH_CASE:
                shown[label] = r
    if not shown:
        return None
    figure, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.8), squeeze=False)
    for axis, (label, result) in zip(axes[0], shown.items(), strict=True):
        eps = EPS[result.case.bound_dtype]
        layer = result.history[0].layer
        for key, colour in (("K", "tab:blue"), ("W", "tab:orange")):
            points = [d for d in result.history if d.layer == layer and d.key == key]
            steps = [d.step + 1 for d in points]
            errors = [max(error_in_eps(d, eps), 1e-3) for d in points]
            bounds = [d.bound / (eps * d.magnitude) for d in points]
            axis.plot(steps, errors, color=colour, marker="o", markersize=3, label=f"{key} error")
            axis.plot(steps, bounds, color=colour, linestyle="--", label=f"{key} bound")
            local = [d for d in result.local_history if d.layer == layer and d.key == key]
            axis.plot(
                [d.step + 1 for d in local],
                [d.bound / (eps * d.magnitude) for d in local],
                color=colour,
                linestyle=":",
                label=f"{key} one-step bound",
            )
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_title(_wrap(label), fontsize=10)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("eps·max|entry|")
    axes[0][0].legend(fontsize=7)
    name = f"{GROWTH_CASE[0]}/{GROWTH_CASE[1]}/{'-'.join(GROWTH_CASE[2])}"
    figure.suptitle(f"Error and propagated bound over the steps ({name}, first layer)")
    return figure


def _wrap(label: str) -> str:
    """Break a mixed-precision label onto two lines."""
    return label.replace("+", "\n+")
