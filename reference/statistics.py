"""Curvature statistics ``A``, ``G`` and KFAC factors of one pass (SPEC §1.1).

Both layer types are brought to one *weight-sharing format* first: inputs
``a`` of shape ``[B, S, d_in]`` and output gradients ``g`` of shape
``[B, S, d_out]``, with ``S`` the number of positions that share the weight
(1 for a plain Linear layer; the product of the extra dims of a Linear layer
on ``[B, ..., d]``; the ``H_out · W_out`` output locations of a Conv2d).
Then

* KFAC-expand: rows ``a[b, s]``, ``g[b, s]`` (``n = B·S``);
* KFAC-reduce: rows ``mean_s a[b, s]``, ``sum_s g[b, s]`` (``n = B``);
* a bias appends a column of ones to ``A``;
* ``A ← A / sqrt(n_A)`` and ``G ← G · sqrt(N)``, with ``N`` the number of
  loss terms the loss is averaged over (``"batch"``: ``B``,
  ``"batch+sequence"``: ``B·S``, ``None``: sum loss, no factor).

Everything works on float64 arrays, on object arrays of ``mpmath.mpf`` and on
emulated bf16/fp16 arrays (``reference.numbers.EmulatedArray``: each sum,
division and product rounds once to the storage dtype); for mpmath call
inside ``Numbers.context()`` (``reference.numbers``), as the divisions and
square roots round to mpmath's working precision.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from mpmath import mp

from reference.numbers import same_system
from reference.patches import (
    extract_patches,
    extract_patches_nd,
    output_size,
    pair,
    resolve_padding,
)

#: The KFAC flavours of SPEC §1.1.
APPROXIMATIONS: tuple[str, ...] = ("expand", "reduce")
#: The loss reductions of SPEC §1.1 (``None`` is a sum loss).
LOSS_AVERAGES: tuple[str | None, ...] = ("batch", "batch+sequence", None)


def check_choices(approx: str, loss_average: str | None) -> None:
    """Validate the KFAC flavour and loss reduction (SPEC §1.1).

    Raises:
        ValueError: If ``approx`` or ``loss_average`` is not one of
            :data:`APPROXIMATIONS` / :data:`LOSS_AVERAGES`.
    """
    if approx not in APPROXIMATIONS:
        raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}")
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")


def loss_terms(batch_size: int, shared: int, loss_average: str | None) -> int:
    """``N``, the number of terms the loss is averaged over (SPEC §1.1 scaling).

    Args:
        batch_size: ``B``.
        shared: ``S``, shared positions per sample.
        loss_average: ``"batch"`` → ``B``; ``"batch+sequence"`` → ``B·S``;
            ``None`` → 1 (sum loss).
    """
    check_choices("expand", loss_average)
    if loss_average is None:
        return 1
    return batch_size * shared if loss_average == "batch+sequence" else batch_size


def _as_numbers(x: np.ndarray) -> np.ndarray:
    """``x`` as is if it holds ``mpf`` objects, else as float64 (an emulated array stays one)."""
    x = np.asanyarray(x)
    return x if x.dtype == object else x.astype(np.float64)


def _sqrt(n: int, like: np.ndarray) -> Any:
    """``sqrt(n)`` in the number type of ``like`` (mpmath at its working precision)."""
    return mp.sqrt(n) if like.dtype == object else math.sqrt(n)


def shared_format_statistics(
    a: np.ndarray,
    g: np.ndarray,
    *,
    bias: bool,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> tuple[np.ndarray, np.ndarray]:
    """``A``, ``G`` from inputs and output gradients in weight-sharing format (SPEC §1.1).

    Args:
        a: Layer inputs, shape ``[B, S, d_in]``.
        g: Gradients of the backpropagated loss w.r.t. the layer output,
            shape ``[B, S, d_out]`` (for a mean loss they carry its ``1/N``).
        bias: Whether to append a column of ones to ``A``.
        approx: ``"expand"`` or ``"reduce"``.
        loss_average: ``"batch"``, ``"batch+sequence"`` or ``None``.

    Returns:
        ``A`` (``n × (d_in + bias)``) scaled by ``1/sqrt(n)`` and ``G``
        (``n × d_out``) scaled by ``sqrt(N)``; ``n = B·S`` (expand) or ``B``
        (reduce).
    """
    check_choices(approx, loss_average)
    batch, shared, _ = a.shape
    if approx == "expand":
        rows_a = a.reshape(batch * shared, a.shape[2])
        rows_g = g.reshape(batch * shared, g.shape[2])
    else:
        rows_a = a.sum(axis=1) / shared
        rows_g = g.sum(axis=1)
    if bias:
        ones = np.ones((rows_a.shape[0], 1), dtype=rows_a.dtype)
        rows_a = np.concatenate([rows_a, ones], axis=1)
    n_a = rows_a.shape[0]
    scale_g = _sqrt(loss_terms(batch, shared, loss_average), rows_g)
    return rows_a / _sqrt(n_a, rows_a), rows_g * scale_g


def linear_statistics(
    a: np.ndarray,
    g: np.ndarray,
    *,
    bias: bool,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> tuple[np.ndarray, np.ndarray]:
    """``A``, ``G`` of a Linear layer, optionally with weight-sharing dims (SPEC §1.1).

    All dims between the batch dim and the feature dim are shared positions
    (``S`` = their product; no such dims: ``S = 1``, and expand == reduce).

    Args:
        a: Layer inputs, shape ``[B, ..., d_in]``.
        g: Gradients of the backpropagated loss w.r.t. the layer output,
            shape ``[B, ..., d_out]`` with the same ``B, ...``.
        bias: Whether the layer has a bias (append a ones column to ``A``).
        approx: ``"expand"`` (rows per position, ``n = B·S``) or
            ``"reduce"`` (``a`` averaged and ``g`` summed over positions,
            ``n = B``).
        loss_average: ``"batch"`` (``N = B``), ``"batch+sequence"``
            (``N = B·S``) or ``None`` (sum loss).

    Returns:
        ``(A, G)``: ``A`` of shape ``n × (d_in + bias)`` divided by
        ``sqrt(n)``; ``G`` of shape ``n × d_out`` multiplied by ``sqrt(N)``.

    Raises:
        ValueError: On fewer than 2 dims, mismatched batch/shared dims, or an
            unknown ``approx`` / ``loss_average``.
    """
    check_choices(approx, loss_average)
    a, g = _as_numbers(a), _as_numbers(g)
    if a.ndim < 2 or g.ndim < 2:
        raise ValueError(f"a and g need shape [B, ..., d], got {a.shape} and {g.shape}")
    if a.shape[:-1] != g.shape[:-1]:
        raise ValueError(f"batch/shared dims of a {a.shape[:-1]} and g {g.shape[:-1]} do not match")
    batch, shared = a.shape[0], math.prod(a.shape[1:-1])
    return shared_format_statistics(
        a.reshape(batch, shared, a.shape[-1]),
        g.reshape(batch, shared, g.shape[-1]),
        bias=bias,
        approx=approx,
        loss_average=loss_average,
    )


def conv2d_statistics(
    x: np.ndarray,
    g: np.ndarray,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    bias: bool,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> tuple[np.ndarray, np.ndarray]:
    """``A``, ``G`` of a Conv2d layer (SPEC §1.1): patches as rows, groups averaged.

    The patches of each channel group (:func:`reference.patches.extract_patches`,
    columns ``(c, k_h, k_w)`` with ``k_w`` fastest) are averaged over the
    groups into one ``(C_in/groups)·k_h·k_w`` row per output location; the
    ``S = H_out · W_out`` output locations are the shared positions.

    Args:
        x: Layer input, shape ``[B, C_in, H, W]``.
        g: Gradient of the backpropagated loss w.r.t. the layer output,
            shape ``[B, C_out, H_out, W_out]``.
        kernel_size: ``k`` or ``(k_h, k_w)``.
        stride: ``s`` or ``(s_h, s_w)``.
        padding: Int, pair, ``"same"`` or ``"valid"`` (``torch.nn.Conv2d``
            semantics, see :func:`reference.patches.resolve_padding`).
        dilation: ``d`` or ``(d_h, d_w)``.
        groups: Number of channel groups.
        bias: Whether the layer has a bias (append a ones column to ``A``).
        approx: ``"expand"`` (``n = B·H_out·W_out``) or ``"reduce"``
            (patches averaged, ``g`` summed over locations, ``n = B``).
        loss_average: ``"batch"`` (``N = B``), ``"batch+sequence"``
            (``N = B·H_out·W_out``) or ``None`` (sum loss).

    Returns:
        ``(A, G)``: ``A`` of shape ``n × ((C_in/groups)·k_h·k_w + bias)``
        divided by ``sqrt(n)``; ``G`` of shape ``n × C_out`` times ``sqrt(N)``.

    Raises:
        ValueError: If ``x``/``g`` are not 4-D, their batch sizes differ,
            ``C_in`` or ``C_out`` is not divisible by ``groups``, ``g``'s spatial
            size is not the convolution's output size, or ``approx`` /
            ``loss_average`` is unknown.
    """
    check_choices(approx, loss_average)
    x, g = _as_numbers(x), _as_numbers(g)
    if x.ndim != 4 or g.ndim != 4:
        raise ValueError(f"x and g need shapes [B, C, H, W], got {x.shape} and {g.shape}")
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"batch sizes of x ({x.shape[0]}) and g ({g.shape[0]}) do not match")
    c_in, c_out = x.shape[1], g.shape[1]
    if groups < 1 or c_in % groups:
        raise ValueError(f"C_in={c_in} is not divisible by groups={groups}")
    if c_out % groups:
        raise ValueError(f"C_out={c_out} is not divisible by groups={groups}")
    kernel = pair(kernel_size, "kernel_size")
    strides, dilations = pair(stride, "stride"), pair(dilation, "dilation")
    (top, bottom), (left, right) = resolve_padding(padding, kernel, strides, dilations)
    expected = (
        output_size(x.shape[2], kernel[0], strides[0], dilations[0], top, bottom),
        output_size(x.shape[3], kernel[1], strides[1], dilations[1], left, right),
    )
    if g.shape[2:] != expected:
        raise ValueError(
            f"g has spatial size {g.shape[2:]}, but the convolution's output size is {expected}"
        )
    # [B, L, C_in·kh·kw]; copies of x's entries and zeros, so exact in any number system
    patches = same_system(extract_patches(x, kernel, strides, padding, dilations), x)
    batch, locations, _ = patches.shape
    per_group = patches.reshape(batch, locations, groups, -1)  # columns ordered (group, c, kh, kw)
    a = per_group.sum(axis=2) / groups
    g_rows = g.reshape(batch, c_out, locations).transpose(0, 2, 1)
    return shared_format_statistics(a, g_rows, bias=bias, approx=approx, loss_average=loss_average)


def _nd_padding(
    padding: int | tuple[int, ...] | str, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` zero padding per dim with ``torch.nn.Conv{1,2,3}d``'s meaning.

    ``"same"``: a total of ``d(k − 1)`` per dim, ``total // 2`` before and the
    rest after; ``"valid"``: none; an int: that on both sides of every dim.
    """
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        return tuple((total // 2, total - total // 2) for total in totals)
    if isinstance(padding, str):
        raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
    pads = (padding,) * len(kernel) if isinstance(padding, int) else tuple(padding)
    if len(pads) != len(kernel) or min(pads) < 0:
        raise ValueError(f"padding must be {len(kernel)} non-negative ints, got {padding!r}")
    return tuple((pad, pad) for pad in pads)


def conv_statistics(
    x: np.ndarray,
    g: np.ndarray,
    *,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: int | tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int = 1,
    bias: bool,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> tuple[np.ndarray, np.ndarray]:
    """``A``, ``G`` of a Conv1d/2d/3d layer (SPEC-layers, Conv): patches as rows, groups averaged.

    As :func:`conv2d_statistics` for ``r`` spatial dims, with the patches of
    :func:`reference.patches.extract_patches_nd`.

    Args:
        x: Layer input, shape ``[B, C_in, *spatial]`` (``r`` spatial dims).
        g: Output gradient, shape ``[B, C_out, *O]``.
        kernel_size, stride, dilation: ``r`` ints each.
        padding: ``r`` ints, one int, ``"same"`` or ``"valid"``.
        groups, bias, approx, loss_average: as for :func:`conv2d_statistics`.

    Raises:
        ValueError: On mismatched ranks or batch sizes, channels not divisible
            by ``groups``, or ``g``'s spatial size not the output size.
    """
    check_choices(approx, loss_average)
    x, g = _as_numbers(x), _as_numbers(g)
    rank = len(kernel_size)
    if x.ndim != rank + 2 or g.ndim != rank + 2 or x.shape[0] != g.shape[0]:
        raise ValueError(f"x and g need shapes [B, C, *{rank} dims], got {x.shape}, {g.shape}")
    c_in, c_out = x.shape[1], g.shape[1]
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"C_in={c_in} and C_out={c_out} must be divisible by groups={groups}")
    pads = _nd_padding(padding, tuple(kernel_size), tuple(dilation))
    expected = tuple(
        output_size(n, k, s, d, before, after)
        for n, k, s, d, (before, after) in zip(
            x.shape[2:], kernel_size, stride, dilation, pads, strict=True
        )
    )
    if g.shape[2:] != expected:
        raise ValueError(f"g has spatial size {g.shape[2:]}, the output size is {expected}")
    patches = same_system(
        extract_patches_nd(x, tuple(kernel_size), tuple(stride), pads, tuple(dilation)), x
    )
    batch, locations, _ = patches.shape
    a = patches.reshape(batch, locations, groups, -1).sum(axis=2) / groups
    g_rows = g.reshape(batch, c_out, locations).transpose(0, 2, 1)
    return shared_format_statistics(a, g_rows, bias=bias, approx=approx, loss_average=loss_average)


def embedding_statistics(
    indices: np.ndarray,
    g: np.ndarray,
    *,
    num_embeddings: int,
    padding_idx: int | None = None,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> tuple[np.ndarray, np.ndarray]:
    """``A``, ``G`` of ``nn.Embedding(V, E)`` (SPEC-layers, Embedding): one-hot rows.

    ``W~ = Wᵀ`` (``E × V``, no bias), ``a_{n,s} = e_{idx}`` (the one-hot row;
    the zero row at ``padding_idx``), ``g_{n,s} = ∂L/∂out``; then SPEC §1.1.
    The oracle writes the one-hot rows out (small ``V`` only).

    Args:
        indices: Integer indices, shape ``[B, ...]`` (``[B]``: one position per
            sample, as a Linear input ``[B, d]``).
        g: Output gradient, shape ``[*indices.shape, E]``.
        num_embeddings: ``V``.
        padding_idx: The index whose rows are zero, or ``None``.

    Raises:
        ValueError: If shapes disagree or an index is outside ``[0, V)``.
    """
    check_choices(approx, loss_average)
    indices = np.asarray(indices)
    g = _as_numbers(g)
    if indices.ndim == 1:
        indices, g = indices[:, None], g[:, None]
    if g.shape[:-1] != indices.shape:
        raise ValueError(f"g {g.shape} must be indices {indices.shape} plus a feature dim")
    if indices.size and (indices.min() < 0 or indices.max() >= num_embeddings):
        raise ValueError(f"indices must lie in [0, {num_embeddings})")
    batch = indices.shape[0]
    flat = indices.reshape(batch, -1)
    one = g.flat[0] * 0 + 1 if g.dtype == object and g.size else 1.0
    a = np.zeros((*flat.shape, num_embeddings), dtype=g.dtype)
    if g.dtype == object:
        a.fill(one * 0)
    for (n, s), index in np.ndenumerate(flat):
        if index != padding_idx:
            a[n, s, index] = one
    rows_g = g.reshape(batch, flat.shape[1], g.shape[-1])
    a = same_system(a, g)  # zeros and ones: exact in every number system
    return shared_format_statistics(a, rows_g, bias=False, approx=approx, loss_average=loss_average)


def kfac_factors(a: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KFAC factors of one pass (SPEC §1.1): ``U = AᵀA``, ``Gc = GᵀG``.

    Args:
        a: Scaled input statistic ``A``, shape ``n_A × d_i``.
        g: Scaled gradient statistic ``G``, shape ``n_G × d_o``.

    Returns:
        ``U`` (``d_i × d_i``) and ``Gc`` (``d_o × d_o``).
    """
    a, g = _as_numbers(a), _as_numbers(g)
    return a.T @ a, g.T @ g
