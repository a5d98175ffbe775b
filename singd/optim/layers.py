"""Which parameters belong to which supported layer, and which fall back.

A supported layer (``nn.Linear``/``nn.Conv2d``, :mod:`singd.optim.statistics`)
is preconditioned as one matrix ``W~ = [W, b]`` (SPEC §1), so its weight and
bias must live in the same param group.  Every other optimised parameter is a
*fallback* parameter (momentum SGD on its raw gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from singd.optim.statistics import is_supported


@dataclass(frozen=True)
class Layer:
    """A supported layer handled with Kronecker factors.

    Attributes:
        name: qualified name in the unwrapped model's ``named_modules()``.
        module: the layer.
        group_index: index of the param group holding its weight (and bias).
        has_bias: whether the bias column is part of ``W~``.
    """

    name: str
    module: nn.Module
    group_index: int
    has_bias: bool

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias if self.has_bias else None

    @property
    def input_dim(self) -> int:
        """``d_i~``: ``d_i`` plus one for the bias column."""
        return math.prod(self.module.weight.shape[1:]) + int(self.has_bias)

    @property
    def output_dim(self) -> int:
        """``d_o``."""
        return self.module.weight.shape[0]

    def params(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


def unwrap_model(model: Any) -> nn.Module:
    """The module to hook: ``model.module`` for ``(Distributed)DataParallel``.

    Raises:
        ValueError: for a ``DataParallel`` over more than one device: its
            replicas run the hooks of one module in threads, so the
            statistics would mix devices and count every sample once per
            replica; ``DistributedDataParallel`` (one process per device) is
            supported.
    """
    if isinstance(model, DataParallel) and len(model.device_ids) > 1:
        raise ValueError(
            f"DataParallel over {len(model.device_ids)} devices is not supported (its replicas "
            "share one set of curvature hooks); use torch.nn.parallel.DistributedDataParallel "
            "with one process per device (or DataParallel over one device)"
        )
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def find_layers(model: nn.Module, param_groups: list[dict[str, Any]]) -> list[Layer]:
    """The supported layers whose weight is optimised, in module order.

    A layer whose weight is frozen (``requires_grad=False``) or not real
    floating point (complex) is not one: its optimised parameters fall back to
    momentum SGD.  A frozen bias is not a column of ``W~``.

    Raises:
        ValueError: if a layer's weight and bias are in different param groups
            (or one of them in none while the other is optimised), or a
            parameter is shared by two supported layers.
    """
    group_of = {id(p): index for index, group in enumerate(param_groups) for p in group["params"]}
    owner: dict[int, str] = {}
    layers = []
    for name, module in model.named_modules():
        if not is_supported(module):
            continue
        weight, bias = module.weight, module.bias
        if not (weight.requires_grad and weight.is_floating_point()):
            continue
        weight_group = group_of.get(id(weight))
        bias_group = None if bias is None else group_of.get(id(bias))
        if weight_group is None and bias_group is None:
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
        layers.append(Layer(name, module, weight_group, needs_bias))
    return layers


def fallback_params(
    model: nn.Module, param_groups: list[dict[str, Any]], layers: list[Layer]
) -> dict[int, str]:
    """``id(param) → name`` of every optimised parameter outside ``layers``."""
    covered = {id(p) for layer in layers for p in layer.params()}
    names = {id(p): name for name, p in model.named_parameters()}
    result = {}
    for index, group in enumerate(param_groups):
        for position, param in enumerate(group["params"]):
            if id(param) not in covered:
                result[id(param)] = names.get(id(param), f"param_groups[{index}][{position}]")
    return result
