"""SINGD's factor step of many diagonal layers as one stacked computation (SPEC §1.3).

With ``K = diag(k)`` and ``C = diag(c)`` every quantity of a factor step is a
vector and every operation of :func:`~singd.optim.updates.singd_update_factors`
is elementwise, so the layers of one param group whose factors share sizes,
dtypes (float32 or float64: :data:`BATCHED_DTYPES`) and device are stacked
into ``L × d`` tensors and stepped together: a fixed number of operators per
batch, not per layer (issue 9's launch track).  The per-layer numbers of the
step (the traces, the ``GradScaler`` correction, ``β1/max(1, ‖m‖_∞)``)
become ``L × 1`` columns.

Every entry sees the operations of the per-layer step in the same order and
dtype, so the results are the same bits (``tests/optim/test_batched.py``):
``x.mul(s)`` with a Python number ``s`` computes ``fl(x·fl(s))``, which a
column in ``x``'s dtype reproduces, and ``x.add_(y, alpha=s)`` rounds as
``addcmul`` with that column does.  A batch's results are views of its
stacked tensors (``unbind``): finiteness checks reduce them per base
(:func:`singd.optim.finiteness.finite_flags`).  The directions of diagonal
layers are batched too (:func:`diagonal_directions`, any dtype: products
only).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from singd.optim.updates import Traces, self_inner_scale
from singd.structures.base import StructuredMatrix
from singd.structures.diagonal import Diagonal

#: The factor dtypes whose layers are batched.  bfloat16/float16 factors keep the per-layer
#: step: the CPU's half-precision ``add(…, alpha=s)`` rounds the last entries of a tensor
#: (its vector loop's remainder) differently from the others, so a stacked operator would
#: not reproduce the per-layer bits (measured: 3 of 3000 entries of a row differ by one ulp).
BATCHED_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class DiagonalBatch:
    """The stacked factors and statistics of ``L`` diagonal layers (rows in ``names`` order).

    Attributes:
        names: the layers.
        k, c: ``K``'s and ``C``'s diagonals (``L × d_i``, ``L × d_o``).
        m_K, m_C: the momenta's diagonals.
        h_K, h_C: the statistics ``Π̂(KᵀUK)``, ``Π̂(CᵀGcC)`` (diagonals).
        inner_K, inner_C: ``p²Π̂(KᵀK) = (pk)²`` and ``(pc)²`` (:func:`self_inner_scale`).
        scale: ``p²``.
    """

    names: tuple[str, ...]
    k: Tensor
    c: Tensor
    m_K: Tensor
    m_C: Tensor
    h_K: Tensor
    h_C: Tensor
    inner_K: Tensor
    inner_C: Tensor
    scale: float

    def traces(self) -> list[list[Tensor]]:
        """Per layer the 0-dim tensors of :class:`Traces` (its field order), 4 operators in all
        (rows longer than :data:`STACKED_SUM_MAX`: one sum per row)."""
        sums = [_row_sums(t) for t in (self.h_K, self.h_C, self.inner_K, self.inner_C)]
        return [list(row) for row in zip(*(s.unbind() for s in sums), strict=True)]


#: Rows of at most this many entries are summed by one stacked reduction, longer ones one
#: by one: torch splits a 1-D sum of more than ``at::internal::GRAIN_SIZE`` = 32768 entries
#: across threads, and a stacked row sum then rounds differently (measured at 50000).
STACKED_SUM_MAX = 32768


def _row_sums(rows: Tensor) -> Tensor:
    """``Σ_j rows[l, j]`` per row ``l``, bitwise each row's own ``sum()``."""
    if rows.shape[1] <= STACKED_SUM_MAX:
        return rows.sum(dim=1)
    return torch.stack([row.sum() for row in rows])


@dataclass(frozen=True)
class Row:
    """Layer ``index`` of ``batch``: what a batched layer's ``FactorStepInputs`` holds."""

    batch: DiagonalBatch
    index: int


@dataclass(frozen=True)
class NewFactors:
    """A batch's stepped factors and momenta (stacked ``L × d``)."""

    k: Tensor
    c: Tensor
    m_K: Tensor
    m_C: Tensor


def batch_key(
    state: dict[str, StructuredMatrix], summaries: tuple[object, object], group_index: int
) -> Hashable | None:
    """Layers with equal keys are stepped as one batch; ``None``: this layer is not batched.

    Batched: ``K``, ``C``, both momenta and both statistics diagonal, of one of
    :data:`BATCHED_DTYPES` per side, with no compensation or master copy (the
    guards act on half-precision factors only).  The key holds the group (so
    the hyper-parameters agree), sizes, dtypes and devices.
    """
    K, C, m_K, m_C = (state[key] for key in ("K", "C", "m_K", "m_C"))
    H_K, H_C = summaries
    if not all(type(m) is Diagonal for m in (K, C, m_K, m_C, H_K, H_C)) or 0 in (K.dim, C.dim):
        return None
    for factor, others in ((K, (m_K, H_K)), (C, (m_C, H_C))):
        if factor.dtype not in BATCHED_DTYPES:
            return None
        if any(m.dtype != factor.dtype or m.device != factor.device for m in others):
            return None
    return (group_index, K.dim, C.dim, K.dtype, C.dtype, K.device, C.device)


def stack(
    names: Sequence[str],
    states: Sequence[dict[str, StructuredMatrix]],
    summaries: Sequence[tuple[Diagonal, Diagonal]],
    damping: float,
) -> DiagonalBatch:
    """The :class:`DiagonalBatch` of layers ``names`` (one ``stack`` per quantity).

    ``inner_K = (pk)²`` as :func:`~singd.optim.updates.singd_self_inners`
    forms it: ``k ⊙ k`` when ``p = 1``, else ``(k·p) ⊙ (k·p)``.
    """

    def stacked(values: Sequence[StructuredMatrix]) -> Tensor:
        return torch.stack([value.storage["diag"] for value in values])

    k = stacked([s["K"] for s in states])
    c = stacked([s["C"] for s in states])
    p = self_inner_scale(damping)
    scaled_k, scaled_c = (k, c) if p == 1.0 else (k.mul(p), c.mul(p))
    return DiagonalBatch(
        names=tuple(names),
        k=k,
        c=c,
        m_K=stacked([s["m_K"] for s in states]),
        m_C=stacked([s["m_C"] for s in states]),
        h_K=stacked([h[0] for h in summaries]),
        h_C=stacked([h[1] for h in summaries]),
        inner_K=scaled_k * scaled_k,
        inner_C=scaled_c * scaled_c,
        scale=1.0 if p == 1.0 else p * p,
    )


def _columns(values: Sequence[Sequence[float]], like: Tensor) -> list[Tensor]:
    """``L × 1`` columns of per-layer numbers in ``like``'s dtype (one host-to-device copy).

    A Python number enters a float32/float64 operator rounded to its dtype, as here.
    """
    table = torch.tensor(values, dtype=like.dtype, device=like.device)
    return list(table.unsqueeze(-1).unbind())


def momenta(
    batch: DiagonalBatch,
    traces: Sequence[Traces],
    corrections: Sequence[float],
    *,
    damping: float,
    alpha1: float,
    kfac_like: bool,
    normalize_lr_cov: bool,
) -> tuple[Tensor, Tensor]:
    """The new ``m_K``, ``m_C`` (stacked): :func:`~singd.optim.updates.singd_factor_momenta`.

    Default mode, row ``l`` with its traces and correction ``r``::

        m_K ← α1 m_K + coef/d_o · (r tr(H_C) h_K + (λ p² tr(CᵀC)/p²)/p² · (pk)² − d_o)
        m_C ← α1 m_C + coef/d_i · (r tr(H_K) h_C + (λ p² tr(KᵀK)/p²)/p² · (pc)² − d_i)

    IKFAC: ``m_K = coef·(h_K + λ/p² (pk)² − 1)``, ``m_C = coef·(r h_C + λ/p² (pc)² − 1)``.
    """
    d_i, d_o, scale = batch.k.shape[1], batch.c.shape[1], batch.scale
    coef = 0.5 * (1.0 - alpha1) if normalize_lr_cov else 0.5
    if kfac_like:
        weight = damping / scale
        bracket_K = batch.h_K.add(batch.inner_K, alpha=weight).add_(-1.0)
        (correction,) = _columns([corrections], batch.h_C)
        bracket_C = batch.h_C.mul(correction).add_(batch.inner_C, alpha=weight)
        bracket_C.add_(-1.0)
        return bracket_K.mul_(coef), bracket_C.mul_(coef)
    trace_H_C = [t.H_C * r for t, r in zip(traces, corrections, strict=True)]
    trace_H_K = [t.H_K * r for t, r in zip(traces, corrections, strict=True)]
    c_sq = [damping * t.C_sq / scale / scale for t in traces]
    kappa_sq = [damping * t.K_sq / scale / scale for t in traces]
    weight_h_K, weight_inner_K = _columns([trace_H_C, c_sq], batch.h_K)
    weight_h_C, weight_inner_C = _columns([trace_H_K, kappa_sq], batch.h_C)
    bracket_K = batch.h_K.mul(weight_h_K).addcmul_(batch.inner_K, weight_inner_K)
    bracket_K.add_(-float(d_o))
    bracket_C = batch.h_C.mul(weight_h_C).addcmul_(batch.inner_C, weight_inner_C)
    bracket_C.add_(-float(d_i))
    new_m_K = bracket_K.mul_(coef / d_o).add_(batch.m_K, alpha=alpha1)
    new_m_C = bracket_C.mul_(coef / d_i).add_(batch.m_C, alpha=alpha1)
    return new_m_K, new_m_C


def factor_step(factor: Tensor, momentum: Tensor, lr: float | Tensor) -> Tensor:
    """``K ← K − β1·K m`` (:func:`~singd.optim.updates.singd_factor_step`), stacked.

    ``lr``: ``β1``, or a column of per-row ``−β1/max(1, ‖m‖_∞)`` (``normalize_lr_cov``).
    """
    product = factor * momentum
    if isinstance(lr, Tensor):
        return torch.addcmul(factor, product, lr)
    return factor.add(product, alpha=-lr)


def normalised_lr_columns(lr_cov: float, new_m_K: Tensor, new_m_C: Tensor) -> tuple[Tensor, Tensor]:
    """Columns of ``−β1 / max(1, ‖m‖_∞)`` per row (``normalize_lr_cov``; one host sync).

    The same numbers as :func:`~singd.optim.updates.normalized_lr_cov`, which reads
    ``‖m‖_∞`` per layer and factor.
    """
    maxima = torch.cat([new_m_K.abs().amax(dim=1), new_m_C.abs().amax(dim=1)]).tolist()
    rows = new_m_K.shape[0]
    lrs = [-(lr_cov / max(1.0, value)) for value in maxima]
    column_K = _columns([lrs[:rows]], new_m_K)[0]
    column_C = _columns([lrs[rows:]], new_m_C)[0]
    return column_K, column_C


def step(
    batch: DiagonalBatch,
    traces: Sequence[Traces],
    corrections: Sequence[float],
    *,
    lr_cov: float,
    damping: float,
    alpha1: float,
    kfac_like: bool,
    normalize_lr_cov: bool,
) -> NewFactors:
    """One covariance step of the batch (:func:`~singd.optim.updates.singd_update_factors`)."""
    new_m_K, new_m_C = momenta(
        batch,
        traces,
        corrections,
        damping=damping,
        alpha1=alpha1,
        kfac_like=kfac_like,
        normalize_lr_cov=normalize_lr_cov,
    )
    lr_K: float | Tensor = lr_cov
    lr_C: float | Tensor = lr_cov
    if normalize_lr_cov:
        lr_K, lr_C = normalised_lr_columns(lr_cov, new_m_K, new_m_C)
    k = factor_step(batch.k, new_m_K, lr_K)
    c = factor_step(batch.c, new_m_C, lr_C)
    return NewFactors(k, c, new_m_K, new_m_C)


def diagonal_directions(
    ks: Sequence[Tensor],
    cs: Sequence[Tensor],
    weight_grads: Sequence[Tensor],
    bias_grads: Sequence[Tensor] | None,
) -> list[tuple[Tensor, Tensor | None]]:
    """:func:`~singd.optim.updates.singd_precondition` of diagonal layers, the same bits.

    ``ĝ = diag(c²) ∇W~ diag(k²)`` splits into ``ĝ_W = c² ⊙ ∇W ⊙ k²[:d_i]``
    (rows, then columns) and ``ĝ_b = c² ⊙ ∇b · k²[d_i]``, so ``[∇W, ∇b]`` is
    never concatenated nor ``ĝ`` split and copied.  Every entry sees the
    operations of ``singd_precondition`` with :class:`Diagonal` factors in the
    same order and dtypes (``fl(c ⊙ c)``, the row scaling in ``C``'s dtype, the
    cast to ``K``'s, ``fl(k ⊙ k)``, the column scaling, the cast back), so the
    result is the same bits (``tests/optim/test_diagonal_fast_path.py``).

    The layers share sizes and dtypes: ``ks`` (``d_i~`` each), ``cs`` (``d_o``),
    ``weight_grads`` (``d_o × …``, conv weights flattened from dim 1),
    ``bias_grads`` (``d_o``; ``None``: no bias).  ``c²``, ``k²`` are formed
    stacked; the products are ``_foreach_mul`` over the layers.
    """
    c_sq, k_sq = (torch.stack(list(cs)), torch.stack(list(ks)))
    c_sq, k_sq = c_sq * c_sq, k_sq * k_sq
    c_dtype, k_dtype = c_sq.dtype, k_sq.dtype
    matrices = [g.reshape(g.shape[0], -1) for g in weight_grads]
    columns = matrices[0].shape[1]
    left = torch._foreach_mul([g.to(c_dtype) for g in matrices], list(c_sq[:, :, None].unbind()))
    right = [x.to(k_dtype) for x in left]  # ``left`` itself where the dtypes agree
    if right[0] is left[0]:  # a product of fresh tensors: scaled in place, no second allocation
        torch._foreach_mul_(right, list(k_sq[:, :columns].unbind()))
    else:
        right = torch._foreach_mul(right, list(k_sq[:, :columns].unbind()))
    weight_dirs = [d.to(g.dtype).reshape(g.shape) for d, g in zip(right, weight_grads, strict=True)]
    if bias_grads is None:
        return [(w, None) for w in weight_dirs]
    left_b = torch._foreach_mul([b.to(c_dtype) for b in bias_grads], list(c_sq.unbind()))
    bias_dirs = torch._foreach_mul([x.to(k_dtype) for x in left_b], list(k_sq[:, -1].unbind()))
    return [(w, d.to(b.dtype)) for w, d, b in zip(weight_dirs, bias_dirs, bias_grads, strict=True)]
