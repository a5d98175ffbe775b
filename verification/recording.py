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
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from reference.attention import ROLES, AttentionParameters, additive_mask

#: A model's loss on one micro-batch: ``loss_fn(model, micro_batch_index)``.
LossFunction = Callable[[nn.Module, int], Tensor]


@dataclass
class AttentionPass:
    """What an ``nn.MultiheadAttention`` call shows from outside (SPEC §1.6): the oracle's
    (:mod:`reference.attention`) inputs for the rows of its four projections.

    Attributes:
        query, key, value: ``[B, S, d]`` float64 copies (batch first; unbatched: ``B = 1``).
        mask: The additive mask ``[B, 1, L, S]`` of ``key_padding_mask`` / ``attn_mask``.
        params: The module's parameters at the forward.
        dtype: The model's dtype (its attention rounds in it).
        output_grads: ``∂loss/∂out`` ``[B, L, E]``, set during backward.
    """

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    mask: np.ndarray
    params: AttentionParameters
    dtype: torch.dtype
    output_grads: np.ndarray | None = None


@dataclass
class LayerPass:
    """One forward/backward pass through one layer.

    Attributes:
        inputs: The layer's input ``a`` (as the layer received it; an MHA's query).
        output_grads: ``∂loss/∂output``, set by the tensor hook during backward.
        attention: For a projection of an MHA: the call, from which the oracle
            computes ``a`` and ``g`` itself (never torch's internal tensors).
        role: That projection (``q``, ``k``, ``v``, ``out_proj``).
    """

    inputs: Tensor
    output_grads: Tensor | None = None
    attention: AttentionPass | None = None
    role: str | None = None


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


def attention_role(model: nn.Module, name: str) -> tuple[nn.Module, str | None]:
    """The module of layer ``name`` and, for an MHA projection (``<mha>.q``, …), its role."""
    parent, _, role = name.rpartition(".")
    owner = model.get_submodule(parent)
    if isinstance(owner, nn.MultiheadAttention) and role in ROLES:
        return owner, role
    return model.get_submodule(name), None


def _attention_blocks(module: nn.MultiheadAttention, role: str) -> list[tuple[Tensor, slice]]:
    """``(parameter, rows)`` of ``W`` and (if any) ``b`` of an MHA projection (SPEC §1.6)."""
    embed = module.embed_dim
    if role == "out_proj":
        blocks = [(module.out_proj.weight, slice(None))]
        bias = module.out_proj.bias
        return blocks if bias is None else [*blocks, (bias, slice(None))]
    rows = slice(ROLES.index(role) * embed, (ROLES.index(role) + 1) * embed)
    if module._qkv_same_embed_dim:
        blocks = [(module.in_proj_weight, rows)]
    else:
        blocks = [(getattr(module, f"{role}_proj_weight"), slice(None))]
    bias = module.in_proj_bias
    return blocks if bias is None else [*blocks, (bias, rows)]


def _role_matrix(
    module: nn.MultiheadAttention, role: str, tensor_of: Callable[[Tensor], Tensor]
) -> Tensor:
    """``[W, b]`` of an MHA projection, each read through ``tensor_of(parameter)[rows]``."""
    parts = [tensor_of(param)[rows] for param, rows in _attention_blocks(module, role)]
    return torch.cat([parts[0], *(part.unsqueeze(1) for part in parts[1:])], dim=1)


def weight_matrix(module: nn.Module, weight: Tensor) -> Tensor:
    """``W`` (or a tensor shaped like it) as ``d_o × d_i``: flattened from dim 1; ``Wᵀ`` for an
    embedding (SPEC-layers)."""
    if isinstance(module, nn.Embedding):
        return weight.T
    return weight.flatten(start_dim=1)


def _bias(module: nn.Module) -> Tensor | None:
    return getattr(module, "bias", None)


def combined_weight(module: nn.Module, role: str | None = None) -> Tensor:
    """``W~ = [W, b]`` (``d_o × d_i``) of a Linear, Conv or Embedding layer, or of the
    ``role`` projection of an MHA."""
    if role is not None:
        return _role_matrix(module, role, lambda param: param)
    weight = weight_matrix(module, module.weight)
    if _bias(module) is None:
        return weight
    return torch.cat([weight, module.bias.unsqueeze(1)], dim=1)


def combined_grad(module: nn.Module, role: str | None = None) -> Tensor:
    """``∇W~`` from ``weight.grad`` and ``bias.grad`` (same layout as :func:`combined_weight`)."""
    if role is not None:
        return _role_matrix(module, role, lambda param: param.grad)
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


def _combined_momentum(
    optimizer: torch.optim.Optimizer, module: nn.Module, role: str | None = None
) -> Tensor:
    """The momentum buffers of ``weight`` and ``bias`` in the ``W~`` layout."""
    if role is not None:
        return _role_matrix(module, role, partial(_momentum_buffer, optimizer))
    weight = weight_matrix(module, _momentum_buffer(optimizer, module.weight))
    if _bias(module) is None:
        return weight
    bias = _momentum_buffer(optimizer, module.bias)
    return torch.cat([weight, bias.unsqueeze(1)], dim=1)


def to_numpy(tensor: Tensor) -> np.ndarray:
    """An exact float64 numpy copy of ``tensor`` (any float dtype upcasts exactly)."""
    return tensor.detach().to(dtype=torch.float64, device="cpu").numpy().copy()


def _batch_first(module: nn.MultiheadAttention, x: Tensor) -> np.ndarray:
    """An MHA input or output as ``[B, S, d]`` float64 (unbatched ``[S, d]``: ``B = 1``)."""
    if x.ndim == 2:
        x = x.unsqueeze(0)
    elif not module.batch_first:
        x = x.transpose(0, 1)
    return to_numpy(x)


def _array(tensor: Tensor | None) -> np.ndarray | None:
    return None if tensor is None else to_numpy(tensor)


def attention_parameters(module: nn.MultiheadAttention) -> AttentionParameters:
    """The oracle's parameters of ``module`` (float64 copies)."""
    embed = module.embed_dim
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = np.split(to_numpy(module.in_proj_weight), 3)
    else:
        w_q, w_k, w_v = (
            to_numpy(getattr(module, f"{role}_proj_weight")) for role in ("q", "k", "v")
        )
    bias = _array(module.in_proj_bias)
    b_q, b_k, b_v = (None,) * 3 if bias is None else np.split(bias, 3)
    extra = [
        _array(t).reshape(embed) if t is not None else None for t in (module.bias_k, module.bias_v)
    ]
    return AttentionParameters(
        w_q,
        w_k,
        w_v,
        to_numpy(module.out_proj.weight),
        b_q,
        b_k,
        b_v,
        _array(module.out_proj.bias),
        module.num_heads,
        *extra,
        module.add_zero_attn,
    )


def _attention_mask(
    module: nn.MultiheadAttention, query: np.ndarray, key: np.ndarray, kwargs: dict[str, Any]
) -> np.ndarray:
    """The call's additive mask (:func:`reference.attention.additive_mask`).

    Raises:
        ValueError: for a per-head (3-D) ``attn_mask`` or ``is_causal`` (not recorded).
    """
    padding, attn = kwargs.get("key_padding_mask"), kwargs.get("attn_mask")
    if kwargs.get("is_causal") or (attn is not None and attn.ndim != 2):
        raise ValueError("the recorder takes 2-D attn_mask and key_padding_mask only")
    batch, length, source = query.shape[0], query.shape[1], key.shape[1]
    if padding is not None:
        padding = padding.reshape(batch, source).cpu().numpy()
        padding = padding if padding.dtype == bool else to_numpy(padding) != 0
    if attn is not None:
        attn = attn.cpu().numpy() if attn.dtype == torch.bool else to_numpy(attn)
    return additive_mask(batch, length, source, key_padding_mask=padding, attn_mask=attn)


class PassRecorder:
    """Forward hooks + output tensor hooks that record ``a`` and ``g`` per pass.

    An MHA's projections (``roles``: layer name → the MHA's role) get one
    hook on the MHA: the call's inputs, mask, parameters and ``∂loss/∂out``
    (:class:`AttentionPass`), shared by the four layers' passes.
    """

    def __init__(
        self, layers: dict[str, nn.Module], roles: dict[str, str | None] | None = None
    ) -> None:
        self.passes: dict[str, list[LayerPass]] = {name: [] for name in layers}
        roles = roles or {}
        plain = {name: m for name, m in layers.items() if roles.get(name) is None}
        self._handles = [
            module.register_forward_hook(self._forward_hook(name)) for name, module in plain.items()
        ]
        attention: dict[int, list[tuple[str, str]]] = {}
        for name, module in layers.items():
            role = roles.get(name)
            if role is not None:
                attention.setdefault(id(module), []).append((name, role))
        for named in attention.values():
            module = layers[named[0][0]]
            hook = self._attention_hook(named)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _attention_hook(self, named: list[tuple[str, str]]) -> Callable[..., None]:
        """The hook recording one MHA call for its layers ``(name, role)``."""

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: tuple) -> None:
            call = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
            query, key, value = (_batch_first(module, call[k]) for k in ("query", "key", "value"))
            record = AttentionPass(
                query,
                key,
                value,
                _attention_mask(module, query, key, call),
                attention_parameters(module),
                module.out_proj.weight.dtype,
            )
            passes = []
            for name, role in named:
                layer_pass = LayerPass(call["query"].detach().clone(), attention=record, role=role)
                self.passes[name].append(layer_pass)
                passes.append(layer_pass)

            def store_grad(grad: Tensor) -> None:
                record.output_grads = _batch_first(module, grad)
                for layer_pass in passes:
                    layer_pass.output_grads = grad.detach().clone()

            if output[0].requires_grad:
                output[0].register_hook(store_grad)

        return hook

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
    located = {name: attention_role(model, name) for name in optimizer.layer_names()}
    layers = {name: module for name, (module, _) in located.items()}
    roles = {name: role for name, (_, role) in located.items()}
    initial = {name: to_numpy(combined_weight(layers[name], roles[name])) for name in layers}
    recorder = PassRecorder(layers, roles)
    recorded: list[dict[str, LayerStep]] = []
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            for index in range(micro_batches):
                loss_fn(model, index).backward()
            passes = recorder.pop()
            step = {
                name: LayerStep(
                    passes=passes[name], grad=to_numpy(combined_grad(module, roles[name]))
                )
                for name, module in layers.items()
            }
            optimizer.step()
            for name, module in layers.items():
                state = {key: _dense(value) for key, value in optimizer.layer_state(name).items()}
                state["W"] = to_numpy(combined_weight(module, roles[name]))
                state["m_W"] = to_numpy(_combined_momentum(optimizer, module, roles[name]))
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
