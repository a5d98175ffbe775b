"""Input patches of a convolution, written out with loops (SPEC §1.1, SPEC-layers Conv rows).

A convolution with weight ``w`` of shape ``[C_out, C_in/groups, k_h, k_w]``
is, per channel group, a matrix product of the weight flattened from dim 1
with the *patches* of the zero-padded input: one row per output location,
one column per ``(channel, kernel row, kernel column)`` triple, kernel column
fastest.  This module computes the patches by explicit slicing (no library
unfold) so that the oracle's convolution does not rest on the code it checks.

Everything works on float64 arrays and on object arrays of ``mpmath.mpf``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

#: ``((top, bottom), (left, right))`` zero padding of the two spatial dims.
Padding2d = tuple[tuple[int, int], tuple[int, int]]


def pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``value`` as a ``(height, width)`` pair of positive/non-negative ints.

    Args:
        value: One int for both spatial dims, or a pair.
        name: The argument's name, for the error message.

    Raises:
        ValueError: If ``value`` is neither an int nor a pair of ints.
    """
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def resolve_padding(
    padding: int | tuple[int, int] | str,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
) -> Padding2d:
    """Zero padding per side, with ``torch.nn.Conv2d``'s meaning of ``padding``.

    ``"valid"`` is no padding.  ``"same"`` (stride 1 only) pads a total of
    ``dilation · (k − 1)`` per dim, ``total // 2`` before and the rest after,
    so an even effective kernel gets one more zero at the bottom/right.

    Args:
        padding: Int (both sides of both dims), ``(p_h, p_w)`` (both sides of
            each dim), ``"same"`` or ``"valid"``.
        kernel_size: ``k`` or ``(k_h, k_w)``.
        stride: ``s`` or ``(s_h, s_w)``.
        dilation: ``d`` or ``(d_h, d_w)``.

    Returns:
        ``((top, bottom), (left, right))``.

    Raises:
        ValueError: On an unknown padding string, negative padding, or
            ``"same"`` with a stride other than 1.
    """
    kernel = pair(kernel_size, "kernel_size")
    strides = pair(stride, "stride")
    dilations = pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
        if strides != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride {strides}")
        totals = [d * (k - 1) for d, k in zip(dilations, kernel, strict=True)]
        (before_h, before_w) = (totals[0] // 2, totals[1] // 2)
        return (before_h, totals[0] - before_h), (before_w, totals[1] - before_w)
    pad_h, pad_w = pair(padding, "padding")
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (pad_h, pad_h), (pad_w, pad_w)


def output_size(
    size: int, kernel: int, stride: int, dilation: int, pad_before: int, pad_after: int
) -> int:
    """Output length of one spatial dim: ``⌊(n + p − d(k − 1) − 1)/s⌋ + 1``."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def extract_patches(
    x: np.ndarray,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
) -> np.ndarray:
    """The unfolded input patches of a 2-D convolution, one row per output location.

    Row ``r = i_out · W_out + j_out`` (row-major over output locations) holds
    the padded input under the kernel placed at that location; column
    ``c · k_h · k_w + p · k_w + q`` holds channel ``c`` at kernel offset
    ``(p, q)`` — the layout of a conv weight flattened from dim 1.

    Args:
        x: Input, shape ``[B, C, H, W]`` (float64 or ``mpf`` objects).
        kernel_size: ``k`` or ``(k_h, k_w)``.
        stride: ``s`` or ``(s_h, s_w)``.
        padding: As in :func:`resolve_padding`.
        dilation: ``d`` or ``(d_h, d_w)``.

    Returns:
        Patches, shape ``[B, H_out · W_out, C · k_h · k_w]``.

    Raises:
        ValueError: If ``x`` is not 4-D, a size argument is not positive, or
            the (padded) input is smaller than the dilated kernel.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"conv input must have shape [B, C, H, W], got shape {x.shape}")
    (k_h, k_w) = kernel = pair(kernel_size, "kernel_size")
    (s_h, s_w) = strides = pair(stride, "stride")
    (d_h, d_w) = dilations = pair(dilation, "dilation")
    for name, values in (("kernel_size", kernel), ("stride", strides), ("dilation", dilations)):
        if min(values) < 1:
            raise ValueError(f"{name} must be positive, got {values}")
    (top, bottom), (left, right) = resolve_padding(padding, kernel, strides, dilations)
    batch, channels, height, width = x.shape
    h_out = output_size(height, k_h, s_h, d_h, top, bottom)
    w_out = output_size(width, k_w, s_w, d_w, left, right)
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"padded input {height + top + bottom}×{width + left + right} is smaller than "
            f"the dilated kernel {d_h * (k_h - 1) + 1}×{d_w * (k_w - 1) + 1}"
        )
    padded = np.zeros((batch, channels, height + top + bottom, width + left + right), x.dtype)
    if x.dtype == object:
        padded.fill(x.flat[0] * 0 if x.size else 0)  # zeros of the input's number type
    padded[:, :, top : top + height, left : left + width] = x
    patches = np.empty((batch, h_out * w_out, channels * k_h * k_w), dtype=x.dtype)
    kernel_rows = d_h * np.arange(k_h)
    kernel_cols = d_w * np.arange(k_w)
    for i_out in range(h_out):
        for j_out in range(w_out):
            rows = i_out * s_h + kernel_rows
            cols = j_out * s_w + kernel_cols
            window = padded[:, :, rows, :][:, :, :, cols]  # [B, C, k_h, k_w]
            patches[:, i_out * w_out + j_out, :] = window.reshape(batch, -1)
    return patches


def conv2d_forward(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> np.ndarray:
    """A grouped 2-D convolution as patches times the flattened weight, per group.

    Group ``j`` maps input channels ``[j·C_in/groups, (j+1)·C_in/groups)``
    with output channels ``[j·C_out/groups, (j+1)·C_out/groups)``:
    ``y_j = patches(x_j) @ w_j.reshape(C_out/groups, -1)ᵀ``.

    Args:
        x: Input, shape ``[B, C_in, H, W]``.
        w: Weight, shape ``[C_out, C_in/groups, k_h, k_w]``.
        b: Bias, shape ``[C_out]``, or ``None``.
        stride: ``s`` or ``(s_h, s_w)``.
        padding: As in :func:`resolve_padding`.
        dilation: ``d`` or ``(d_h, d_w)``.
        groups: Number of channel groups.

    Returns:
        Output, shape ``[B, C_out, H_out, W_out]``.

    Raises:
        ValueError: If channels are not divisible by ``groups`` or the weight's
            channel dim does not match ``C_in / groups``.
    """
    x = np.asarray(x)
    w = np.asarray(w)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(
            f"need x [B, C, H, W] and w [C_out, C/g, kh, kw], got {x.shape} and {w.shape}"
        )
    c_in, c_out = x.shape[1], w.shape[0]
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"C_in={c_in} and C_out={c_out} must be divisible by groups={groups}")
    if w.shape[1] != c_in // groups:
        raise ValueError(f"weight has {w.shape[1]} input channels, C_in/groups = {c_in // groups}")
    kernel = (w.shape[2], w.shape[3])
    in_per_group, out_per_group = c_in // groups, c_out // groups
    outputs = []
    for j in range(groups):
        patches = extract_patches(
            x[:, j * in_per_group : (j + 1) * in_per_group], kernel, stride, padding, dilation
        )
        w_group = w[j * out_per_group : (j + 1) * out_per_group].reshape(out_per_group, -1)
        outputs.append(patches @ w_group.T)  # [B, L, C_out/groups]
    y = np.concatenate(outputs, axis=2)
    if b is not None:
        y = y + np.asarray(b)
    (top, bottom), (left, right) = resolve_padding(padding, kernel, stride, dilation)
    strides, dilations = pair(stride, "stride"), pair(dilation, "dilation")
    h_out = output_size(x.shape[2], kernel[0], strides[0], dilations[0], top, bottom)
    w_out = output_size(x.shape[3], kernel[1], strides[1], dilations[1], left, right)
    return y.transpose(0, 2, 1).reshape(x.shape[0], c_out, h_out, w_out)


def extract_patches_nd(
    x: np.ndarray,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    dilation: tuple[int, ...],
) -> np.ndarray:
    """The input patches of an ``r``-D convolution (r = 1, 2, 3), one row per output location.

    The same definition as :func:`extract_patches` for any number of spatial
    dims: row ``r`` = the output location in row-major order, column = the
    ``(c, k_1, …, k_r)`` index in row-major order (the flattened weight's layout).

    Args:
        x: Input, shape ``[B, C, *spatial]`` (float64 or ``mpf`` objects).
        kernel: ``(k_1, …, k_r)``.
        stride: ``(s_1, …, s_r)``.
        padding: ``((before, after), …)`` zero padding per spatial dim.
        dilation: ``(d_1, …, d_r)``.

    Returns:
        Patches, shape ``[B, Π O, C · Π k]``.

    Raises:
        ValueError: If the lengths disagree or an output size is below 1.
    """
    x = np.asarray(x)
    rank = x.ndim - 2
    if not len(kernel) == len(stride) == len(padding) == len(dilation) == rank:
        raise ValueError(f"x of shape {x.shape} needs {rank} kernel/stride/padding/dilation values")
    sizes = [
        output_size(n, k, s, d, before, after)
        for n, k, s, d, (before, after) in zip(
            x.shape[2:], kernel, stride, dilation, padding, strict=True
        )
    ]
    if min(sizes) < 1:
        raise ValueError(f"padded input of shape {x.shape} is smaller than the dilated kernel")
    padded_shape = [
        n + before + after for n, (before, after) in zip(x.shape[2:], padding, strict=True)
    ]
    padded = np.zeros((*x.shape[:2], *padded_shape), x.dtype)
    if x.dtype == object:
        padded.fill(x.flat[0] * 0 if x.size else 0)  # zeros of the input's number type
    inner = tuple(
        slice(before, before + n) for n, (before, _) in zip(x.shape[2:], padding, strict=True)
    )
    padded[(slice(None), slice(None), *inner)] = x
    batch, channels = x.shape[:2]
    patches = np.empty((batch, math.prod(sizes), channels * math.prod(kernel)), dtype=x.dtype)
    for row, location in enumerate(itertools.product(*(range(size) for size in sizes))):
        columns = []
        for offsets in itertools.product(*(range(k) for k in kernel)):
            index = tuple(
                o * s + j * d
                for o, s, j, d in zip(location, stride, offsets, dilation, strict=True)
            )
            columns.append(padded[(slice(None), slice(None), *index)])  # [B, C]
        # columns: kernel offsets (row-major); the weight's layout puts the channel first
        patches[:, row, :] = np.stack(columns, axis=2).reshape(batch, -1)
    return patches
