"""The public singd package's ``singd.structures.blockdiagonal`` module.

Ours is :mod:`singd.structures.block_diagonal`.

``BlockDiagonalMatrixTemplate`` is :class:`~singd.structures.block_diagonal.BlockDiagonal`;
``Block30DiagonalMatrix`` / ``Block3DiagonalMatrix`` are the registry's classes
for ``"block30diagonal"`` / ``"block3diagonal"``, so ``isinstance`` holds for
the factors of a ``SINGD`` built with those names.
"""

from singd.structures import get_structure
from singd.structures.block_diagonal import BlockDiagonal

__all__ = ["Block3DiagonalMatrix", "Block30DiagonalMatrix", "BlockDiagonalMatrixTemplate"]

BlockDiagonalMatrixTemplate = BlockDiagonal
Block30DiagonalMatrix = get_structure("block30diagonal")
Block3DiagonalMatrix = get_structure("block3diagonal")
