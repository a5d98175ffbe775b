"""Finiteness checks of many tensors with few kernels and no host sync (the step's guards).

A step is taken all or nothing: every gradient, statistic and result is
checked before any state changes (SPEC §1.4a, docs/optimizer.md).  One
reduction per tensor gives values that are finite exactly when every entry
is, with no full-size temporary (``isfinite(t).all()`` writes a boolean copy
of ``t`` first, about ten times slower on the CPU):

* off the CPU, ``max|t|`` for all tensors of one dtype in one operator,
  ``torch._foreach_norm(tensors, inf)`` (a multi-tensor kernel on CUDA):
  ``|±inf| = inf`` and the maximum propagates NaN;
* on the CPU, where a foreach operator is a loop over tensors and the
  infinity-norm kernel is about ten times slower than ``aminmax`` (4.3 ms
  against 0.4 ms for six 512 × 513 float32 tensors, one thread), one
  ``aminmax`` per tensor: an ``inf`` entry is the maximum, a ``-inf`` entry
  the minimum, and NaN propagates.

The values of one dtype are then stacked and tested by one ``isfinite``.
Tensors that are rows of one 2-D contiguous tensor (the stacked results of
:mod:`singd.optim.batched`, taken apart by ``unbind``) are reduced together,
one ``aminmax(dim=1)`` per base, so a batch of layers costs the operators of
one.  A tensor that is a permutation of a contiguous one (a transposed view)
is reduced through that permutation, and one whose rows are contiguous but
padded (a column slice, such as ``ĝ_W`` of ``[ĝ_W, ĝ_b]``) row by row
(:func:`extremes`): ``aminmax`` of the whole would copy it first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def finite_flags(tensors: Sequence[Tensor], *, fused: bool | None = None) -> list[Tensor]:
    """One 0-dim boolean per tensor: whether all its entries are finite (no host sync).

    The flags live on the first tensor's device.  Empty tensors are finite
    (the extremes of no entries are undefined, so they are not reduced);
    complex tensors are checked through their real and imaginary parts.
    ``fused``: use ``_foreach_norm`` (``None``: off the CPU, see the module
    docstring).  Operators: per dtype ``_foreach_norm`` (fused) or one
    ``aminmax`` per tensor, then ``stack`` and ``isfinite``.
    """
    if not tensors:
        return []
    device = tensors[0].device
    if fused is None:
        fused = device.type != "cpu"
    groups: dict[torch.dtype, list[int]] = {}
    bases: dict[int, tuple[Tensor, list[tuple[int, int]]]] = {}
    checked: list[Tensor] = []
    for i, tensor in enumerate(tensors):
        if tensor.is_complex():
            tensor = torch.view_as_real(tensor)
        checked.append(tensor)
        if not tensor.numel():
            continue
        found = _row_of(tensor)
        if found is None:
            groups.setdefault(tensor.dtype, []).append(i)
        else:
            bases.setdefault(id(found[0]), (found[0], []))[1].append((i, found[1]))
    true = torch.ones((), dtype=torch.bool, device=device)
    flags = [true] * len(tensors)
    if bases:  # one aminmax per base, then one test of every base's extremes
        row_extremes = [torch.aminmax(base, dim=1) for base, _ in bases.values()]
        lows = torch.cat([low.to(device) for low, _ in row_extremes])
        highs = torch.cat([high.to(device) for _, high in row_extremes])
        ok = torch.isfinite(torch.stack((lows, highs), dim=1)).all(dim=1).unbind()
        start = 0
        for base, rows in bases.values():
            for i, row in rows:
                flags[i] = ok[start + row]
            start += base.shape[0]
    for indices in groups.values():
        group = [checked[i] for i in indices]
        if fused:
            values = torch._foreach_norm(group, float("inf"))
        else:
            values = [value for tensor in group for value in extremes(tensor)]
        ok = torch.isfinite(torch.stack([value.to(device) for value in values]))
        ok = ok.view(len(indices), -1).all(dim=1) if not fused else ok
        for i, flag in zip(indices, ok.unbind(), strict=True):
            flags[i] = flag
    return flags


def extremes(tensor: Tensor) -> tuple[Tensor, Tensor]:
    """``(min, max)`` of a non-empty real ``tensor`` as 0-dim tensors, without copying it.

    ``aminmax`` of a strided input copies it first, a full-size allocation and
    pass per layer: a preconditioned gradient is often a transposed view
    (``singd_precondition``'s default right product is ``(K Kᵀ leftᵀ)ᵀ``), a
    Conv's output gradient a permuted one, and ``ĝ_W`` a column slice of ``[ĝ_W, ĝ_b]``.
    So the dims are first permuted into memory order (the same entries, so
    the same extremes).  That view is reduced whole by ``aminmax`` where it is
    contiguous; where only its innermost dim is (contiguous rows, padded or
    sliced), ``amin`` and ``amax`` run along that dim and then over the rows
    (NaN propagates through both stages; two rows-sized temporaries; not
    ``aminmax(dim=-1)``, which on the CPU took 13× as long as both).  Any
    other layout is reduced as is.
    """
    ordered = tensor.permute(sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d)))
    if ordered.is_contiguous() or ordered.dim() < 2 or ordered.stride(-1) != 1:
        low, high = torch.aminmax(ordered)
        return low, high
    return ordered.amin(dim=-1).amin(), ordered.amax(dim=-1).amax()


def _row_of(tensor: Tensor) -> tuple[Tensor, int] | None:
    """``(base, r)`` if ``tensor`` is row ``r`` of the 2-D contiguous ``base`` it views."""
    base = tensor._base
    if base is None or tensor.dim() != 1 or base.dim() != 2 or not base.is_contiguous():
        return None
    if base.shape[1] != tensor.shape[0] or tensor.stride() != (1,) or base.dtype != tensor.dtype:
        return None
    offset = tensor.storage_offset() - base.storage_offset()
    if offset % tensor.shape[0]:
        return None
    return base, offset // tensor.shape[0]
