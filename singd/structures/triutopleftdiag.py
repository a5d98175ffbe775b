"""The public singd package's ``singd.structures.triutopleftdiag`` module.

``TriuTopLeftDiagonalMatrix`` is our ``"triutopleftdiagonal"`` structure.
"""

from singd.structures.recursive import TriuTopLeftDiagonal

__all__ = ["TriuTopLeftDiagonalMatrix"]

TriuTopLeftDiagonalMatrix = TriuTopLeftDiagonal
