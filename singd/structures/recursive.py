"""Triangular factors with a diagonal block: the four "recursive" forms (SPEC §2).

Each member has ``2d − 1`` free entries: the diagonal ``δ = [a; c]`` and one
coupling vector ``b`` next to the ``1 × 1`` corner at index ``p``.  The two
lower forms are

* bottom-right diagonal, ``L = [[a, 0], [b, diag(c)]]``: ``p = 0``, ``b``
  below the corner in column ``p``, ``L = D + b e_pᵀ``;
* top-left diagonal, ``L = [[diag(a), 0], [bᵀ, c]]``: ``p = d − 1``, ``b``
  left of the corner in row ``p``, ``L = D + e_p bᵀ``;

with ``D = diag(δ)`` and ``b`` read as zero at index ``p``.  Two rank-one
terms cover every product, with ``x_p`` row ``p`` of ``X`` and ``X_r`` the
other rows:

* *spread* ``b e_pᵀ X``: adds ``b x_p`` to the rows ``X_r``;
* *gather* ``e_p bᵀ X``: adds ``bᵀ X_r`` to row ``p``.

So ``L X = D X + spread`` and ``Lᵀ X = D X + gather`` when ``b`` lies in a
column, and the other way round when it lies in a row.  Since ``b_p = 0``,
``e_pᵀ b = 0``, ``e_pᵀ D = δ_p e_pᵀ`` and ``D b = δ_r ⊙ b`` (``δ_r``: the
diagonal off the corner), products and Gram matrices stay in the structure:

* ``(D₁ + b₁ e_pᵀ)(D₂ + b₂ e_pᵀ) = D₁ D₂ + (δ₁,r ⊙ b₂ + δ₂,p b₁) e_pᵀ``, and
  for rows the transpose: ``e_p (δ₂,r ⊙ b₁ + δ₁,p b₂)ᵀ``;
* ``(D + b e_pᵀ)ᵀ (D + b e_pᵀ) = D² + e_p (D b)ᵀ + (D b) e_pᵀ + ‖b‖² e_p e_pᵀ``:
  Π̂ adds ``‖b‖²`` at the corner and couples by ``2 δ_r ⊙ b``;
* ``(D + b e_pᵀ)(D + b e_pᵀ)ᵀ = D² + δ_p (b e_pᵀ + e_p bᵀ) + b bᵀ``: Π̂ adds
  ``b²`` to the diagonal off the corner and couples by ``2 δ_p b``.

For symmetric ``M``, Π̂ keeps the diagonal and puts ``M_ij + M_ji`` on the
coupling entries.  Every operation works on the three storage vectors:
``O(d·m)`` time and memory, no ``d × d`` tensor except the ``to_dense``
result.  ``d = 1`` gives the ``1 × 1`` matrix (``b`` and the diagonal block
are empty).  The upper forms are the transposes of the lower ones (see
:mod:`singd.structures.lower_upper`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from singd.structures.base import check_factor, check_scalar, check_square
from singd.structures.lower_upper import LowerForm, UpperMirror, check_dim


def _row_norms_squared(rows: Tensor) -> Tensor:
    """``Σ_j X_ij²`` for each row of ``X`` (``r × m`` → ``r``)."""
    return (rows * rows).sum(dim=1)


class _TrilWithDiagonalBlock(LowerForm):
    """A lower form of the module docstring; storage ``{"a", "b", "c"}``.

    ``a`` and ``c`` are the top-left and bottom-right parts of the diagonal
    (one of them the ``1 × 1`` corner), ``b`` the coupling vector (``d − 1``).

    Attributes:
        corner_first: ``True`` for ``p = 0`` (the diagonal block is bottom
            right, ``b`` lies in column ``p``), ``False`` for ``p = d − 1``
            (block top left, ``b`` in row ``p``).
    """

    corner_first: ClassVar[bool]

    # ---------------------------------------------------------------- layout
    @classmethod
    def _indices(cls, dim: int) -> tuple[int, slice]:
        """``(p, rest)``: the corner's index and a slice of the other ``d − 1`` indices."""
        if cls.corner_first:
            return 0, slice(1, None)
        return dim - 1, slice(None, dim - 1)

    @classmethod
    def _split(cls, dim: int) -> int:
        """The length of ``a``: ``1`` if the corner is first, else ``d − 1``."""
        return 1 if cls.corner_first else dim - 1

    @classmethod
    def storage_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """``{"a": (split,), "b": (dim − 1,), "c": (dim − split,)}``."""
        check_dim(dim, cls.name)
        split = cls._split(dim)
        return {"a": (split,), "b": (dim - 1,), "c": (dim - split,)}

    def _parts(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(δ_p, b, δ_rest)``: the corner (``1``), coupling and other diagonal (``d − 1``)."""
        a, b, c = self._storage["a"], self._storage["b"], self._storage["c"]
        return (a, b, c) if self.corner_first else (c, b, a)

    @classmethod
    def _from_parts(cls, corner: Tensor, coupling: Tensor, rest: Tensor) -> dict[str, Tensor]:
        """Storage from ``(δ_p, b, δ_rest)``, the inverse of :meth:`_parts`."""
        a, c = (corner, rest) if cls.corner_first else (rest, corner)
        return {"a": a, "b": coupling, "c": c}

    @classmethod
    def _coupling_of(cls, matrix: Tensor) -> Tensor:
        """The view of ``matrix`` (``d × d``) at the coupling positions (``d − 1``)."""
        corner, rest = cls._indices(matrix.shape[0])
        return matrix[rest, corner] if cls.corner_first else matrix[corner, rest]

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_dense(cls, matrix: Tensor) -> _TrilWithDiagonalBlock:
        """The diagonal and the coupling entries of ``matrix`` (``d × d``)."""
        dim = check_square(matrix, cls.name)
        split = cls._split(dim)
        storage = {
            "a": matrix.diagonal()[:split],
            "b": cls._coupling_of(matrix),
            "c": matrix.diagonal()[split:],
        }
        return cls(dim, {key: part.clone() for key, part in storage.items()})

    @classmethod
    def project(cls, sym: Tensor) -> _TrilWithDiagonalBlock:
        """``Π̂(M)``: the diagonal of ``M`` and ``b = M[r, p] + M[p, r]`` (``M``: ``d × d``)."""
        dim = check_square(sym, cls.name)
        corner, rest = cls._indices(dim)
        split = cls._split(dim)
        storage = {
            "a": sym.diagonal()[:split].clone(),
            "b": sym[rest, corner] + sym[corner, rest],
            "c": sym.diagonal()[split:].clone(),
        }
        return cls(dim, storage)

    @classmethod
    def project_gram(cls, factor: Tensor) -> _TrilWithDiagonalBlock:
        """``Π̂(X Xᵀ)`` from ``X`` (``d × m``, rows ``x_i``).

        Diagonal ``‖x_i‖²``, coupling ``b = 2 X_r x_p``.
        """
        dim = check_factor(factor, cls.name)
        corner, rest = cls._indices(dim)
        split = cls._split(dim)
        storage = {
            "a": _row_norms_squared(factor[:split]),
            "b": 2 * (factor[rest] @ factor[corner]),
            "c": _row_norms_squared(factor[split:]),
        }
        return cls(dim, storage)

    def to_dense(self) -> Tensor:
        """``L`` (``d × d``)."""
        dense = self._storage["b"].new_zeros(self.dim, self.dim)
        split = self._split(self.dim)
        dense.diagonal()[:split] = self._storage["a"]
        dense.diagonal()[split:] = self._storage["c"]
        self._coupling_of(dense).copy_(self._storage["b"])
        return dense

    # -------------------------------------------------------------- products
    def _times(self, other: Tensor, transpose: bool) -> Tensor:
        """``L X`` or ``Lᵀ X``: ``D X`` plus the spread or the gather (module docstring)."""
        own, x = self._promoted_rows(other)
        corner_value, coupling, rest_values = own._parts()
        corner, rest = self._indices(self.dim)
        result = torch.empty_like(x)
        result[corner] = corner_value * x[corner]
        result[rest] = rest_values[:, None] * x[rest]
        if self.corner_first != transpose:  # spread: X_r += b x_p
            result[rest].addcmul_(coupling[:, None], x[corner][None, :])
        else:  # gather: x_p += bᵀ X_r
            result[corner].add_(coupling @ x[rest])
        return result

    def matmul(self, other: Tensor) -> Tensor:
        """``L X`` (``d × m``), in the promoted dtype."""
        return self._times(other, transpose=False)

    def t_matmul(self, other: Tensor) -> Tensor:
        """``Lᵀ X`` (``d × m``), in the promoted dtype."""
        return self._times(other, transpose=True)

    def _product_storage(self, other: _TrilWithDiagonalBlock) -> dict[str, Tensor]:
        """``L₁ L₂``: diagonals multiply; coupling as in the module docstring."""
        dtype, own = self._promoted(other)
        corner1, coupling1, rest1 = own._parts()
        corner2, coupling2, rest2 = (t.to(dtype) for t in other._parts())
        if self.corner_first:  # b in a column: D₁ b₂ + b₁ δ₂,p
            coupling = corner2 * coupling1 + rest1 * coupling2
        else:  # b in a row: b₁ D₂ + δ₁,p b₂
            coupling = rest2 * coupling1 + corner1 * coupling2
        return self._from_parts(corner1 * corner2, coupling, rest1 * rest2)

    def _column_inner(self) -> dict[str, Tensor]:
        """``Π̂((D + b e_pᵀ)ᵀ (D + b e_pᵀ))``: corner ``δ_p² + ‖b‖²``, coupling ``2 δ_r ⊙ b``."""
        corner, coupling, rest = self._parts()
        return self._from_parts(
            corner * corner + (coupling * coupling).sum(),
            2 * rest * coupling,
            rest * rest,
        )

    def _column_outer(self) -> dict[str, Tensor]:
        """``Π̂((D + b e_pᵀ)(D + b e_pᵀ)ᵀ)``: coupling ``2 δ_p b``, ``δ_r² + b²`` off the corner."""
        corner, coupling, rest = self._parts()
        return self._from_parts(
            corner * corner, 2 * corner * coupling, coupling * coupling + rest * rest
        )

    def _inner_storage(self) -> dict[str, Tensor]:
        """``Π̂(Lᵀ L)``: ``L`` is ``D + b e_pᵀ`` (column) or its transpose (row)."""
        return self._column_inner() if self.corner_first else self._column_outer()

    def _outer_storage(self) -> dict[str, Tensor]:
        """``Π̂(L Lᵀ)``: ``L`` is ``D + b e_pᵀ`` (column) or its transpose (row)."""
        return self._column_outer() if self.corner_first else self._column_inner()

    # ------------------------------------------------------------ reductions
    def trace(self) -> Tensor:
        """``Σ a_i + Σ c_i``."""
        return self._storage["a"].sum() + self._storage["c"].sum()

    def add_diag_(self, value: float | Tensor) -> _TrilWithDiagonalBlock:
        """``L ← L + v I``: ``a`` and ``c`` move, ``b`` does not."""
        check_scalar(value, f"{self.name}.add_diag_")
        self._storage["a"].add_(value)
        self._storage["c"].add_(value)
        return self


class TrilBottomRightDiagonal(_TrilWithDiagonalBlock):
    """``L = [[a, 0], [b, diag(c)]]``: ``a`` is ``1 × 1``, ``b`` and ``c`` have ``d − 1`` entries.

    Storage ``{"a": (1,), "b": (d−1,), "c": (d−1,)}``.
    """

    name = "trilbottomrightdiagonal"
    corner_first = True


class TrilTopLeftDiagonal(_TrilWithDiagonalBlock):
    """``L = [[diag(a), 0], [bᵀ, c]]``: ``a`` and ``b`` have ``d − 1`` entries, ``c`` is ``1 × 1``.

    Storage ``{"a": (d−1,), "b": (d−1,), "c": (1,)}``.
    """

    name = "triltopleftdiagonal"
    corner_first = False


class TriuBottomRightDiagonal(UpperMirror, TrilBottomRightDiagonal):
    """``K = [[a, bᵀ], [0, diag(c)]]``, stored as its transpose :class:`TrilBottomRightDiagonal`."""

    name = "triubottomrightdiagonal"


class TriuTopLeftDiagonal(UpperMirror, TrilTopLeftDiagonal):
    """``K = [[diag(a), b], [0, c]]``, stored as its transpose :class:`TrilTopLeftDiagonal`."""

    name = "triutopleftdiagonal"
