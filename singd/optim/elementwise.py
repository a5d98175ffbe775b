"""Elementwise scale and shift (LayerNorm, RMSNorm): a diagonal inverse-free preconditioner.

SPEC-layers, "Normalisation layers".  ``y = γ ⊙ x̂ + β`` has no Kronecker
structure; each entry ``θ_j`` of ``γ`` or ``β`` gets ``p_j = k_j²`` with the
IKFAC fixed point ``k_j² = 1/(h_j + λ)``::

    h_j  = N · Σ_rows r_{row,j}²        r = g ⊙ x̂ for γ, r = g for β
    m_j ← α1 m_j + ½ (k_j² h_j + λ k_j² − 1)
    k_j ← k_j (1 − β1 m_j)
    ĝ_j  = k_j² ∇θ_j                    then weight decay, momentum and lr (SPEC §1.4)

Rows as in SPEC §1.1 (expand: one per sample and position; reduce: one per
sample, ``r`` summed over its positions), ``N`` the loss terms.  ``x̂`` is
recomputed from the layer input (never as ``(y − β)/γ``), in float32 or
wider; ``h`` is accumulated in that dtype.  ``k`` starts at 1 and is kept,
like ``m``, in ``γ``'s dtype, in the parameter's optimizer state
(``"elementwise_k"``, ``"elementwise_m"``).  All functions are pure.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn

from singd.optim.statistics import Approx, LossAverage, loss_terms

#: The modules whose affine parameters get the elementwise preconditioner.
ELEMENTWISE_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)

#: Optimizer-state keys of an elementwise parameter.
K_KEY, M_KEY = "elementwise_k", "elementwise_m"


def is_elementwise(module: nn.Module) -> bool:
    """Whether ``module`` is a LayerNorm/RMSNorm (exactly; its ``forward``) with affine params.

    Not for FSDP2-sharded parameters (``DTensor``): ``h`` is formed in full on
    every rank, which the shards' ``k`` would need gathered; those fall back.
    """
    weight = getattr(module, "weight", None)
    tensor = sys.modules.get("torch.distributed.tensor")  # not imported here: it is slow
    sharded = tensor is not None and isinstance(weight, tensor.DTensor)
    return (
        type(module) in ELEMENTWISE_TYPES
        and weight is not None
        and weight.is_floating_point()
        and not sharded
    )


def normalised_input(module: nn.Module, x: Tensor) -> Tensor:
    """``x̂`` of a LayerNorm/RMSNorm input, in float32 or wider (SPEC-layers).

    LayerNorm: ``(x − mean)/sqrt(var + eps)`` over the normalised dims (biased
    variance); RMSNorm: ``x / sqrt(mean(x²) + eps)`` (``eps=None``: the input
    dtype's machine epsilon, as torch).
    """
    wide = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    dims = tuple(range(-len(module.normalized_shape), 0))
    if isinstance(module, nn.LayerNorm):
        centred = wide - wide.mean(dim=dims, keepdim=True)
        variance = centred.square().mean(dim=dims, keepdim=True)
        return centred * torch.rsqrt(variance + module.eps)
    eps = torch.finfo(x.dtype).eps if module.eps is None else module.eps
    return wide * torch.rsqrt(wide.square().mean(dim=dims, keepdim=True) + eps)


def elementwise_statistics(
    x_hat: Tensor,
    grad_output: Tensor,
    *,
    feature_dims: int,
    has_bias: bool,
    approx: Approx,
    loss_average: LossAverage,
) -> list[Tensor]:
    """``h`` of ``γ`` (and of ``β``) from one pass (SPEC-layers), in ``x_hat``'s dtype.

    Args:
        x_hat: ``[B, ..., *F]`` normalised input (``F`` the ``feature_dims`` normalised dims).
        grad_output: ``∂L/∂y``, same shape.

    Returns:
        ``[h_γ]`` or ``[h_γ, h_β]``, each of shape ``F``.
    """
    features = x_hat.shape[x_hat.ndim - feature_dims :]
    g = grad_output.detach().to(x_hat.dtype)
    if x_hat.ndim == feature_dims:  # unbatched: one sample, one position
        x_hat, g = x_hat.unsqueeze(0), g.unsqueeze(0)
    batch = x_hat.shape[0]
    positions = math.prod(x_hat.shape[1 : x_hat.ndim - feature_dims])
    terms = loss_terms(batch, positions, loss_average)
    rows = [g * x_hat, g] if has_bias else [g * x_hat]
    result = []
    for r in rows:
        r = r.reshape(batch, positions, *features)
        r = r.reshape(-1, *features) if approx == "expand" else r.sum(dim=1)
        result.append(terms * r.square().sum(dim=0))
    return result


def elementwise_factor_step(
    k: Tensor, m: Tensor, h: Tensor, *, lr_cov: float, damping: float, alpha1: float
) -> tuple[Tensor, Tensor]:
    """The new ``(k, m)`` (SPEC-layers) in ``k``'s dtype, computed in ``h``'s (wider) dtype."""
    wide = h.dtype
    k_wide = k.to(wide)
    square = k_wide.square()
    m_new = alpha1 * m.to(wide) + 0.5 * (square * h + damping * square - 1.0)
    k_new = k_wide * (1.0 - lr_cov * m_new)
    return k_new.to(k.dtype), m_new.to(m.dtype)


def elementwise_precondition(k: Tensor, grad: Tensor) -> Tensor:
    """``ĝ = k² ⊙ ∇θ`` (SPEC-layers), in ``grad``'s dtype."""
    return k.square().to(grad.dtype) * grad
