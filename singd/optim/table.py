"""The optimizer's layer table: its Kronecker layers with their states, its elementwise
layers and its fallback parameters (SPEC §1, SPEC-layers).

:mod:`singd.optim.layers` says which modules are layers and which parameters
fall back; the table keeps what was found as param groups are added, makes
each new layer's state with the preconditioner, keeps every state placed like
its weight (``model.to`` after construction) and names every parameter for
the skip warnings.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from singd.optim.layers import (
    ElementwiseLayer,
    Layer,
    fallback_params,
    find_elementwise_layers,
    find_layers,
    parameter_labels,
)
from singd.optim.preconditioner import Preconditioner


class Added(NamedTuple):
    """What :meth:`LayerTable.refresh` added.

    Attributes:
        layers: the new Kronecker layers, in module order.
        elementwise: the new elementwise layers, in module order.
        unseen: names of fallback parameters not in the table before.
        declined: ``name → reason`` of the modules a kind matched that fall back.
    """

    layers: list[Layer]
    elementwise: list[ElementwiseLayer]
    unseen: list[str]
    declined: dict[str, str]


class LayerTable:
    """Layer name → layer and state, elementwise layers, ``id(param)`` → fallback name."""

    def __init__(self) -> None:
        self.layers: dict[str, Layer] = {}
        self.states: dict[str, dict[str, Any]] = {}
        #: ``(device, dtype)`` of each layer's weight when its state was made or last moved
        self.placements: dict[str, tuple[torch.device, torch.dtype]] = {}
        self.elementwise: dict[str, ElementwiseLayer] = {}
        self.fallback: dict[int, str] = {}

    def refresh(
        self,
        model: nn.Module,
        param_groups: list[dict[str, Any]],
        preconditioner: Preconditioner[Any],
    ) -> Added:
        """Add the newly optimised layers (with their initial states) and the new fallbacks.

        Every new layer's state is made before any is added, so a layer that
        is rejected (``ValueError``) leaves nothing behind.
        """
        layers, declined = find_layers(model, param_groups, preconditioner.declines)
        new_states = {
            layer.name: preconditioner.new_state(layer, param_groups[layer.group_index])
            for layer in layers
            if layer.name not in self.layers
        }
        elementwise = []
        if preconditioner.elementwise:
            elementwise = find_elementwise_layers(model, param_groups)
            taken = {id(p) for layer in layers for p in layer.params()}
            elementwise = [e for e in elementwise if not taken & {id(p) for p in e.params}]
        added = [layer for layer in layers if layer.name in new_states]
        for layer in added:
            self.states[layer.name] = new_states[layer.name]
            self.placements[layer.name] = (layer.weight.device, layer.weight.dtype)
            self.layers[layer.name] = layer
        added_elementwise = [layer for layer in elementwise if layer.name not in self.elementwise]
        for layer in added_elementwise:
            self.elementwise[layer.name] = layer
        new_fallback = fallback_params(model, param_groups, layers, elementwise)
        unseen = [name for key, name in new_fallback.items() if key not in self.fallback]
        self.fallback = new_fallback
        return Added(added, added_elementwise, unseen, declined)

    def follow_weight(
        self, name: str, group: dict[str, Any], preconditioner: Preconditioner[Any]
    ) -> None:
        """Move layer ``name``'s state to its weight's device and dtype if ``model.to`` moved it.

        The state is rebuilt as the layer's fresh state (so dtypes follow the
        same rules as at construction, e.g. ``preconditioner_dtype=None`` → the
        weight's) filled with the old factors' values; entries of
        ``Preconditioner.dtype_specific`` start afresh when the dtype changes.
        """
        layer = self.layers[name]
        placement = (layer.weight.device, layer.weight.dtype)
        if self.placements[name] == placement:
            return
        fresh = preconditioner.new_state(layer, group)
        old = preconditioner.to_storage(self.states[name])
        dtype_changed = self.placements[name][1] != placement[1]
        storage = {
            factor: new
            if factor not in old or (dtype_changed and factor in preconditioner.dtype_specific)
            else old[factor]
            for factor, new in preconditioner.to_storage(fresh).items()
        }
        self.states[name] = preconditioner.from_storage(layer, group, fresh, storage)
        self.placements[name] = placement

    def param_labels(self) -> dict[int, str]:
        """``id(param)`` → how a skip warning names it (layer and weight/bias, or fallback)."""
        labels = {key: f"parameter {name!r}" for key, name in self.fallback.items()}
        for name, layer in self.elementwise.items():
            for param, role in zip(layer.params, ("weight", "bias"), strict=False):
                labels[id(param)] = f"elementwise layer {name!r}: {role}"
        labels.update(parameter_labels(self.layers.values()))
        return labels
