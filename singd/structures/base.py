"""The interface every structured Kronecker factor implements (SPEC §2).

A *structure* is a set of ``d × d`` matrices that contains the identity and is
closed under addition, scaling and matrix products, so that the SINGD update
``K ← K (I − β1 m_K)`` never leaves it.  A :class:`StructuredMatrix` stores only
the structure's free entries (its *storage*: a dict of plain tensors) and
implements every operation the optimizer needs without forming a dense
``d × d`` matrix wherever the structure allows.

Parametric families (``block<b>diagonal``, ``hierarchical<k1>_<k2>``) are
subclasses whose parameters are class attributes, made once by the registry
(:func:`singd.structures.get_structure`).

Dtype rule (mixed inputs):

* out-of-place operations with a dense tensor (``matmul``, ``t_matmul``) and
  between two structured matrices return ``torch.promote_types`` of the two
  operand dtypes — never a silent downcast, never a promotion past the wider
  operand (python scalars do not promote);
* in-place operations (``mul_``, ``add_``, ``add_diag_``) keep ``self``'s
  dtype, like torch's own in-place ops: the factor stays in its
  ``preconditioner_dtype``;
* constructors from a dense tensor (``from_dense``, ``project``,
  ``project_gram``) keep the input's dtype.

Helpers for subclasses: :func:`check_square` / :func:`check_factor` validate
dense inputs, ``_check_rows`` a ``d × m`` operand (``_check_columns`` an
``m × d`` one), ``_check_same`` a structured
operand, ``_promoted`` applies the dtype rule above and ``_promoted_rows`` does
both for a dense ``d × m`` operand (``_promoted_columns`` for an ``m × d`` one).
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

try:  # Python >= 3.11
    from typing import Self
except ImportError:  # pragma: no cover - Python 3.10
    from typing_extensions import Self


def check_square(matrix: Tensor, name: str) -> int:
    """Return ``d`` for a ``d × d`` tensor; raise ``ValueError`` naming ``name`` otherwise."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name}: expected a square d × d matrix, got shape {tuple(matrix.shape)}")
    return matrix.shape[0]


def check_scalar(value: object, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a number or a 0-dim tensor.

    A tensor with elements along some dimension would broadcast against the
    storage tensors: a silently wrong result, or an error after some of them
    had already changed.
    """
    if isinstance(value, Tensor):
        if value.ndim != 0:
            raise ValueError(
                f"{name}: expected a scalar, got a tensor of shape {tuple(value.shape)}"
            )
    elif not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a scalar, got {type(value).__name__}")


def records_graph(*tensors: Tensor) -> bool:
    """Whether autograd records an operation on ``tensors`` (an ``out=`` write cannot be)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_factor(factor: Tensor, name: str) -> int:
    """Return ``d`` for a ``d × m`` tensor; raise ``ValueError`` naming ``name`` otherwise."""
    if factor.ndim != 2:
        raise ValueError(f"{name}: expected a d × m matrix, got shape {tuple(factor.shape)}")
    return factor.shape[0]


class StructuredMatrix(ABC):
    """A ``dim × dim`` matrix held as the free entries of its structure.

    Attributes:
        name: The registry name of the structure (e.g. ``"block30diagonal"``).
        dim: The matrix size ``d``.
    """

    name: ClassVar[str]

    def __init__(self, dim: int, storage: dict[str, Tensor]) -> None:
        self.dim = dim
        self._storage = storage

    # ------------------------------------------------------------------ layout
    @classmethod
    @abstractmethod
    def storage_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the storage tensors for a ``dim × dim`` member."""

    @classmethod
    def storage_numel(cls, dim: int) -> int:
        """Number of stored entries = number of free entries of the structure."""
        total = 0
        for shape in cls.storage_shapes(dim).values():
            numel = 1
            for size in shape:
                numel *= size
            total += numel
        return total

    @property
    def storage(self) -> dict[str, Tensor]:
        """The storage tensors (plain tensors; safe for ``weights_only`` loads)."""
        return self._storage

    @classmethod
    def from_storage(cls, dim: int, storage: dict[str, Tensor]) -> Self:
        """Rebuild a member from :attr:`storage`.

        Raises ``ValueError`` unless ``dim`` is an int and ``storage`` holds
        exactly the expected keys, as floating tensors of the expected shapes
        with one dtype and one device.
        """
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"{cls.name}: dim must be an int, got {dim!r}")
        expected = cls.storage_shapes(dim)
        if set(storage) != set(expected):
            raise ValueError(
                f"{cls.name}: storage keys {sorted(storage)} != expected {sorted(expected)}"
            )
        for key, shape in expected.items():
            if not isinstance(storage[key], Tensor):
                raise ValueError(
                    f"{cls.name}: storage[{key!r}] must be a tensor, "
                    f"got {type(storage[key]).__name__}"
                )
            if tuple(storage[key].shape) != shape:
                raise ValueError(
                    f"{cls.name}: storage[{key!r}] has shape {tuple(storage[key].shape)}, "
                    f"expected {shape} for dim={dim}"
                )
        kinds = {(t.dtype, t.device) for t in storage.values()}
        if not all(t.is_floating_point() for t in storage.values()) or len(kinds) != 1:
            raise ValueError(
                f"{cls.name}: storage must be floating tensors of one dtype and device, got "
                f"{sorted(str(kind) for kind in kinds)}"
            )
        return cls(dim, dict(storage))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._storage.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._storage.values())).device

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage tensors."""
        return sum(t.numel() * t.element_size() for t in self._storage.values())

    # ------------------------------------------------------------ constructors
    @classmethod
    def zeros(
        cls, dim: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Self:
        """The zero member."""
        shapes = cls.storage_shapes(dim)
        return cls(dim, {k: torch.zeros(s, dtype=dtype, device=device) for k, s in shapes.items()})

    @classmethod
    def eye(
        cls, dim: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Self:
        """The identity."""
        return cls.zeros(dim, dtype=dtype, device=device).add_diag_(1.0)

    @classmethod
    @abstractmethod
    def from_dense(cls, matrix: Tensor) -> Self:
        """The member whose pattern entries are read from ``matrix`` (``d × d``).

        Entries outside the pattern are ignored; for Toeplitz structures the
        first column (row) is read.  Raises ``ValueError`` if not square.
        """

    @classmethod
    @abstractmethod
    def project(cls, sym: Tensor) -> Self:
        """``Π̂(M)`` for a dense symmetric ``M`` (SPEC §2 table)."""

    @classmethod
    @abstractmethod
    def project_gram(cls, factor: Tensor) -> Self:
        """``Π̂(X Xᵀ)`` from ``X`` (``d × m``) without forming ``X Xᵀ`` where avoidable."""

    # ------------------------------------------------------------- conversion
    @abstractmethod
    def to_dense(self) -> Tensor:
        """The full ``d × d`` matrix (zeros outside the pattern)."""

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Self:
        """A copy in another dtype and/or on another device."""
        return type(self)(
            self.dim, {k: t.to(dtype=dtype, device=device) for k, t in self._storage.items()}
        )

    def clone(self) -> Self:
        return type(self)(self.dim, {k: t.clone() for k, t in self._storage.items()})

    # --------------------------------------------------------------- products
    @abstractmethod
    def matmul(self, other: Tensor) -> Tensor:
        """``K @ X`` for a dense ``X`` of shape ``d × m``."""

    @abstractmethod
    def t_matmul(self, other: Tensor) -> Tensor:
        """``Kᵀ @ X`` for a dense ``X`` of shape ``d × m``."""

    @abstractmethod
    def __matmul__(self, other: StructuredMatrix) -> Self:
        """Structured product ``K @ L`` of two members of the same structure."""

    def self_outer_matmul(self, other: Tensor) -> Tensor:
        """``K Kᵀ X`` for a dense ``X`` (``d × m``): ``matmul(t_matmul(X))``."""
        return self.matmul(self.t_matmul(other))

    def right_matmul(self, other: Tensor) -> Tensor:
        """``X K`` for a dense ``X`` of shape ``m × d``: ``(Kᵀ Xᵀ)ᵀ``, a transposed view here.

        A structure whose products can be written column block by column block
        overrides the three ``right_*`` products to return a row-major result
        (the preconditioned gradient's layout, so the parameter update reads it
        contiguously: :func:`singd.optim.updates.singd_precondition`).
        """
        self._check_columns(other)
        return self.t_matmul(other.T).T

    def right_t_matmul(self, other: Tensor) -> Tensor:
        """``X Kᵀ`` for a dense ``X`` (``m × d``): ``(K Xᵀ)ᵀ``."""
        self._check_columns(other)
        return self.matmul(other.T).T

    def right_self_outer_matmul(self, other: Tensor) -> Tensor:
        """``X K Kᵀ`` for a dense ``X`` (``m × d``): ``(K Kᵀ Xᵀ)ᵀ``."""
        self._check_columns(other)
        return self.self_outer_matmul(other.T).T

    def self_outer(self) -> Self | None:
        """``K Kᵀ`` as a member of this structure, where the structure is closed under it.

        ``None`` here (``K Kᵀ`` of a triangular, hierarchical or Toeplitz ``K``
        is dense); dense, block-diagonal and diagonal factors return it, so a
        preconditioner reused for ``T`` steps costs one product per side per
        step instead of two (:func:`singd.optim.updates.singd_precondition`).
        """
        return None

    def project_inner(self, factor: Tensor) -> Self:
        """``Π̂(Kᵀ X Xᵀ K)`` from ``X`` (``d × m``): ``project_gram(Kᵀ X)``."""
        return self.project_gram(self.t_matmul(factor))

    @abstractmethod
    def project_self_inner(self) -> Self:
        """``Π̂(Kᵀ K)``."""

    # -------------------------------------------------------------- reductions
    @abstractmethod
    def trace(self) -> Tensor:
        """``tr(K)`` as a 0-dim tensor."""

    def max_abs(self) -> Tensor:
        """Largest absolute entry (stored entries are matrix entries); 0 for ``dim = 0``."""
        maxima = [t.abs().max() for t in self._storage.values() if t.numel()]
        if not maxima:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.stack(maxima).max()

    # ----------------------------------------------------------- out of place
    def mul(self, scalar: float | Tensor) -> Self:
        """``s K`` as a new matrix (one operator per storage tensor, no clone first)."""
        check_scalar(scalar, f"{self.name}.mul")
        return type(self)(self.dim, {k: t.mul(scalar) for k, t in self._storage.items()})

    def add(self, other: StructuredMatrix, alpha: float | Tensor = 1.0) -> Self:
        """``K + α L`` as a new matrix, bitwise ``K.clone().add_(L, alpha)`` (same kernel)."""
        self._check_same(other)
        check_scalar(alpha, f"{self.name}.add alpha")
        storage = {}
        for key, t in self._storage.items():
            addend = other._storage[key].to(t.dtype)
            if isinstance(alpha, Tensor):  # torch's add takes only a number as alpha
                storage[key] = t.add(addend * alpha)
            else:
                storage[key] = t.add(addend, alpha=alpha)
        return type(self)(self.dim, storage)

    # ---------------------------------------------------------------- in place
    def add_onto_(self, base: StructuredMatrix, alpha: float) -> Self:
        """``self ← base + α self``, written into this matrix's storage.

        Bitwise ``base.add(self, alpha)`` (the same kernel, its output aliasing
        ``self``), without a new storage-sized result.  Needs ``self`` and
        ``base`` of one structure, size and dtype, with no storage in common
        (``ValueError`` otherwise).
        """
        self._check_same(base)
        check_scalar(alpha, f"{self.name}.add_onto_ alpha")
        pairs = [(t, base._storage[key]) for key, t in self._storage.items()]
        for t, b in pairs:
            if t.dtype != b.dtype:
                raise ValueError(f"{self.name}.add_onto_: dtypes {t.dtype} and {b.dtype} differ")
            if (
                t.numel()
                and b.numel()
                and t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            ):
                raise ValueError(f"{self.name}.add_onto_: the two matrices share storage")
        for t, b in pairs:
            torch.add(b, t, alpha=alpha, out=t)
        return self

    def mul_(self, scalar: float | Tensor) -> Self:
        """``K ← s K``."""
        check_scalar(scalar, f"{self.name}.mul_")
        for t in self._storage.values():
            t.mul_(scalar)
        return self

    def add_(self, other: StructuredMatrix, alpha: float | Tensor = 1.0) -> Self:
        """``K ← K + α L`` for ``L`` of the same structure and size."""
        self._check_same(other)
        check_scalar(alpha, f"{self.name}.add_ alpha")
        for key, t in self._storage.items():
            addend = other._storage[key].to(t.dtype)
            if isinstance(alpha, Tensor):  # torch's add_ takes only a number as alpha
                t.add_(addend * alpha)
            else:
                t.add_(addend, alpha=alpha)  # fused: no temporary of the storage's size
        return self

    @abstractmethod
    def add_diag_(self, value: float | Tensor) -> Self:
        """``K ← K + v I``."""

    # ------------------------------------------------------------------ helpers
    def _check_rows(self, other: Tensor) -> None:
        """Raise ``ValueError`` unless ``other`` is a dense ``dim × m`` matrix."""
        self._check_operand(other, axis=0)

    def _check_columns(self, other: Tensor) -> None:
        """Raise ``ValueError`` unless ``other`` is a dense ``m × dim`` matrix (right products)."""
        self._check_operand(other, axis=1)

    def _check_operand(self, other: Tensor, axis: int) -> None:
        """Raise ``ValueError`` unless ``other`` is a dense matrix with ``dim`` along ``axis``."""
        shape = f"{self.dim} × m" if axis == 0 else f"m × {self.dim}"
        if not isinstance(other, Tensor):
            raise ValueError(
                f"{self.name}: expected a dense {shape} tensor, got "
                f"{type(other).__name__} (use @ for a product of structured matrices)"
            )
        if other.ndim != 2 or other.shape[axis] != self.dim:
            raise ValueError(
                f"{self.name}: expected a dense {shape} matrix, got shape {tuple(other.shape)}"
            )

    def _check_same(self, other: StructuredMatrix) -> None:
        if not isinstance(other, StructuredMatrix):
            raise ValueError(
                f"expected a {self.name} matrix of dim {self.dim}, got {type(other).__name__} "
                "(use matmul / t_matmul for a dense tensor)"
            )
        if type(other) is not type(self) or other.dim != self.dim:
            raise ValueError(
                f"expected a {self.name} matrix of dim {self.dim}, "
                f"got {getattr(other, 'name', type(other).__name__)} of dim "
                f"{getattr(other, 'dim', '?')}"
            )

    def _promoted(self, other: Tensor | StructuredMatrix) -> tuple[torch.dtype, Self]:
        """The result dtype of a product with ``other`` and ``self`` cast to it (dtype rule)."""
        dtype = torch.promote_types(self.dtype, other.dtype)
        return dtype, (self if dtype == self.dtype else self.to(dtype=dtype))

    def _promoted_rows(self, other: Tensor) -> tuple[Self, Tensor]:
        """``self`` and a dense ``dim × m`` operand, checked and cast to the promoted dtype."""
        self._check_rows(other)
        dtype, own = self._promoted(other)
        return own, other.to(dtype)

    def _promoted_columns(self, other: Tensor) -> tuple[Self, Tensor]:
        """``self`` and a dense ``m × dim`` operand, checked and cast to the promoted dtype."""
        self._check_columns(other)
        dtype, own = self._promoted(other)
        return own, other.to(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype}, device={self.device})"
