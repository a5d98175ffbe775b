"""Data-parallel training: the one place where ranks' curvature statistics are combined.

With ``torch.distributed`` initialised and a world of ``R > 1`` ranks, every
rank runs the same model on its own share of the batch, the gradients are
averaged (``DistributedDataParallel``), and each rank's hooks hold statistics
of its own rows only.  :func:`all_reduce_statistics_` turns them into the
statistics of the whole batch, identical on every rank, so that every rank
takes the same factor step.

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

Every rank must collect statistics for the same layers in the same steps (as
data-parallel training does); the reduction is one ``all_reduce`` of the
exponents per device and one per dtype and device of the statistics, in
module order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from singd.optim.hooks import GradScaleInfo, PendingStatistics, rescaled_summary
from singd.optim.statistics import LossAverage


def world_size() -> int:
    """Number of ranks: ``torch.distributed``'s world size, or 1 when not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank_weights(loss_average: LossAverage, world: int) -> tuple[float, float]:
    """Weights of one rank's (input, gradient) statistics in the full batch's (see above)."""
    return 1.0 / world, 1.0 if loss_average is None else 1.0 / world


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


def all_reduce_statistics_(
    layers: Sequence[tuple[PendingStatistics, LossAverage]], world: int
) -> None:
    """Replace every rank's statistics by the full batch's, in place (module docstring).

    Each summary is weighted by :func:`rank_weights` and then summed over
    ranks; with ``R`` a power of two the weighting is exact.

    Args:
        layers: pending statistics of each layer with its ``loss_average``, in
            the same order on every rank.
        world: the number of ranks ``R``.
    """
    _common_grad_exponents_(layers)
    tensors: list[Tensor] = []
    for stats, loss_average in layers:
        input_weight, grad_weight = rank_weights(loss_average, world)
        stats.input_summary.mul_(input_weight)
        stats.grad_summary.mul_(grad_weight)
        tensors.extend(stats.tensors())
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([tensor.reshape(-1) for tensor in bucket])
        dist.all_reduce(flat)
        for tensor, chunk in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            tensor.copy_(chunk.view_as(tensor))
