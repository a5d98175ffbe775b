"""The range-safe ``λ Π̂(KᵀK)`` of float16 factors (stability issue, case 3).

IKFAC on stationary statistics with ``μ_min(U + λI) ≈ λ = 1e-6``: at the fixed
point ``Π̂(KᵀK) ≈ (U + λI)⁻¹`` has entries near ``1/μ_min ≈ 1e6``, beyond
float16's 65504.  Formed as ``(λ/p²)·Π̂((pK)ᵀ(pK))`` (``updates.self_inner_scale``)
every step is finite and the run reaches the fixed point within the derived
bound; the paper's order (``p = 1``) overflows, skips the steps and freezes ``K``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from singd.optim import updates
from verification import longhorizon
from verification.arithmetic import precision_for
from verification.comparison import compare_singd_blocks
from verification.fixed_point import (
    FLOAT16_MAX,
    ikfac_hyper,
    paper_order,
    residual,
    residual_bound,
    run_torch,
    spectrum,
    stationary_stream,
    target,
)
from verification.recording import record_run
from verification.scenarios import FACTOR_GUARD, make_singd

#: β1: contraction ``1 − β1`` per step (fixed_point docstring).
LR_COV = 0.1
#: λ and cond(U) of the issue's failing cell.
DAMPING, COND = 1e-6, 1e8
#: Growth to ``k* = μ_min^{-1/2} ≤ 1e3`` takes ``log(k*)/log(1 + β1/2) ≤ 142`` steps, then
#: ``(1 − β1)^{258} < 1e-11``: far below float16's floor.
STEPS = 400


def _run() -> tuple[float, int]:
    stream = stationary_stream(8, COND, seed=0)
    assert np.abs(target(stream, "float64", DAMPING)).max() > FLOAT16_MAX  # the case overflows
    run = run_torch(stream, ikfac_hyper(LR_COV, DAMPING), STEPS, "float16")
    measured = residual(run.factors[-1], target(stream, "float16", DAMPING))
    return measured / residual_bound("float16", spectrum(stream, DAMPING), LR_COV), run.skipped


def test_scale_is_a_power_of_two_with_headroom() -> None:
    """``p² ∈ (2^10 λ, 2^12 λ]`` for ``λ < 2^-12``; ``p = 1`` from there on and for ``λ = 0``."""
    for damping in (1e-8, 1e-6, 1e-5, 2.0**-13):
        p = updates.self_inner_scale(damping)
        assert np.log2(p) == np.round(np.log2(p))
        assert 2.0**10 * damping < p * p <= 2.0**12 * damping
    assert updates.self_inner_scale(2.0**-12) == 1.0
    assert updates.self_inner_scale(1e-3) == 1.0
    assert updates.self_inner_scale(0.0) == 1.0


def test_float16_fixed_point_beyond_the_range_of_the_inverse() -> None:
    """No step skipped; residual within ``fixed_point.residual_bound`` (3√3 × derived level)."""
    ratio, skipped = _run()
    assert skipped == 0
    assert ratio <= 1.0


def test_the_papers_order_overflows_there() -> None:
    """With ``p = 1`` (``λ·fl(Π̂(KᵀK))``) the same run skips steps and misses the bound."""
    with paper_order():
        ratio, skipped = _run()
    assert skipped > 0
    assert ratio > 1.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("structure", ["dense", "tril", "triltoeplitz"])
def test_both_orders_are_bitwise_equal_within_range(dtype: str, structure: str) -> None:
    """Where nothing overflows or goes subnormal, scaling by ``p`` is exact: same bits.

    Float32 and bfloat16 hold ``p²KᵀK`` (``p² ≥ 2^-10 λ``) without underflow, so the
    range-safe order changes no bit there (exact equality: no rounding rule applies).
    """
    stream = stationary_stream(8, COND, seed=1)
    hyper = ikfac_hyper(LR_COV, DAMPING, structure)
    checkpoints = (10, 20, 30)
    new = run_torch(stream, hyper, 40, dtype, checkpoints=checkpoints)
    with paper_order():
        old = run_torch(stream, hyper, 40, dtype, checkpoints=checkpoints)
    for k_new, k_old in zip(new.factors, old.factors, strict=True):
        np.testing.assert_array_equal(k_new, k_old)


def test_bounds_mirror_holds_with_the_scaled_inner() -> None:
    """Teacher-forced blocks of the long-horizon stream, fp16 IKFAC, λ = 1e-6: error/bound ≤ 1.

    ``p = 2^-4`` here, so the mirror scales ``K`` before ``Π̂((pK)ᵀ(pK))`` and charges
    its subnormal rounding (``Arithmetic.scale_by_power_of_two``); the bound is the
    verifier's (rule: error/bound ≤ 1, as in ``singd-verify``).
    """
    case = longhorizon.Case(("dense", "dense"), "float16", 1e8, "ikfac", 60)
    assert updates.self_inner_scale(DAMPING) == 2.0**-4
    hyper = dataclasses.replace(longhorizon.hyper_of(case), damping=DAMPING)
    torch.manual_seed(0)
    model = longhorizon._SCENARIO.make_model().to(torch.float16)
    optimizer = make_singd(model, longhorizon._SCENARIO, hyper, None)
    run = record_run(model, optimizer, longhorizon._loss_function(case.cond, torch.float16), 60)
    assert optimizer.steps == 60
    precision = precision_for(torch.float16, None, factor_guard=FACTOR_GUARD)
    blocks = compare_singd_blocks(run, hyper, precision, "expand", None, block=longhorizon.BLOCK)
    worst = max(0.0 if d.error == 0 else d.error / d.bound for d in blocks)
    assert worst <= 1.0
