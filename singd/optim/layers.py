"""Which parameters belong to which Kronecker layer, and which fall back.

A module that a layer kind (:mod:`singd.optim.kinds`) handles is
preconditioned as one matrix ``W~ = [W, b]`` (SPEC §1, SPEC-layers), so its
weight and bias must live in the same param group.  Every other optimised
parameter is a *fallback* parameter (the group's ``fallback`` optimizer on
its raw gradient), except the affine parameters of LayerNorm/RMSNorm layers
where the optimizer takes them (:mod:`singd.optim.elementwise`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from singd.optim.elementwise import is_elementwise
from singd.optim.kinds import LayerKind, input_dim, kind_of, output_dim

#: Why an optimizer declines a kind (``None``: it accepts it), e.g. KFAC and one-hot inputs.
KindFilter = Callable[[LayerKind], str | None]


@dataclass(frozen=True)
class Layer:
    """A layer handled with Kronecker factors.

    Attributes:
        name: qualified name in the unwrapped model's ``named_modules()``.
        module: the layer.
        kind: how the module becomes a canonical layer.
        group_index: index of the param group holding its weight (and bias).
        has_bias: whether the bias column is part of ``W~``.
    """

    name: str
    module: nn.Module
    kind: LayerKind
    group_index: int
    has_bias: bool

    @property
    def weight(self) -> Tensor:
        return self.kind.weight(self.module)

    @property
    def bias(self) -> Tensor | None:
        return self.kind.bias(self.module) if self.has_bias else None

    @property
    def input_dim(self) -> int:
        """``d_i~``: ``d_i`` plus one for the bias column."""
        return input_dim(self.kind, self.module, self.has_bias)

    @property
    def output_dim(self) -> int:
        """``d_o``."""
        return output_dim(self.kind, self.module)

    def params(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def gradient_matrix(self, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
        """``∇W~ = [∇W, ∇b]`` as a ``d_o × d_i~`` matrix (SPEC §1)."""
        matrix = self.kind.weight_matrix(weight_grad)
        if bias_grad is None:
            return matrix
        return torch.cat([matrix, bias_grad.reshape(-1, 1)], dim=1)

    def split(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`gradient_matrix`: ``d_o × d_i~`` → (weight-shaped, bias)."""
        shape = self.weight.shape
        if not self.has_bias:
            return self.kind.weight_from_matrix(matrix, shape), None
        return self.kind.weight_from_matrix(matrix[:, :-1], shape), matrix[:, -1].clone()


def unwrap_model(model: Any) -> nn.Module:
    """The module to hook and name layers by.

    ``model.module`` for ``(Distributed)DataParallel``, ``model._orig_mod`` for
    ``torch.compile`` (so names, and checkpoints, are those of the plain model).

    Raises:
        ValueError: for a ``DataParallel`` over more than one device: its
            replicas run the hooks of one module in threads, so the
            statistics would mix devices and count every sample once per
            replica; ``DistributedDataParallel`` (one process per device) is
            supported.
    """
    while True:
        if isinstance(model, DataParallel) and len(model.device_ids) > 1:
            raise ValueError(
                f"DataParallel over {len(model.device_ids)} devices is not supported (its "
                "replicas share one set of curvature hooks); use "
                "torch.nn.parallel.DistributedDataParallel with one process per device (or "
                "DataParallel over one device)"
            )
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            break
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _not_called_as_module(model: nn.Module) -> set[int]:
    """Modules whose parent computes with their parameters without calling them.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` inside
    ``F.multi_head_attention_forward``: hooks on ``out_proj`` never fire.
    """
    return {
        id(module.out_proj)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def find_layers(
    model: nn.Module, param_groups: list[dict[str, Any]], accepts: KindFilter
) -> tuple[list[Layer], dict[str, str]]:
    """The Kronecker layers whose weight is optimised, in module order, and declined modules.

    A module no kind matches is not one; nor one whose weight is frozen
    (``requires_grad=False``), not real floating point (complex) or not yet
    initialised (lazy modules).  A frozen bias is not a column of ``W~``.

    Returns:
        The layers, and ``name → reason`` for matched modules that fall back
        anyway (the kind's :meth:`~singd.optim.kinds.LayerKind.unsupported_reason`,
        the optimizer declining the kind, a ``kfac_approx`` the kind does not
        define, or a module its parent never calls).

    Raises:
        ValueError: if a layer's weight and bias are in different param groups
            (or one of them in none while the other is optimised), or a
            parameter is shared by two layers.
    """
    group_of = {id(p): index for index, group in enumerate(param_groups) for p in group["params"]}
    not_called = _not_called_as_module(model)
    owner: dict[int, str] = {}
    layers, declined = [], {}
    for name, module in model.named_modules():
        kind = kind_of(module)
        if kind is None:
            continue
        weight, bias = kind.weight(module), kind.bias(module)
        if isinstance(weight, nn.parameter.UninitializedParameter):
            continue
        if not (weight.requires_grad and weight.is_floating_point()):
            continue
        weight_group = group_of.get(id(weight))
        bias_group = None if bias is None else group_of.get(id(bias))
        if weight_group is None and bias_group is None:
            continue
        reason = kind.unsupported_reason(module) or accepts(kind)
        if id(module) in not_called:
            reason = "its parent computes with its weight without calling it"
        elif reason is None:
            approx = param_groups[weight_group if weight_group is not None else bias_group][
                "kfac_approx"
            ]
            if approx not in kind.approximations:
                reason = f"{kind.name} statistics are not defined for kfac_approx={approx!r}"
        if reason is not None:
            declined[name] = reason
            continue
        needs_bias = bias is not None and bias.requires_grad
        if needs_bias and weight_group != bias_group:
            raise ValueError(
                f"layer {name!r}: weight and bias must be in the same param group (they form "
                f"one matrix [W, b]); weight is in group {weight_group}, bias in {bias_group}"
            )
        for param in (weight, bias):
            if param is not None and id(param) in owner:
                raise ValueError(
                    f"layer {name!r} shares a parameter with layer {owner[id(param)]!r}; "
                    "shared weights are not supported"
                )
            if param is not None:
                owner[id(param)] = name
        layers.append(Layer(name, module, kind, weight_group, needs_bias))
    return layers, declined


@dataclass(frozen=True)
class ElementwiseLayer:
    """A LayerNorm/RMSNorm whose affine parameters get the elementwise preconditioner.

    Attributes:
        name: qualified name in the unwrapped model.
        module: the layer.
        group_index: the param group of its weight (and bias).
        params: ``[γ]`` or ``[γ, β]`` (an optimised bias only).
    """

    name: str
    module: nn.Module
    group_index: int
    params: list[Tensor]


def find_elementwise_layers(
    model: nn.Module, param_groups: list[dict[str, Any]]
) -> list[ElementwiseLayer]:
    """The LayerNorm/RMSNorm layers with an optimised, trainable weight, in module order.

    Raises:
        ValueError: if weight and bias are in different param groups.
    """
    group_of = {id(p): index for index, group in enumerate(param_groups) for p in group["params"]}
    layers = []
    for name, module in model.named_modules():
        if not is_elementwise(module) or not module.weight.requires_grad:
            continue
        weight_group = group_of.get(id(module.weight))
        if weight_group is None:
            continue
        params = [module.weight]
        bias = getattr(module, "bias", None)
        if bias is not None and bias.requires_grad:
            if group_of.get(id(bias)) != weight_group:
                raise ValueError(
                    f"layer {name!r}: weight and bias must be in the same param group "
                    f"(one elementwise layer); weight is in group {weight_group}, bias in "
                    f"{group_of.get(id(bias))}"
                )
            params.append(bias)
        layers.append(ElementwiseLayer(name, module, weight_group, params))
    return layers


def fallback_params(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    layers: list[Layer],
    elementwise: list[ElementwiseLayer] = (),
) -> dict[int, str]:
    """``id(param) → name`` of every optimised parameter outside ``layers`` and ``elementwise``."""
    covered = {id(p) for layer in layers for p in layer.params()}
    covered |= {id(p) for layer in elementwise for p in layer.params}
    names = {id(p): name for name, p in model.named_parameters()}
    result = {}
    for index, group in enumerate(param_groups):
        for position, param in enumerate(group["params"]):
            if id(param) not in covered:
                result[id(param)] = names.get(id(param), f"param_groups[{index}][{position}]")
    return result
