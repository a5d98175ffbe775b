"""Replica safety: an opt-in check that every rank holds the same factors and parameters.

Data-parallel ranks must stay bitwise identical; a rank that drifts (a
missed all-reduce, a nondeterministic kernel, a bad seed) silently trains
another model.  ``optimizer.configure_distributed(drift_check_every=N)``
checks every ``N`` steps: every rank sums the bit patterns of each entry's
tensors (a float tensor viewed as integers of its width, summed in int64
with wrap-around), so any single changed bit changes the checksum; the
checksums of all entries are all-gathered in one collective and compared.
Cost: one pass over the factors and parameters and one all-gather of
``8 · entries`` bytes per rank.  Equal checksums do not prove equality (two
changes may cancel); different ones prove drift.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from singd.optim import distributed

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_interval(every: object) -> None:
    """Raise ``ValueError`` unless ``every`` is ``None`` or a positive int."""
    if every is None:
        return
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"drift_check_every must be None or a positive int, got {every!r}")


def due(every: int | None, steps: int) -> bool:
    """Whether the check runs after the step that completed ``steps`` steps."""
    return every is not None and steps % every == 0 and distributed.world_size() > 1


def replicated(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors that every rank holds in full (a ``DTensor`` shard is its rank's own)."""
    return [t for t in tensors if not distributed.is_dtensor(t)]


def entries(
    layers: dict[str, tuple[list[Tensor], list[Tensor]]], fallback: dict[str, Tensor]
) -> dict[str, list[Tensor]]:
    """Label → the tensors every rank must hold bitwise equal (drift check).

    Args:
        layers: layer name → (its factors' tensors, its parameters).
        fallback: label → fallback parameter.

    Sharded (``DTensor``) parameters are each rank's own and not compared.
    """
    labelled: dict[str, list[Tensor]] = {}
    for name, (factors, params) in layers.items():
        labelled[f"layer {name!r}: factors"] = factors
        labelled[f"layer {name!r}: parameters"] = replicated(params)
    for label, param in fallback.items():
        labelled[f"parameter {label!r}"] = replicated([param])
    return labelled


def checksum(tensors: list[Tensor], device: torch.device) -> Tensor:
    """0-dim int64 on ``device``: the wrap-around sum of the bit patterns of every entry."""
    total = torch.zeros((), dtype=torch.int64, device=device)
    for tensor in tensors:
        width = max(w for w in _INT_OF_WIDTH if tensor.element_size() % w == 0)  # complex: 2 words
        bits = tensor.detach().contiguous().reshape(-1).view(_INT_OF_WIDTH[width])
        total = total + bits.to(torch.int64).sum().to(device)
    return total


def check_replicas(entries: dict[str, list[Tensor]]) -> None:
    """Compare the checksums of ``entries`` (label → tensors) across ranks.

    Raises:
        RuntimeError: naming the first entry (in the given order) whose
            checksum differs between ranks, and the ranks that disagree with
            rank 0.
    """
    labels = list(entries)
    device = _collective_device(entries)
    local = torch.stack([checksum(entries[label], device) for label in labels])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered).cpu()
    differs = (table != table[0]).any(dim=0)
    if bool(differs.any()):
        first = int(differs.nonzero()[0])
        ranks = [r for r in range(len(gathered)) if table[r, first] != table[0, first]]
        raise RuntimeError(
            f"data-parallel replicas diverged: {labels[first]} differs between rank 0 and "
            f"rank(s) {ranks} after this step (checksums of the bit patterns); the ranks no "
            "longer train the same model"
        )


def _collective_device(entries: dict[str, list[Tensor]]) -> torch.device:
    """Where the checksums are gathered: the CPU for gloo, else the first tensor's device."""
    first = next((t for tensors in entries.values() for t in tensors), None)
    if first is None or dist.get_backend() == "gloo":
        return torch.device("cpu")
    return first.device
