"""The public singd package's ``singd.structures.trilbottomrightdiag`` module.

``TrilBottomRightDiagonalMatrix`` is our ``"trilbottomrightdiagonal"`` structure.
"""

from singd.structures.recursive import TrilBottomRightDiagonal

__all__ = ["TrilBottomRightDiagonalMatrix"]

TrilBottomRightDiagonalMatrix = TrilBottomRightDiagonal
