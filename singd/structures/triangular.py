"""Lower and upper triangular factors (SPEC §2, rows ``tril`` and ``triu``).

``Π̂(M) = diag(M) + 2·strictly-lower(M)`` (``tril``) for symmetric ``M``; the
coupling entries are computed as ``M_ij + M_ji``.  The storage holds
``d(d+1)/2`` numbers, Θ(d²), so the operations work on the dense ``d × d``
matrix: such a temporary is the same order as the factor itself, and a
triangular product gains nothing over a dense BLAS call.  Index sets are
boolean ``d × d`` masks (one byte per entry) rather than ``tril_indices``
(sixteen bytes per entry), read with ``masked_select`` (at ``d = 1024`` on one
CPU thread half the time of boolean indexing, which first lists the indices).
"""

from __future__ import annotations

import torch
from torch import Tensor

from singd.structures.base import check_factor, check_scalar, check_square
from singd.structures.lower_upper import LowerForm, UpperMirror, check_dim


def _lower_mask(dim: int, device: torch.device) -> Tensor:
    """``d × d`` bool, True on and below the diagonal."""
    return torch.ones(dim, dim, dtype=torch.bool, device=device).tril()


def _diagonal_positions(dim: int, device: torch.device) -> Tensor:
    """Positions of ``L_ii`` in the row-major list of lower entries: ``i(i+3)/2``."""
    rows = torch.arange(dim, device=device)
    return rows * (rows + 3) // 2


class Tril(LowerForm):
    """Lower triangular ``L``; storage ``{"entries": (d(d+1)/2,)}``, row by row."""

    name = "tril"

    @classmethod
    def storage_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """``{"entries": (dim(dim+1)/2,)}``."""
        check_dim(dim, cls.name)
        return {"entries": (dim * (dim + 1) // 2,)}

    @property
    def _entries(self) -> Tensor:
        return self._storage["entries"]

    @classmethod
    def from_dense(cls, matrix: Tensor) -> Tril:
        """The lower triangle of ``matrix`` (``d × d``)."""
        dim = check_square(matrix, cls.name)
        return cls(dim, {"entries": matrix.masked_select(_lower_mask(dim, matrix.device))})

    @classmethod
    def project(cls, sym: Tensor) -> Tril:
        """``Π̂(M)``: ``M_ii`` on the diagonal, ``M_ij + M_ji`` below (``M``: ``d × d``)."""
        dim = check_square(sym, cls.name)
        # a contiguous transpose first: the blocked copy beats a strided read of Mᵀ
        coupled = sym + sym.mT.contiguous()
        entries = coupled.masked_select(_lower_mask(dim, sym.device))
        entries[_diagonal_positions(dim, sym.device)] = sym.diagonal()
        return cls(dim, {"entries": entries})

    @classmethod
    def project_gram(cls, factor: Tensor) -> Tril:
        """``Π̂(X Xᵀ)`` from ``X`` (``d × m``), via the dense ``d × d`` Gram matrix."""
        check_factor(factor, cls.name)
        return cls.project(factor @ factor.mT)

    def _dense(self, dtype: torch.dtype) -> Tensor:
        """``L`` as a ``d × d`` tensor of ``dtype``."""
        dense = torch.zeros(self.dim, self.dim, dtype=dtype, device=self.device)
        return dense.masked_scatter_(_lower_mask(self.dim, self.device), self._entries.to(dtype))

    def to_dense(self) -> Tensor:
        """``L`` (``d × d``)."""
        return self._dense(self.dtype)

    def matmul(self, other: Tensor) -> Tensor:
        """``L X`` (``d × m``), in the promoted dtype."""
        own, x = self._promoted_rows(other)
        return own._dense(x.dtype) @ x

    def t_matmul(self, other: Tensor) -> Tensor:
        """``Lᵀ X`` (``d × m``), in the promoted dtype."""
        own, x = self._promoted_rows(other)
        return own._dense(x.dtype).mT @ x

    def _product_storage(self, other: Tril) -> dict[str, Tensor]:
        """``L₁ L₂`` is lower triangular: keep its lower entries."""
        dtype = torch.promote_types(self.dtype, other.dtype)
        product = self._dense(dtype) @ other._dense(dtype)
        return {"entries": product.masked_select(_lower_mask(self.dim, self.device))}

    def _inner_storage(self) -> dict[str, Tensor]:
        """``Π̂(Lᵀ L)``."""
        dense = self._dense(self.dtype)
        return type(self).project(dense.mT @ dense).storage

    def _outer_storage(self) -> dict[str, Tensor]:
        """``Π̂(L Lᵀ)``."""
        dense = self._dense(self.dtype)
        return type(self).project(dense @ dense.mT).storage

    def trace(self) -> Tensor:
        """``Σ L_ii``."""
        return self._entries[_diagonal_positions(self.dim, self.device)].sum()

    def add_diag_(self, value: float | Tensor) -> Tril:
        """``L ← L + v I``."""
        check_scalar(value, f"{self.name}.add_diag_")
        self._entries[_diagonal_positions(self.dim, self.device)] += value
        return self


class Triu(UpperMirror, Tril):
    """Upper triangular ``K``, stored as the :class:`Tril` member ``Kᵀ`` (column by column).

    ``Π̂(M) = diag(M) + 2·strictly-upper(M)`` for symmetric ``M``.
    """

    name = "triu"
