"""Planning a step: everything it writes, computed before anything is written (SPEC §1.4a).

:func:`plan_step` takes the step's gathered inputs (full-batch statistics and
gradients, :class:`Gathered`) and returns either a :class:`StepPlan` — each
statistics layer's new state (SPEC §1.2/§1.3), each elementwise parameter's
new ``(k, m)`` (SPEC-layers) and every parameter's update direction ``ĝ``
(SPEC §1.4) — or the :class:`~singd.optim.checks.Skip` of a step with
non-finite gradients, statistics or results.  It changes no optimizer state;
the optimizer commits a plan.  Its host reads are those of
:mod:`singd.optim.checks`: one for every flag and factor-step scalar, one for
the results' finiteness.  With ``shard_factor_work`` each rank computes the
factor steps of its own layers and receives the others' (:mod:`.sharded`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from singd.optim import checks, scaling, sharded
from singd.optim.checks import Skip
from singd.optim.elementwise import (
    K_KEY,
    M_KEY,
    elementwise_factor_step,
    elementwise_precondition,
)
from singd.optim.hooks import PendingStatistics
from singd.optim.layers import ElementwiseLayer, Layer, parameter_directions
from singd.optim.preconditioner import FactorStepInputs, LayerStep, Preconditioner, StepScalars
from singd.optim.table import LayerTable
from singd.optim.validation import resolve_lr_cov


class Gathered(NamedTuple):
    """A step's inputs after the optimizer's gather (full-batch, unscaled).

    Attributes:
        amp: the ``GradScaler``'s (or declared) scale of this step.
        pending: layer name → its statistics of this step's passes
            (:func:`plan_step` empties it once the factor steps are done).
        pending_elementwise: elementwise layer → its ``([h_γ, (h_β)], scale_removed)``.
        grads: ``id(param)`` → full-batch gradient.
    """

    amp: scaling.AmpStepInfo
    pending: dict[str, PendingStatistics]
    pending_elementwise: dict[str, tuple[list[Tensor], bool]]
    grads: dict[int, Tensor]


class StepContext(NamedTuple):
    """The optimizer state a step is planned from (read only).

    Attributes:
        table: the layers, their live states and the fallback.
        groups: the param groups.
        preconditioner: the per-layer maths.
        param_state: torch's per-parameter state (the elementwise ``k``, ``m``).
        steps: completed steps.
        shard_factor_work: ``configure_distributed(shard_factor_work=...)``.
    """

    table: LayerTable
    groups: list[dict[str, Any]]
    preconditioner: Preconditioner[Any]
    param_state: Mapping[Tensor, dict[str, Any]]
    steps: int
    shard_factor_work: bool

    def group(self, layer: Layer | ElementwiseLayer) -> dict[str, Any]:
        """The param group holding ``layer``'s parameters."""
        return self.groups[layer.group_index]

    def layer_step(self, name: str, pending: PendingStatistics) -> LayerStep:
        """Layer ``name`` with its group, live state and this step's statistics."""
        layer = self.table.layers[name]
        return LayerStep(layer, self.group(layer), self.table.states[name], pending)

    def restore(self, name: str, current: Any, storage: sharded.Storage) -> Any:
        """Layer ``name``'s state from plain tensors, shaped and placed like ``current``."""
        layer = self.table.layers[name]
        return self.preconditioner.from_storage(layer, self.group(layer), current, storage)


class StepPlan(NamedTuple):
    """Everything a taken step writes.

    Attributes:
        layer_states: layer name → its state after the factor step (layers with
            statistics only).
        elementwise: ``id(param)`` → its new ``(k, m)`` (elementwise parameters
            with statistics only).
        directions: ``id(param)`` → its update direction ``ĝ`` (before weight decay).
        backward_scale: the scale of this step's backward passes, if known (kept
            as the checkpoints' ``grad_scale_prev``, SPEC §1.5).
    """

    layer_states: dict[str, Any]
    elementwise: dict[int, tuple[Tensor, Tensor]]
    directions: dict[int, Tensor]
    backward_scale: float | None


def plan_step(context: StepContext, gathered: Gathered) -> Skip | StepPlan:
    """Everything the step writes, or why it is skipped; changes no optimizer state.

    Raises:
        ValueError: if the statistics' scale is unknown
            (:func:`singd.optim.scaling.statistics_correction`).
    """
    amp, pending, grads = gathered.amp, gathered.pending, gathered.grads
    table, preconditioner = context.table, context.preconditioner
    owners = sharded.owners(
        context.shard_factor_work,
        table.layers,
        lambda name: preconditioner.factor_step_cost(table.layers[name], table.states[name]),
    )
    prepared = preconditioner.prepare_factor_steps(
        [context.layer_step(name, pending[name]) for name in sharded.owned(owners, pending)]
    )
    param_labels = table.param_labels()
    stats_labels, stats_flags = checks.statistic_flags(
        {name: prepared[name].statistics if name in prepared else None for name in pending},
        pending,
        preconditioner.statistic_names,
    )
    # The gradients are checked through the directions: ĝ of a non-finite gradient
    # entry is non-finite through every preconditioner (each entry enters a product
    # or a sum: inf·0 and NaN give NaN), and only where a check fails are they read
    # themselves, to name them (the skip is then theirs, as if they had been checked
    # first; a taken step does not read them at all).
    reads = checks.read_host(
        stats_flags,
        {
            name: [pending[name].grad_scale.log2_factor, *inputs.reads]
            for name, inputs in prepared.items()
        },
    )
    if not all(reads.stats_ok):
        return gradient_skip(param_labels, grads) or Skip(
            "non-finite curvature statistics", checks.culprits(stats_labels, reads.stats_ok)
        )
    owned = {name: stats for name, stats in pending.items() if name in prepared}
    new_states = sharded.share_states(
        owners,
        new_layer_states(context, owned, prepared, reads.layers, amp),
        {name: table.states[name] for name in pending},
        to_storage=preconditioner.to_storage,
        from_storage=context.restore,
    )
    # The statistics and the factor steps' inputs are spent.  Released before the
    # directions are formed, these reuse their memory instead of growing the heap
    # (which glibc then trims after every step, so that the next one page-faults
    # it back in: 2 700 faults, about 11 ms, per step of the dense MLP).
    del prepared, owned
    pending.clear()
    step_directions = directions(context, grads, {**table.states, **new_states})
    elementwise, new_elementwise = elementwise_directions(
        context, grads, gathered.pending_elementwise, amp
    )
    step_directions.update(elementwise)
    culprits = checks.result_culprits(
        param_labels,
        new_elementwise,
        {name: preconditioner.to_storage(state) for name, state in new_states.items()},
        step_directions,
    )
    if culprits:
        return gradient_skip(param_labels, grads) or Skip(
            "non-finite factors or update after the factor step", culprits
        )
    return StepPlan(new_states, new_elementwise, step_directions, amp.backward_scale)


def gradient_skip(param_labels: dict[int, str], grads: dict[int, Tensor]) -> Skip | None:
    """The skip for non-finite gradients, naming them, or ``None`` if all are finite.

    Read only when a later check failed (one host sync): a gradient at fault
    takes precedence over the statistics or results it made non-finite.
    """
    labels = [f"{param_labels.get(key, 'a parameter')} gradient" for key in grads]
    bad = checks.nonfinite(labels, list(grads.values()))
    return Skip("non-finite gradients", bad) if bad else None


def new_layer_states(
    context: StepContext,
    pending: dict[str, PendingStatistics],
    prepared: dict[str, FactorStepInputs],
    reads: dict[str, checks.LayerReads],
    amp: scaling.AmpStepInfo,
) -> dict[str, Any]:
    """The factors after this statistics step (SPEC §1.3/§1.2), one new state per layer.

    ``reads`` holds each layer's host values (:func:`singd.optim.checks.read_host`).
    The gradient statistic's correction ``2^(−log2_factor) / s²`` is exact
    in float64 (SPEC §1.5, docs/SPEC.md).
    """
    scalars = {}
    for name, stats in pending.items():
        group = context.group(context.table.layers[name])
        correction = math.ldexp(
            scaling.statistics_correction(stats.grad_scale, amp, name),
            -reads[name].log2_factor,
        )
        lr_cov = resolve_lr_cov(group["lr_cov"], context.steps)
        scalars[name] = StepScalars(reads[name].values, correction, lr_cov)
    return context.preconditioner.updated_states(
        [context.layer_step(name, stats) for name, stats in pending.items()],
        prepared,
        scalars,
        context.steps,
    )


def directions(
    context: StepContext, grads: dict[int, Tensor], states: dict[str, Any]
) -> dict[int, Tensor]:
    """Every parameter's update direction ``ĝ`` (before weight decay, SPEC §1.4).

    Only parameters with a gradient get one: if just one of ``W``, ``b``
    has a gradient, the other enters ``∇W~`` as zeros but is not moved.
    """
    table = context.table
    result = {key: grad for key, grad in grads.items() if key in table.fallback}
    result.update(
        parameter_directions(
            table.layers.values(),
            grads,
            lambda requests: context.preconditioner.many_directions(
                [
                    (layer, context.group(layer), states[layer.name], weight, bias)
                    for layer, weight, bias in requests
                ]
            ),
        )
    )
    return result


def elementwise_directions(
    context: StepContext,
    grads: dict[int, Tensor],
    pending: dict[str, tuple[list[Tensor], bool]],
    amp: scaling.AmpStepInfo,
) -> tuple[dict[int, Tensor], dict[int, tuple[Tensor, Tensor]]]:
    """``ĝ = k² ∇θ`` of the elementwise parameters and their new ``(k, m)`` (SPEC-layers).

    With statistics pending, ``k`` moves first (``elementwise_factor_step``)
    and ``ĝ`` uses the new one; ``h`` still carrying the backward's ``s²``
    is divided by it here.  (``param_state[param]`` is torch's lazily made
    per-parameter dict: looking it up is all this does to it.)
    """
    result, new = {}, {}
    for name, layer in context.table.elementwise.items():
        group = context.group(layer)
        hs, scale_removed = pending.get(name, (None, True))
        for index, param in enumerate(layer.params):
            state = context.param_state[param]
            # the defaults only for a first step (dict.get would make them every step)
            k = state[K_KEY].to(param) if K_KEY in state else torch.ones_like(param)
            m = state[M_KEY].to(param) if M_KEY in state else torch.zeros_like(param)
            if hs is not None:
                h = hs[index].to(param.device)
                if not scale_removed and amp.backward_scale is not None:
                    h = h / amp.backward_scale**2
                k, m = elementwise_factor_step(
                    k,
                    m,
                    h,
                    lr_cov=resolve_lr_cov(group["lr_cov"], context.steps),
                    damping=group["damping"],
                    alpha1=group["alpha1"],
                )
                new[id(param)] = (k, m)
            if id(param) in grads:
                result[id(param)] = elementwise_precondition(k, grads[id(param)])
    return result, new
