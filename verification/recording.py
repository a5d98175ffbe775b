"""Record a real torch training run with hooks of its own (the implementation side).

The recorder is independent of the optimizer's plumbing: it registers its
*own* forward hooks (layer inputs ``a``) and tensor hooks on the layer outputs
(output gradients ``g``) on every layer the optimizer preconditions, reads
``p.grad`` before each ``step()`` and the optimizer's state after it.  What it
keeps is exactly what :mod:`verification.replay` feeds the oracle: the raw
``a``, ``g`` per pass, ``∇W~`` per step, and dense float64 copies of the state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

#: A model's loss on one micro-batch: ``loss_fn(model, micro_batch_index)``.
LossFunction = Callable[[nn.Module, int], Tensor]


LossFunction = Callable[[nn.Module, int], Tensor]


@dataclass
class LayerPass:
    """One forward/backward pass through one layer.

    Attributes:
        inputs: The layer's input ``a`` (as the layer received it).
        output_grads: ``∂loss/∂output``, set by the tensor hook during backward.
    """

    inputs: Tensor
    output_grads: Tensor | None = None


@dataclass
class LayerStep:
    """What one layer saw during one ``step()`` and its state afterwards.

    Attributes:
        passes: The forward/backward passes before the step (accumulation).
        grad: ``∇W~`` (``d_o × d_i``, bias column last), read before ``step()``.
        state: Dense float64 copies of the optimizer's layer state after the
            step (``"K"``, ``"C"``, … or ``"S_K"``, ``"S_C"``), plus ``"W"``
            (``W~``) and ``"m_W"`` (its momentum).
    """

    passes: list[LayerPass]
    grad: np.ndarray
    state: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class RecordedRun:
    """A recorded torch run.

    Attributes:
        initial_weights: ``W~`` of each layer before the first step (float64).
        steps: ``steps[t][layer_name]`` is that layer's :class:`LayerStep`.
        layers: The preconditioned modules by qualified name.
    """

    initial_weights: dict[str, np.ndarray]
    steps: list[dict[str, LayerStep]]
    layers: dict[str, nn.Module]


def weight_matrix(module: nn.Module, weight: Tensor) -> Tensor:
    """``W`` (or a tensor shaped like it) as ``d_o × d_i``: flattened from dim 1; ``Wᵀ`` for an
    embedding (SPEC-layers)."""
    if isinstance(module, nn.Embedding):
        return weight.T
    return weight.flatten(start_dim=1)


def _bias(module: nn.Module) -> Tensor | None:
    return getattr(module, "bias", None)


def combined_weight(module: nn.Module) -> Tensor:
    """``W~ = [W, b]`` (``d_o × d_i``) of a Linear, Conv or Embedding layer."""
    weight = weight_matrix(module, module.weight)
    if _bias(module) is None:
        return weight
    return torch.cat([weight, module.bias.unsqueeze(1)], dim=1)


def combined_grad(module: nn.Module) -> Tensor:
    """``∇W~`` from ``weight.grad`` and ``bias.grad`` (same layout as :func:`combined_weight`)."""
    grad = weight_matrix(module, module.weight.grad)
    if _bias(module) is None:
        return grad
    return torch.cat([grad, module.bias.grad.unsqueeze(1)], dim=1)


def _momentum_buffer(optimizer: torch.optim.Optimizer, param: Tensor) -> Tensor:
    """``param``'s momentum buffer; zeros (its initial value) while no step has been taken.

    Only every step so far having been skipped (non-finite) leaves no buffer.
    """
    buffer = optimizer.state[param].get("momentum_buffer")
    return torch.zeros_like(param) if buffer is None else buffer


def _combined_momentum(optimizer: torch.optim.Optimizer, module: nn.Module) -> Tensor:
    """The momentum buffers of ``weight`` and ``bias`` in the ``W~`` layout."""
    weight = weight_matrix(module, _momentum_buffer(optimizer, module.weight))
    if _bias(module) is None:
        return weight
    bias = _momentum_buffer(optimizer, module.bias)
    return torch.cat([weight, bias.unsqueeze(1)], dim=1)


def to_numpy(tensor: Tensor) -> np.ndarray:
    """An exact float64 numpy copy of ``tensor`` (any float dtype upcasts exactly)."""
    return tensor.detach().to(dtype=torch.float64, device="cpu").numpy().copy()


class PassRecorder:
    """Forward hooks + output tensor hooks that record ``a`` and ``g`` per pass."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.passes: dict[str, list[LayerPass]] = {name: [] for name in layers}
        self._handles = [
            module.register_forward_hook(self._forward_hook(name))
            for name, module in layers.items()
        ]

    def _forward_hook(self, name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        """The hook that records the input of layer ``name`` and hooks its output."""

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            record = LayerPass(inputs=inputs[0].detach().clone())
            self.passes[name].append(record)

            def store_grad(grad: Tensor) -> None:
                record.output_grads = grad.detach().clone()

            if output.requires_grad:
                output.register_hook(store_grad)

        return hook

    def pop(self) -> dict[str, list[LayerPass]]:
        """The completed passes since the last call (passes without backward are dropped)."""
        done = {
            name: [p for p in passes if p.output_grads is not None]
            for name, passes in self.passes.items()
        }
        self.passes = {name: [] for name in self.passes}
        return done

    def remove(self) -> None:
        """Remove all hooks."""
        for handle in self._handles:
            handle.remove()


def record_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFunction,
    steps: int,
    micro_batches: int = 1,
) -> RecordedRun:
    """Train ``model`` for ``steps`` steps and record everything the oracle needs.

    Args:
        model: The model (already in its dtype).
        optimizer: A ``SINGD`` or ``KFAC`` instance built on ``model``.
        loss_fn: ``loss_fn(model, index)`` runs the forward pass of the
            ``index``-th micro-batch of the *current step* and returns its loss;
            it must draw fresh data on every call.
        steps: Number of optimizer steps.
        micro_batches: Backward passes per step (gradient accumulation).

    Returns:
        The recording.
    """
    layers = {name: model.get_submodule(name) for name in optimizer.layer_names()}
    initial = {name: to_numpy(combined_weight(module)) for name, module in layers.items()}
    recorder = PassRecorder(layers)
    recorded: list[dict[str, LayerStep]] = []
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            for index in range(micro_batches):
                loss_fn(model, index).backward()
            passes = recorder.pop()
            step = {
                name: LayerStep(passes=passes[name], grad=to_numpy(combined_grad(module)))
                for name, module in layers.items()
            }
            optimizer.step()
            for name, module in layers.items():
                state = {key: _dense(value) for key, value in optimizer.layer_state(name).items()}
                state["W"] = to_numpy(combined_weight(module))
                state["m_W"] = to_numpy(_combined_momentum(optimizer, module))
                step[name].state = state
            recorded.append(step)
    finally:
        recorder.remove()
    return RecordedRun(initial_weights=initial, steps=recorded, layers=layers)


def _dense(value: object) -> np.ndarray:
    """A layer-state entry (``StructuredMatrix`` or tensor) as dense float64."""
    if isinstance(value, Tensor):
        return to_numpy(value)
    return to_numpy(value.to_dense())
