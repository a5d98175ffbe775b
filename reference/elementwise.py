"""The elementwise preconditioner of LayerNorm/RMSNorm scale and shift (SPEC-layers).

For ``y = γ ⊙ x̂ + β`` each entry ``θ_j`` gets ``p_j = k_j²`` with::

    h_j  = N · Σ_rows r_{row,j}²       r = g ⊙ x̂ for γ, r = g for β
    m_j ← α1 m_j + ½ (k_j² h_j + λ k_j² − 1)
    k_j ← k_j (1 − β1 m_j)
    ĝ_j  = k_j² ∇θ_j

Rows: expand, one per sample and position; reduce, one per sample with ``r``
summed over its positions; ``N`` the loss terms (SPEC §1.1).  Written on
float64 numpy arrays from the definitions (no torch).
"""

from __future__ import annotations

import math

import numpy as np

from reference.statistics import loss_terms


def layer_norm_hat(x: np.ndarray, feature_dims: int, eps: float) -> np.ndarray:
    """``(x − mean)/sqrt(var + eps)`` over the last ``feature_dims`` dims (biased variance)."""
    axes = tuple(range(x.ndim - feature_dims, x.ndim))
    centred = x - x.mean(axis=axes, keepdims=True)
    return centred / np.sqrt((centred**2).mean(axis=axes, keepdims=True) + eps)


def rms_norm_hat(x: np.ndarray, feature_dims: int, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x²) + eps)`` over the last ``feature_dims`` dims."""
    axes = tuple(range(x.ndim - feature_dims, x.ndim))
    return x / np.sqrt((x**2).mean(axis=axes, keepdims=True) + eps)


def elementwise_h(
    x_hat: np.ndarray,
    g: np.ndarray,
    *,
    feature_dims: int,
    bias: bool,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> list[np.ndarray]:
    """``[h_γ]`` or ``[h_γ, h_β]`` of one pass, each of the normalised shape.

    Args:
        x_hat: ``[B, ..., *F]`` normalised input (or unbatched ``F``).
        g: ``∂L/∂y``, same shape.
    """
    x_hat, g = np.asarray(x_hat, dtype=np.float64), np.asarray(g, dtype=np.float64)
    if x_hat.ndim == feature_dims:
        x_hat, g = x_hat[None], g[None]
    features = x_hat.shape[x_hat.ndim - feature_dims :]
    batch = x_hat.shape[0]
    positions = math.prod(x_hat.shape[1 : x_hat.ndim - feature_dims])
    terms = loss_terms(batch, positions, loss_average)
    result = []
    for r in [g * x_hat, g] if bias else [g * x_hat]:
        r = r.reshape(batch, positions, *features)
        rows = r.reshape(batch * positions, *features) if approx == "expand" else r.sum(axis=1)
        result.append(terms * (rows**2).sum(axis=0))
    return result


def elementwise_step(
    k: np.ndarray, m: np.ndarray, h: np.ndarray, *, lr_cov: float, damping: float, alpha1: float
) -> tuple[np.ndarray, np.ndarray]:
    """The new ``(k, m)``: ``m ← α1 m + ½(k²h + λk² − 1)``, ``k ← k(1 − β1 m)``."""
    m_new = alpha1 * m + 0.5 * (k**2 * h + damping * k**2 - 1.0)
    return k * (1.0 - lr_cov * m_new), m_new
