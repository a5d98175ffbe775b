"""Curvature statistics ``A`` and ``G`` of one pass through a layer (SPEC §1.1).

Every supported layer is first brought into one canonical *weight-sharing
format* ``[batch, shared, features]``:

* ``nn.Linear`` input/output ``[B, ..., d]`` → ``[B, S, d]`` with ``S`` the
  product of the extra dims (``S = 1`` without weight sharing);
* ``nn.Conv2d`` input → unfolded patches ``[B, L, (C_in/groups)·k_h·k_w]``
  (channel groups averaged into one group), output gradient
  ``[B, C_out, H_o, W_o]`` → ``[B, L, C_out]`` with ``L = H_o·W_o``.

From there one pair of functions covers both approximations:

* KFAC-expand: shared positions become rows (``n = B·S``);
* KFAC-reduce: inputs averaged, gradients summed over them (``n = B``);

and the loss-reduction scaling ``A ← A / sqrt(n_A)``, ``G ← G · sqrt(N)``.
All functions are pure; they never see the optimizer.
"""

from __future__ import annotations

import math
import sys
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Approx = Literal["expand", "reduce"]
LossAverage = Literal["batch", "batch+sequence"] | None

#: The layer types whose weights are preconditioned with Kronecker factors.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` is exactly a supported layer (subclasses are not: their
    ``forward`` may not use the weight the way the statistics assume).

    ``fully_shard`` (FSDP2) turns a layer's class into ``FSDP<class>`` with the
    bases ``(FSDPModule, class)``; its ``forward`` is the layer's own, so such a
    layer is supported if its class is.
    """
    cls = type(module)
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported here: it costs ~1 s
    if fsdp is not None and isinstance(module, fsdp.FSDPModule) and len(cls.__bases__) == 2:
        fsdp_base, cls = cls.__bases__
        if fsdp_base is not fsdp.FSDPModule:
            return False
    return cls in SUPPORTED_LAYERS


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


def conv2d_explicit_padding(
    kernel_size: tuple[int, int], dilation: tuple[int, int], padding: str | tuple[int, int]
) -> tuple[int, int, int, int]:
    """Padding ``(left, right, top, bottom)`` that ``nn.Conv2d`` applies for ``padding``.

    ``'same'`` pads ``dilation·(k − 1)`` in total per spatial dim with the odd
    element on the right/bottom, as torch does; ``'valid'`` pads nothing.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        total_h = dilation[0] * (kernel_size[0] - 1)
        total_w = dilation[1] * (kernel_size[1] - 1)
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
    pad_h, pad_w = padding
    return (pad_w, pad_w, pad_h, pad_h)


def conv2d_input_shared_format(
    x: Tensor,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    padding_mode: str = "zeros",
) -> Tensor:
    """A Conv2d input as unfolded patches (SPEC §1.1, Conv2d).

    Args:
        x: ``[B, C_in, H, W]`` or unbatched ``[C_in, H, W]``.

    Returns:
        ``[B, L, (C_in/groups)·k_h·k_w]``, ``L`` output locations; the ``groups``
        channel groups of a patch are averaged into one.
    """
    if x.ndim == 3:
        x = x.unsqueeze(0)
    pad = conv2d_explicit_padding(kernel_size, dilation, padding)
    if any(pad):
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = F.pad(x, pad, mode=mode)
    patches = F.unfold(x, kernel_size, dilation=dilation, padding=0, stride=stride)
    batch, features, locations = patches.shape
    patches = patches.reshape(batch, groups, features // groups, locations).mean(dim=1)
    return patches.transpose(1, 2)


def conv2d_grad_shared_format(grad_output: Tensor) -> Tensor:
    """A Conv2d output gradient ``[B, C_out, H_o, W_o]`` (or unbatched) → ``[B, L, C_out]``."""
    if grad_output.ndim == 3:
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


# ------------------------------------------------------------- per layer type
def layer_input_matrix(
    module: nn.Module, x: Tensor, *, approx: Approx, bias: bool | None = None
) -> Tensor:
    """``A`` for a supported layer's input ``x`` (canonical format + :func:`input_matrix`).

    ``bias``: whether ``W~`` has the bias column (``None``: whether the module
    has a bias; ``False`` for a frozen bias, which is not optimised).
    """
    if isinstance(module, nn.Conv2d):
        shared = conv2d_input_shared_format(
            x,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
        )
    else:
        shared = linear_shared_format(x)
    has_bias = module.bias is not None if bias is None else bias
    return input_matrix(shared, approx=approx, bias=has_bias)


def layer_grad_matrix(
    module: nn.Module, grad_output: Tensor, *, approx: Approx, loss_average: LossAverage
) -> Tensor:
    """``G`` for a supported layer's output gradient (canonical format + :func:`grad_matrix`)."""
    if isinstance(module, nn.Conv2d):
        shared = conv2d_grad_shared_format(grad_output)
    else:
        shared = linear_shared_format(grad_output)
    return grad_matrix(shared, approx=approx, loss_average=loss_average)


def weight_gradient_matrix(weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
    """``∇W~ = [∇W, ∇b]`` as a ``d_o × d_i~`` matrix (conv weights flattened from dim 1)."""
    matrix = weight_grad.reshape(weight_grad.shape[0], -1)
    if bias_grad is None:
        return matrix
    return torch.cat([matrix, bias_grad.reshape(-1, 1)], dim=1)


def split_weight_matrix(
    matrix: Tensor, weight_shape: torch.Size, has_bias: bool
) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`weight_gradient_matrix`: ``d_o × d_i~`` → (weight-shaped, bias)."""
    if not has_bias:
        return matrix.reshape(weight_shape), None
    return matrix[:, :-1].reshape(weight_shape), matrix[:, -1].clone()


# --------------------------------------------------- scale-free gradient statistics
def _binary_exponent(value: Tensor) -> Tensor:
    """``e`` (0-dim int32) with ``value < 2^e`` for a finite ``value > 0`` (``0`` for 0/inf/NaN)."""
    return torch.frexp(value).exponent


def _power_of_two(exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^exponent`` as a 0-dim tensor of ``dtype`` (exact: an integer power of two)."""
    return torch.ldexp(torch.ones((), dtype=dtype, device=exponent.device), exponent)


def gram_normaliser_exponent(
    module: nn.Module, grad_output: Tensor, *, approx: Approx, loss_average: LossAverage
) -> Tensor:
    """``k`` (0-dim int32 tensor) such that ``G`` of ``2^k · grad_output`` is well scaled.

    SPEC §1.5 as this project implements it (docs/SPEC.md, deviation): with
    ``G`` the matrix of :func:`layer_grad_matrix`, the largest diagonal entry of
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
        module: the supported layer whose output gradient this is.
        grad_output: the output gradient as backward delivered it (any float dtype).

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
    first = _binary_exponent(g.abs().amax()).clamp(-limit, limit)
    G = layer_grad_matrix(
        module, g * _power_of_two(-first, wide), approx=approx, loss_average=loss_average
    )
    if G.numel() == 0:
        return zero
    column_norms = _binary_exponent(G.square().sum(dim=0).amax())  # < 2^column_norms
    second = torch.div(column_norms + 1, 2, rounding_mode="floor")  # ceil(column_norms / 2)
    return (-first - second).clamp(-limit, limit).to(torch.int32)


def normalised_grad_matrix(
    module: nn.Module,
    grad_output: Tensor,
    *,
    approx: Approx,
    loss_average: LossAverage,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``2^k G`` in ``dtype`` and ``2k``, the log2 of the factor its Gram product carries.

    ``k`` from :func:`gram_normaliser_exponent` (SPEC §1.5, docs/SPEC.md
    deviation).  The gradient is scaled in its wide dtype *before* the cast to
    ``dtype`` and :func:`layer_grad_matrix` (so neither can overflow); since
    ``2^k`` is a power of two, ``2^k G`` has exactly the bits of ``G`` formed
    the usual way, times ``2^k``, unless ``G`` overflowed or had subnormal
    entries in ``dtype`` (where the normalised one is the more accurate).

    Returns:
        ``(G, log2_factor)`` with ``G`` (n_G × d_o) in ``dtype`` and
        ``log2_factor = 2k`` a 0-dim int32 tensor on ``G``'s device.
    """
    wide = torch.promote_types(grad_output.dtype, torch.float32)
    g = grad_output.detach().to(wide)  # one copy (none for float32 gradients)
    k = gram_normaliser_exponent(module, g, approx=approx, loss_average=loss_average)
    scaled = g * _power_of_two(k, wide)
    G = layer_grad_matrix(module, scaled.to(dtype), approx=approx, loss_average=loss_average)
    return G, 2 * k
