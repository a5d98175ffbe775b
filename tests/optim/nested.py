"""Test helper: the tensors of a nested state dict, in a fixed order."""

from __future__ import annotations

from typing import Any

import torch


def nested_tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor in ``tree`` (dicts by sorted key, lists/tuples in order)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in nested_tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in nested_tensors(item)]
    return []
