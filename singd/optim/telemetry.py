"""Opt-in numerical telemetry of SINGD's factors (stability issue; SPEC §1.3).

Pure functions of tensors:

* :func:`rounded_to_nothing`: the share of a factor's stored entries that the
  last step ``K ← K − β1·K·m`` (SPEC §1.4a) left bitwise unchanged although
  ``K m`` is nonzero there: update swamping, ``|β1 (K m)_ij| < ½ ulp(K_ij)``.
  A 0-dim tensor on the factor's device (no host sync while training);
* :func:`gram_extremes`: the largest and smallest eigenvalue of ``K Kᵀ`` by
  power iteration on ``K Kᵀ`` and on ``(K Kᵀ)⁻¹ = K⁻ᵀ K⁻¹`` (LU of ``K``), in
  float64 on the host;
* :func:`ikfac_residual`: ``‖Kᵀ(U + λI)K − I‖₂``, zero at IKFAC's fixed point
  ``K Kᵀ = (U + λI)⁻¹`` (SPEC §1.3), in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix

#: Power iterations per eigenvalue of :func:`gram_extremes`.
POWER_ITERATIONS = 100


class GramExtremes(NamedTuple):
    """Power-iteration estimates of ``λ_max``, ``λ_min`` of ``K Kᵀ`` and their ratio."""

    largest: float
    smallest: float

    @property
    def condition(self) -> float:
        """``λ_max / λ_min`` (``inf`` for a singular ``K``)."""
        return self.largest / self.smallest if self.smallest > 0 else float("inf")


def rounded_to_nothing(
    before: StructuredMatrix, after: StructuredMatrix, product: StructuredMatrix
) -> Tensor:
    """Share of stored entries with ``after == before`` although ``product = K m`` is not 0.

    Args:
        before: ``K`` before the step.
        after: ``K`` after it (same structure and dimension).
        product: ``K m`` (same structure), the direction the step moves ``K`` along.

    Returns:
        A 0-dim float32 tensor in ``[0, 1]`` on ``before``'s device.
    """
    stuck = torch.zeros((), dtype=torch.float32, device=before.device)
    for key, old in before.storage.items():
        moved = product.storage[key] != 0
        stuck = stuck + ((after.storage[key] == old) & moved).sum()
    return stuck / before.storage_numel(before.dim)


def _power(apply: object, dim: int, iterations: int) -> float:
    """The Rayleigh quotient after ``iterations`` steps of ``v ← apply(v)/‖·‖``."""
    start = 1.0 + torch.arange(dim, dtype=torch.float64) / dim  # fixed: reproducible
    vector = start / torch.linalg.vector_norm(start)
    value = 0.0
    for _ in range(iterations):
        image = apply(vector)  # type: ignore[operator]
        value = float(vector @ image)
        norm = torch.linalg.vector_norm(image)
        if not bool(norm > 0):
            return 0.0
        vector = image / norm
    return value


def gram_extremes(factor: StructuredMatrix, iterations: int = POWER_ITERATIONS) -> GramExtremes:
    """``λ_max``, ``λ_min`` of ``K Kᵀ`` by power iteration (``K`` as a float64 dense matrix).

    ``λ_max`` from ``v ← K(Kᵀv)``; ``λ_min = 1/λ_max((KKᵀ)⁻¹)`` from
    ``v ← K⁻ᵀ(K⁻¹v)`` with one LU factorisation of ``K``.  From the fixed start
    ``v_0``, the symmetric power method's Rayleigh quotient errs by at most
    ``(λ_1 − λ_d) tan²θ_0 (λ_2/λ_1)^{2k}`` after ``k`` steps (Golub & Van Loan,
    Thm. 8.2.1): an estimate, exact in the limit.  A singular ``K`` gives
    ``smallest = 0``.
    """
    dense = factor.to_dense().detach().to(device="cpu", dtype=torch.float64)
    dim = dense.shape[0]
    largest = _power(lambda v: dense @ (dense.T @ v), dim, iterations)
    lu, pivots, info = torch.linalg.lu_factor_ex(dense)
    if int(info) != 0:
        return GramExtremes(largest, 0.0)

    def inverse_gram(v: Tensor) -> Tensor:
        inner = torch.linalg.lu_solve(lu, pivots, v[:, None])  # K⁻¹ v
        return torch.linalg.lu_solve(lu, pivots, inner, adjoint=True)[:, 0]  # K⁻ᵀ K⁻¹ v

    inverse_largest = _power(inverse_gram, dim, iterations)
    return GramExtremes(largest, 1.0 / inverse_largest if inverse_largest > 0 else 0.0)


def ikfac_residual(factor: StructuredMatrix, statistic: Tensor, damping: float) -> float:
    """``‖Kᵀ(U + λI)K − I‖₂`` in float64.

    Args:
        factor: ``K`` (d × d).
        statistic: ``U`` (d × d, symmetric PSD), e.g. ``AᵀA`` of SPEC §1.1.
        damping: ``λ``.

    Raises:
        ValueError: ``statistic`` is not ``d × d``.
    """
    dim = factor.dim
    if tuple(statistic.shape) != (dim, dim):
        raise ValueError(
            f"ikfac_residual: the statistic must be {dim} × {dim} (the factor's), "
            f"got shape {tuple(statistic.shape)}"
        )
    k = factor.to_dense().detach().to(device="cpu", dtype=torch.float64)
    damped = statistic.detach().to(device="cpu", dtype=torch.float64) + damping * torch.eye(
        dim, dtype=torch.float64
    )
    residual = k.T @ damped @ k - torch.eye(dim, dtype=torch.float64)
    return float(torch.linalg.matrix_norm(residual, ord=2))
