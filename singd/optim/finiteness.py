"""Finiteness checks of many tensors with few kernels and no host sync (the step's guards).

A step is taken all or nothing: every gradient, statistic and result is
checked before any state changes (SPEC §1.4a, docs/optimizer.md).  The flag
of one tensor is ``isfinite(min) ∧ isfinite(max)``: an ``inf`` entry is the
maximum, a ``-inf`` entry the minimum, and ``aminmax`` propagates NaN, so both
extremes are finite exactly when every entry is.  That is one reduction pass
per tensor and no full-size temporary (``isfinite(t).all()`` writes a boolean
copy of ``t`` first, about ten times slower on the CPU); the extremes of all
tensors of one dtype are then stacked and tested by one ``isfinite``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def finite_flags(tensors: Sequence[Tensor]) -> list[Tensor]:
    """One 0-dim boolean per tensor: whether all its entries are finite (no host sync).

    The flags live on the first tensor's device.  Empty tensors are finite;
    complex tensors are checked through their real and imaginary parts.
    Kernels: one ``aminmax`` per tensor plus a handful per dtype, independent
    of the tensors' sizes.
    """
    if not tensors:
        return []
    device = tensors[0].device
    groups: dict[torch.dtype, list[int]] = {}
    extremes: list[tuple[Tensor, Tensor] | None] = []
    for index, tensor in enumerate(tensors):
        if tensor.numel() == 0:
            extremes.append(None)
            continue
        if tensor.is_complex():
            tensor = torch.view_as_real(tensor)
        extremes.append(torch.aminmax(tensor))
        groups.setdefault(tensor.dtype, []).append(index)
    true = torch.ones((), dtype=torch.bool, device=device)
    flags = [true] * len(tensors)
    for indices in groups.values():
        pairs = [value.to(device) for i in indices for value in extremes[i]]  # type: ignore[union-attr]
        ok = torch.isfinite(torch.stack(pairs)).view(-1, 2).all(dim=1)
        for i, flag in zip(indices, ok.unbind(), strict=True):
            flags[i] = flag
    return flags
