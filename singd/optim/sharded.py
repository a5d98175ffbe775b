"""Sharded factor work: each rank computes the factor steps of the layers it owns.

Opt-in (``optimizer.configure_distributed(shard_factor_work=True)``).  After
the statistics are reduced (every rank holds the full batch's), rank ``r``
prepares and takes the factor steps of its own layers only and broadcasts
the new factors; the others receive them, so every rank ends the step with
the same factors as an unsharded run (the owner computes exactly what every
rank would have computed; the broadcast copies bits).  The factor-step
compute per rank thus falls with the number of ranks; the statistics'
all-reduce and the preconditioning (every step, every layer) are unchanged.

Owners are assigned once per step from the layers' factor-step costs
(:meth:`~singd.optim.preconditioner.Preconditioner.factor_step_cost`), greedily:
the costliest layer first, each to the least-loaded rank (ties: the lowest
rank), which is within 4/3 of the best balance (Graham's LPT bound).  Every
rank computes the same assignment from the same layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from singd.optim import distributed

#: A layer's factors as plain tensors: factor name → storage key → tensor.
Storage = dict[str, dict[str, Tensor]]

#: A layer's state (the optimizer's own type).
State = TypeVar("State")


def assign_owners(costs: dict[str, float], world: int) -> dict[str, int]:
    """Layer → owning rank, balancing the summed ``costs`` over ``world`` ranks (LPT)."""
    loads = [0.0] * world
    owners = {}
    for name in sorted(costs, key=lambda layer: -costs[layer]):  # stable: module order on ties
        owner = min(range(world), key=lambda r: (loads[r], r))
        owners[name] = owner
        loads[owner] += costs[name]
    return owners


def broadcast_storages(
    owners: dict[str, int], computed: dict[str, Storage], templates: dict[str, Storage]
) -> dict[str, Storage]:
    """Every layer's new factors on every rank, each broadcast from its owner.

    One ``broadcast`` per owning rank and (dtype, device), in the order of
    ``owners`` (the same on every rank).

    Args:
        owners: layer → owning rank, for every layer taking a factor step.
        computed: this rank's new factors of the layers it owns.
        templates: every layer's current factors (shapes, dtypes and devices of
            the new ones; not modified).

    Returns:
        Layer → new factors, for every layer of ``owners`` (``computed``'s own).
    """
    me = dist.get_rank()
    received: dict[str, Storage] = {
        name: {f: {k: torch.empty_like(t) for k, t in s.items()} for f, s in template.items()}
        for name, template in templates.items()
        if owners[name] != me
    }
    for source in sorted(set(owners.values())):
        layers = [name for name, owner in owners.items() if owner == source]
        side = computed if source == me else received
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for name in layers:
            for factor in templates[name]:
                for key in templates[name][factor]:
                    tensor = side[name][factor][key]
                    buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for tensors in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.broadcast(flat, src=source)
            if source != me:
                chunks = flat.split([t.numel() for t in tensors])
                for tensor, chunk in zip(tensors, chunks, strict=True):
                    tensor.copy_(chunk.view_as(tensor))
    return {name: computed[name] if owners[name] == me else received[name] for name in owners}


def owners(
    enabled: bool, layers: Iterable[str], cost: Callable[[str], float]
) -> dict[str, int] | None:
    """Layer → the rank computing its factor steps, or ``None`` (every rank computes all).

    ``None`` unless ``enabled`` (``shard_factor_work``) on a world of more than one rank.
    """
    world = distributed.world_size()
    if not (enabled and world > 1):
        return None
    return assign_owners({name: cost(name) for name in layers}, world)


def owned(owners: dict[str, int] | None, layers: Iterable[str]) -> list[str]:
    """The ``layers`` whose factor step this rank computes."""
    if owners is None:
        return list(layers)
    return [name for name in layers if owners[name] == distributed.rank()]


def share_states(
    owners: dict[str, int] | None,
    computed: dict[str, State],
    current: dict[str, State],
    *,
    to_storage: Callable[[State], Storage],
    from_storage: Callable[[str, State, Storage], State],
) -> dict[str, State]:
    """Every rank's new states of ``current``'s layers from their owners' ``computed``.

    Args:
        owners: :func:`owners` (``None``: ``computed`` already holds every layer).
        computed: this rank's new states of the layers it owns.
        current: the live state of every layer taking a factor step (the templates).
        to_storage: a state → its plain tensors.
        from_storage: ``(layer, template state, storage) → state``.
    """
    if owners is None:
        return computed
    storages = broadcast_storages(
        {name: owners[name] for name in current},
        {name: to_storage(state) for name, state in computed.items()},
        {name: to_storage(state) for name, state in current.items()},
    )
    return {
        name: computed[name] if name in computed else from_storage(name, current[name], storage)
        for name, storage in storages.items()
    }
