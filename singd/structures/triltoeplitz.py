"""The public singd package's ``singd.structures.triltoeplitz`` module.

``TrilToeplitzMatrix`` is our ``"triltoeplitz"`` structure.
"""

from singd.structures.toeplitz import TrilToeplitz

__all__ = ["TrilToeplitzMatrix"]

TrilToeplitzMatrix = TrilToeplitz
