"""SINGD: structured inverse-free natural gradient descent for PyTorch."""

from singd.optim import KFAC, SINGD
from singd.structures import get_structure

__all__ = ["KFAC", "SINGD", "get_structure"]
