"""SINGD: structured inverse-free natural gradient descent for PyTorch."""

from singd.optim import KFAC, SINGD
from singd.optim.kinds import LayerKind, register_layer_kind, unregister_layer_kind
from singd.structures import get_structure

__all__ = [
    "KFAC",
    "SINGD",
    "LayerKind",
    "get_structure",
    "register_layer_kind",
    "unregister_layer_kind",
]
