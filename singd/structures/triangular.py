"""Lower and upper triangular factors (SPEC §2, rows ``tril`` and ``triu``).

``Π̂(M) = diag(M) + 2·strictly-lower(M)`` (``tril``) for symmetric ``M``; the
coupling entries are computed as ``M_ij + M_ji``.  The storage holds
``d(d+1)/2`` numbers, Θ(d²), so the operations work on the dense ``d × d``
matrix: such a temporary is the same order as the factor itself, and a
triangular product gains nothing over a dense BLAS call.  The lower entries are
read and written through precomputed flat positions (``index_select``,
``scatter_``), cached per ``(d, device)``: every operation has an output size
fixed by ``d``, so a CUDA step waits for no device value (a boolean mask read
with ``masked_select`` sizes its output from the mask's values, a host sync per
call).  The cache holds ``d(d+1)/2`` int64 positions (about ``4 d²`` bytes) per
size and device, shared by every factor of that size; at ``d = 1024`` on one
CPU thread ``index_select`` takes a fifth of the time of building a mask and
reading it with ``masked_select``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from singd.structures.base import check_factor, check_scalar, check_square
from singd.structures.lower_upper import LowerForm, UpperMirror, check_dim


def _not_cached_under_fake_mode(
    cached: Callable[[int, torch.device], Tensor],
) -> Callable[[int, torch.device], Tensor]:
    """``cached`` (an ``lru_cache``), bypassed while ``FakeTensorMode`` is active: a fake
    index kept in the cache would reach later real calls."""

    @functools.wraps(cached)
    def positions(dim: int, device: torch.device) -> Tensor:
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
            return cached.__wrapped__(dim, device)
        return cached(dim, device)

    return positions


@_not_cached_under_fake_mode
@functools.lru_cache(maxsize=64)
def _lower_positions(dim: int, device: torch.device) -> Tensor:
    """Row-major flat positions ``i d + j`` (``j ≤ i``) of the lower entries: the storage order."""
    with torch.inference_mode(False):  # usable by autograd even if first built in inference mode
        rows, cols = torch.tril_indices(dim, dim, device=device)
        return rows * dim + cols


@_not_cached_under_fake_mode
@functools.lru_cache(maxsize=64)
def _diagonal_positions(dim: int, device: torch.device) -> Tensor:
    """Positions of ``L_ii`` in the row-major list of lower entries: ``i(i+3)/2``."""
    with torch.inference_mode(False):
        rows = torch.arange(dim, device=device)
        return rows * (rows + 3) // 2


def _lower_entries(matrix: Tensor) -> Tensor:
    """The lower triangle of ``matrix`` (``d × d``), row by row (a copy)."""
    dim = matrix.shape[-1]
    return matrix.reshape(-1).index_select(0, _lower_positions(dim, matrix.device))


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
        return cls(dim, {"entries": _lower_entries(matrix)})

    @classmethod
    def project(cls, sym: Tensor) -> Tril:
        """``Π̂(M)``: ``M_ii`` on the diagonal, ``M_ij + M_ji`` below (``M``: ``d × d``)."""
        dim = check_square(sym, cls.name)
        # a contiguous transpose first: the blocked copy beats a strided read of Mᵀ
        coupled = sym + sym.mT.contiguous()
        entries = _lower_entries(coupled)
        entries.scatter_(0, _diagonal_positions(dim, sym.device), sym.diagonal())
        return cls(dim, {"entries": entries})

    @classmethod
    def project_gram(cls, factor: Tensor) -> Tril:
        """``Π̂(X Xᵀ)`` from ``X`` (``d × m``), via the dense ``d × d`` Gram matrix."""
        check_factor(factor, cls.name)
        return cls.project(factor @ factor.mT)

    def _dense(self, dtype: torch.dtype) -> Tensor:
        """``L`` as a ``d × d`` tensor of ``dtype``."""
        dense = torch.zeros(self.dim * self.dim, dtype=dtype, device=self.device)
        positions = _lower_positions(self.dim, self.device)
        return dense.scatter_(0, positions, self._entries.to(dtype)).view(self.dim, self.dim)

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
        return {"entries": _lower_entries(product)}

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
        return self._entries.index_select(0, _diagonal_positions(self.dim, self.device)).sum()

    def add_diag_(self, value: float | Tensor) -> Tril:
        """``L ← L + v I``."""
        check_scalar(value, f"{self.name}.add_diag_")
        positions = _diagonal_positions(self.dim, self.device)
        diagonal = self._entries.index_select(0, positions)
        diagonal += value  # the in-place add of ``entries[positions] += value``, one rounding
        self._entries.scatter_(0, positions, diagonal)
        return self


class Triu(UpperMirror, Tril):
    """Upper triangular ``K``, stored as the :class:`Tril` member ``Kᵀ`` (column by column).

    ``Π̂(M) = diag(M) + 2·strictly-upper(M)`` for symmetric ``M``.
    """

    name = "triu"
