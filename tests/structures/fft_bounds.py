"""Error bounds of the Toeplitz FFT path (``d ≥ FFT_MIN_DIM``), shared by the structure tests.

FFT error bound (normwise; Higham, *Accuracy and Stability*, 2nd ed., §24.1).
A computed length-``n`` FFT satisfies ``‖ŷ − y‖₂ ≤ α‖y‖₂`` with
``α = log₂(n)·η``, ``η ≈ μ + γ₄(√2 + μ) ≈ 3.4·eps`` for radix 2 with
correctly rounded twiddles (Thm. 24.2); we take ``α = 5·log₂(n)·eps`` to
cover mixed radix 3/5 stages and the real-to-complex post-processing.
``F y`` has norm ``√n‖y‖``, and an inverse FFT output entry is at most
``(1/n)`` times the 1-norm of its input, so by Cauchy–Schwarz:

* convolution ``y = t ∗ x`` (one column ``x`` of ``X``; ``Lᵀ X`` is a
  correlation with the same bound): the errors of ``t̂`` and ``x̂`` give
  ``α‖t‖₂‖x‖₂`` each, the spectral product ``2·eps·‖t‖₂‖x‖₂``, and the
  inverse FFT ``α‖t ∗ x‖₂`` (the full, untruncated convolution), every entry:
  ``|ŷ_i − y_i| ≤ (2α + 2·eps)‖t‖₂‖x‖₂ + α‖t ∗ x‖₂``;
* lag products ``r_k = Σ_j Σ_i A_ij B_{i+k,j}``: ``2α‖A‖_F‖B‖_F`` from the
  two spectra, ``(m + 3)·eps·‖A‖_F‖B‖_F`` from the products, the sum over
  ``m`` columns and one rounding of the operands, and ``α‖r‖₂`` from the
  inverse FFT, ``r`` the full two-sided sum of correlations ``Σ_j a_j ⋆ b_j``.

The norms of the exact full results are computed in float64 by the tests.

bf16/fp16 compute in float32 (``α`` with float32's eps) and round once:
``+ eps(dtype)·|exact|``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from singd.structures.lower_upper import compute_dtype
from singd.structures.toeplitz import fft_length
from tests.tolerances import EPS


def fft_alpha(dtype: torch.dtype, dim: int) -> float:
    """``α = 5·log₂(n)·eps``: normwise error of one FFT of length ``n = fft_length(d)``."""
    return 5 * max(math.log2(fft_length(dim)), 1.0) * EPS[compute_dtype(dtype)]


def convolution_bound(dtype: torch.dtype, t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-column bound (``1 × m``) of the FFT convolution ``t ∗ x``, ``x``: ``d × m``."""
    alpha, eps = fft_alpha(dtype, len(t)), EPS[compute_dtype(dtype)]
    full = np.stack([np.convolve(t, column) for column in x.T], axis=1)  # (2d − 1) × m
    spectra = (2 * alpha + 2 * eps) * np.linalg.norm(t) * np.linalg.norm(x, axis=0)
    return (spectra + alpha * np.linalg.norm(full, axis=0))[None, :]


def lag_bound(dtype: torch.dtype, a: np.ndarray, b: np.ndarray) -> float:
    """Bound on every FFT lag product of ``a``, ``b`` (``d × m``), see module docstring."""
    alpha, eps = fft_alpha(dtype, a.shape[0]), EPS[compute_dtype(dtype)]
    frobenius = np.linalg.norm(a) * np.linalg.norm(b)
    full = sum(np.correlate(b[:, j], a[:, j], mode="full") for j in range(a.shape[1]))
    return (2 * alpha + (a.shape[1] + 3) * eps) * frobenius + alpha * np.linalg.norm(full)


def rounding(dtype: torch.dtype, exact: np.ndarray) -> np.ndarray:
    """The final rounding of a half-precision result computed in float32 (else 0)."""
    return EPS[dtype] * np.abs(exact) if compute_dtype(dtype) != dtype else 0 * exact


def diagonal_means_bound(dtype: torch.dtype, lag_error: float, exact: np.ndarray) -> np.ndarray:
    """Π̂ entry ``k`` = ``(2 or 1)·r_k/(d − k)``: the lag error scaled, one division rounding."""
    dim = len(exact)
    scale = np.array([1.0 / dim] + [2.0 / (dim - k) for k in range(1, dim)])
    return scale * lag_error + EPS[compute_dtype(dtype)] * np.abs(exact) + rounding(dtype, exact)


def lags_of_computed_bound(
    dtype: torch.dtype, computed: np.ndarray, exact: np.ndarray, column_error: np.ndarray
) -> float:
    """Lag error when the lags of ``Y`` (``d × m``) are taken from an FFT result ``Ŷ``.

    ``|Ŷ_ij − Y_ij| ≤ a_j`` (``column_error``, ``1 × m``) gives
    ``‖Ŷ − Y‖_F ≤ √d‖a‖₂`` and, by Cauchy–Schwarz on
    ``r_k(Ŷ) − r_k(Y) = Σ E_ij Ŷ_{i+k,j} + Y_ij E_{i+k,j}``, a change of at
    most ``‖E‖_F (‖Ŷ‖_F + ‖Y‖_F)``; the FFT lags of ``Ŷ`` add
    :func:`lag_bound` (first order, like :mod:`tests.tolerances`).
    """
    perturbation = math.sqrt(exact.shape[0]) * np.linalg.norm(column_error)
    spread = perturbation * (np.linalg.norm(computed) + np.linalg.norm(exact))
    return lag_bound(dtype, computed, computed) + spread
