"""The public singd package's ``singd.structures.triubottomrightdiag`` module.

``TriuBottomRightDiagonalMatrix`` is our ``"triubottomrightdiagonal"`` structure.
"""

from singd.structures.recursive import TriuBottomRightDiagonal

__all__ = ["TriuBottomRightDiagonalMatrix"]

TriuBottomRightDiagonalMatrix = TriuBottomRightDiagonal
