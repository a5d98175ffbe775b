"""Feed a recorded torch run to the float64 oracle steppers (``reference``).

The raw ``a``, ``g`` of every pass go through :mod:`reference.statistics`
(SPEC §1.1) to the oracle's :class:`~reference.updates.StepRecord`; the
oracle stepper then runs in float64 from the same initial ``W~``.  In low
precision the oracle is fed the *same* recorded low-precision tensors, upcast
exactly to float64, so a comparison measures only the optimizer's own
rounding, never the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from reference.attention import Rows, projection_rows
from reference.kfac import KFACHyperparameters, KFACState, kfac_trajectory
from reference.numbers import FLOAT64, Numbers
from reference.statistics import (
    conv2d_statistics,
    conv_statistics,
    embedding_statistics,
    linear_statistics,
)
from reference.updates import SINGDHyperparameters, SINGDState, StepRecord, singd_trajectory
from verification.recording import LayerPass, RecordedRun, to_numpy
from verification.tolerances import chain_bound

_State = TypeVar("_State")
_Hyper = TypeVar("_Hyper")


def layer_statistics(
    module: nn.Module,
    layer_pass: LayerPass,
    approx: str,
    loss_average: str | None,
    numbers: Numbers = FLOAT64,
) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's scaled ``(A, G)`` (SPEC §1.1, SPEC-layers) of one recorded pass in ``numbers``.

    Dispatches on the module type itself (not on singd's layer kinds): Linear,
    Conv1d/2d/3d, Embedding; a pass of an MHA projection on its recorded call.
    """
    if layer_pass.attention is not None:
        rows = attention_rows(layer_pass)
        return linear_statistics(
            numbers.asarray(rows.inputs),
            numbers.asarray(rows.grads),
            bias=attention_bias(layer_pass),
            approx=approx,
            loss_average=loss_average,
        )
    grads = numbers.asarray(to_numpy(layer_pass.output_grads))
    if isinstance(module, nn.Embedding):
        return embedding_statistics(
            layer_pass.inputs.cpu().numpy(),
            grads,
            num_embeddings=module.num_embeddings,
            padding_idx=module.padding_idx,
            approx=approx,
            loss_average=loss_average,
        )
    inputs = numbers.asarray(to_numpy(layer_pass.inputs))
    bias = module.bias is not None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        # Conv2d keeps the oracle's original 2-d patch code (its own check of the N-d one)
        statistics = conv2d_statistics if isinstance(module, nn.Conv2d) else conv_statistics
        return statistics(
            inputs,
            grads,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=bias,
            approx=approx,
            loss_average=loss_average,
        )
    return linear_statistics(inputs, grads, bias=bias, approx=approx, loss_average=loss_average)


def attention_rows(layer_pass: LayerPass) -> Rows:
    """The oracle's rows (and magnitudes) of an MHA projection's pass (SPEC §1.6), computed
    by :func:`reference.attention.projection_rows` from the recorded call."""
    call = layer_pass.attention
    rows = projection_rows(
        call.params, call.query, call.key, call.value, call.output_grads, call.mask
    )
    return rows[layer_pass.role]


def attention_bias(layer_pass: LayerPass) -> bool:
    """Whether the MHA projection of ``layer_pass`` has a bias column."""
    params = layer_pass.attention.params
    return (params.b_o if layer_pass.role == "out_proj" else params.b_q) is not None


def attention_row_errors(layer_pass: LayerPass) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on ``|model's a − oracle's a|`` and the same for ``g`` of an MHA projection.

    Rule: the recorded query, key, value and ``∂L/∂out`` are the model's exactly;
    ``o`` (out_proj's ``a``) and ``∂L/∂q``, ``∂L/∂k``, ``∂L/∂v`` are computed twice,
    by the model in its dtype and by the oracle in float64, along the attention's
    chain of products (in-projection, scores, softmax sum, ``P v``, and back:
    ``∂L/∂o``, ``∂L/∂P``, the softmax's row sum, ``∂L/∂q``); each differs from
    the exact value by at most ``chain_bound(dtype, chain)`` times the magnitude
    :func:`reference.attention.projection_rows` carries (Higham §3.3).
    """
    call = layer_pass.attention
    rows = attention_rows(layer_pass)
    embed, heads = call.params.w_o.shape[0], call.params.num_heads
    source = call.key.shape[1] + (call.params.bias_k is not None) + call.params.add_zero_attn
    widest = max(call.query.shape[2], call.key.shape[2], call.value.shape[2]) + 1
    chain = [widest, embed // heads, source, source, embed + 1, embed // heads, source, source]
    rule = chain_bound(call.dtype, chain) + chain_bound(torch.float64, chain)
    exact = np.zeros_like
    if layer_pass.role == "out_proj":
        return rule * rows.inputs_magnitude, exact(rows.grads)
    return exact(rows.inputs), rule * rows.grads_magnitude


def step_records(
    run: RecordedRun, name: str, approx: str, loss_average: str | None
) -> list[StepRecord]:
    """The oracle's records of layer ``name``, one per step."""
    module = run.layers[name]
    return [
        StepRecord(
            grad=step[name].grad,
            stats=tuple(
                layer_statistics(module, p, approx, loss_average) for p in step[name].passes
            ),
        )
        for step in run.steps
    ]


def _replay(
    run: RecordedRun,
    trajectory: Callable[[np.ndarray, list[StepRecord], _Hyper, Numbers], list[_State]],
    hyper: _Hyper,
    approx: str,
    loss_average: str | None,
) -> dict[str, list[_State]]:
    """Every layer's float64 oracle ``trajectory`` from its initial ``W~``, fed the recorded run."""
    return {
        name: trajectory(
            run.initial_weights[name], step_records(run, name, approx, loss_average), hyper, FLOAT64
        )
        for name in run.layers
    }


def replay_singd(
    run: RecordedRun,
    hyper: SINGDHyperparameters,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> dict[str, list[SINGDState]]:
    """The float64 oracle trajectory of every layer, fed the recorded run."""
    return _replay(run, singd_trajectory, hyper, approx, loss_average)


def replay_kfac(
    run: RecordedRun,
    hyper: KFACHyperparameters,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> dict[str, list[KFACState]]:
    """The float64 KFAC oracle trajectory of every layer, fed the recorded run."""
    return _replay(run, kfac_trajectory, hyper, approx, loss_average)
