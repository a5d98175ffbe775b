"""Dense factors (SPEC §2, row ``dense``): all ``d²`` entries free, ``Π̂(M) = M``.

``DenseMatrix`` is the public singd package's name for :class:`Dense`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix, check_factor, check_scalar, check_square


class Dense(StructuredMatrix):
    """A full ``d × d`` matrix; storage ``{"matrix": (d, d)}``.

    This is INGD's structure (SPEC §1.3): every operation is a plain dense
    product, so ``d × d`` temporaries are inherent here.
    """

    name = "dense"

    @classmethod
    def storage_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """``{"matrix": (dim, dim)}``."""
        return {"matrix": (dim, dim)}

    @property
    def _matrix(self) -> Tensor:
        return self._storage["matrix"]

    @classmethod
    def from_dense(cls, matrix: Tensor) -> Dense:
        """A copy of ``matrix`` (``d × d``)."""
        dim = check_square(matrix, cls.name)
        return cls(dim, {"matrix": matrix.clone()})

    @classmethod
    def project(cls, sym: Tensor) -> Dense:
        """``Π̂(M) = M`` for symmetric ``M`` (``d × d``)."""
        return cls.from_dense(sym)

    @classmethod
    def project_gram(cls, factor: Tensor) -> Dense:
        """``X Xᵀ`` (``d × d``) from ``X`` (``d × m``)."""
        dim = check_factor(factor, cls.name)
        return cls(dim, {"matrix": factor @ factor.T})

    def to_dense(self) -> Tensor:
        """A copy of the stored ``d × d`` matrix."""
        return self._matrix.clone()

    def matmul(self, other: Tensor) -> Tensor:
        """``K X`` (``d × m``), in the promoted dtype."""
        own, x = self._promoted_rows(other)
        return own._matrix @ x

    def t_matmul(self, other: Tensor) -> Tensor:
        """``Kᵀ X`` (``d × m``), in the promoted dtype."""
        own, x = self._promoted_rows(other)
        return own._matrix.T @ x

    def right_matmul(self, other: Tensor) -> Tensor:
        """``X K`` (``m × d``, row-major), in the promoted dtype."""
        own, x = self._promoted_columns(other)
        return x @ own._matrix

    def right_t_matmul(self, other: Tensor) -> Tensor:
        """``X Kᵀ`` (``m × d``, row-major), in the promoted dtype.

        ``X K Kᵀ`` keeps the default ``(K (Kᵀ Xᵀ))ᵀ``: the two row-major products
        measured slower than it, parameter update included (issue 9's note).
        """
        own, x = self._promoted_columns(other)
        return x @ own._matrix.T

    def __matmul__(self, other: StructuredMatrix) -> Dense:
        """``K L`` for another dense ``L``, in the promoted dtype."""
        self._check_same(other)
        return type(self)(self.dim, {"matrix": self.matmul(other.storage["matrix"])})

    def project_self_inner(self) -> Dense:
        """``Π̂(KᵀK) = KᵀK``."""
        return type(self)(self.dim, {"matrix": self._matrix.T @ self._matrix})

    def self_outer(self) -> Dense:
        """``K Kᵀ``."""
        return type(self)(self.dim, {"matrix": self._matrix @ self._matrix.T})

    def trace(self) -> Tensor:
        """``tr(K)``."""
        return torch.trace(self._matrix)

    def add_diag_(self, value: float | Tensor) -> Dense:
        """``K ← K + v I``."""
        check_scalar(value, f"{self.name}.add_diag_")
        self._matrix.diagonal().add_(value)
        return self


#: The public singd package's name (``singd.structures.dense.DenseMatrix``).
DenseMatrix = Dense
