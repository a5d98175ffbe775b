"""The public singd package's ``singd.structures.triltopleftdiag`` module.

``TrilTopLeftDiagonalMatrix`` is our ``"triltopleftdiagonal"`` structure.
"""

from singd.structures.recursive import TrilTopLeftDiagonal

__all__ = ["TrilTopLeftDiagonalMatrix"]

TrilTopLeftDiagonalMatrix = TrilTopLeftDiagonal
