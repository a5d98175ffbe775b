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
(:meth:`~singd.optim.base.KroneckerOptimizer._factor_step_cost`), greedily:
the costliest layer first, each to the least-loaded rank (ties: the lowest
rank), which is within 4/3 of the best balance (Graham's LPT bound).  Every
rank computes the same assignment from the same layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

#: A layer's factors as plain tensors: factor name → storage key → tensor.
Storage = dict[str, dict[str, Tensor]]


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
