"""Diagonal factors (SPEC §2, row ``diagonal``): ``d`` free entries, ``Π̂(M) = diag(M)``.

``DiagonalMatrix`` is the public singd package's name for :class:`Diagonal`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix, check_factor, check_scalar, check_square


class Diagonal(StructuredMatrix):
    """``diag(k)``; storage ``{"diag": (d,)}``.  No operation forms a ``d × d`` tensor."""

    name = "diagonal"

    @classmethod
    def storage_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """``{"diag": (dim,)}``."""
        return {"diag": (dim,)}

    @property
    def _diag(self) -> Tensor:
        return self._storage["diag"]

    @classmethod
    def from_dense(cls, matrix: Tensor) -> Diagonal:
        """``diag(M)`` of ``matrix`` (``d × d``)."""
        dim = check_square(matrix, cls.name)
        return cls(dim, {"diag": matrix.diagonal().clone()})

    @classmethod
    def project(cls, sym: Tensor) -> Diagonal:
        """``Π̂(M) = diag(M)`` for symmetric ``M`` (``d × d``)."""
        return cls.from_dense(sym)

    @classmethod
    def project_gram(cls, factor: Tensor) -> Diagonal:
        """``diag(X Xᵀ)_i = Σ_j X_ij²`` from ``X`` (``d × m``)."""
        dim = check_factor(factor, cls.name)
        return cls(dim, {"diag": (factor * factor).sum(dim=1)})

    def to_dense(self) -> Tensor:
        """``diag(k)`` (``d × d``)."""
        return torch.diag(self._diag)

    def matmul(self, other: Tensor) -> Tensor:
        """``K X = k ⊙ X`` row-wise (``d × m``), in the promoted dtype."""
        own, x = self._promoted_rows(other)
        return own._diag[:, None] * x

    def t_matmul(self, other: Tensor) -> Tensor:
        """``Kᵀ X = K X`` (``d × m``)."""
        return self.matmul(other)

    def self_outer_matmul(self, other: Tensor) -> Tensor:
        """``K Kᵀ X = k² ⊙ X`` row-wise: ``fl(fl(k ⊙ k) ⊙ X)``, one pass over ``X``."""
        own, x = self._promoted_rows(other)
        return (own._diag * own._diag)[:, None] * x

    def project_inner(self, factor: Tensor) -> Diagonal:
        """``Π̂(Kᵀ X Xᵀ K) = k² ⊙ rowsum(X²)`` from ``X`` (``d × m``), in the promoted dtype.

        Two passes over ``X`` (square, sum) where ``rowsum((k ⊙ X)²)`` takes
        three.  In float16/bfloat16 the latter order is kept: it is the order
        the emulated oracle rounds in (``RN(k·x)`` first; verification/emulated.py),
        whose one-step comparison allows only the roundings it lists.
        """
        if torch.promote_types(self.dtype, factor.dtype).itemsize < 4:
            return super().project_inner(factor)
        own, x = self._promoted_rows(factor)
        return type(self)(self.dim, {"diag": (own._diag * own._diag) * (x * x).sum(dim=1)})

    def __matmul__(self, other: StructuredMatrix) -> Diagonal:
        """``K L = diag(k ⊙ l)``, in the promoted dtype."""
        self._check_same(other)
        dtype, own = self._promoted(other)
        return type(self)(self.dim, {"diag": own._diag * other.storage["diag"].to(dtype)})

    def project_self_inner(self) -> Diagonal:
        """``Π̂(KᵀK) = diag(k²)``."""
        return type(self)(self.dim, {"diag": self._diag * self._diag})

    def self_outer(self) -> Diagonal:
        """``K Kᵀ = diag(k²)``."""
        return type(self)(self.dim, {"diag": self._diag * self._diag})

    def trace(self) -> Tensor:
        """``Σ k_i``."""
        return self._diag.sum()

    def add_diag_(self, value: float | Tensor) -> Diagonal:
        """``K ← K + v I``."""
        check_scalar(value, f"{self.name}.add_diag_")
        self._diag.add_(value)
        return self


#: The public singd package's name (``singd.structures.diagonal.DiagonalMatrix``).
DiagonalMatrix = Diagonal
