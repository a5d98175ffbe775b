"""Curvature statistics ``A`` and ``G`` of one pass through a layer (SPEC §1.1).

Every layer kind (:mod:`singd.optim.kinds`) first brings its tensors into one
canonical *weight-sharing format* ``[batch, shared, features]`` with the
conversions here:

* a Linear input/output ``[B, ..., d]`` → ``[B, S, d]`` with ``S`` the
  product of the extra dims (``S = 1`` without weight sharing);
* a Conv1d/2d/3d input → patches ``[B, L, (C_in/groups)·Π k]`` (channel
  groups averaged into one group), output gradient ``[B, C_out, *O]`` →
  ``[B, L, C_out]`` with ``L = Π O`` the output locations.

From there one pair of functions covers both approximations:

* KFAC-expand: shared positions become rows (``n = B·S``);
* KFAC-reduce: inputs averaged, gradients summed over them (``n = B``);

and the loss-reduction scaling ``A ← A / sqrt(n_A)``, ``G ← G · sqrt(N)``.
All functions are pure; they never see the optimizer.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Approx = Literal["expand", "reduce"]
LossAverage = Literal["batch", "batch+sequence"] | None


# ---------------------------------------------------------------- canonical format
def linear_shared_format(tensor: Tensor) -> Tensor:
    """A Linear layer's input or output gradient in ``[batch, shared, features]``.

    Args:
        tensor: ``[d]``, ``[B, d]`` or ``[B, ..., d]``.

    Returns:
        ``[B, S, d]`` with ``S`` the product of the dims between batch and features.
    """
    if tensor.ndim == 1:
        return tensor.reshape(1, 1, -1)
    # explicit S: ``-1`` is ambiguous for an empty batch
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:-1]), tensor.shape[-1])


def conv_explicit_padding(
    kernel_size: tuple[int, ...], dilation: tuple[int, ...], padding: str | tuple[int, ...]
) -> list[tuple[int, int]]:
    """Padding ``(before, after)`` per spatial dim that ``nn.Conv{1,2,3}d`` applies.

    ``'same'`` pads ``dilation·(k − 1)`` in total per spatial dim with the odd
    element after, as torch does; ``'valid'`` pads nothing.
    """
    if padding == "valid":
        return [(0, 0)] * len(kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True)]
        return [(total // 2, total - total // 2) for total in totals]
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
    return [(pad, pad) for pad in padding]


def conv_input_shared_format(
    x: Tensor,
    *,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: str | tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    padding_mode: str = "zeros",
) -> Tensor:
    """A Conv1d/2d/3d input as patches (SPEC-layers, Conv), one code for every rank ``r``.

    The input is padded as the module pads it (``padding_mode``), then each
    spatial dim is windowed with ``Tensor.unfold`` (window ``d(k − 1) + 1``,
    step ``s``) and every ``d``-th entry of a window kept.

    Args:
        x: ``[B, C_in, *spatial]`` or unbatched ``[C_in, *spatial]`` (``r`` spatial dims).

    Returns:
        ``[B, L, (C_in/groups)·Π k]``, ``L`` output locations (row-major), columns
        in the flattened weight's ``(c, k_1, …, k_r)`` order; the ``groups``
        channel groups of a patch are averaged into one.
    """
    rank = len(kernel_size)
    if x.ndim == rank + 1:
        x = x.unsqueeze(0)
    pads = conv_explicit_padding(kernel_size, dilation, padding)
    if any(before or after for before, after in pads):
        flat = [side for pair in reversed(pads) for side in pair]  # F.pad: last dim first
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = F.pad(x, flat, mode=mode)
    for dim, (k, s, d) in enumerate(zip(kernel_size, stride, dilation, strict=True)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)[..., ::d]
    # [B, C, *O, *k] → [B, *O, C, *k]
    batch, channels = x.shape[:2]
    locations = math.prod(x.shape[2 : 2 + rank])  # explicit: ``-1`` is ambiguous for B = 0
    order = [0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank)]
    features = channels // groups * math.prod(kernel_size)
    return x.permute(order).reshape(batch, locations, groups, features).mean(dim=2)


def conv_grad_shared_format(grad_output: Tensor, rank: int) -> Tensor:
    """A Conv output gradient ``[B, C_out, *O]`` (or unbatched) → ``[B, L, C_out]``."""
    if grad_output.ndim == rank + 1:
        grad_output = grad_output.unsqueeze(0)
    return grad_output.flatten(start_dim=2).transpose(1, 2)


# ------------------------------------------------------------ rows and scaling
def input_matrix(shared: Tensor, *, approx: Approx, bias: bool) -> Tensor:
    """``A`` (n_A × d_i~) from inputs in ``[B, S, d_i]`` (SPEC §1.1).

    Expand flattens shared positions into rows, reduce averages over them; a
    bias appends a column of ones; finally ``A ← A / sqrt(n_A)``.
    """
    if approx == "expand":
        rows = shared.reshape(-1, shared.shape[-1])
    else:
        rows = shared.mean(dim=1)
    if bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows / math.sqrt(rows.shape[0])


def loss_terms(batch: int, shared: int, loss_average: LossAverage) -> int:
    """``N``, the number of terms the loss is averaged over (SPEC §1.1, scaling)."""
    if loss_average == "batch":
        return batch
    if loss_average == "batch+sequence":
        return batch * shared
    return 1


def grad_matrix(shared: Tensor, *, approx: Approx, loss_average: LossAverage) -> Tensor:
    """``G`` (n_G × d_o) from output gradients in ``[B, S, d_o]`` (SPEC §1.1).

    Expand flattens shared positions into rows, reduce sums over them; then
    ``G ← G · sqrt(N)`` undoes the loss average.  The result is always a new
    tensor (never a view of ``shared``), so callers may scale it in place.
    """
    batch, positions, _ = shared.shape
    rows = shared.reshape(-1, shared.shape[-1]) if approx == "expand" else shared.sum(dim=1)
    return rows * math.sqrt(loss_terms(batch, positions, loss_average))


# --------------------------------------------------- scale-free gradient statistics
def _binary_exponent(value: Tensor) -> Tensor:
    """``e`` (0-dim int32) with ``value < 2^e`` for a finite ``value > 0`` (``0`` for 0/inf/NaN)."""
    return torch.frexp(value).exponent


def _power_of_two(exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^exponent`` as a 0-dim tensor of ``dtype`` (exact: an integer power of two)."""
    return torch.ldexp(torch.ones((), dtype=dtype, device=exponent.device), exponent)


def gram_normaliser_exponent(
    grad_output: Tensor, *, approx: Approx, loss_average: LossAverage
) -> Tensor:
    """``k`` (0-dim int32 tensor) such that ``G`` of ``2^k · grad_output`` is well scaled.

    SPEC §1.5 as this project implements it (docs/SPEC.md, deviation): with
    ``G`` the matrix of :func:`grad_matrix`, the largest diagonal entry of
    ``(2^k G)ᵀ(2^k G)`` — the largest squared column norm — lies in ``[1/4, 1)``,
    so by Cauchy–Schwarz every entry of the Gram product is below 1 whatever
    scale (loss scale, learning-rate regime) the gradients carry.  Found in two
    stages in ``float32`` (or the gradient's dtype if wider), without a host
    sync: first ``max|g|`` is brought below 1, then the squared column norms of
    that ``G`` are measured (no overflow: each is at most ``n·N·S²``).  ``k``
    is clamped so that ``2^k`` is a normal number of that dtype; only
    gradients within a factor ``2^126`` of the dtype's range are then left
    partly unnormalised.

    Args:
        grad_output: a layer's output gradient in ``[B, S, d_o]`` (any float dtype).

    Returns:
        ``k``; ``0`` for an empty gradient.  Garbage (but finite) if
        ``grad_output`` has inf/NaN entries: those stay non-finite in ``G``.
    """
    wide = torch.promote_types(grad_output.dtype, torch.float32)
    limit = math.frexp(torch.finfo(wide).max)[1] - 2  # 2^±limit are normal numbers of ``wide``
    zero = torch.zeros((), dtype=torch.int32, device=grad_output.device)
    if grad_output.numel() == 0:
        return zero
    g = grad_output.detach().to(wide)
    low, high = torch.aminmax(g)  # max|g| in one pass, no |g| temporary
    first = _binary_exponent(torch.maximum(-low, high)).clamp(-limit, limit)
    G = grad_matrix(g * _power_of_two(-first, wide), approx=approx, loss_average=loss_average)
    if G.numel() == 0:
        return zero
    column_norms = _binary_exponent(G.square().sum(dim=0).amax())  # < 2^column_norms
    second = torch.div(column_norms + 1, 2, rounding_mode="floor")  # ceil(column_norms / 2)
    return (-first - second).clamp(-limit, limit).to(torch.int32)


def normalised_grad_matrix(
    grad_output: Tensor,
    *,
    approx: Approx,
    loss_average: LossAverage,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``2^k G`` in ``dtype`` and ``2k``, the log2 of the factor its Gram product carries.

    ``k`` from :func:`gram_normaliser_exponent` (SPEC §1.5, docs/SPEC.md
    deviation).  The gradient is scaled in its wide dtype *before* the cast to
    ``dtype`` and :func:`grad_matrix` (so neither can overflow); since
    ``2^k`` is a power of two, ``2^k G`` has exactly the bits of ``G`` formed
    the usual way, times ``2^k``, unless ``G`` overflowed or had subnormal
    entries in ``dtype`` (where the normalised one is the more accurate).

    Args:
        grad_output: a layer's output gradient in ``[B, S, d_o]`` (its kind's format).

    Returns:
        ``(G, log2_factor)`` with ``G`` (n_G × d_o) in ``dtype`` and
        ``log2_factor = 2k`` a 0-dim int32 tensor on ``G``'s device.
    """
    wide = torch.promote_types(grad_output.dtype, torch.float32)
    g = grad_output.detach().to(wide)  # one copy (none for float32 gradients)
    k = gram_normaliser_exponent(g, approx=approx, loss_average=loss_average)
    scaled = g * _power_of_two(k, wide)
    G = grad_matrix(scaled.to(dtype), approx=approx, loss_average=loss_average)
    return G, 2 * k
