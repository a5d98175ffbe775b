"""Long half-precision runs: the IKFAC fixed point, structure and nonsingularity, long horizons.

Default tier: short runs (``d = 8``, a few hundred IKFAC steps; 40-step
long-horizon cases; a three-step stability cell).  Slow tier
(``pytest -m oracle``): the issue's ``d = 32``, 1000-step fixed point and the
full long-horizon product (every structure × precision × cond × mode, 1000
steps each; parametrised so it can be sharded with ``-k``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reference.structures import STRUCTURE_NAMES
from verification import longhorizon, stability
from verification.fixed_point import (
    ikfac_hyper,
    measure,
    residual,
    residual_bound,
    run_torch,
    spectrum,
    stationary_stream,
    structure_mask,
    target,
)

#: β1 of the fixed-point runs: the contraction per step is ``1 − β1`` (fixed_point docstring).
LR_COV = 0.1
#: Steps: ``log(k*)/log(1 + β1/2)`` ≤ 71 to grow ``K`` to ``k* ≤ √(1/λ) ≈ 32`` (λ = 1e-3),
#: then ``(1 − β1)^{179} < 1e-8``, below every dtype's floor.
STEPS = 250


@settings(max_examples=2)
@given(
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    cond=st.sampled_from([1.0, 1e2, 1e4]),
    seed=st.integers(0, 3),
)
@example(dtype="bfloat16", cond=1e4, seed=0)
@example(dtype="float16", cond=1e4, seed=1)
def test_ikfac_fixed_point_within_derived_bound(dtype: str, cond: float, seed: int) -> None:
    """Torch IKFAC on stationary statistics reaches ``KKᵀ = (U_r + λI)⁻¹`` within the bound.

    The bound is ``fixed_point.residual_bound``: ``3√3`` times the derived
    stationary level ``2u + noise + drift`` (``fixed_point.floor_terms``).
    """
    damping = 1e-3
    stream = stationary_stream(8, cond, seed)
    run = run_torch(stream, ikfac_hyper(LR_COV, damping), STEPS, dtype)
    measured = residual(run.factors[-1], target(stream, dtype, damping))
    assert run.skipped == 0
    assert measured <= residual_bound(dtype, spectrum(stream, damping), LR_COV)


@settings(max_examples=2)
@given(
    structure=st.sampled_from(STRUCTURE_NAMES),
    dtype=st.sampled_from(["bfloat16", "float16"]),
    seed=st.integers(0, 3),
)
@example(structure="triltoeplitz", dtype="bfloat16", seed=0)
@example(structure="hierarchical2_3", dtype="float16", seed=0)
def test_structure_zeros_stay_zero_and_k_nonsingular(structure: str, dtype: str, seed: int) -> None:
    """A long half-precision run keeps K zero outside its structure, and invertible.

    Nonsingular: ``σ_min(K) ≥ ½ min(1, μ_max^{-1/2})``.  From ``K_0 = I`` the
    singular values move monotonically towards ``μ^{-1/2} ≥ μ_max^{-1/2}`` (fixed_point
    docstring), and one rounding of ``K`` moves ``σ_min`` by at most
    ``u‖|K|‖₂ ≤ u√d‖K‖₂ = u√d·cond(K)·σ_min ≈ 0.33 σ_min`` here (bf16, ``d = 8``,
    ``cond(K) = √cond(M) ≤ 30``), so half of the smallest admissible value is a
    margin no rounding can cross but a collapsing factor does.
    """
    stream = stationary_stream(8, 1e4, seed)
    checkpoints = tuple(range(20, 201, 20))
    run = run_torch(stream, ikfac_hyper(LR_COV, 1e-3, structure), 200, dtype, None, checkpoints)
    outside = ~structure_mask(structure, stream.dim)
    smallest = 0.5 * min(1.0, float(spectrum(stream, 1e-3)[-1]) ** -0.5)
    for k in run.factors:
        assert np.all(k[outside] == 0.0)
        assert np.linalg.svd(k, compute_uv=False)[-1] >= smallest


def test_long_horizon_short_cases_agree_with_the_model() -> None:
    """Two 40-step cases: teacher-forced blocks within the bound, finite drifts, nothing skipped."""
    cases = (
        longhorizon.Case(("dense", "dense"), "bfloat16", 1e8, "ikfac", 40),
        longhorizon.Case(("tril", "diagonal"), "float32+bfloat16 factors", 1e4, "singd", 40),
    )
    results = longhorizon.run_cases(cases)
    for result in results:
        assert result.passed, longhorizon.format_row(result)
        assert result.skipped == 0 and math.isfinite(result.drift_torch)
        if result.drift_emulated is not None:
            assert math.isfinite(result.drift_emulated)
    text = "\n".join(longhorizon.markdown(longhorizon.summary(results, "tiny", 1.0)))
    assert "2/2 cases within" in text and "| dense/dense | bfloat16 | 1e+08 | ikfac | 40 |" in text


def test_long_horizon_grids() -> None:
    """default 8 × 100 steps; medium 5 structures and full all 14, × 4 precisions × 3 conds × 2."""
    assert [len(longhorizon.grid_cases(g)) for g in ("default", "medium", "full")] == [8, 120, 336]
    assert {c.steps for c in longhorizon.grid_cases("medium")} == {1000}
    with pytest.raises(ValueError, match="long-horizon grid must be"):
        longhorizon.grid_cases("huge")


def test_stability_labels_follow_their_definitions() -> None:
    """Precedence skipped > diverged > converged > stagnated, at the stated thresholds."""
    initial, reference = 2.3, 0.3  # halfway: 1.3
    assert stability.label(initial, 0.1, reference, 10, 20, True) == "skipped"
    assert stability.label(initial, math.nan, reference, 0, 20, True) == "diverged"
    assert stability.label(initial, 2.4, reference, 0, 20, True) == "diverged"
    assert stability.label(initial, 1.0, reference, 0, 20, False) == "diverged"
    assert stability.label(initial, 1.25, reference, 9, 20, True) == "converged"
    assert stability.label(initial, 1.31, reference, 0, 20, True) == "stagnated"


def test_stability_map_tiny_grid(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A one-point grid of three steps: every method has a cell, Markdown and PNG are written."""
    tiny = {
        "lr_cov": (0.05,),
        "damping": (0.1,),
        "structures": ("dense",),
        "dtypes": ("bfloat16",),
        "steps": (3,),
    }
    monkeypatch.setitem(stability.GRIDS, "tiny", tiny)
    result = stability.stability_map("tiny")
    methods = {cell["method"] for cell in result["cells"]}
    assert methods == {*stability.SINGD_VARIANTS, "kfac_f32", "adamw"}
    assert all(cell["label"] in stability.LABELS for cell in result["cells"])
    result["plot"] = stability.write_plot(result, tmp_path)
    text = "\n".join(stability.markdown(result))
    assert "Stability map" in text and "singd / bfloat16 / dense" in text
    if result["plot"] is not None:
        assert (tmp_path / result["plot"]).stat().st_size > 0


# ------------------------------------------------------------------ slow tier
@pytest.mark.oracle
@pytest.mark.parametrize(
    ("cond", "damping", "dtype"),
    [(1e4, 1e-3, "bfloat16"), (1e8, 1e-6, "bfloat16"), (1e4, 1e-3, "float16")],
)
def test_issue_fixed_point_cells_within_derived_bound(
    cond: float, damping: float, dtype: str
) -> None:
    """The issue's d = 32, 1000-step cells: torch and the emulated oracle both within the bound."""
    for cell in measure(cond, damping, dtype, systems=("torch", "emulated"), steps=1000):
        assert cell.skipped == 0
        assert cell.residual <= 3 * math.sqrt(3) * cell.floor, cell


@pytest.mark.oracle
@pytest.mark.parametrize("case", longhorizon.full_cases(1000), ids=str)
def test_long_horizon_full_product(case: longhorizon.Case) -> None:
    """Every structure × precision × cond × mode for 1000 steps: blocks within the bound."""
    result = longhorizon.run_case(case)
    assert result.passed, longhorizon.format_row(result)
