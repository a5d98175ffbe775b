"""Which parameters belong to which Kronecker layer, and which fall back.

A module that a layer kind (:mod:`singd.optim.kinds`) handles is
preconditioned as one matrix ``W~ = [W, b]`` (SPEC §1, SPEC-layers), so its
weight and bias must live in the same param group.  Every other optimised
parameter is a *fallback* parameter (the group's ``fallback`` optimizer on
its raw gradient), except the affine parameters of LayerNorm/RMSNorm layers
where the optimizer takes them (:mod:`singd.optim.elementwise`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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

    def param_rows(self) -> list[tuple[Tensor, tuple[int, int] | None]]:
        """The weight and bias (if any), each with this layer's rows of it (``None``: all)."""
        blocks = [(self.weight, self.kind.weight_rows(self.module))]
        if self.bias is not None:
            blocks.append((self.bias, self.kind.bias_rows(self.module)))
        return blocks

    def weight_block(self, tensor: Tensor) -> Tensor:
        """This layer's rows of a weight-shaped ``tensor`` (all of it unless a row block)."""
        return _rows(tensor, self.kind.weight_rows(self.module))

    def bias_block(self, tensor: Tensor) -> Tensor:
        """This layer's rows of a bias-shaped ``tensor``."""
        return _rows(tensor, self.kind.bias_rows(self.module))

    def gradient_matrix(self, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
        """``∇W~ = [∇W, ∇b]`` as a ``d_o × d_i~`` matrix (SPEC §1) from the layer's
        blocks (:meth:`weight_block`, :meth:`bias_block`) of the parameter gradients."""
        matrix = self.kind.weight_matrix(weight_grad)
        if bias_grad is None:
            return matrix
        return torch.cat([matrix, bias_grad.reshape(-1, 1)], dim=1)

    def split(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`gradient_matrix`: ``d_o × d_i~`` → (weight block, bias block)."""
        shape = self.weight_block(self.weight).shape
        if not self.has_bias:
            return self.kind.weight_from_matrix(matrix, shape), None
        return self.kind.weight_from_matrix(matrix[:, :-1], shape), matrix[:, -1].clone()


def _rows(tensor: Tensor, rows: tuple[int, int] | None) -> Tensor:
    return tensor if rows is None else tensor[rows[0] : rows[1]]


#: ``[(layer, ∇W block, ∇b block)] → [(ĝ_W, ĝ_b)]``: the directions of many layers at once.
LayerDirections = Callable[
    [list[tuple[Layer, Tensor, Tensor | None]]], list[tuple[Tensor, Tensor | None]]
]


def parameter_directions(
    layers: Iterable[Layer], grads: dict[int, Tensor], directions: LayerDirections
) -> dict[int, Tensor]:
    """``id(param) → ĝ`` of the layers' parameters that have a gradient (SPEC §1.4).

    Each layer gets its blocks of the gradients (a missing ``∇W`` or ``∇b`` of
    a parameter without gradient enters as zeros; that parameter gets no
    direction); ``directions`` computes those of every layer in one call (so a
    preconditioner may batch them).  A parameter several layers share as row
    blocks (an MHA's ``in_proj_weight``: ``q``, ``k``, ``v``) gets their
    directions concatenated in row order.
    """
    requests: list[tuple[Layer, Tensor, Tensor | None]] = []
    for layer in layers:
        weight_grad = grads.get(id(layer.weight))
        bias_grad = None if layer.bias is None else grads.get(id(layer.bias))
        if weight_grad is None and bias_grad is None:
            continue
        weight_block = layer.weight_block(
            torch.zeros_like(layer.weight) if weight_grad is None else weight_grad
        )
        bias_block = None
        if layer.bias is not None:
            bias_block = layer.bias_block(
                torch.zeros_like(layer.bias) if bias_grad is None else bias_grad
            )
        requests.append((layer, weight_block, bias_block))
    blocks: dict[int, list[tuple[int, Tensor]]] = {}
    for (layer, _, _), found in zip(requests, directions(requests), strict=True):
        for (param, rows), block in zip(layer.param_rows(), found, strict=False):
            if id(param) in grads:
                blocks.setdefault(id(param), []).append((0 if rows is None else rows[0], block))
    return {
        key: parts[0][1]
        if len(parts) == 1
        else torch.cat([b for _, b in sorted(parts, key=_first)], dim=0)
        for key, parts in blocks.items()
    }


def _first(part: tuple[int, Tensor]) -> int:
    return part[0]


def parameter_labels(layers: Iterable[Layer]) -> dict[int, str]:
    """``id(param) → "layer 'name': weight"`` (or bias; the names of every layer sharing it)."""
    owners: dict[int, list[str]] = {}
    for layer in layers:
        for param, role in ((layer.weight, "weight"), (layer.bias, "bias")):
            if param is not None:
                owners.setdefault(id(param), []).append(f"{layer.name!r}: {role}")
    return {key: "layer " + ", ".join(names) for key, names in owners.items()}


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


def find_layers(
    model: nn.Module, param_groups: list[dict[str, Any]], accepts: KindFilter
) -> tuple[list[Layer], dict[str, str]]:
    """The Kronecker layers whose weight is optimised, in module order, and declined modules.

    A module no kind matches is not one; nor one whose weight is frozen
    (``requires_grad=False``), not real floating point (complex) or not yet
    initialised (lazy modules).  A frozen bias is not a column of ``W~``.  A
    module of several canonical layers (:meth:`~singd.optim.kinds.LayerKind.parts`:
    an ``nn.MultiheadAttention``) gives one per part, named ``name + suffix``;
    parts sharing a parameter as row blocks are layers only together (one
    part frozen or declined: the module's parts all fall back); submodules it
    :meth:`~singd.optim.kinds.LayerKind.absorbed` (an MHA's ``out_proj``) are no
    layers of their own.

    Returns:
        The layers, and ``name → reason`` for matched modules that fall back
        anyway (the kind's :meth:`~singd.optim.kinds.LayerKind.unsupported_reason`,
        the optimizer declining the kind, a ``kfac_approx`` the kind does not
        define, or row blocks of a parameter that would only partly be layers).

    Raises:
        ValueError: if a layer's weight and bias are in different param groups
            (or one of them in none while the other is optimised), or a
            parameter is shared by two layers (other than as disjoint row blocks).
    """
    group_of = {id(p): index for index, group in enumerate(param_groups) for p in group["params"]}
    owner: dict[int, list[tuple[tuple[int, int] | None, str]]] = {}
    layers, declined = [], {}
    absorbed: set[int] = set()
    for name, module in model.named_modules():
        kind = kind_of(module)
        if kind is None or id(module) in absorbed:
            continue
        absorbed |= {id(sub) for sub in kind.absorbed(module)}
        found = [
            _part_layer(
                f"{name}{suffix}" if name else suffix.lstrip("."),
                module,
                part,
                param_groups,
                group_of,
                accepts,
            )
            for suffix, part in kind.parts(module)
        ]
        taken = [layer for layer in found if isinstance(layer, Layer)]
        for layer_name, reason in (f for f in found if isinstance(f, tuple)):
            declined[layer_name] = reason
        partial = _partly_covered(taken)
        if partial is not None:
            for layer in taken:
                declined[layer.name] = partial
            continue
        for layer in taken:
            _claim(owner, layer)
        layers.extend(taken)
    return layers, declined


def _part_layer(
    name: str,
    module: nn.Module,
    kind: LayerKind,
    param_groups: list[dict[str, Any]],
    group_of: dict[int, int],
    accepts: KindFilter,
) -> Layer | tuple[str, str] | None:
    """The layer ``kind`` makes of ``module``, ``(name, reason)`` if declined, ``None`` if none."""
    weight, bias = kind.weight(module), kind.bias(module)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return None
    if not (weight.requires_grad and weight.is_floating_point()):
        return None
    weight_group = group_of.get(id(weight))
    bias_group = None if bias is None else group_of.get(id(bias))
    if weight_group is None and bias_group is None:
        return None
    reason = kind.unsupported_reason(module) or accepts(kind)
    if reason is None:
        approx = param_groups[weight_group if weight_group is not None else bias_group][
            "kfac_approx"
        ]
        if approx not in kind.approximations:
            reason = f"{kind.name} statistics are not defined for kfac_approx={approx!r}"
    if reason is not None:
        return name, reason
    needs_bias = bias is not None and bias.requires_grad
    if needs_bias and weight_group != bias_group:
        raise ValueError(
            f"layer {name!r}: weight and bias must be in the same param group (they form "
            f"one matrix [W, b]); weight is in group {weight_group}, bias in {bias_group}"
        )
    return Layer(name, module, kind, weight_group, needs_bias)


def _partly_covered(layers: list[Layer]) -> str | None:
    """Why ``layers`` (the parts of one module) cannot be layers: a row-blocked parameter
    whose rows they do not all cover (its other rows would have no direction)."""
    covered: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for layer in layers:
        for param, rows in layer.param_rows():
            if rows is not None:
                covered[id(param)] = covered.get(id(param), 0) + rows[1] - rows[0]
                sizes[id(param)] = param.shape[0]
    if any(covered[key] != sizes[key] for key in covered):
        return (
            "some of its projections are frozen or declined, so a parameter they share as "
            "row blocks would be only partly preconditioned"
        )
    return None


def _claim(owner: dict[int, list[tuple[tuple[int, int] | None, str]]], layer: Layer) -> None:
    """Record ``layer``'s parameters (or row blocks) as its own.

    Raises:
        ValueError: if another layer already owns one of them (overlapping rows).
    """
    for param, rows in layer.param_rows():
        for other_rows, other in owner.get(id(param), []):
            if rows is None or other_rows is None or _overlap(rows, other_rows):
                raise ValueError(
                    f"layer {layer.name!r} shares a parameter with layer {other!r}; "
                    "shared weights are not supported"
                )
        owner.setdefault(id(param), []).append((rows, layer.name))


def _overlap(first: tuple[int, int], second: tuple[int, int]) -> bool:
    return first[0] < second[1] and second[0] < first[1]


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
