"""Tolerance rules of every numeric comparison (tests, ``singd-verify``) and their derivation.

Nothing here is tuned: each bound is ``c · eps(dtype) · (problem-size factor)``
with the factor taken from standard rounding-error analysis (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed.):

* an inner product / matrix product with reduction length ``n`` has an error of
  at most ``γ_n = n·u / (1 - n·u) ≈ n·u`` relative to ``|a|ᵀ|b|``
  (Higham Thm. 3.5), where ``u = eps / 2`` is the unit roundoff.  We bound by
  ``n · eps`` (i.e. ``2·γ_n``), a factor two of slack for the final rounding
  of the stored result and for sums of two such products.
* a sequence of ``s`` steps, each adding a rounding error of size ``δ``
  relative to the state, accumulates at most ``s · δ`` (first order,
  contractive maps); with a map whose Lipschitz constant is ``L > 1`` the bound
  is multiplied by ``L^s``, so tests keep step counts where the map is
  contractive (β small) and state the constant.

Use :func:`matmul_bound` for a single product, :func:`chain_bound` for ``k``
products in a row, and scale by the magnitude ``|A| |B|`` (not ``|AB|``):
cancellation makes relative error in the result unbounded.
"""

from __future__ import annotations

import torch

#: Machine epsilon (spacing of floats at 1.0) for each dtype under test.
EPS: dict[torch.dtype, float] = {
    torch.float64: 2.0**-52,  # 2.2e-16
    torch.float32: 2.0**-23,  # 1.2e-7
    torch.bfloat16: 2.0**-7,  # 7.8e-3
    torch.float16: 2.0**-10,  # 9.8e-4
}

#: numpy dtype names to the same epsilons (the oracle's tests use numpy only).
EPS_BY_NAME: dict[str, float] = {
    "float64": EPS[torch.float64],
    "float32": EPS[torch.float32],
    "bfloat16": EPS[torch.bfloat16],
    "float16": EPS[torch.float16],
}


def matmul_bound(dtype: torch.dtype, reduction_length: int) -> float:
    """Relative (to ``|A||B|``) error bound of one product: ``n · eps``.

    ``n`` is the reduction length (inner dimension), at least 1.  Inputs that
    are first rounded to ``dtype`` add one ``eps`` each, so the bound used is
    ``(n + 2) · eps``.
    """
    return (max(reduction_length, 1) + 2) * EPS[dtype]


def chain_bound(dtype: torch.dtype, reduction_lengths: list[int]) -> float:
    """Bound for a chain of products: the per-product bounds add (first order)."""
    return sum(matmul_bound(dtype, n) for n in reduction_lengths)
