"""Check ``Kᵀ`` products of the public ``singd`` structures on a non-symmetric factor.

Run with the public package's Python (``/work/venv-public/bin/python
scripts/probe_public_transposes.py``).  For every structure class it builds a
non-symmetric member ``K`` by two SINGD-like updates ``K ← K − 0.3 K Π̂(S)``
from the identity (``S`` random symmetric; one update of ``I`` stays
symmetric), then prints in float32 the largest entry of
``|K − Kᵀ|``, ``K.rmatmat(X) − Kᵀ X``, ``K.from_inner(X) − Π̂(Kᵀ X Xᵀ K)`` and
``K.from_inner() − Π̂(Kᵀ K)``.  A correct structure shows rounding-level
numbers (≲ 1e-5) in the last three columns.
"""

from __future__ import annotations

import warnings

import torch

from singd.optim.optimizer import SINGD
from singd.structures.blockdiagonal import Block3DiagonalMatrix
from singd.structures.hierarchical import Hierarchical3_2Matrix
from singd.structures.trilbottomrightdiag import TrilBottomRightDiagonalMatrix
from singd.structures.triltopleftdiag import TrilTopLeftDiagonalMatrix
from singd.structures.triubottomrightdiag import TriuBottomRightDiagonalMatrix
from singd.structures.triutopleftdiag import TriuTopLeftDiagonalMatrix

CLASSES = {
    **SINGD.SUPPORTED_STRUCTURES,
    "block3diagonal": Block3DiagonalMatrix,
    "hierarchical3_2": Hierarchical3_2Matrix,
    "triltopleftdiagonal": TrilTopLeftDiagonalMatrix,
    "trilbottomrightdiagonal": TrilBottomRightDiagonalMatrix,
    "triutopleftdiagonal": TriuTopLeftDiagonalMatrix,
    "triubottomrightdiagonal": TriuBottomRightDiagonalMatrix,
}


def main(d: int = 7) -> None:
    """Print one line per structure (dimension ``d``)."""
    warnings.filterwarnings("ignore", message="Calling naive implementation")
    torch.manual_seed(0)
    print(
        f"{'structure':<24} {'|K-Kᵀ|':>9} {'rmatmat err':>12} {'from_inner(X) err':>18} "
        f"{'from_inner() err':>17}"
    )
    for name, cls in CLASSES.items():
        factor = cls.eye(d, dtype=torch.float32)
        for _ in range(2):
            sym = torch.randn(d, d)
            factor.add_(factor @ cls.from_dense(sym + sym.T), alpha=-0.3)
        dense = factor.to_dense()
        x = torch.randn(d, 4)
        asymmetry = (dense - dense.T).abs().max().item()
        rmatmat = (factor.rmatmat(x) - dense.T @ x).abs().max().item()
        projected = cls.from_dense(dense.T @ x @ x.T @ dense).to_dense()
        inner = (factor.from_inner(x).to_dense() - projected).abs().max().item()
        gram = factor.from_inner().to_dense() - cls.from_dense(dense.T @ dense).to_dense()
        print(
            f"{name:<24} {asymmetry:>9.2e} {rmatmat:>12.2e} {inner:>18.2e} "
            f"{gram.abs().max().item():>17.2e}"
        )


if __name__ == "__main__":
    main()
