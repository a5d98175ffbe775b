"""Data-parallel training: the one place where ranks' statistics and gradients are combined.

With ``torch.distributed`` initialised and a world of ``R > 1`` ranks, every
rank runs the same model on its own share of the batch and each rank's hooks
hold statistics of its own rows only.  :func:`reduce_step_` turns them into
the statistics of the whole batch, identical on every rank, and gives every
rank the averaged gradients (below), so that every rank takes the same step.

Which reduction (rank ``r`` holds ``B_r = B / R`` samples, ``n_r = n / R`` rows
of ``A``; ``F_i = ∂ℓ_i ∂ℓ_iᵀ`` summed over a sample's rows; SPEC §1.1):

* Input side, every ``loss_average``: rank ``r`` scales its rows (bias column
  of ones included) by ``1/sqrt(n_r)``, so ``U_r = (1/n_r) Σ_{rows of r} a aᵀ``
  and the full batch's ``U = (1/n) Σ_{all rows} a aᵀ = (1/R) Σ_r U_r``: the
  **mean** over ranks.
* Gradient side, ``"batch"`` (``"batch+sequence"`` alike with ``N_r = B_r·S``):
  rank ``r`` backpropagates its own mean loss, so ``g`` carries ``1/N_r`` and
  ``G ← G·sqrt(N_r)`` gives ``Gc_r = (1/N_r) Σ_{i ∈ r} F_i``; the full batch has
  ``Gc = (1/N) Σ_i F_i = (1/R) Σ_r Gc_r``: the **mean**.
* Gradient side, ``None`` (sum loss): ``Gc_r = Σ_{i ∈ r} F_i`` carries no
  factor and the full batch's ``Gc = Σ_i F_i = Σ_r Gc_r``: the **sum**.  (The
  mean would be the statistic of ``(1/R) Σ_i ℓ_i``, which ``loss_average=None``
  does not describe.)  DDP still *averages* the gradients, so with a sum loss
  the R-rank run equals the full-batch run at learning rate ``lr / R`` (with
  ``weight_decay = 0``), as for plain SGD under DDP.

``H_K = Π̂(Kᵀ U K)`` and ``H_C = Π̂(Cᵀ Gc C)`` are linear in ``U``, ``Gc`` and
every rank holds the same ``K``, ``C``, so the same reductions apply to SINGD's
``H_K``, ``H_C`` as to KFAC's ``U``, ``Gc``.  With equal per-rank batches the
R-rank run therefore equals the single-process full-batch run up to rounding
(the same terms summed in another order).  Unequal per-rank batches break this
already for the DDP gradient and are not corrected for.

Each rank's gradient statistics carry a power of two of their own, the hooks'
normalisation ``2^log2_factor`` (SPEC §1.5, docs/SPEC.md).  Before summing,
every rank rescales its gradient statistics to the smallest exponent over the
ranks (an ``all_reduce`` with ``MIN``), exactly, as the hooks do for the
passes of one rank; that common exponent is what the step then removes.

Gradients.  A ``DistributedDataParallel`` model's gradients arrive averaged
over the ranks and a ``fully_shard`` (FSDP2) model's arrive reduce-scattered
(averaged) as ``DTensor`` shards; :func:`reduce_step_` reuses both (no second
all-reduce) and gathers a sharded gradient into the full matrix
(:func:`full_gradients`, below).  Every other gradient (an unwrapped model on a
world of ``R > 1``) is local to its rank and is averaged here, as DDP would:
``(1/R) Σ_r ∇_r``.  We all-reduce the raw gradient rather than the
preconditioned one: the two have the same size (``ĝ`` has the shape of
``∇W~`` whatever the structure), so neither saves communication, but reducing
first gives every rank the same gradient *before* the step, so the
finiteness checks (skip or not), the fallback parameters, weight decay and
momentum all see identical inputs, and the preconditioning then runs on
identical tensors: the ranks agree bitwise by construction.  The gradients
share the statistics' buckets: one ``all_reduce`` per dtype and device.

Every rank must collect statistics for the same layers in the same steps (as
data-parallel training does).  Per step the reduction is, on factor steps
only, one ``all_reduce`` (``MIN``) of the exponents per device, and one
``all_reduce`` per dtype and device of the statistics and local gradients
together, in module order (no collective at all on the other steps of a
DDP model); an FSDP2 model adds one gather of its gradients per step.

FSDP2.  A row-sharded ``W~`` (``Shard(0)``: rank ``r`` holds rows ``R_r`` of
``W`` and of ``b``) is preconditioned as ``ĝ = C Cᵀ ∇W~ K Kᵀ``: the ``K``
side acts on the columns and is row-local, but ``C Cᵀ`` mixes the rows, so
every rank needs the full ``∇W~``.  :func:`full_gradients` all-gathers it
(one collective for all layers), every rank preconditions the full matrix
with its (replicated, identical) factors and keeps its own rows
(:func:`like_param`; a local slice, no communication).  The factors are *not*
sharded: ``H_C = Π̂(Cᵀ Gᵀ G C)`` needs all of ``C`` against every sample's
``G`` row (all ``d_o`` columns), and ``H_K`` all of ``K`` likewise, so a
sharded factor would be all-gathered at every statistics pass; they are
replicated (``d_i² + d_o²`` entries dense, less with structure).  (A
diagonal ``C``, or a block-diagonal one whose blocks align with the shards,
is row-local and would need only the local rows; we gather regardless: one
code path.)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from singd.optim.hooks import GradScaleInfo, PendingStatistics, rescaled_summary
from singd.optim.statistics import LossAverage


def world_size() -> int:
    """Number of ranks: ``torch.distributed``'s world size, or 1 when not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank, or 0 when ``torch.distributed`` is not initialised."""
    return dist.get_rank() if world_size() > 1 else 0


def agreed_found_inf(found_inf: bool, device: torch.device) -> bool:
    """A ``GradScaler``'s ``found_inf``, checked to be the same on every rank.

    Each rank's scaler inspects its own gradients.  Under DDP they are
    already averaged, so an inf anywhere is an inf everywhere; a rank that
    skipped alone would wait forever in the next collective, and scalers
    that back off on some ranks only would scale the ranks' statistics
    differently from then on.  One ``all_reduce`` (``MAX`` of ``±flag``); none
    on one rank.

    Raises:
        RuntimeError: (on every rank) if some ranks found inf/NaN and others not.
    """
    if world_size() == 1:
        return found_inf
    flags = torch.tensor([float(found_inf), -float(found_inf)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    anywhere, everywhere = bool(flags[0] > 0), bool(flags[1] < 0)
    if anywhere != everywhere:
        raise RuntimeError(
            "the GradScalers of some ranks found inf/NaN gradients and others did not, so "
            "their loss scales would diverge: an unwrapped model's gradients are averaged "
            "only inside step(), after the scaler has looked (wrap the model in "
            "torch.nn.parallel.DistributedDataParallel); a fully_shard model's scaler sees "
            "its rank's shard only (use torch.distributed.fsdp.sharded_grad_scaler."
            "ShardedGradScaler, which agrees across ranks)"
        )
    return found_inf


def rank_weights(loss_average: LossAverage, world: int) -> tuple[float, float]:
    """Weights of one rank's (input, gradient) statistics in the full batch's (see above)."""
    return 1.0 / world, 1.0 if loss_average is None else 1.0 / world


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2's parameters and gradients).

    ``torch.distributed.tensor`` is looked up, not imported: no ``DTensor``
    exists before it is imported, and importing it costs about a second, so
    ``import singd`` does not.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _row_sharded(grad: Tensor) -> bool:
    """Whether ``grad`` is a ``DTensor`` split by rows over a 1-D mesh (FSDP2's layout)."""
    if not is_dtensor(grad):
        return False
    from torch.distributed.tensor import Shard

    return grad.device_mesh.ndim == 1 and grad.placements == (Shard(0),)


def full_gradients(grads: dict[int, Tensor]) -> dict[int, Tensor]:
    """Every gradient in full: the ``DTensor`` ones gathered, the others as they are.

    Row-sharded gradients (FSDP2) share one ``all_gather_into_tensor`` per
    (mesh, dtype, device): rank ``r`` holds rows ``[r·c, (r + 1)·c)`` of a
    ``d_0``-row gradient, ``c = ⌈d_0/R⌉`` (``torch.chunk``'s split; the last
    ranks may hold fewer or none), padded to ``c`` rows for the gather.
    Other layouts use ``DTensor.full_tensor``.
    """
    full = dict(grads)
    buckets: dict[tuple[Any, torch.dtype, torch.device], list[int]] = {}
    for key, grad in grads.items():
        if _row_sharded(grad):
            buckets.setdefault((grad.device_mesh, grad.dtype, grad.device), []).append(key)
        elif is_dtensor(grad):
            full[key] = grad.full_tensor()
    for (mesh, dtype, device), keys in buckets.items():
        ranks = mesh.size()
        rows = {key: -(-grads[key].shape[0] // ranks) for key in keys}
        padded = []
        for key in keys:
            local = grads[key].to_local()
            piece = local.new_zeros((rows[key], *local.shape[1:]))
            piece[: local.shape[0]] = local
            padded.append(piece.reshape(-1))
        flat = torch.cat(padded)
        gathered = torch.empty(ranks * flat.numel(), dtype=dtype, device=device)
        dist.all_gather_into_tensor(gathered, flat, group=mesh.get_group())
        per_rank = gathered.view(ranks, -1).split([p.numel() for p in padded], dim=1)
        for key, chunk in zip(keys, per_rank, strict=True):
            shape = grads[key].shape
            full[key] = chunk.reshape(ranks * rows[key], *shape[1:])[: shape[0]]
    return full


def like_param(direction: Tensor, param: Tensor) -> Tensor:
    """A full-size update ``direction`` laid out like ``param`` (its own shard of a DTensor).

    ``direction`` is identical on every rank, so replicating and then
    sharding it is a local slice, no communication.
    """
    if not is_dtensor(param):
        return direction
    from torch.distributed.tensor import DTensor, Replicate

    mesh = param.device_mesh
    replicated = DTensor.from_local(direction, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, param.placements)


def _common_grad_exponents_(layers: Sequence[tuple[PendingStatistics, LossAverage]]) -> None:
    """Rescale every gradient statistic to the smallest normalisation exponent over ranks."""
    by_device: dict[torch.device, list[PendingStatistics]] = {}
    for stats, _ in layers:
        by_device.setdefault(stats.grad_scale.log2_factor.device, []).append(stats)
    for group in by_device.values():
        exponents = torch.stack([stats.grad_scale.log2_factor for stats in group])
        common = exponents.clone()
        dist.all_reduce(common, op=dist.ReduceOp.MIN)
        for stats, own, target in zip(group, exponents, common, strict=True):
            stats.grad_summary = rescaled_summary(stats.grad_summary, own, target)
            stats.grad_scale = GradScaleInfo(stats.grad_scale.scale, target)


def _all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """``Σ_r`` of every tensor, as new tensors: one ``all_reduce`` per dtype and device."""
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, tensor in enumerate(tensors):
        buckets.setdefault((tensor.dtype, tensor.device), []).append(index)
    reduced: list[Tensor] = list(tensors)
    for indices in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        dist.all_reduce(flat)
        chunks = flat.split([tensors[i].numel() for i in indices])
        for i, chunk in zip(indices, chunks, strict=True):
            reduced[i] = chunk.view_as(tensors[i])
    return reduced


def wrapper_averages_gradients(model: object) -> bool:
    """Whether ``model``'s wrapper averages the gradients over ranks (``DistributedDataParallel``).

    ``fully_shard`` (FSDP2) averages too, and is recognised per gradient (a ``DTensor``).
    """
    return isinstance(model, DistributedDataParallel)


def reduce_step_(
    layers: Sequence[tuple[PendingStatistics, LossAverage]],
    grads: dict[int, Tensor],
    world: int,
    *,
    wrapper_averaged: bool,
) -> dict[int, Tensor]:
    """Full-batch statistics (in the pending sums) and gradients (returned) on every rank.

    Each statistic summary is weighted by :func:`rank_weights`, each local
    gradient by ``1/R``, and all are summed over ranks in one bucket per
    dtype and device (module docstring); with ``R`` a power of two the
    weighting is exact.  The other gradients (averaged by a wrapper) pass
    through, a sharded one gathered in full (:func:`full_gradients`).  The
    input gradients are not modified, nor is a first pass's input summary
    (a retained graph's hook still holds it: it is replaced by a new tensor).

    Args:
        layers: pending statistics of each layer with its ``loss_average``, in
            the same order on every rank (empty on steps without statistics).
        grads: ``id(param)`` → gradient, in the same order on every rank.
        world: the number of ranks ``R``.
        wrapper_averaged: whether a wrapper has averaged the plain gradients.

    Returns:
        ``id(param)`` → the full-batch (averaged) gradient, in ``grads``'s order.
    """
    if world == 1:
        return full_gradients(grads)
    if layers:
        _common_grad_exponents_(layers)
    statistics: list[Tensor] = []
    for stats, loss_average in layers:
        input_weight, grad_weight = rank_weights(loss_average, world)
        if stats.input_summary_is_held:
            stats.input_summary = stats.input_summary.mul(input_weight)
        else:
            stats.input_summary.mul_(input_weight)
        stats.grad_summary.mul_(grad_weight)
        statistics.extend(stats.tensors())
    local_keys = [key for key, grad in grads.items() if not (wrapper_averaged or is_dtensor(grad))]
    reduced = _all_reduce_sum([*statistics, *(grads[key] * (1.0 / world) for key in local_keys)])
    for target, value in zip(statistics, reduced, strict=False):
        target.copy_(value)
    averaged = dict(zip(local_keys, reduced[len(statistics) :], strict=True))
    return full_gradients({**grads, **averaged})


def reduce_elementwise_(
    pending: dict[str, tuple[list[Tensor], bool]], loss_averages: dict[str, LossAverage]
) -> None:
    """Full-batch ``h`` on every rank (in place): weighted like gradient statistics, then summed.

    ``h`` is a gradient-side statistic (``N Σ r²`` with ``g`` carrying ``1/N_r``):
    averaged over ranks for a mean loss, summed for a sum loss
    (:func:`rank_weights`).  One ``all_reduce`` per layer, in module order (every
    rank collects the same layers in the same steps).

    Args:
        pending: elementwise layer → its pending ``([h_γ, (h_β)], scale_removed)``.
        loss_averages: elementwise layer → its group's ``loss_average``.
    """
    world = world_size()
    if world == 1:
        return
    for name, (hs, _) in pending.items():
        _, weight = rank_weights(loss_averages[name], world)
        flat = torch.cat([h.reshape(-1) for h in hs]) * weight
        dist.all_reduce(flat)
        for h, chunk in zip(hs, flat.split([h.numel() for h in hs]), strict=True):
            h.copy_(chunk.view_as(h))
