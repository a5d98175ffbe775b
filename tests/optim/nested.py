"""Test helpers: the tensors of a nested state dict, and bitwise state snapshots."""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
from torch import nn


def nested_tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor in ``tree`` (dicts by sorted key, lists/tuples in order)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in nested_tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in nested_tensors(item)]
    return []


def owns_exactly_its_bytes(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s storage holds its own entries and nothing more (no larger buffer)."""
    return tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def _skeleton(tree: Any) -> Any:
    """``tree`` with every tensor replaced by its (dtype, shape): the non-tensor part."""
    if isinstance(tree, torch.Tensor):
        return (tree.dtype, tuple(tree.shape))
    if isinstance(tree, dict):
        return {key: _skeleton(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_skeleton(item) for item in tree]
    return tree


class Snapshot(NamedTuple):
    """Copies of every tensor of an optimizer's ``state_dict()`` and its model's
    parameters, and the rest of the state dict (steps, hyper-parameters, layout)."""

    tensors: list[torch.Tensor]
    skeleton: Any


def state_snapshot(opt: Any, model: nn.Module) -> Snapshot:
    """A :class:`Snapshot` of ``opt`` and ``model`` now."""
    state = copy.deepcopy(opt.state_dict())
    tensors = nested_tensors(state) + [p.detach().clone() for p in model.parameters()]
    return Snapshot(tensors, _skeleton(state))


def same_state(before: Snapshot, after: Snapshot) -> bool:
    """Whether two snapshots agree bitwise (tensors) and exactly (everything else)."""
    return (
        before.skeleton == after.skeleton
        and len(before.tensors) == len(after.tensors)
        and all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            for a, b in zip(before.tensors, after.tensors, strict=True)
        )
    )
