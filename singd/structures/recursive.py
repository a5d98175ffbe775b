"""Triangular factors with a diagonal block: the four "recursive" forms (SPEC §2).

Each member has ``2d − 1`` free entries: a diagonal plus one coupling
vector ``b`` in the first column / last row (lower forms) or first row /
last column (upper forms).  For symmetric ``M``, Π̂ keeps the diagonal and
puts ``M_ij + M_ji`` on the coupling entries.  Every operation below works on
the three storage vectors: ``O(d·m)`` time and memory, no ``d × d`` tensor
except the ``to_dense`` result.  ``d = 1`` gives the ``1 × 1`` matrix (the
coupling vector and the diagonal block are empty).

The upper forms are the transposes of the lower ones (see
:mod:`singd.structures.lower_upper`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from singd.structures.base import check_factor, check_square
from singd.structures.lower_upper import LowerForm, UpperMirror, check_dim


def _row_norms_squared(rows: Tensor) -> Tensor:
    """``Σ_j X_ij²`` for each row of ``X`` (``r × m`` → ``r``)."""
    return (rows * rows).sum(dim=1)


class TrilBottomRightDiagonal(LowerForm):
    """``L = [[a, 0], [b, diag(c)]]``: ``a`` is ``1 × 1``, ``b`` and ``c`` have ``d − 1`` entries.

    Storage ``{"a": (1,), "b": (d−1,), "c": (d−1,)}``.
    """

    name = "trilbottomrightdiagonal"

    @classmethod
    def storage_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """``{"a": (1,), "b": (dim−1,), "c": (dim−1,)}``."""
        check_dim(dim, cls.name)
        return {"a": (1,), "b": (dim - 1,), "c": (dim - 1,)}

    def _parts(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._storage["a"], self._storage["b"], self._storage["c"]

    @classmethod
    def from_dense(cls, matrix: Tensor) -> TrilBottomRightDiagonal:
        """``a = M₀₀``, ``b = M[1:, 0]``, ``c = diag(M)[1:]`` of ``matrix`` (``d × d``)."""
        dim = check_square(matrix, cls.name)
        return cls(
            dim,
            {
                "a": matrix[:1, 0].clone(),
                "b": matrix[1:, 0].clone(),
                "c": matrix.diagonal()[1:].clone(),
            },
        )

    @classmethod
    def project(cls, sym: Tensor) -> TrilBottomRightDiagonal:
        """``Π̂(M)``: ``a = M₀₀``, ``b = M[1:, 0] + M[0, 1:]``, ``c = diag(M)[1:]``."""
        dim = check_square(sym, cls.name)
        return cls(
            dim,
            {
                "a": sym[:1, 0].clone(),
                "b": sym[1:, 0] + sym[0, 1:],
                "c": sym.diagonal()[1:].clone(),
            },
        )

    @classmethod
    def project_gram(cls, factor: Tensor) -> TrilBottomRightDiagonal:
        """``Π̂(X Xᵀ)`` from ``X`` (``d × m``, rows ``x_i``).

        ``a = ‖x₀‖²``, ``b = 2 X[1:] x₀``, ``c_i = ‖x_i‖²`` for ``i ≥ 1``.
        """
        dim = check_factor(factor, cls.name)
        head, tail = factor[:1], factor[1:]
        return cls(
            dim,
            {
                "a": _row_norms_squared(head),
                "b": 2 * (tail @ head[0]),
                "c": _row_norms_squared(tail),
            },
        )

    def to_dense(self) -> Tensor:
        """``L`` (``d × d``)."""
        a, b, c = self._parts()
        dense = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        dense[:1, 0] = a
        dense[1:, 0] = b
        dense.diagonal()[1:] = c
        return dense

    def matmul(self, other: Tensor) -> Tensor:
        """``L X = [a x₀; b x₀ + c ⊙ X[1:]]`` (``d × m``), in the promoted dtype."""
        self._check_rows(other)
        dtype, own = self._promoted(other)
        a, b, c = own._parts()
        x = other.to(dtype)
        head, tail = x[:1], x[1:]
        return torch.cat([a[:, None] * head, b[:, None] * head + c[:, None] * tail])

    def t_matmul(self, other: Tensor) -> Tensor:
        """``Lᵀ X = [a x₀ + bᵀ X[1:]; c ⊙ X[1:]]`` (``d × m``), in the promoted dtype."""
        self._check_rows(other)
        dtype, own = self._promoted(other)
        a, b, c = own._parts()
        x = other.to(dtype)
        head, tail = x[:1], x[1:]
        return torch.cat([a[:, None] * head + b[None, :] @ tail, c[:, None] * tail])

    def _product_storage(self, other: TrilBottomRightDiagonal) -> dict[str, Tensor]:
        """``L₁ L₂ = [[a₁a₂, 0], [a₂ b₁ + c₁ ⊙ b₂, diag(c₁ ⊙ c₂)]]``."""
        dtype, own = self._promoted(other)
        a1, b1, c1 = own._parts()
        a2, b2, c2 = (t.to(dtype) for t in other._parts())
        return {"a": a1 * a2, "b": a2 * b1 + c1 * b2, "c": c1 * c2}

    def _inner_storage(self) -> dict[str, Tensor]:
        """``Lᵀ L = [[a² + bᵀb, (c ⊙ b)ᵀ], [c ⊙ b, diag(c²)]]``, projected."""
        a, b, c = self._parts()
        return {"a": a * a + (b * b).sum(), "b": 2 * c * b, "c": c * c}

    def _outer_storage(self) -> dict[str, Tensor]:
        """``L Lᵀ = [[a², a bᵀ], [a b, b bᵀ + diag(c²)]]``, projected."""
        a, b, c = self._parts()
        return {"a": a * a, "b": 2 * a * b, "c": b * b + c * c}

    def trace(self) -> Tensor:
        """``a + Σ c_i``."""
        a, _, c = self._parts()
        return a.sum() + c.sum()

    def add_diag_(self, value: float | Tensor) -> TrilBottomRightDiagonal:
        """``L ← L + v I``: ``a`` and ``c`` move, ``b`` does not."""
        a, _, c = self._parts()
        a.add_(value)
        c.add_(value)
        return self


class TrilTopLeftDiagonal(LowerForm):
    """``L = [[diag(a), 0], [bᵀ, c]]``: ``a`` and ``b`` have ``d − 1`` entries, ``c`` is ``1 × 1``.

    Storage ``{"a": (d−1,), "b": (d−1,), "c": (1,)}``.
    """

    name = "triltopleftdiagonal"

    @classmethod
    def storage_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """``{"a": (dim−1,), "b": (dim−1,), "c": (1,)}``."""
        check_dim(dim, cls.name)
        return {"a": (dim - 1,), "b": (dim - 1,), "c": (1,)}

    def _parts(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._storage["a"], self._storage["b"], self._storage["c"]

    @classmethod
    def from_dense(cls, matrix: Tensor) -> TrilTopLeftDiagonal:
        """``a = diag(M)[:−1]``, ``b = M[−1, :−1]``, ``c = M₋₁₋₁`` of ``matrix`` (``d × d``)."""
        dim = check_square(matrix, cls.name)
        return cls(
            dim,
            {
                "a": matrix.diagonal()[:-1].clone(),
                "b": matrix[-1, :-1].clone(),
                "c": matrix[-1, -1:].clone(),
            },
        )

    @classmethod
    def project(cls, sym: Tensor) -> TrilTopLeftDiagonal:
        """``Π̂(M)``: ``a = diag(M)[:−1]``, ``b = M[−1, :−1] + M[:−1, −1]``, ``c = M₋₁₋₁``."""
        dim = check_square(sym, cls.name)
        return cls(
            dim,
            {
                "a": sym.diagonal()[:-1].clone(),
                "b": sym[-1, :-1] + sym[:-1, -1],
                "c": sym[-1, -1:].clone(),
            },
        )

    @classmethod
    def project_gram(cls, factor: Tensor) -> TrilTopLeftDiagonal:
        """``Π̂(X Xᵀ)`` from ``X`` (``d × m``, rows ``x_i``).

        ``a_i = ‖x_i‖²`` for ``i < d − 1``, ``b = 2 X[:−1] x₋₁``, ``c = ‖x₋₁‖²``.
        """
        dim = check_factor(factor, cls.name)
        body, last = factor[:-1], factor[-1:]
        return cls(
            dim,
            {
                "a": _row_norms_squared(body),
                "b": 2 * (body @ last[0]),
                "c": _row_norms_squared(last),
            },
        )

    def to_dense(self) -> Tensor:
        """``L`` (``d × d``)."""
        a, b, c = self._parts()
        dense = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        dense.diagonal()[:-1] = a
        dense[-1, :-1] = b
        dense[-1, -1:] = c
        return dense

    def matmul(self, other: Tensor) -> Tensor:
        """``L X = [a ⊙ X[:−1]; bᵀ X[:−1] + c x₋₁]`` (``d × m``), in the promoted dtype."""
        self._check_rows(other)
        dtype, own = self._promoted(other)
        a, b, c = own._parts()
        x = other.to(dtype)
        body, last = x[:-1], x[-1:]
        return torch.cat([a[:, None] * body, b[None, :] @ body + c[:, None] * last])

    def t_matmul(self, other: Tensor) -> Tensor:
        """``Lᵀ X = [a ⊙ X[:−1] + b x₋₁; c x₋₁]`` (``d × m``), in the promoted dtype."""
        self._check_rows(other)
        dtype, own = self._promoted(other)
        a, b, c = own._parts()
        x = other.to(dtype)
        body, last = x[:-1], x[-1:]
        return torch.cat([a[:, None] * body + b[:, None] * last, c[:, None] * last])

    def _product_storage(self, other: TrilTopLeftDiagonal) -> dict[str, Tensor]:
        """``L₁ L₂ = [[diag(a₁ ⊙ a₂), 0], [(a₂ ⊙ b₁ + c₁ b₂)ᵀ, c₁c₂]]``."""
        dtype, own = self._promoted(other)
        a1, b1, c1 = own._parts()
        a2, b2, c2 = (t.to(dtype) for t in other._parts())
        return {"a": a1 * a2, "b": a2 * b1 + c1 * b2, "c": c1 * c2}

    def _inner_storage(self) -> dict[str, Tensor]:
        """``Lᵀ L = [[diag(a²) + b bᵀ, c b], [c bᵀ, c²]]``, projected."""
        a, b, c = self._parts()
        return {"a": a * a + b * b, "b": 2 * c * b, "c": c * c}

    def _outer_storage(self) -> dict[str, Tensor]:
        """``L Lᵀ = [[diag(a²), a ⊙ b], [(a ⊙ b)ᵀ, bᵀb + c²]]``, projected."""
        a, b, c = self._parts()
        return {"a": a * a, "b": 2 * a * b, "c": (b * b).sum() + c * c}

    def trace(self) -> Tensor:
        """``Σ a_i + c``."""
        a, _, c = self._parts()
        return a.sum() + c.sum()

    def add_diag_(self, value: float | Tensor) -> TrilTopLeftDiagonal:
        """``L ← L + v I``: ``a`` and ``c`` move, ``b`` does not."""
        a, _, c = self._parts()
        a.add_(value)
        c.add_(value)
        return self


class TriuBottomRightDiagonal(UpperMirror, TrilBottomRightDiagonal):
    """``K = [[a, bᵀ], [0, diag(c)]]``, stored as its transpose :class:`TrilBottomRightDiagonal`."""

    name = "triubottomrightdiagonal"


class TriuTopLeftDiagonal(UpperMirror, TrilTopLeftDiagonal):
    """``K = [[diag(a), b], [0, c]]``, stored as its transpose :class:`TrilTopLeftDiagonal`."""

    name = "triutopleftdiagonal"
