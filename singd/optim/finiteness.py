"""Finiteness checks of many tensors with few kernels and no host sync (the step's guards).

A step is taken all or nothing: every gradient, statistic and result is
checked before any state changes (SPEC §1.4a, docs/optimizer.md).  The flag
of one tensor is ``isfinite(max|t|)``: ``|±inf| = inf`` and the maximum
propagates NaN, so the largest magnitude is finite exactly when every entry
is.  ``torch._foreach_norm(tensors, inf)`` computes it for all tensors of
one dtype in one operator (on CUDA a fused multi-tensor kernel), with no
full-size temporary (``isfinite(t).all()`` writes a boolean copy of ``t``
first, about ten times slower on the CPU); the magnitudes of one dtype are
then stacked and tested by one ``isfinite``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def finite_flags(tensors: Sequence[Tensor]) -> list[Tensor]:
    """One 0-dim boolean per tensor: whether all its entries are finite (no host sync).

    The flags live on the first tensor's device.  Empty tensors are finite
    (the infinity norm of no entries is undefined, so they are not passed on);
    complex tensors are checked through their real and imaginary parts.
    Operators: three per dtype (``_foreach_norm``, ``stack``, ``isfinite``),
    independent of the number of tensors and of their sizes.
    """
    if not tensors:
        return []
    device = tensors[0].device
    groups: dict[torch.dtype, list[int]] = {}
    checked: list[Tensor] = []
    for tensor in tensors:
        if tensor.is_complex():
            tensor = torch.view_as_real(tensor)
        checked.append(tensor)
        if tensor.numel():
            groups.setdefault(tensor.dtype, []).append(len(checked) - 1)
    true = torch.ones((), dtype=torch.bool, device=device)
    flags = [true] * len(tensors)
    for indices in groups.values():
        magnitudes = torch._foreach_norm([checked[i] for i in indices], float("inf"))
        ok = torch.isfinite(torch.stack([m.to(device) for m in magnitudes]))
        for i, flag in zip(indices, ok.unbind(), strict=True):
            flags[i] = flag
    return flags
