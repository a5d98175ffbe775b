"""Calibrate an arithmetic model: measure torch's real rounding errors against the model's bounds.

Each probe computes one kind of operation the optimizer uses — matmul in
every transposition (different kernels), a long sum and a mean, a fused
``add_(·, alpha=·)``, and the Toeplitz FFT product — on inputs chosen to
expose the model's assumptions, and compares with the exact float64 result
of the *same* rounded inputs:

* ``ones``: a sum of ``4·2^p`` ones (``p`` = mantissa bits): a sum kept in
  the storage dtype stalls at ``2^p`` (``2^p + 1`` rounds back to ``2^p``),
  so a narrow accumulator misses by ``3·2^p`` where the float32 model allows
  half an ulp;
* ``random``: Gaussian operands, reduction length 1024;
* ``cancellation``: rows ``[x, −x]`` with a tiny residual, where ``|A||B|``
  is ``10⁴`` times ``|AB|``: only a bound relative to ``|A||B|`` holds, and
  an accumulation in a wider dtype than claimed shows here in float32;
* ``near-tie``: ``a + α·b`` with ``α·b`` just above half an ulp of ``a``.
* ``positive``: uniform ``[0, 1)`` operands, reduction length 1024: no
  cancellation, so every rounding of a partial sum is a fraction of ``u``
  of a partial that is itself a fair share of ``Σ|a_k b_k|``; a float32
  accumulator then errs by several ``u·Σ|a_k b_k|`` (5.6 measured with
  MKL on an AMD EPYC, torch 2.13), which a model claiming a wider
  accumulator (at most ``u`` of that) cannot allow.  Gaussian operands
  show it on some kernels only (0.78 of such a bound on that machine).

A probe passes iff ``max |computed − exact| / bound ≤ 1`` entrywise;
:func:`calibrated_model` refuses (``ValueError``) a model any probe
contradicts.  The measured ratios say how tight the model is on that device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from verification.arithmetic import EPS, ArithmeticModel, model_for

#: Stored mantissa bits + 1 (the precision ``p``): a storage-dtype sum of ones stalls at 2^p.
PRECISION_BITS = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}

#: Reduction length of the random and cancellation probes (>= 256, the issue's long reductions).
REDUCTION = 1024

#: Toeplitz size of the FFT probe (>= the FFT path's threshold of 48).
FFT_DIM = 96


@dataclass(frozen=True)
class ProbeResult:
    """One probe's measurement.

    Attributes:
        name: What was computed.
        error: ``max |computed − exact|`` (entrywise, after dividing by the bound's scale).
        ratio: ``max |computed − exact| / bound`` (passes iff ``<= 1``).
    """

    name: str
    error: float
    ratio: float

    @property
    def passed(self) -> bool:
        """Whether the model's bound holds."""
        return self.ratio <= 1.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return {"name": self.name, "error": self.error, "ratio": self.ratio, "passed": self.passed}


def _exact(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()


def _ratio(computed: torch.Tensor, exact: np.ndarray, bound: np.ndarray) -> tuple[float, float]:
    error = np.abs(_exact(computed) - exact)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0, 0.0, error / bound)
    return float(error.max()), float(ratio.max())


#: A matrix product ``(A, B) ↦ A @ B`` (the probe's subject; torch's by default).
Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _matmul_probe(
    name: str, model: ArithmeticModel, a: torch.Tensor, b: torch.Tensor, matmul: Matmul
) -> ProbeResult:
    """``a @ b`` against ``model.product(n)·|a||b|`` (``n`` the inner dimension)."""
    exact_a, exact_b = _exact(a), _exact(b)
    bound = model.product(a.shape[-1]) * (np.abs(exact_a) @ np.abs(exact_b))
    return ProbeResult(name, *_ratio(matmul(a, b), exact_a @ exact_b, bound))


def _matmul_probes(
    model: ArithmeticModel, device: str, generator: torch.Generator, matmul: Matmul
) -> list[ProbeResult]:
    dtype, n = model.storage, REDUCTION
    stall = 2 ** PRECISION_BITS[dtype]
    results = []
    if stall * 4 <= 2**20:
        ones = torch.ones(1, 4 * stall, dtype=dtype, device=device)
        results.append(_matmul_probe(f"matmul ones n={4 * stall}", model, ones, ones.T, matmul))
    a = torch.randn(48, n, generator=generator).to(dtype=dtype, device=device)
    b = torch.randn(n, 40, generator=generator).to(dtype=dtype, device=device)
    results.append(_matmul_probe(f"matmul random n={n}", model, a, b, matmul))
    results.append(_matmul_probe(f"matmul Aᵀ·B random n={n}", model, a.T.contiguous().T, b, matmul))
    results.append(_matmul_probe(f"matmul A·Bᵀ random n={n}", model, a, b.T.contiguous().T, matmul))
    results.append(_matmul_probe(f"matvec random n={n}", model, a, b[:, :1], matmul))
    positive_a = torch.rand(48, n, generator=generator).to(dtype=dtype, device=device)
    positive_b = torch.rand(n, 40, generator=generator).to(dtype=dtype, device=device)
    results.append(_matmul_probe(f"matmul positive n={n}", model, positive_a, positive_b, matmul))
    # cancellation: [x, −x + r] so that |A||B| ≫ |AB|
    half = torch.randn(48, n // 2, generator=generator)
    residual = 1e-4 * torch.randn(48, n // 2, generator=generator)
    left = torch.cat([half, -half + residual], dim=1).to(dtype=dtype, device=device)
    right = torch.ones(n, 8, dtype=dtype, device=device)
    results.append(_matmul_probe(f"matmul cancellation n={n}", model, left, right, matmul))
    return results


def _reduction_probes(
    model: ArithmeticModel, device: str, generator: torch.Generator
) -> list[ProbeResult]:
    dtype = model.storage
    stall = 2 ** PRECISION_BITS[dtype]
    results = []
    if stall * 4 <= 2**20:
        ones = torch.ones(4 * stall, dtype=dtype, device=device)
        count = ones.numel()
        bound = np.array(model.reduction(count) * count)
        results.append(
            ProbeResult(f"sum ones n={count}", *_ratio(ones.sum(), np.array(count), bound))
        )
    x = torch.randn(16, REDUCTION, generator=generator).to(dtype=dtype, device=device)
    exact = _exact(x)
    magnitude = np.abs(exact).sum(axis=1)
    bound = model.reduction(REDUCTION) * magnitude
    results.append(
        ProbeResult(f"sum random n={REDUCTION}", *_ratio(x.sum(dim=1), exact.sum(axis=1), bound))
    )
    mean_bound = (model.reduction(REDUCTION) + model.store) * magnitude / REDUCTION
    results.append(
        ProbeResult(
            f"mean random n={REDUCTION}", *_ratio(x.mean(dim=1), exact.mean(axis=1), mean_bound)
        )
    )
    return results


def _elementwise_probe(
    model: ArithmeticModel, device: str, generator: torch.Generator
) -> ProbeResult:
    """``a.add_(b, alpha=α)`` with ``α·b`` near half an ulp of ``a``: one rounding (``store``)."""
    dtype = model.storage
    a = (1 + torch.rand(4096, generator=generator)).to(dtype=dtype, device=device)
    ulp = torch.tensor(EPS[dtype], dtype=torch.float64)  # the dtype's spacing at 1, not the model's
    b = ((0.5 + 0.01 * torch.rand(4096, generator=generator, dtype=torch.float64)) * ulp).to(
        dtype=dtype, device=device
    )
    alpha = 1.25
    exact = _exact(a) + alpha * _exact(b)
    bound = model.store * np.abs(exact)
    return ProbeResult(
        "add_(b, alpha) near ties", *_ratio(a.clone().add_(b, alpha=alpha), exact, bound)
    )


def _fft_probe(model: ArithmeticModel, device: str, generator: torch.Generator) -> ProbeResult:
    """The Toeplitz FFT product ``L X`` (``d = FFT_DIM``): normwise bound per column.

    Higham §24.1: one FFT of length ``n`` has normwise error ``α = 5·log₂(n)·eps_a``
    (covering mixed radix and the real transform); the convolution ``t ∗ x`` then
    errs by at most ``(2α + 2·eps_a)‖t‖₂‖x‖₂ + α‖t ∗ x‖₂`` per entry, plus one
    rounding ``u_s·|exact|`` to storage (module ``tests/structures/fft_bounds``).
    """
    from singd.structures import get_structure
    from singd.structures.toeplitz import fft_length

    dtype = model.storage
    t = torch.randn(FFT_DIM, generator=generator).to(dtype=dtype, device=device)
    columns = torch.randn(FFT_DIM, 24, generator=generator).to(dtype=dtype, device=device)
    structure = get_structure("triltoeplitz")
    dense = torch.zeros(FFT_DIM, FFT_DIM, dtype=dtype, device=device)
    for lag in range(FFT_DIM):
        dense.diagonal(-lag).fill_(t[lag].item())
    factor = structure.from_dense(dense)
    computed = factor.matmul(columns)
    exact_t, exact_x = _exact(t), _exact(columns)
    exact = _exact(dense) @ exact_x
    eps_a = 2 * model.accumulation_unit
    alpha = 5 * max(math.log2(fft_length(FFT_DIM)), 1.0) * eps_a
    full = np.stack([np.convolve(exact_t, column) for column in exact_x.T], axis=1)
    per_column = (2 * alpha + 2 * eps_a) * np.linalg.norm(exact_t) * np.linalg.norm(exact_x, axis=0)
    per_column = per_column + alpha * np.linalg.norm(full, axis=0)
    bound = per_column[None, :] + model.final_unit * np.abs(exact)
    return ProbeResult(f"Toeplitz FFT product d={FFT_DIM}", *_ratio(computed, exact, bound))


def run_probe(
    model: ArithmeticModel, device: str = "cpu", seed: int = 0, matmul: Matmul = torch.matmul
) -> list[ProbeResult]:
    """Every probe of ``model`` on ``device`` (module docstring); ``matmul``: the product probed."""
    generator = torch.Generator().manual_seed(seed)
    results = _matmul_probes(model, device, generator, matmul)
    results += _reduction_probes(model, device, generator)
    results.append(_elementwise_probe(model, device, generator))
    results.append(_fft_probe(model, device, generator))
    return results


def calibrated_model(
    dtype: torch.dtype, device: str = "cpu", seed: int = 0
) -> tuple[ArithmeticModel, list[ProbeResult]]:
    """:func:`~verification.arithmetic.model_for` ``(dtype, device)``, checked by :func:`run_probe`.

    Raises:
        ValueError: If a probe contradicts the model (naming the probe and its ratio).
    """
    model = model_for(dtype, device)
    results = run_probe(model, device, seed)
    failed = [result for result in results if not result.passed]
    if failed:
        details = ", ".join(f"{r.name}: error/bound {r.ratio:.3g}" for r in failed)
        raise ValueError(f"the arithmetic model '{model.label}' is contradicted by {details}")
    return model, results


@dataclass(frozen=True)
class Calibration:
    """The model of one dtype on one device and the probe's measurements of it.

    Attributes:
        model: The arithmetic model (:func:`~verification.arithmetic.model_for`).
        results: Every probe's measurement.
    """

    model: ArithmeticModel
    results: tuple[ProbeResult, ...]

    @property
    def passed(self) -> bool:
        """Whether no probe contradicts the model (else it must not be used)."""
        return all(result.passed for result in self.results)

    @property
    def worst_ratio(self) -> float:
        """The largest measured error/bound over the probes."""
        return max(result.ratio for result in self.results)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return {
            "model": self.model.as_dict(),
            "passed": self.passed,
            "worst_ratio": self.worst_ratio,
            "probes": [result.as_dict() for result in self.results],
        }


def calibrate(
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    device: str = "cpu",
    seed: int = 0,
) -> list[Calibration]:
    """:func:`run_probe` of :func:`~verification.arithmetic.model_for` for every dtype."""
    calibrations = []
    for dtype in dtypes:
        model = model_for(dtype, device)
        calibrations.append(Calibration(model, tuple(run_probe(model, device, seed))))
    return calibrations
