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

from singd.optim.finiteness import extremes

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
        channel groups of a patch are averaged into one.  Stored feature-major
        (a view of a ``[features, B, L]`` tensor): gathered so, the copy out of
        the windows moves runs of output locations, where a location-major
        gather moves runs of one kernel row (measured: 0.8 against 5 ms for a
        ``[64, 32, 16, 16]`` input, 3 × 3 kernel, 2 threads).
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
    # [B, C, *O, *k] → [C, *k, B, *O]
    batch, channels = x.shape[:2]
    locations = math.prod(x.shape[2 : 2 + rank])  # explicit: ``-1`` is ambiguous for B = 0
    order = [1, *range(2 + rank, 2 + 2 * rank), 0, *range(2, 2 + rank)]
    features = channels // groups * math.prod(kernel_size)
    patches = x.permute(order).reshape(groups, features, batch, locations)
    by_feature = patches[0] if groups == 1 else patches.mean(dim=0)
    return by_feature.permute(1, 2, 0)


def conv_grad_shared_format(grad_output: Tensor, rank: int) -> Tensor:
    """A Conv output gradient ``[B, C_out, *O]`` (or unbatched) → ``[B, L, C_out]``."""
    if grad_output.ndim == rank + 1:
        grad_output = grad_output.unsqueeze(0)
    return grad_output.flatten(start_dim=2).transpose(1, 2)


# ------------------------------------------------------------ rows and scaling
def _rows_out(like: Tensor, rows: int, columns: int) -> Tensor:
    """An empty ``rows × columns`` matrix, laid out as ``like``'s last dim is.

    Row-major when ``like``'s features are its fastest dim, else column-major
    (a transposed ``columns × rows`` buffer): an elementwise result written
    into it from ``like`` (``[B, S, d]`` or ``n × d``) then reads and writes
    both in memory order, where a row-major target for a channel-major
    ``like`` (a Conv's patches or output gradient) is a transposing copy,
    several times slower.
    """
    if like.stride(-1) == 1:
        return like.new_empty(rows, columns)
    return like.new_empty(columns, rows).T


def _as_shared(out: Tensor, shared: Tensor) -> Tensor:
    """The ``[B, S, d]`` view of ``out`` (``B·S × d``, from :func:`_rows_out`, or its
    first columns) through which ``shared`` is written into it."""
    if out.stride(-1) == 1:
        return out.view(shared.shape)
    by_feature = out.T.view(shared.shape[-1], *shared.shape[:-1])
    return by_feature.permute(*range(1, shared.dim()), 0)


def _input_rows(shared: Tensor, approx: Approx) -> tuple[Tensor, int]:
    """The inputs ``A``'s rows come from and ``n_A``: ``shared`` (``[B, S, d_i]``,
    expand: every position a row) or its means over positions (reduce)."""
    source = shared if approx == "expand" else shared.mean(dim=1)
    return source, math.prod(source.shape[:-1])


def input_matrix(shared: Tensor, *, approx: Approx, bias: bool) -> Tensor:
    """``A`` (n_A × d_i~) from inputs in ``[B, S, d_i]`` (SPEC §1.1).

    Expand flattens shared positions into rows, reduce averages over them; a
    bias appends a column of ones; finally ``A ← A / sqrt(n_A)``.  One pass
    writes ``A``: ``rows / sqrt(n_A)`` goes straight into its columns
    (``torch.div(..., out=)``, the bits of ``cat`` then divide), in the layout
    of ``shared``'s features (:func:`_rows_out`).
    """
    source, count = _input_rows(shared, approx)
    features = source.shape[-1]
    out = _rows_out(source, count, features + int(bias))
    target = out[:, :features]
    if approx == "expand":
        target = _as_shared(target, shared)
    torch.div(source, math.sqrt(count), out=target)
    if bias:
        out[:, features].fill_(1).div_(math.sqrt(count))
    return out


def input_gram_diagonal(shared: Tensor, *, approx: Approx, bias: bool) -> Tensor:
    """``diag(AᵀA)`` (d_i~) of :func:`input_matrix`'s ``A``, without forming ``A``.

    ``Σ_rows x²`` per feature, over ``n_A`` rows (expand: every position;
    reduce: the means over positions), divided by ``n_A``; the bias column's
    entry is ``n_A · (1/sqrt(n_A))² = 1``, exact here.  Two passes over the
    input (square, sum) where forming ``A`` and squaring it take four; the
    sum is the same length, rounded as ``fl(Σ fl(x²)) / n_A`` instead of
    ``Σ fl(fl(x/sqrt(n_A))²)`` (both within the oracle's bound for a sum of
    ``n_A`` terms).  No rows (``n_A = 0``): zeros, as ``AᵀA`` of an empty ``A``.
    """
    source, count = _input_rows(shared, approx)
    features = source.shape[-1]
    if count == 0:
        return source.new_zeros(features + int(bias))
    sums = torch.sum(source.square(), dim=tuple(range(source.dim() - 1))).div_(count)
    return torch.nn.functional.pad(sums, (0, 1), value=1.0) if bias else sums


def loss_terms(batch: int, shared: int, loss_average: LossAverage) -> int:
    """``N``, the number of terms the loss is averaged over (SPEC §1.1, scaling)."""
    if loss_average == "batch":
        return batch
    if loss_average == "batch+sequence":
        return batch * shared
    return 1


def grad_matrix(
    shared: Tensor,
    *,
    approx: Approx,
    loss_average: LossAverage,
    scale: Tensor | float | None = None,
) -> Tensor:
    """``G`` (n_G × d_o) from output gradients in ``[B, S, d_o]`` (SPEC §1.1).

    Expand flattens shared positions into rows, reduce sums over them; then
    ``G ← G · sqrt(N)`` undoes the loss average (times ``scale``, a power of
    two as a 0-dim tensor or a Python float, if given: for expand one product
    ``fl(x · (2^j · sqrt(N)))``, the bits of ``fl(fl(x · 2^j) · sqrt(N))`` but
    for subnormals; for reduce ``x · 2^j`` before the sum).  The result is
    always a new tensor (never a view of ``shared``), so callers may scale it
    in place; it is written in one pass, in the layout of ``shared``'s
    features (:func:`_rows_out`).
    """
    batch, positions, features = shared.shape
    factor = math.sqrt(loss_terms(batch, positions, loss_average))
    if approx == "reduce":  # a scale is applied before the sum, which it keeps from overflowing
        scaled = shared if scale is None else shared * scale
        return scaled.sum(dim=1) * factor
    multiplier = factor if scale is None else scale * factor
    out = _rows_out(shared, batch * positions, features)
    torch.mul(shared, multiplier, out=_as_shared(out, shared))
    return out


# --------------------------------------------------- scale-free gradient statistics
def _binary_exponent(value: Tensor) -> Tensor:
    """``e`` (0-dim int32) with ``value < 2^e`` for a finite ``value > 0`` (``0`` for 0/inf/NaN)."""
    return torch.frexp(value).exponent


def _power_of_two(exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^exponent`` as a 0-dim tensor of ``dtype`` (exact: an integer power of two)."""
    return torch.ldexp(torch.ones((), dtype=dtype, device=exponent.device), exponent)


def _two_to(exponent: int | Tensor, dtype: torch.dtype) -> float | Tensor:
    """``2^exponent``: a Python float for a host exponent, else :func:`_power_of_two`."""
    if isinstance(exponent, int):
        return math.ldexp(1.0, exponent)
    return _power_of_two(exponent, dtype)


def _on_device(exponent: int | Tensor, device: torch.device) -> Tensor:
    """An exponent as the 0-dim int32 tensor on ``device`` that the hooks hand on."""
    if isinstance(exponent, int):
        return torch.tensor(exponent, dtype=torch.int32, device=device)
    return exponent


def _measuring_pass(
    g: Tensor,
    *,
    approx: Approx,
    loss_average: LossAverage,
    on_host: bool | None = None,
    squares_in_place: bool = False,
) -> tuple[Tensor, int | Tensor, int | Tensor, Tensor]:
    """``(G_j, j, k, s)`` for ``g`` (``[B, S, d_o]``, float32 or wider).

    ``s`` is the measured ``diag(G_jᵀ G_j)``, the squared column norms (d_o).
    ``squares_in_place``: ``G_j`` is squared in its own storage (the returned
    ``G_j`` then holds the squares; for a caller that needs only ``s``).

    ``k`` is the exponent with which ``G`` of ``2^k · g`` is well scaled (SPEC
    §1.5 as this project implements it, docs/SPEC.md, deviation): with ``G`` the
    matrix of :func:`grad_matrix`, the largest diagonal entry of
    ``(2^k G)ᵀ(2^k G)`` — the largest squared column norm — lies in ``[1/4, 1)``,
    so by Cauchy–Schwarz every entry of the Gram product is below 1 whatever
    scale (loss scale, learning-rate regime) the gradients carry.  ``k`` is
    clamped so that ``2^k`` is a normal number of ``g``'s dtype; only gradients
    within a factor ``2^126`` of the dtype's range are then left partly
    unnormalised.  Garbage (but finite) if ``g`` has inf/NaN entries: those stay
    non-finite in ``G``.

    Found in two stages: first ``max|g|`` is brought below 1 (``2^j``, ``j``
    from one ``aminmax``), then the squared column norms of ``G_j = 2^j G``
    (the ``G`` of ``2^j g``) are measured (no overflow: each is at most
    ``n·N``).  ``j`` is clamped so that ``2^j`` and ``2^j·sqrt(N)`` are finite
    normal numbers (:func:`grad_matrix` forms ``G_j`` in one product with
    their product).  For an empty ``g``, ``j = k = 0`` and ``G_j`` is ``G``.

    ``on_host`` (``None``: on the CPU): the two measured extremes are read into
    Python and ``j``, ``k`` are Python ints, the scalar steps (``frexp``,
    clamps, powers of two) host arithmetic — on the CPU a read waits for
    nothing, and it saves about fifteen operator calls per layer.  Otherwise
    (a device) they stay 0-dim int32 tensors and no host sync happens.  Both
    give the same ``G_j`` bits and the same exponents (tested).
    """
    wide = g.dtype
    limit = math.frexp(torch.finfo(wide).max)[1] - 2  # 2^±limit are normal numbers of ``wide``
    if on_host is None:
        on_host = g.device.type == "cpu"
    zero: int | Tensor = 0 if on_host else torch.zeros((), dtype=torch.int32, device=g.device)
    if g.numel() == 0:
        G = grad_matrix(g, approx=approx, loss_average=loss_average)
        return G, zero, zero, _column_squares(G, squares_in_place)
    batch, positions, _ = g.shape
    headroom = math.ceil(math.log2(loss_terms(batch, positions, loss_average)) / 2) + 1
    low, high = extremes(g)  # max|g| without a |g| temporary or a copy
    if on_host:
        first = min(max(math.frexp(max(-float(low), float(high)))[1], headroom - limit), limit)
    else:
        first = _binary_exponent(torch.maximum(-low, high)).clamp(headroom - limit, limit)
    j = -first
    G = grad_matrix(g, approx=approx, loss_average=loss_average, scale=_two_to(j, wide))
    sums = _column_squares(G, squares_in_place)
    if G.numel() == 0:
        return G, zero, zero, sums
    if on_host:
        column_norms = math.frexp(float(sums.amax()))[1]  # sums.amax() < 2^column_norms
        k = min(max(j - (column_norms + 1) // 2, -limit), limit)
    else:
        column_norms = _binary_exponent(sums.amax())
        second = torch.div(column_norms + 1, 2, rounding_mode="floor")  # ceil(column_norms / 2)
        k = (j - second).clamp(-limit, limit).to(torch.int32)
    return G, j, k, sums


def _column_squares(G: Tensor, in_place: bool) -> Tensor:
    """``diag(Gᵀ G)``: each column's sum of squares (squared in ``G`` itself if ``in_place``)."""
    return (G.square_() if in_place else G.square()).sum(dim=0)


def normalised_grad_matrix(
    grad_output: Tensor,
    *,
    approx: Approx,
    loss_average: LossAverage,
    dtype: torch.dtype,
    on_host: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """``2^k G`` in ``dtype`` and ``2k``, the log2 of the factor its Gram product carries.

    ``k`` from :func:`_measuring_pass` (SPEC §1.5, docs/SPEC.md
    deviation).  The gradient is scaled in its wide dtype *before* the cast to
    ``dtype`` and :func:`grad_matrix` (so neither can overflow); since
    ``2^k`` is a power of two, ``2^k G`` has exactly the bits of ``G`` formed
    the usual way, times ``2^k``, unless ``G`` overflowed or had subnormal
    entries in ``dtype`` (where the normalised one is the more accurate).
    Where ``dtype`` is the wide dtype, ``2^k G`` is the measuring pass's
    ``2^j G`` times ``2^(k − j)`` in place (the same bits, but for entries
    below ``2^−126`` of the largest: a pass over ``g`` and one write fewer).

    Args:
        grad_output: a layer's output gradient in ``[B, S, d_o]`` (its kind's format).
        on_host: where the exponents are worked out (:func:`_measuring_pass`).

    Returns:
        ``(G, log2_factor)`` with ``G`` (n_G × d_o) in ``dtype`` and
        ``log2_factor = 2k`` a 0-dim int32 tensor on ``G``'s device.
    """
    wide = torch.promote_types(grad_output.dtype, torch.float32)
    g = grad_output.detach().to(wide)  # one copy (none for float32 gradients)
    measured, j, k, _ = _measuring_pass(
        g, approx=approx, loss_average=loss_average, on_host=on_host
    )
    if dtype == wide:
        return measured.mul_(_two_to(k - j, wide)), _on_device(2 * k, g.device)
    scaled = g * _two_to(k, wide)
    G = grad_matrix(scaled.to(dtype), approx=approx, loss_average=loss_average)
    return G, _on_device(2 * k, g.device)


def normalised_grad_gram_diagonal(
    grad_output: Tensor,
    *,
    approx: Approx,
    loss_average: LossAverage,
    on_host: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """``diag((2^k G)ᵀ(2^k G))`` (d_o) in the gradient's wide dtype, and ``2k``.

    All a diagonal ``C`` needs of ``G`` (its ``Π̂(Cᵀ GᵀG C)`` is ``c² ⊙`` this):
    the measuring pass's squared column norms of ``G_j`` times ``2^(2(k − j))``,
    so ``2^k G`` is neither formed nor squared again.  The same bits as
    ``(G ⊙ G)`` summed over rows for ``G`` of :func:`normalised_grad_matrix`
    (the same reduction over the same layout; a power of two moves through the
    squares and the sum exactly), but for entries and partial sums below the
    dtype's smallest normal number.
    """
    wide = torch.promote_types(grad_output.dtype, torch.float32)
    g = grad_output.detach().to(wide)
    _, j, k, sums = _measuring_pass(
        g, approx=approx, loss_average=loss_average, on_host=on_host, squares_in_place=True
    )
    return sums.mul_(_two_to(2 * (k - j), wide)), _on_device(2 * k, g.device)
