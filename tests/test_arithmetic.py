"""The arithmetic model of each dtype, its probe, and that the probe refuses wrong models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from verification import arithmetic
from verification.arithmetic import (
    EPS,
    ArithmeticModel,
    failure_probability,
    gamma,
    model_for,
    precision_for,
    probabilistic_gamma,
    unit_roundoff,
)
from verification.probe import PRECISION_BITS, calibrate, calibrated_model, run_probe

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_model_survives_its_probe(dtype: torch.dtype) -> None:
    """The CPU model of every dtype holds on every probe (error/bound <= 1), and is not vacuous.

    Not vacuous: the long product of positive operands uses at least 0.1 % of
    its bound, where ``γ_n`` is a worst case that sequential summation of
    ``n = 1024`` terms can approach and a blocked kernel stays below by its
    block count (measured 5.7e-3 in float32 with MKL on an AMD EPYC; the
    Gaussian product's 7.6e-4 there depends on the kernel, 1e-3 on a Xeon).
    """
    model, results = calibrated_model(dtype)
    assert model == model_for(dtype)
    assert all(result.passed for result in results)
    positive = [result for result in results if result.name.startswith("matmul positive")]
    assert positive and positive[0].ratio >= 1e-3


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_half_precision_accumulates_in_float32_on_cpu(dtype: torch.dtype) -> None:
    """A sum of 4·2^p ones is exact: a storage-dtype accumulator would stall at 2^p."""
    results = {result.name: result for result in run_probe(model_for(dtype))}
    ones = [result for name, result in results.items() if "ones" in name]
    assert len(ones) == 2 and all(result.error == 0 for result in ones)


def _narrow_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with every partial sum rounded to ``a``'s dtype (a narrow accumulator)."""
    total = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
    for k in range(a.shape[1]):
        total = total + a[:, k : k + 1] * b[k : k + 1, :]
    return total


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_probe_refuses_float32_model_for_a_narrow_accumulator(dtype: torch.dtype) -> None:
    """A device that keeps partial sums in bf16/fp16 contradicts the float32-accumulation model.

    The ones probe (``n = 4·2^p``) misses by ``3·2^p`` where the model allows
    ``(u + γ_n(u₃₂))·n``: error/bound = ``3 / (4 (u + γ_n(u₃₂)))`` (192 in bf16,
    768 in fp16); asserted at half of that, far above 1.
    """
    results = run_probe(model_for(dtype), matmul=_narrow_matmul)
    ones = next(result for result in results if result.name.startswith("matmul ones"))
    n = 4 * 2 ** PRECISION_BITS[dtype]
    expected = 3 / (4 * (unit_roundoff(dtype) + gamma(n, unit_roundoff(torch.float32))))
    assert ones.ratio >= expected / 2


def test_probe_refuses_a_model_claiming_float64_accumulation_for_float32() -> None:
    """float32 products accumulate in float32: a float64-accumulation model is contradicted
    by the positive operands' product (probe docstring; 5.6× that model's bound measured)."""
    too_tight = ArithmeticModel("cpu", torch.float32, torch.float64, torch.float32)
    failed = [result for result in run_probe(too_tight) if not result.passed]
    assert any(result.name.startswith("matmul positive") for result in failed)


@dataclass(frozen=True)
class _UnroundedModel(ArithmeticModel):
    """A wrong model: bfloat16 storage whose results would be rounded only to float32."""

    @property
    def unit(self) -> float:
        return unit_roundoff(torch.float32)


def test_probe_refuses_a_model_without_the_final_rounding() -> None:
    """bf16 results are rounded to bf16: a model rounding to float32 precision is contradicted."""
    wrong = _UnroundedModel("cpu", torch.bfloat16, torch.float32, torch.float32)
    failed = {result.name for result in run_probe(wrong) if not result.passed}
    assert any(name.startswith("matmul random") for name in failed)
    assert "add_(b, alpha) near ties" in failed


def test_calibrate_reports_every_dtype() -> None:
    """``calibrate`` covers the four dtypes, each passing, with its model's label."""
    calibrations = calibrate()
    assert [c.model.storage for c in calibrations] == list(DTYPES)
    assert all(c.passed and 0 < c.worst_ratio <= 1 for c in calibrations)
    assert "accumulate in float32" in calibrations[2].model.label


def test_model_rules() -> None:
    """γ_n, the product and reduction rules, and the probabilistic bound's label and size."""
    u32 = unit_roundoff(torch.float32)
    assert gamma(10, u32) == 10 * u32 / (1 - 10 * u32)  # the same float64 expression: exact
    assert gamma(2**25, u32) == math.inf
    bf16 = model_for(torch.bfloat16)
    # one product: accumulation in float32 plus one rounding to bf16 (half an ulp)
    # no operand rounding (0.0) + the same two float64 terms in the same order: exact
    assert bf16.product(256) == gamma(256, u32) + EPS[torch.bfloat16] / 2
    assert model_for(torch.float32).product(256) == gamma(256, u32)  # no extra rounding
    assert bf16.reduction(1) == 0.0
    lam = 7.0
    probabilistic = model_for(torch.float32).probabilistic(lam)
    assert "PROBABILISTIC" in probabilistic.label
    assert probabilistic.product(10_000) < model_for(torch.float32).product(10_000) / 10
    # expm1(x + n·u²/(1−u)) = x·(1 + x/2 + O(x²)) + O(n·u²) with x = λ√n·u = 4.2e-5: the
    # linearisation is off by x/2 + n·u²/x ≈ 2.1e-5 relative, within rel = x
    x = lam * 100 * u32
    assert probabilistic_gamma(10_000, u32, lam) == pytest.approx(x, rel=x)
    assert failure_probability(1000, u32, lam) < 1e-7


def test_precision_of_mixed_runs() -> None:
    """float32 model + bf16 factors: factors rounded in bf16, a cast of ∇W~ costs u_bf16."""
    mixed = precision_for(torch.float32, torch.bfloat16)
    assert mixed.factors.storage == torch.bfloat16 and mixed.params.storage == torch.float32
    assert mixed.cast == EPS[torch.bfloat16] / 2
    assert precision_for(torch.bfloat16).cast == 0.0
    assert precision_for(mixed) is mixed


def test_cuda_switches_change_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reduced-precision reductions and TF32 are modelled from torch's switches (no GPU needed)."""
    flags = {"allow_tf32": True, "allow_bf16_reduced_precision_reduction": True}
    monkeypatch.setattr(arithmetic, "cuda_matmul_flags", lambda: flags)
    assert model_for(torch.bfloat16, "cuda").accumulation == torch.bfloat16
    assert model_for(torch.float16, "cuda").accumulation == torch.float32
    assert model_for(torch.float32, "cuda").input_rounding == 2.0**-11
    assert model_for(torch.bfloat16, "cpu").accumulation == torch.float32
    flags.clear()
    assert model_for(torch.bfloat16, "cuda").accumulation == torch.float32
    assert model_for(torch.float32, "cuda").input_rounding == 0.0
