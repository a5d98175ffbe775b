"""Triangular Toeplitz factors (SPEC §2, rows ``triltoeplitz`` and ``triutoeplitz``).

A lower-triangular Toeplitz ``L`` is its first column ``t``: ``L_ij = t_{i−j}``
for ``i ≥ j``.  Every product is a convolution along the ``d`` axis:

* ``(L X)_i = Σ_k t_k X_{i−k}`` and ``(Lᵀ X)_i = Σ_k t_k X_{i+k}``;
* ``L₁ L₂`` is lower Toeplitz with first column ``L₁ t₂``;
* the diagonal sums of a Gram matrix are lag products
  ``r_k = Σ_i Σ_j A_{i,j} B_{i+k,j}``: ``Σ_i (X Xᵀ)_{i+k,i} = r_k`` with
  ``A = B = X``, and ``Σ_i (Lᵀ L)_{i+k,i} = Σ_i (L Lᵀ)_{i+k,i}
  = Σ_p (d − k − p) t_p t_{p+k}`` with ``A = t``, ``B = w ⊙ t``,
  ``w_q = d − q``;
* Π̂ puts on diagonal ``k`` the mean of the ``k``-th sub- and super-diagonal
  of a symmetric ``M``: ``2 r_k / (d − k)`` for ``k ≥ 1`` and ``r_0 / d``.

Algorithms.  For ``d ≥ FFT_MIN_DIM`` convolutions and lag products use real
FFTs of length ``n ≥ 2d − 1`` (zero padding, so the circular result has no
wrap-around): ``O(d·m·log d)`` time, ``O(d·m)`` memory, and normwise errors
``O(log(n)·eps)`` relative to the operands' norms.  Smaller ``d`` use the
direct sums, one vectorised step per diagonal: ``O(d²·m)`` time, still no
``d × d`` tensor, componentwise errors like a dense product.  On CPU the FFT
is faster at every size measured (8 ≤ d ≤ 128); the direct path exists for
the componentwise accuracy that small factors are tested against, at a cost
below 0.4 ms per call (d < 48, CPU).  The measured times at ``d = 1024``,
``m = 256`` are in docs/structures.md ("Cost at d = 1024",
``scripts/structure_costs.py``).

Layout.  Every transform runs along the last, contiguous axis: ``X`` (``d × m``)
is transformed as ``Xᵀ``, whose zero-padded copy is ``m × n``, and a product
is returned as the transposed view ``[:, :d]ᵀ`` of its ``m × n`` inverse-FFT
buffer (not contiguous; the buffer, ``n = fft_length(d) < 4d``, is the largest
temporary and lives as long as the result).  Transforming along axis 0 of a
row-major ``X`` instead runs each length-``n`` transform at stride ``m``; with
``m = 512`` (a power of two, as in most layers) the cache sets collide, and
``L X`` at ``d = m = 512`` took about three times as long, for the same bits
(tests/structures/test_toeplitz.py checks that every transform reads its
axis at stride 1).

Dtypes.  bfloat16 and float16 have no FFT on CPU (and fp16 only for powers
of two on CUDA): both paths compute in float32 and round once to the input's
dtype.  Results are returned in the dtype the interface prescribes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from singd.structures.base import check_factor, check_scalar, check_square
from singd.structures.lower_upper import LowerForm, UpperMirror, check_dim, compute_dtype

#: Smallest ``d`` for which products and projections use the FFT.
FFT_MIN_DIM = 48


def fft_length(dim: int) -> int:
    """The smallest ``n = 2^a 3^b 5^c ≥ 2·dim − 1``: a fast, wrap-free FFT length."""
    length = max(2 * dim - 1, 1)
    while True:
        rest = length
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return length
        length += 1


def convolve_direct(first_column: Tensor, columns: Tensor, transpose: bool) -> Tensor:
    """``L X`` (or ``Lᵀ X``) by direct sums over the diagonals of ``L``.

    Args:
        first_column: ``t`` (``d``), the first column of lower Toeplitz ``L``.
        columns: ``X`` (``d × m``), same dtype.
        transpose: Multiply by ``Lᵀ`` instead of ``L``.

    Returns:
        ``d × m``.
    """
    dim = columns.shape[0]
    result = columns * first_column[0]
    for lag in range(1, dim):
        if transpose:
            result[: dim - lag].addcmul_(columns[lag:], first_column[lag])
        else:
            result[lag:].addcmul_(columns[: dim - lag], first_column[lag])
    return result


def convolve_fft(first_column: Tensor, columns: Tensor, transpose: bool) -> Tensor:
    """``L X`` (or ``Lᵀ X``) as a real-FFT convolution (correlation) along the rows.

    Args and returns as :func:`convolve_direct`; float32/float64 only.
    """
    dim = columns.shape[0]
    length = fft_length(dim)
    kernel = torch.fft.rfft(first_column, length)
    spectrum = torch.fft.rfft(columns.T, length, dim=1)
    spectrum.mul_(kernel.conj() if transpose else kernel)
    return torch.fft.irfft(spectrum, length, dim=1)[:, :dim].T


def lag_products_direct(left: Tensor, right: Tensor) -> Tensor:
    """``r_k = Σ_i Σ_j A_{i,j} B_{i+k,j}`` for ``k = 0, …, d − 1`` by direct sums.

    Each lag sums the ``m`` products of a row pair first, then the ``d − k``
    row results (error ``(m + d)·eps``-like, as for a Gram matrix and a
    diagonal sum).

    Args:
        left: ``A`` (``d × m``).
        right: ``B`` (``d × m``), same dtype.

    Returns:
        ``r`` (``d``).
    """
    dim = left.shape[0]
    return torch.stack([(left[: dim - lag] * right[lag:]).sum(dim=1).sum() for lag in range(dim)])


def lag_products_fft(left: Tensor, right: Tensor) -> Tensor:
    """Lag products as :func:`lag_products_direct`, via ``irfft(Σ_j conj(Â_j) B̂_j)``.

    float32/float64 only.
    """
    dim = left.shape[0]
    length = fft_length(dim)
    left_spectrum = torch.fft.rfft(left.T, length, dim=1)
    right_spectrum = left_spectrum if right is left else torch.fft.rfft(right.T, length, dim=1)
    cross = torch.linalg.vecdot(left_spectrum, right_spectrum, dim=0)
    return torch.fft.irfft(cross, length)[:dim]


def _toeplitz_times(first_column: Tensor, columns: Tensor, transpose: bool) -> Tensor:
    """``L X`` or ``Lᵀ X`` in the dtype of ``columns`` (``first_column`` has the same)."""
    work = compute_dtype(columns.dtype)
    first_column, work_columns = first_column.to(work), columns.to(work)
    use_fft = columns.shape[0] >= FFT_MIN_DIM and columns.shape[1] > 0  # MKL rejects m = 0
    convolve = convolve_fft if use_fft else convolve_direct
    return convolve(first_column, work_columns, transpose).to(columns.dtype)


def _diagonal_means(left: Tensor, right: Tensor) -> Tensor:
    """Π̂ of a symmetric matrix whose sub-diagonal sums are the lag products of ``left, right``.

    Returns ``r_0 / d`` and ``2 r_k / (d − k)`` (``d``) in the dtype of ``left``.
    """
    dim, dtype = left.shape[0], left.dtype
    work = compute_dtype(dtype)
    same = right is left  # one FFT and one float32 copy for a Gram matrix
    left = left.to(work)
    right = left if same else right.to(work)
    use_fft = dim >= FFT_MIN_DIM and left.shape[1] > 0  # MKL rejects m = 0
    lag_products = lag_products_fft if use_fft else lag_products_direct
    sums = lag_products(left, right)
    two_sided = torch.cat([sums[:1], 2 * sums[1:]])
    counts = torch.arange(dim, 0, -1, dtype=work, device=left.device)
    return (two_sided / counts).to(dtype)


class TrilToeplitz(LowerForm):
    """Lower-triangular Toeplitz ``L``; storage ``{"diagonals": (d,)}``, ``t_k`` on diagonal ``−k``.

    See the module docstring for the algorithms, their cost and accuracy.
    """

    name = "triltoeplitz"

    @classmethod
    def storage_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """``{"diagonals": (dim,)}``."""
        check_dim(dim, cls.name)
        return {"diagonals": (dim,)}

    @property
    def _diagonals(self) -> Tensor:
        return self._storage["diagonals"]

    @classmethod
    def from_dense(cls, matrix: Tensor) -> TrilToeplitz:
        """The first column of ``matrix`` (``d × d``)."""
        dim = check_square(matrix, cls.name)
        return cls(dim, {"diagonals": matrix[:, 0].clone()})

    @classmethod
    def project(cls, sym: Tensor) -> TrilToeplitz:
        """``Π̂(M)``: diagonal ``k`` gets (sum of ``M``'s ``±k`` diagonals) / (``d − k``).

        One pass over the ``2d − 1`` diagonals of ``M`` (``d × d``); no copy.
        """
        dim = check_square(sym, cls.name)
        work = compute_dtype(sym.dtype)
        sums = [sym.diagonal().sum(dtype=work)] + [
            sym.diagonal(-lag).sum(dtype=work) + sym.diagonal(lag).sum(dtype=work)
            for lag in range(1, dim)
        ]
        counts = torch.arange(dim, 0, -1, dtype=work, device=sym.device)
        return cls(dim, {"diagonals": (torch.stack(sums) / counts).to(sym.dtype)})

    @classmethod
    def project_gram(cls, factor: Tensor) -> TrilToeplitz:
        """``Π̂(X Xᵀ)`` from the row lag products of ``X`` (``d × m``); no ``d × d`` tensor."""
        dim = check_factor(factor, cls.name)
        return cls(dim, {"diagonals": _diagonal_means(factor, factor)})

    def to_dense(self) -> Tensor:
        """``L_ij = t_{i−j}`` for ``i ≥ j``, else 0 (``d × d``)."""
        padded = torch.cat([self._diagonals.new_zeros(self.dim - 1), self._diagonals])
        # row i of L, read right to left, is the window padded[i : i + d]
        return padded.unfold(0, self.dim, 1).flip(1)

    def matmul(self, other: Tensor) -> Tensor:
        """``L X`` (``d × m``), in the promoted dtype."""
        own, x = self._promoted_rows(other)
        return _toeplitz_times(own._diagonals, x, transpose=False)

    def t_matmul(self, other: Tensor) -> Tensor:
        """``Lᵀ X`` (``d × m``), in the promoted dtype."""
        own, x = self._promoted_rows(other)
        return _toeplitz_times(own._diagonals, x, transpose=True)

    def _product_storage(self, other: TrilToeplitz) -> dict[str, Tensor]:
        """First column of ``L₁ L₂``: ``L₁ t₂``, in storage of its own.

        The product is a view of its ``n``-long inverse-FFT buffer (module
        docstring, "Layout"); a factor stepped from it (``K − β1 K m``) would
        keep that buffer alive and write it into a checkpoint, so the ``d``
        entries are cloned.
        """
        dtype, own = self._promoted(other)
        second = other._diagonals.to(dtype)[:, None]
        first_column = _toeplitz_times(own._diagonals, second, transpose=False)[:, 0]
        return {"diagonals": first_column.clone()}

    def _inner_storage(self) -> dict[str, Tensor]:
        """``Π̂(Lᵀ L)`` from the lag products of ``t`` and ``w ⊙ t``, ``w_q = d − q``."""
        first_column = self._diagonals
        work = compute_dtype(self.dtype)  # d − q is exact in float32 up to d = 2²⁴
        weights = torch.arange(self.dim, 0, -1, dtype=work, device=self.device)
        weighted = weights * first_column.to(work)
        return {"diagonals": _diagonal_means(first_column[:, None], weighted[:, None])}

    def _outer_storage(self) -> dict[str, Tensor]:
        """``Π̂(L Lᵀ) = Π̂(Lᵀ L)``: ``L Lᵀ = J Lᵀ L J`` (``J`` reverses), same diagonal sums."""
        return self._inner_storage()

    def trace(self) -> Tensor:
        """``d · t₀``."""
        return self.dim * self._diagonals[0]

    def add_diag_(self, value: float | Tensor) -> TrilToeplitz:
        """``t₀ ← t₀ + v``."""
        check_scalar(value, f"{self.name}.add_diag_")
        self._diagonals[:1].add_(value)
        return self


class TriuToeplitz(UpperMirror, TrilToeplitz):
    """Upper-triangular Toeplitz ``K``, stored as its transpose :class:`TrilToeplitz`.

    ``t_k`` is ``K``'s value on super-diagonal ``k`` (its first row).
    """

    name = "triutoeplitz"
