"""The public singd package's ``singd.structures.triutoeplitz`` module.

``TriuToeplitzMatrix`` is our ``"triutoeplitz"`` structure.
"""

from singd.structures.toeplitz import TriuToeplitz

__all__ = ["TriuToeplitzMatrix"]

TriuToeplitzMatrix = TriuToeplitz
