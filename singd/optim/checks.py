"""A step's checks: its host reads, which tensors are not finite, and the skip warning.

A step reads the host at two named points (its order: SPEC §1.4a):
:func:`read_host` — every finiteness flag of the statistics and the scalars
each layer's factor step needs as Python floats, in one sync — and
:func:`result_culprits` on the planned results (a second).  The gradients are
checked through their directions, which are results: a non-finite gradient
entry makes its direction non-finite (``plan_step``), and :func:`nonfinite`
reads them only after a failed check, to name them.  A step skipped for
non-finite values carries the reason and the labels of the culprits
(:class:`Skip`) for its warning (:func:`skip_message`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from singd.optim.finiteness import finite_flags
from singd.optim.hooks import PendingStatistics
from singd.optim.sharded import Storage

#: A skip warning names at most this many non-finite tensors.
MAX_NAMED = 5


class Skip(NamedTuple):
    """A step that is not taken: why, and the labels of the non-finite tensors."""

    reason: str
    culprits: list[str]


class LayerReads(NamedTuple):
    """One layer's host values for its factor step.

    Attributes:
        log2_factor: the exponent of the hook's power-of-two normalisation of ``G``.
        values: the values of the preconditioner's ``FactorStepInputs.reads``.
    """

    log2_factor: int
    values: list[float]


class HostReads(NamedTuple):
    """The step's first host sync, by meaning (flags: 1.0 finite, 0.0 not)."""

    stats_ok: list[float]
    layers: dict[str, LayerReads]


def host_values(scalars: list[Tensor]) -> list[float]:
    """The values of 0-dim tensors as Python floats, read with one host sync.

    The scalars of one dtype are stacked and converted to float64 together
    (two operators per dtype and one ``cat``, not one conversion per scalar).
    """
    if not scalars:
        return []
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, scalar in enumerate(scalars):
        by_dtype.setdefault(scalar.dtype, []).append(index)
    parts = [
        torch.stack([scalars[i] for i in indices]).to(torch.float64)
        for indices in by_dtype.values()
    ]
    read = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
    values = [0.0] * len(scalars)
    order = (i for indices in by_dtype.values() for i in indices)
    for index, value in zip(order, read, strict=True):
        values[index] = value
    return values


def read_host(stats_flags: list[Tensor], layers: dict[str, list[Tensor]]) -> HostReads:
    """:class:`HostReads` of the given 0-dim tensors, in one host sync.

    Args:
        stats_flags: the pending statistics' finiteness flags.
        layers: layer name → ``[log2_factor, *reads]`` of its factor step.
    """
    scalars = [*stats_flags, *(r for reads in layers.values() for r in reads)]
    values = host_values(scalars)
    stats_end = len(stats_flags)
    by_layer, start = {}, stats_end
    for name, reads in layers.items():
        own = values[start : start + len(reads)]
        by_layer[name] = LayerReads(int(own[0]), own[1:])
        start += len(reads)
    return HostReads(values[:stats_end], by_layer)


def culprits(labels: list[str], flags: Iterable[float]) -> list[str]:
    """The labels whose finiteness flag (read to the host) is false, each named once."""
    named = [label for label, ok in zip(labels, flags, strict=True) if not ok]
    return list(dict.fromkeys(named))


def nonfinite(labels: list[str], tensors: list[Tensor]) -> list[str]:
    """The labels of the non-finite ``tensors`` (one host sync; none for no tensors)."""
    return culprits(labels, host_values(finite_flags(tensors)))


def inf_gradients_skip(param_labels: dict[int, str], params: list[Tensor]) -> Skip:
    """The skip of a step whose ``GradScaler`` found inf/NaN gradients, naming them.

    One host sync (:func:`nonfinite` of every gradient of ``params``).
    """
    grads = [(param_labels.get(id(p), "a parameter"), p.grad) for p in params if p.grad is not None]
    culprits = nonfinite([f"{label} gradient" for label, _ in grads], [g for _, g in grads])
    return Skip("the GradScaler found inf/NaN gradients", culprits)


def skip_message(optimizer: str, skip: Skip) -> str:
    """The warning of a skipped step (at most :data:`MAX_NAMED` culprits named)."""
    detail = ""
    if skip.culprits:
        shown = "; ".join(f"{label} non-finite" for label in skip.culprits[:MAX_NAMED])
        more = len(skip.culprits) - MAX_NAMED
        detail = f": {shown}" + (f"; and {more} more" if more > 0 else "")
    return f"{optimizer}: step skipped ({skip.reason}{detail}); no state was changed"


def statistic_flags(
    standing_in: dict[str, tuple[list[Tensor], list[Tensor]] | None],
    pending: dict[str, PendingStatistics],
    names: tuple[str, str],
) -> tuple[list[str], list[Tensor]]:
    """Labels and finiteness flags of the tensors of every layer's two pending statistics.

    ``standing_in`` maps a layer to copies of its statistics' tensors to check
    instead (``FactorStepInputs.statistics``; ``None``: its own).  ``names``
    says how a label names the (input, gradient) statistic.  A statistic
    stored in several tensors has one flag (and its label) per tensor.
    """
    labels, tensors = [], []
    for name, stats in pending.items():
        own = standing_in.get(name) or stats.summary_tensors()
        for statistic, parts in zip(names, own, strict=True):
            labels += [f"layer {name!r}: {statistic}"] * len(parts)
            tensors += parts
    return labels, finite_flags(tensors)


def result_culprits(
    param_labels: dict[int, str],
    elementwise: dict[int, tuple[Tensor, Tensor]],
    factors: dict[str, Storage],
    directions: dict[int, Tensor],
) -> list[str]:
    """The labels of the planned results that are not finite (the step's second host sync).

    Args:
        param_labels: ``id(param)`` → its name in a warning.
        elementwise: ``id(param)`` → new ``(k, m)`` (``k`` is checked).
        factors: layer name → its new factors' storage.
        directions: ``id(param)`` → update direction.
    """
    labels, results = [], []
    for key, (k, _) in elementwise.items():
        labels.append(f"{param_labels.get(key, 'a parameter')} k after the factor step")
        results.append(k)
    for name, storages in factors.items():
        for factor, storage in storages.items():
            labels += [f"layer {name!r}: {factor} after the factor step"] * len(storage)
            results += storage.values()
    labels += [f"{param_labels.get(key, 'a parameter')} update" for key in directions]
    results += directions.values()
    return nonfinite(labels, results)
