"""Shared machinery of the triangular family (SPEC §2: tril/triu, Toeplitz, recursive).

Every upper form is the transpose of a lower form: ``K = Lᵀ``.  For a
symmetric ``M`` the SPEC §2 projections satisfy ``Π̂_upper(M) = Π̂_lower(M)ᵀ``
(kept entries are read from the diagonal, coupling entries are
``M_ij + M_ji``, both symmetric in ``i, j``), so an upper member is stored
exactly like the lower member ``L = Kᵀ``, and

* ``K X = Lᵀ X`` and ``Kᵀ X = L X``;
* ``K₁ K₂ = (L₂ L₁)ᵀ``;
* ``Π̂_upper(Kᵀ K) = Π̂_lower(L Lᵀ)ᵀ``.

A lower form therefore provides, besides the interface, the storage of the
product ``L₁ L₂`` and of both ``Π̂(Lᵀ L)`` and ``Π̂(L Lᵀ)``;
:class:`UpperMirror` turns it into its upper form.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from singd.structures.base import StructuredMatrix, check_square

if TYPE_CHECKING:
    from typing_extensions import Self

#: Dtypes whose arithmetic is done in float32 and rounded once at the end
#: (CPU has no bf16/fp16 FFT; one rounding is also the most accurate choice).
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for ``HALF_DTYPES``, ``dtype`` itself otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def check_dim(dim: int, name: str) -> int:
    """Return ``dim``; raise ``ValueError`` unless it is a positive integer."""
    if dim < 1:
        raise ValueError(f"{name}: dimension must be at least 1, got {dim}")
    return dim


class LowerForm(StructuredMatrix):
    """A lower-triangular structure, with the products its upper mirror needs.

    The private methods read the storage as ``L`` and must not call the
    public ``to_dense``/``matmul``/``t_matmul``, which the mirror overrides.
    """

    @abstractmethod
    def _product_storage(self, other: Self) -> dict[str, Tensor]:
        """Storage of ``L_self L_other``, in the promoted dtype."""

    @abstractmethod
    def _inner_storage(self) -> dict[str, Tensor]:
        """Storage of ``Π̂(Lᵀ L)``."""

    @abstractmethod
    def _outer_storage(self) -> dict[str, Tensor]:
        """Storage of ``Π̂(L Lᵀ)``."""

    def _same_form(self, other: StructuredMatrix) -> Self:
        """``other``, checked to be a member of this structure and size."""
        self._check_same(other)
        return other  # type: ignore[return-value]

    def __matmul__(self, other: StructuredMatrix) -> Self:
        """``K L`` of two lower members, in the promoted dtype."""
        return type(self)(self.dim, self._product_storage(self._same_form(other)))

    def project_self_inner(self) -> Self:
        """``Π̂(Lᵀ L)``."""
        return type(self)(self.dim, self._inner_storage())


class UpperMirror(LowerForm):
    """Mixin: the upper form ``K = Lᵀ`` of the lower form it precedes in the bases.

    ``class Triu(UpperMirror, Tril)`` stores ``K`` as ``L = Kᵀ`` (module
    docstring) and swaps the roles of ``L`` and ``Lᵀ``; Π̂, trace, scaling,
    sums and the diagonal are shared with the lower form unchanged.
    """

    @classmethod
    def from_dense(cls, matrix: Tensor) -> Self:
        """The member read from the upper pattern of ``matrix`` (``d × d``)."""
        check_square(matrix, cls.name)
        return super().from_dense(matrix.mT)

    def to_dense(self) -> Tensor:
        """``K = Lᵀ`` (``d × d``)."""
        return super().to_dense().mT

    def matmul(self, other: Tensor) -> Tensor:
        """``K X = Lᵀ X`` (``d × m``)."""
        return super().t_matmul(other)

    def t_matmul(self, other: Tensor) -> Tensor:
        """``Kᵀ X = L X`` (``d × m``)."""
        return super().matmul(other)

    def __matmul__(self, other: StructuredMatrix) -> Self:
        """``K₁ K₂ = (L₂ L₁)ᵀ``, in the promoted dtype."""
        return type(self)(self.dim, self._same_form(other)._product_storage(self))

    def project_self_inner(self) -> Self:
        """``Π̂(Kᵀ K) = Π̂(L Lᵀ)ᵀ``."""
        return type(self)(self.dim, self._outer_storage())
