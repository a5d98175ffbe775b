"""Block-diagonal factors (SPEC §2, row ``block-diagonal``).

``K = blockdiag(K_1, …, K_n, K_last)`` with ``n = ⌊d / b⌋`` full ``b × b``
blocks and one last block of size ``r = d mod b`` (absent when ``r = 0``);
``Π̂(M)`` keeps the diagonal blocks of ``M``.  Storage:
``{"blocks": (n, b, b), "last": (r, r)}``, i.e. ``n·b² + r²`` free entries.
The full blocks go through one batched product (``bmm``), the last one through
a plain product, on the row blocks of ``X`` for ``K X`` and on the column
blocks for ``X K`` (a row-major result); no operation forms a ``d × d`` tensor
(except ``to_dense``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from singd.structures.base import (
    StructuredMatrix,
    check_factor,
    check_scalar,
    check_square,
    records_graph,
)


class BlockDiagonal(StructuredMatrix):
    """Block-diagonal with block size :attr:`block_size` (set by the registry).

    Attributes:
        block_size: ``b``; the registry makes one subclass per ``b``
            (``get_structure("block30diagonal").block_size == 30``).
    """

    block_size: ClassVar[int]

    @classmethod
    def _sizes(cls, dim: int) -> tuple[int, int]:
        """``(n, r)``: the number of full blocks and the size of the last block."""
        return dim // cls.block_size, dim % cls.block_size

    @classmethod
    def storage_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """``{"blocks": (n, b, b), "last": (r, r)}``."""
        num_blocks, rest = cls._sizes(dim)
        return {"blocks": (num_blocks, cls.block_size, cls.block_size), "last": (rest, rest)}

    @property
    def _blocks(self) -> Tensor:
        return self._storage["blocks"]

    @property
    def _last(self) -> Tensor:
        return self._storage["last"]

    @classmethod
    def _split_rows(cls, factor: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of ``X`` (``d × m``) as full blocks (``n × b × m``) and the rest (``r × m``)."""
        num_blocks, _ = cls._sizes(factor.shape[0])
        split = num_blocks * cls.block_size
        full = factor[:split].reshape(num_blocks, cls.block_size, factor.shape[1])
        return full, factor[split:]

    @classmethod
    def _split_columns(cls, factor: Tensor) -> tuple[Tensor, Tensor]:
        """Columns of ``X`` (``m × d``) as full blocks (``n × m × b``) and the rest (``m × r``),
        views: a block's rows keep ``X``'s row stride."""
        num_blocks, _ = cls._sizes(factor.shape[1])
        split = num_blocks * cls.block_size
        full = factor[:, :split].unflatten(1, (num_blocks, cls.block_size)).transpose(0, 1)
        return full, factor[:, split:]

    @classmethod
    def from_dense(cls, matrix: Tensor) -> BlockDiagonal:
        """The diagonal blocks of ``matrix`` (``d × d``), read through a strided view."""
        dim = check_square(matrix, cls.name)
        num_blocks, _ = cls._sizes(dim)
        b = cls.block_size
        row_stride, col_stride = matrix.stride()
        blocks = matrix.as_strided(
            (num_blocks, b, b),
            (b * (row_stride + col_stride), row_stride, col_stride),
            matrix.storage_offset(),
        )
        split = num_blocks * b
        return cls(dim, {"blocks": blocks.clone(), "last": matrix[split:, split:].clone()})

    @classmethod
    def project(cls, sym: Tensor) -> BlockDiagonal:
        """``Π̂(M)``: the diagonal blocks of symmetric ``M`` (``d × d``)."""
        return cls.from_dense(sym)

    @classmethod
    def project_gram(cls, factor: Tensor) -> BlockDiagonal:
        """Diagonal blocks ``X_i X_iᵀ`` of ``X Xᵀ`` from ``X`` (``d × m``)."""
        dim = check_factor(factor, cls.name)
        full, rest = cls._split_rows(factor)
        return cls(dim, {"blocks": full @ full.transpose(1, 2), "last": rest @ rest.T})

    def to_dense(self) -> Tensor:
        """``blockdiag(K_1, …, K_n, K_last)`` (``d × d``)."""
        return torch.block_diag(*self._blocks.unbind(0), self._last)

    def matmul(self, other: Tensor) -> Tensor:
        """``K X`` (``d × m``), block by block, in the promoted dtype."""
        own, x = self._promoted_rows(other)
        return self._blockwise(own._blocks, own._last, x)

    def t_matmul(self, other: Tensor) -> Tensor:
        """``Kᵀ X`` (``d × m``), block by block, in the promoted dtype."""
        own, x = self._promoted_rows(other)
        return self._blockwise(own._blocks.transpose(1, 2), own._last.T, x)

    @classmethod
    def _blockwise(cls, blocks: Tensor, last: Tensor, x: Tensor) -> Tensor:
        """``blockdiag(blocks…, last) X``, each product written into its rows of the result.

        No concatenation (the result's row blocks are views of it); the products
        are those of ``bmm``/``mm`` on the same operands (BLAS may round one into
        a slice unlike one into a fresh tensor: its kernel depends on the output's
        address; tests/structures/test_blockwise_products).  Where autograd
        records the products, they are concatenated instead.
        """
        full, rest = cls._split_rows(x)
        if records_graph(blocks, last, x):
            products = blocks @ full
            joined = products.reshape(products.shape[0] * products.shape[1], x.shape[1])
            return torch.cat([joined, last @ rest])
        out = x.new_empty(x.shape)
        out_full, out_rest = cls._split_rows(out)  # views: ``out`` is contiguous
        torch.matmul(blocks, full, out=out_full)
        torch.matmul(last, rest, out=out_rest)
        return out

    def right_matmul(self, other: Tensor) -> Tensor:
        """``X K`` (``m × d``, row-major), column block by column block, in the promoted dtype."""
        own, x = self._promoted_columns(other)
        return self._columnwise(own._blocks, own._last, x)

    def right_t_matmul(self, other: Tensor) -> Tensor:
        """``X Kᵀ`` (``m × d``, row-major), column block by column block, in the promoted dtype."""
        own, x = self._promoted_columns(other)
        return self._columnwise(own._blocks.transpose(1, 2), own._last.T, x)

    def right_self_outer_matmul(self, other: Tensor) -> Tensor:
        """``X K Kᵀ`` (``m × d``, row-major): ``right_t_matmul(right_matmul(X))``."""
        return self.right_t_matmul(self.right_matmul(other))

    @classmethod
    def _columnwise(cls, blocks: Tensor, last: Tensor, x: Tensor) -> Tensor:
        """``X blockdiag(blocks…, last)``, each product written into its columns of the result.

        :meth:`_blockwise` on the column blocks (:meth:`_split_columns`): one
        ``bmm`` of the ``n × m × b`` batch into the matching view of the row-major
        result, then the last block, without a transposed write
        (tests/structures/test_blockwise_products).  Where autograd records the
        products, they are concatenated instead.
        """
        full, rest = cls._split_columns(x)
        if records_graph(blocks, last, x):
            split = full.shape[0] * cls.block_size
            products = (full @ blocks).transpose(0, 1).reshape(x.shape[0], split)
            return torch.cat([products, rest @ last], dim=1)
        out = x.new_empty(x.shape)
        out_full, out_rest = cls._split_columns(out)  # views: ``out`` is contiguous
        torch.matmul(full, blocks, out=out_full)
        torch.matmul(rest, last, out=out_rest)
        return out

    def __matmul__(self, other: StructuredMatrix) -> BlockDiagonal:
        """``K L``: block-wise products, in the promoted dtype."""
        self._check_same(other)
        dtype, own = self._promoted(other)
        blocks = own._blocks @ other.storage["blocks"].to(dtype)
        return type(self)(
            self.dim, {"blocks": blocks, "last": own._last @ other.storage["last"].to(dtype)}
        )

    def project_self_inner(self) -> BlockDiagonal:
        """``Π̂(KᵀK) = blockdiag(K_iᵀ K_i)``."""
        return type(self)(
            self.dim,
            {
                "blocks": self._blocks.transpose(1, 2) @ self._blocks,
                "last": self._last.T @ self._last,
            },
        )

    def self_outer(self) -> BlockDiagonal:
        """``K Kᵀ = blockdiag(K_i K_iᵀ)``."""
        return type(self)(
            self.dim,
            {
                "blocks": self._blocks @ self._blocks.transpose(1, 2),
                "last": self._last @ self._last.T,
            },
        )

    def trace(self) -> Tensor:
        """``Σ_i tr(K_i) + tr(K_last)``."""
        return self._blocks.diagonal(dim1=1, dim2=2).sum() + self._last.diagonal().sum()

    def add_diag_(self, value: float | Tensor) -> BlockDiagonal:
        """``K ← K + v I``."""
        check_scalar(value, f"{self.name}.add_diag_")
        self._blocks.diagonal(dim1=1, dim2=2).add_(value)
        self._last.diagonal().add_(value)
        return self
