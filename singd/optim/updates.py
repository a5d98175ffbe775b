"""The update equations as pure functions of tensors (SPEC §1.2–§1.4).

Nothing here knows about modules, hooks or optimizer state: each function
takes the factors and statistics of one layer and returns new values (the
parameter update of §1.4 works in place on the tensors it is given, as torch's
functional optimizers do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix
from singd.structures.diagonal import Diagonal


class FactorState(NamedTuple):
    """One layer's SINGD factors (SPEC §1.3): ``K`` (d_i × d_i), ``C`` (d_o × d_o)
    and their momenta ``m_K``, ``m_C``."""

    K: StructuredMatrix
    C: StructuredMatrix
    m_K: StructuredMatrix
    m_C: StructuredMatrix


class SelfInners(NamedTuple):
    """``p²Π̂(KᵀK)`` (d_i × d_i) and ``p²Π̂(CᵀC)`` (d_o × d_o), formed once per factor step.

    ``scale = p²`` (:func:`self_inner_scale`): the brackets add them with weight
    ``λ/p²`` (IKFAC) or ``λ tr(·)/p²`` (default mode), so ``λ Π̂(KᵀK)`` is
    formed as ``(λ/p²)·Π̂((pK)ᵀ(pK))``.
    """

    K: StructuredMatrix
    C: StructuredMatrix
    scale: float


class Traces(NamedTuple):
    """The traces the default-mode momenta weight with, read to the host as floats.

    ``K_sq``, ``C_sq`` are the traces of :class:`SelfInners`: ``p² tr(KᵀK)``, ``p² tr(CᵀC)``.
    """

    H_K: float
    H_C: float
    K_sq: float
    C_sq: float


#: Headroom of :func:`self_inner_scale`: ``p²Π̂(KᵀK)`` stays below ``2^12`` (about 1/16 of
#: float16's largest number, 65504) where ``λ Π̂(KᵀK)`` is at most 1.
SELF_INNER_HEADROOM = 2.0**12


def self_inner_scale(damping: float) -> float:
    """``p = 2^e``, ``e = min(0, ⌊log₂(2^12 λ)/2⌋)``: the factor's scale in ``Π̂((pK)ᵀ(pK))``.

    SPEC §1.3 needs ``λ Π̂(KᵀK)`` (IKFAC) or ``c² Π̂(KᵀK)``.  At the IKFAC fixed
    point ``KᵀMK = I`` with ``M = U + λI ⪰ λI``, so ``λ KᵀK ⪯ I``: the term is at
    most 1, but ``Π̂(KᵀK)`` alone reaches ``1/μ_min(M)`` and overflows float16
    for ``μ_min < 1.5e-5`` (the stability issue's case 3).  With
    ``p² ∈ (2^10 λ, 2^12 λ]`` the computed ``Π̂((pK)ᵀ(pK))`` is at most ``p²/λ ≤
    2^12`` (Π̂ doubles off-diagonal entries for tril/triu: ``2^13``), about 8×
    below float16's largest number.  In the default mode the fixed point gives
    ``c² KᵀK ⪯ d_o I`` (``c² = λ tr(CᵀC)``), so the product is at most
    ``2^12 d_o / tr(CᵀC)``: range-safe while ``tr(CᵀC) ≥ d_o/16`` (``C`` starts at
    ``tr(CᵀC) = d_o``).  ``p`` is a power of two and never above 1, so
    scaling is exact unless an entry falls below the dtype's smallest normal
    number: where nothing overflows the result is bitwise that of
    ``Π̂(KᵀK)`` times ``p²``, and for ``λ ≥ 2^-12`` (or ``λ = 0``) ``p = 1``.
    """
    if damping <= 0.0:
        return 1.0
    return 2.0 ** min(0, math.floor(math.log2(SELF_INNER_HEADROOM * damping) / 2))


def singd_self_inners(state: FactorState, damping: float) -> SelfInners:
    """``p²Π̂(KᵀK)`` and ``p²Π̂(CᵀC)`` of the factors from before the update (``p``: λ's).

    Formed as ``Π̂((pK)ᵀ(pK))`` (:func:`self_inner_scale`), so range-safe in float16.
    """
    p = self_inner_scale(damping)
    if p == 1.0:
        return SelfInners(state.K.project_self_inner(), state.C.project_self_inner(), 1.0)
    scaled_K, scaled_C = state.K.mul(p), state.C.mul(p)
    return SelfInners(scaled_K.project_self_inner(), scaled_C.project_self_inner(), p * p)


def singd_trace_terms(
    H_K: StructuredMatrix, H_C: StructuredMatrix, inners: SelfInners
) -> list[Tensor]:
    """The 0-dim tensors behind :class:`Traces`, in its field order (read them in one sync)."""
    return [H_K.trace(), H_C.trace(), inners.K.trace(), inners.C.trace()]


def singd_factor_momenta(
    state: FactorState,
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    *,
    inners: SelfInners,
    traces: Traces,
    damping: float,
    alpha1: float,
    kfac_like: bool,
    normalize_lr_cov: bool,
    grad_scale_correction: float = 1.0,
) -> tuple[StructuredMatrix, StructuredMatrix]:
    """New momenta ``m_K``, ``m_C`` (SPEC §1.3, order of §1.4a).

    Default (SINGD/INGD), with ``c² = λ tr(CᵀC)``, ``κ² = λ tr(KᵀK)``::

        m_K ← α1 m_K + coef/d_o · (tr(H_C) H_K + c² Π̂(KᵀK) − d_o I)
        m_C ← α1 m_C + coef/d_i · (tr(H_K) H_C + κ² Π̂(CᵀC) − d_i I)

    IKFAC (``kfac_like``, α1 = 0): ``m_K = coef·(H_K + λ Π̂(KᵀK) − I)`` and
    likewise for ``C``.  ``coef = ½``, or ``½(1 − α1)`` with
    ``normalize_lr_cov``.  ``grad_scale_correction`` is the factor
    ``2^(−2k)/s_t²`` that removes from ``H_C`` the hooks' normalisation and the
    loss scale (SPEC §1.5, docs/SPEC.md); in the default mode it enters only
    through the (float64) trace weights, so ``H_C`` is never rescaled in a
    narrow dtype.

    ``H_C`` is consumed: ``m_C``'s bracket is formed in its storage (the
    pending statistics are dropped after every step; ``H_K`` is not, since a
    single pass's input summary is still held by its graph's gradient hook).

    Args:
        state: the factors and momenta from before this update.
        H_K: ``Π̂(Kᵀ U K)`` (d_i × d_i), computed with the current ``K``.
        H_C: ``Π̂(Cᵀ Gc C)`` (d_o × d_o), computed with the current ``C``.
        inners: :func:`singd_self_inners` of ``state`` (scaled by ``inners.scale = p²``,
            which every weight of an inner divides out again).
        traces: the values of :func:`singd_trace_terms` (not read with ``kfac_like``).

    Returns:
        ``(m_K_new, m_C_new)`` in the factors' dtypes.
    """
    _, _, m_K, m_C = state
    d_i, d_o = state.K.dim, state.C.dim
    coef = 0.5 * (1.0 - alpha1) if normalize_lr_cov else 0.5
    if kfac_like:
        weight = damping / inners.scale  # λ Π̂(KᵀK) = (λ/p²)·p²Π̂(KᵀK)
        bracket_K = H_K.add(inners.K, alpha=weight).add_diag_(-1.0)
        bracket_C = H_C.mul_(grad_scale_correction).add_(inners.C, alpha=weight)
        bracket_C.add_diag_(-1.0)
        return bracket_K.mul_(coef), bracket_C.mul_(coef)
    trace_H_C = traces.H_C * grad_scale_correction
    trace_H_K = traces.H_K * grad_scale_correction
    c_sq = damping * traces.C_sq / inners.scale  # λ tr(CᵀC); dividing by p² is exact
    kappa_sq = damping * traces.K_sq / inners.scale
    bracket_K = H_K.mul(trace_H_C).add_(inners.K, alpha=c_sq / inners.scale)
    bracket_K.add_diag_(-float(d_o))
    bracket_C = H_C.mul_(trace_H_K).add_(inners.C, alpha=kappa_sq / inners.scale)
    bracket_C.add_diag_(-float(d_i))
    new_m_K = bracket_K.mul_(coef / d_o).add_(m_K, alpha=alpha1)
    new_m_C = bracket_C.mul_(coef / d_i).add_(m_C, alpha=alpha1)
    return new_m_K, new_m_C


def normalized_lr_cov(lr_cov: float, momentum: StructuredMatrix, normalize: bool) -> float:
    """``β1``, or ``β1 / max(1, ‖m‖_∞)`` with ``normalize_lr_cov`` (SPEC §1.3)."""
    if not normalize:
        return lr_cov
    return lr_cov / max(1.0, float(momentum.max_abs()))


def singd_factor_step(
    factor: StructuredMatrix, momentum: StructuredMatrix, lr_cov: float
) -> StructuredMatrix:
    """``K ← K (I − β1 m) = K − β1 · K m`` (SPEC §1.3, first order, §1.4a).

    The sum is written into the product's fresh storage
    (:meth:`~StructuredMatrix.add_onto_`, bitwise ``factor.add(product, −β1)``):
    no third storage-sized buffer, unless the product's dtype differs from
    the factor's (then ``add`` casts it, as before).
    """
    product = factor @ momentum
    if product.dtype != factor.dtype:
        return factor.add(product, alpha=-lr_cov)
    return product.add_onto_(factor, alpha=-lr_cov)


#: ``(factor, momentum, β1) → new factor``: one factor's ``K ← K − β1·K·m`` (SPEC §1.4a).
FactorStep = Callable[[StructuredMatrix, StructuredMatrix, float], StructuredMatrix]


def singd_update_factors(
    state: FactorState,
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    *,
    inners: SelfInners,
    traces: Traces,
    lr_cov: float,
    damping: float,
    alpha1: float,
    kfac_like: bool,
    normalize_lr_cov: bool,
    grad_scale_correction: float = 1.0,
    factor_steps: tuple[FactorStep, FactorStep] | None = None,
) -> FactorState:
    """One covariance step of SPEC §1.3: momenta, then ``K``, ``C``.

    ``inners`` and ``traces`` are as for :func:`singd_factor_momenta`.  Returns
    the new state; the momenta are the new ones (callers keep zeros instead
    when ``α1 = 0``, where they are never read again).  ``factor_steps`` (for
    ``K``, for ``C``) replace :func:`singd_factor_step`, e.g. by a swamping
    guard (:func:`compensated_factor_step`, :func:`stochastic_factor_step`,
    :func:`master_factor_step`).
    """
    step_K, step_C = factor_steps or (singd_factor_step, singd_factor_step)
    new_m_K, new_m_C = singd_factor_momenta(
        state,
        H_K,
        H_C,
        inners=inners,
        traces=traces,
        damping=damping,
        alpha1=alpha1,
        kfac_like=kfac_like,
        normalize_lr_cov=normalize_lr_cov,
        grad_scale_correction=grad_scale_correction,
    )
    new_K = step_K(state.K, new_m_K, normalized_lr_cov(lr_cov, new_m_K, normalize_lr_cov))
    new_C = step_C(state.C, new_m_C, normalized_lr_cov(lr_cov, new_m_C, normalize_lr_cov))
    return FactorState(new_K, new_C, new_m_K, new_m_C)


# ----------------------------------------------- swamping guards (half precision)
#: Dtypes whose factors the swamping guards act on.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def compensated_factor_step(
    factor: StructuredMatrix,
    momentum: StructuredMatrix,
    lr_cov: float,
    compensation: StructuredMatrix,
) -> tuple[StructuredMatrix, StructuredMatrix]:
    """``K ← K − β1·K·m`` (SPEC §1.3, §1.4a) with Kahan compensation.

    ``c`` (same structure and dtype as ``K``) carries what earlier rounding
    of ``K`` dropped, so increments below half an ulp of ``K`` add up instead
    of vanishing (update swamping)::

        y  = c − β1·(K m)        # one rounding to K's dtype
        K' = K + y               # one rounding
        c' = y − (K' − K)        # exact when |y| ≤ |K| or K = 0 (Fast2Sum)

    Every operation is a structured ``add_`` of storage entries, so entries
    outside the structure are never stored and stay zero.

    Returns:
        ``(K', c')``.
    """
    increment = compensation.add(factor @ momentum, alpha=-lr_cov)
    new = factor.add(increment)
    applied = new.add(factor, alpha=-1.0)
    return new, increment.add_(applied, alpha=-1.0)


def stochastic_round(exact: Tensor, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """``exact`` (float32) rounded to ``dtype`` up or down at random, unbiased.

    With ``n`` the nearest and ``o`` the other neighbour of ``exact`` in
    ``dtype``, the result is ``o`` with probability ``|exact − n| / |o − n|``
    (computed in float32), else ``n``; its expectation is ``exact`` up to the
    float32 rounding of that probability.  The uniform draws come from
    ``generator`` (one per entry), so a seeded generator reproduces the run.
    """
    nearest = exact.to(dtype)
    direction = torch.where(nearest.to(exact.dtype) < exact, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(nearest, direction)
    gap = (other.to(exact.dtype) - nearest.to(exact.dtype)).abs()
    probability = (exact - nearest.to(exact.dtype)).abs() / gap
    draws = torch.rand(exact.shape, generator=generator, device=exact.device, dtype=exact.dtype)
    return torch.where(draws < probability, other, nearest)


def stochastic_factor_step(
    factor: StructuredMatrix,
    momentum: StructuredMatrix,
    lr_cov: float,
    generator: torch.Generator,
) -> StructuredMatrix:
    """``K ← K − β1·K·m`` (SPEC §1.3, §1.4a) in float32, stochastically rounded.

    ``K`` and ``m`` are cast to float32 (exactly), ``K − β1·(K m)`` is formed
    there (product with float32 accumulation, one rounding each for the
    product and the sum) and every stored entry is rounded to ``K``'s dtype by
    :func:`stochastic_round`, so the expected update is the float32 one.
    """
    wide = factor.to(dtype=torch.float32)
    exact = wide.add(wide @ momentum.to(dtype=torch.float32), alpha=-lr_cov)
    storage = {
        key: stochastic_round(tensor, factor.dtype, generator)
        for key, tensor in exact.storage.items()
    }
    return type(factor)(factor.dim, storage)


def master_factor_step(
    master: StructuredMatrix,
    momentum: StructuredMatrix,
    lr_cov: float,
    compute: StructuredMatrix,
) -> StructuredMatrix:
    """``K ← K − β1·K·m`` (SPEC §1.3, §1.4a) on a float32 master ``K``.

    ``compute`` is the copy of ``master`` used for the products (the master
    rounded to the half dtype, or the master itself); ``compute @ m`` is formed
    in the promoted dtype of the two, then added to the master with one
    float32 rounding, ``K ← fl32(K + (−β1)·fl(compute m))``.
    """
    return master.add(compute @ momentum, alpha=-lr_cov)


#: ``(K Kᵀ, C Cᵀ)`` kept between factor steps, each ``None`` where not kept.
Outers = tuple[StructuredMatrix | None, StructuredMatrix | None]


def keeps_outer(structure: type[StructuredMatrix]) -> bool:
    """Whether :func:`singd_precondition` can take ``P = fl(F Fᵀ)`` for ``structure``: closed
    under ``F Fᵀ`` (:meth:`StructuredMatrix.self_outer`) and not diagonal (``k² ⊙ X``
    is one pass already)."""
    return structure.self_outer is not StructuredMatrix.self_outer and not issubclass(
        structure, Diagonal
    )


def outer_pays_for_one_product(structure: type[StructuredMatrix], dim: int, columns: int) -> bool:
    """Whether forming ``P = fl(F Fᵀ)`` for a single product ``P X`` (``X``: ``dim × columns``)
    costs at most half of the product ``Fᵀ X`` that it saves (:func:`singd_precondition`).

    With ``n_F`` stored entries, ``b = n_F / dim`` per row (``dim`` for a dense
    ``F``, the block size for a block-diagonal one), ``F Fᵀ`` costs ``n_F · b``
    multiply-adds and ``Fᵀ X`` costs ``n_F · columns``: so ``2b ≤ columns``.  Only
    structures that :func:`keeps_outer` admits form it.  A dense factor of a
    layer with nearly equal sides (``b ≈ columns``: forming ``P`` costs what it
    saves) keeps its two products.
    """
    return keeps_outer(structure) and 2 * structure.storage_numel(dim) <= dim * columns


def singd_precondition(
    K: StructuredMatrix, C: StructuredMatrix, grad: Tensor, outers: Outers = (None, None)
) -> Tensor:
    """``ĝ = C Cᵀ ∇W~ K Kᵀ`` (SPEC §1.4), in the factors' dtypes, cast back.

    ``∇W~ K Kᵀ`` is the right product
    :meth:`StructuredMatrix.right_self_outer_matmul`: by default ``(K Kᵀ
    ∇W~ᵀ)ᵀ``, so only products with ``K``/``Kᵀ`` are needed
    (:meth:`StructuredMatrix.self_outer_matmul`: ``K (Kᵀ X)``, or ``k² ⊙ X``
    for a diagonal ``K``); a block-diagonal ``K`` writes it row-major, column
    block by column block, so ``ĝ`` has the parameter's layout and the update
    reads it contiguously.  Where ``outers`` holds ``P = fl(K Kᵀ)``
    (:meth:`StructuredMatrix.self_outer`, formed once per factor step), that
    side is the one product ``P X`` (on the right ``X Pᵀ``,
    :meth:`StructuredMatrix.right_t_matmul`, row-major for a block-diagonal
    and a dense ``P``).

    Args:
        grad: ``∇W~`` (d_o × d_i~).
        outers: ``(P_K, P_C)``, each ``None`` to use ``K``/``C`` themselves.

    Returns:
        ``ĝ`` (d_o × d_i~) in ``grad``'s dtype.
    """
    P_K, P_C = outers
    g = grad.to(C.dtype)
    left = C.self_outer_matmul(g) if P_C is None else P_C.matmul(g)
    h = left.to(K.dtype)
    right = K.right_self_outer_matmul(h) if P_K is None else P_K.right_t_matmul(h)
    return right.to(grad.dtype)


def kfac_factor_ema(factor: Tensor, statistic: Tensor, lr_cov: float) -> Tensor:
    """``S ← (1 − β1) S + β1 U`` (SPEC §1.2)."""
    return torch.lerp(factor, statistic.to(factor.dtype), lr_cov)


def kfac_precondition(
    S_K: Tensor, S_C: Tensor, grad: Tensor, damping: float, compute_dtype: torch.dtype
) -> Tensor:
    """``ΔW~ = (S_C + λI)⁻¹ ∇W~ (S_K + λI)⁻¹`` via Cholesky (SPEC §1.2).

    Args:
        S_K: ``d_i~ × d_i~`` symmetric PSD factor.
        S_C: ``d_o × d_o`` symmetric PSD factor.
        grad: ``∇W~`` (d_o × d_i~).
        compute_dtype: dtype of the linear algebra (float32 or float64).

    Returns:
        ``ΔW~`` in ``grad``'s dtype.
    """
    eye_K = torch.eye(S_K.shape[0], dtype=compute_dtype, device=S_K.device)
    eye_C = torch.eye(S_C.shape[0], dtype=compute_dtype, device=S_C.device)
    chol_K = torch.linalg.cholesky(S_K.to(compute_dtype) + damping * eye_K)
    chol_C = torch.linalg.cholesky(S_C.to(compute_dtype) + damping * eye_C)
    left = torch.cholesky_solve(grad.to(compute_dtype), chol_C)
    return torch.cholesky_solve(left.T, chol_K).T.to(grad.dtype)


def momentum_parameter_updates(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """SPEC §1.4, in place, for every parameter of a group: ``ĝ += γ W``;
    ``m ← α2 m + ĝ``; ``W ← W − β2 m``.

    ``torch._foreach_*`` kernels (torch.optim's foreach pattern): three or
    four launches for the whole list instead of as many per parameter; each
    entry sees the same operations, in the same order, as the per-tensor
    ``mul_``/``add_`` form, so the results are the same bits.  ``α2`` is
    passed as a 0-dim float32 (float64 if a parameter is float64) tensor:
    with a Python number, the CPU's foreach ``mul_`` first rounds it to a
    bfloat16/float16 list's dtype (0.9 → 0.8984375 in bfloat16), which the
    per-tensor ``mul_`` does not.

    Args:
        params: the parameters ``W`` (any shapes).
        directions: their (preconditioned) gradients ``ĝ``, same shapes.
        momentum_buffers: their ``m``, same shapes, updated in place.
    """
    if not params:
        return
    if weight_decay != 0.0:
        directions = torch._foreach_add(directions, params, alpha=weight_decay)
    wide = any(p.dtype == torch.float64 for p in params)
    alpha2 = torch.full(  # a fill kernel on the device: no host-to-device copy, no sync
        (), momentum, dtype=torch.float64 if wide else torch.float32, device=params[0].device
    )
    torch._foreach_mul_(momentum_buffers, alpha2)
    torch._foreach_add_(momentum_buffers, directions)
    torch._foreach_add_(params, momentum_buffers, alpha=-lr)


def adamw_parameter_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW (Loshchilov & Hutter), in place, as ``torch.optim.AdamW`` (single tensor, no amsgrad).

    ``W ← (1 − β2·γ) W``; ``m ← β₁ m + (1 − β₁) g``; ``v ← β₂ v + (1 − β₂) g²``;
    ``W ← W − β2/(1 − β₁ᵗ) · m / (sqrt(v)/sqrt(1 − β₂ᵗ) + ε)`` with ``t = step``
    (from 1), the same operations in the same order as torch's kernel.
    """
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
