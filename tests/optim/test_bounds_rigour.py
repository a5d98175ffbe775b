"""The per-operation rules of :mod:`verification.bounds` against torch's real kernels.

Each case is a rounding the implementation makes that the bounds once did not
charge (review of the bf16/fp16 bounds); every ratio ``|torch − exact| / bound``
must be at most 1.  Before the fix the ratios were: float16 underflow 72,
float32 scalar conversion 1.7, the statistics' ``/ sqrt(n)`` 1.3, a bfloat16
hierarchical trace 1.5, the bfloat16 diagonal ``Π̂(YYᵀ)`` of rounded squares 1.07.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference.structures import get_structure as reference_structure
from singd.structures import get_structure
from verification.arithmetic import model_for
from verification.bounds import Arithmetic, _statistic, _summed_h, exact, trace_terms


def _ratio(computed: torch.Tensor, bounded) -> float:
    difference = np.abs(computed.double().numpy() - bounded.value)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.where(difference == 0, 0.0, difference / bounded.error).max())


def test_float16_underflow_is_charged() -> None:
    """A float16 product below 2⁻¹⁴ is subnormal: an absolute error up to 2⁻²⁵."""
    arith = Arithmetic(model_for(torch.float16))
    generator = torch.Generator().manual_seed(0)
    k = (1e-3 * torch.randn(7, generator=generator)).to(torch.float16)
    x = (1e-3 * torch.randn(7, 4, generator=generator)).to(torch.float16)
    factor = get_structure("diagonal").from_dense(torch.diag(k))
    bounded = arith.product(exact(np.diag(k.double().numpy())), exact(x.double().numpy()))
    assert _ratio(factor.matmul(x), bounded) <= 1.0


@pytest.mark.parametrize("scalar", [1 / 6, 1 / 14, 0.02, 0.05])
def test_float32_scalar_conversion_is_charged(scalar: float) -> None:
    """``mul_(s)`` / ``add_(y, alpha=s)`` convert the Python float ``s`` to float32 first."""
    arith = Arithmetic(model_for(torch.float32))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=generator)
    y = torch.randn(20000, generator=generator)
    scaled = arith.scale(exact(x.double().numpy()), exact(scalar))
    assert _ratio(x.clone().mul_(scalar), scaled) <= 1.0
    added = arith.add(exact(x.double().numpy()), exact(y.double().numpy()), scalar)
    assert _ratio(x.clone().add_(y, alpha=scalar), added) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistic_scaling_by_python_sqrt(dtype: torch.dtype) -> None:
    """``rows / math.sqrt(n)`` (singd.optim.statistics.input_matrix) with ``n = 3``."""
    arith = Arithmetic(model_for(dtype))
    rows = torch.randn(3, 20000, generator=torch.Generator().manual_seed(2)).to(dtype)
    value = rows.double().numpy() / math.sqrt(3)
    bounded = _statistic(arith, value, np.abs(value), 0.0, 1)
    assert _ratio(rows / math.sqrt(3), bounded) <= 1.0


@pytest.mark.parametrize(
    "name", ["block2diagonal", "hierarchical2_3", "hierarchical1_1", "trilbottomrightdiagonal"]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_traces_of_summed_kernels(name: str, dtype: torch.dtype) -> None:
    """Block, hierarchical and recursive traces round their partial sums, then add them."""
    arith = Arithmetic(model_for(dtype))
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(40):
        dense = torch.randn(7, 7, generator=generator, dtype=torch.float64).abs().to(dtype)
        member = get_structure(name).from_dense(dense)
        bounded = arith.trace(exact(member.to_dense().double().numpy()), trace_terms(name))
        worst = max(worst, _ratio(member.trace(), bounded))
    assert worst <= 1.0


def test_diagonal_statistics_round_their_squares() -> None:
    """``Diagonal.project_gram`` is ``(y * y).sum(1)``: each bf16 square is rounded first."""
    arith = Arithmetic(model_for(torch.bfloat16))
    # y = fl(k·a) and fl(y²) both round up by almost u: (k·a)² errs by 1 % (2.6 u)
    k, a = 1.2578125, 1.7578125
    rows = torch.full((5, 3), a, dtype=torch.bfloat16)
    factor = get_structure("diagonal").from_dense(k * torch.eye(3, dtype=torch.bfloat16))
    computed = factor.project_inner(rows.T).to_dense()
    bounded = _summed_h(
        arith,
        reference_structure("diagonal"),
        "diagonal",
        exact(k * np.eye(3)),
        [exact(rows.double().numpy())],
    )
    assert _ratio(computed, bounded) <= 1.0


def test_power_of_two_scaling_charges_float16_underflow() -> None:
    """``mul_(2⁻⁶)`` of float16 entries near 2⁻¹⁴ is exact except where it goes subnormal.

    The scaled self-inner (``singd_self_inners``) scales ``K`` by a power of two
    first; below 2⁻¹⁴ the result is rounded to the subnormal grid (spacing 2⁻²⁴).
    The bound without the underflow term (exact scaling) must fail here, so the
    case really exercises the term the rule charges.
    """
    arith = Arithmetic(model_for(torch.float16))
    generator = torch.Generator().manual_seed(3)
    x = (2.0**-9 * torch.randn(2000, generator=generator)).to(torch.float16)
    power = 2.0**-6
    scaled = arith.scale_by_power_of_two(exact(x.double().numpy()), power)
    computed = x.clone().mul_(power)
    assert _ratio(computed, scaled) <= 1.0
    without_underflow = type(scaled)(scaled.value, np.zeros_like(scaled.error))
    assert _ratio(computed, without_underflow) > 1.0
