"""Hierarchical factors (SPEC §2, row ``hierarchical (K1, K2)``).

A member is, in block rows/columns of sizes ``(k1, m, k2)``,

    K = [[A, B1,      B2],
         [0, diag(c), 0 ],
         [0, D,       E ]]

with ``A`` (``k1 × k1``), ``E`` (``k2 × k2``), ``B = [B1 | B2]``
(``k1 × (m + k2)``) and ``D`` (``k2 × m``) dense and ``c`` a vector of length
``m``.  Block sizes: ``d ≤ K1`` → ``(d, 0, 0)``; ``d ≤ K1 + K2`` →
``(K1, 0, d − K1)``; else ``(K1, d − K1 − K2, K2)``.  Storage
``{"A", "B", "c", "D", "E"}``: ``k1² + k1(d − k1) + m + k2·m + k2²`` entries.
Π̂ of symmetric ``M``: ``A = M[:k1, :k1]``, ``B = 2·M[:k1, k1:]``,
``c = diag(M)[k1:k1+m]``, ``D = 2·M[k1+m:, k1:k1+m]``, ``E = M[k1+m:, k1+m:]``.
With small ``K1``, ``K2`` no operation forms a ``d × d`` tensor (except
``to_dense``); the largest temporaries are ``k1 × d`` and ``k2 × m``.
``K X`` and ``Kᵀ X`` are written into a result laid out like ``X``: for the
transposed ``X`` of the preconditioner's second side, ``c ⊙ X2`` then reads
and writes at stride 1 (into a row-major result it read at stride ``m``,
10× slower at ``m = 512``), and ``ĝ`` comes back row-major like ``W``.

The public singd package's names resolve here too:
``HierarchicalMatrixTemplate`` is :class:`Hierarchical`, and
``Hierarchical15_15Matrix`` / ``Hierarchical3_2Matrix`` are the registry's
classes for ``"hierarchical15_15"`` / ``"hierarchical3_2"`` (module ``__getattr__``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from singd.structures import get_structure
from singd.structures.base import (
    StructuredMatrix,
    check_factor,
    check_scalar,
    check_square,
    records_graph,
)


class Hierarchical(StructuredMatrix):
    """Hierarchical with maximal corner sizes :attr:`k1_max`, :attr:`k2_max` (set by the registry).

    Attributes:
        k1_max: ``K1``, the size of the top-left dense block for ``d ≥ K1``.
        k2_max: ``K2``, the size of the bottom-right dense block for ``d ≥ K1 + K2``.
    """

    k1_max: ClassVar[int]
    k2_max: ClassVar[int]

    @classmethod
    def block_sizes(cls, dim: int) -> tuple[int, int, int]:
        """``(k1, m, k2)`` for size ``dim`` (module docstring)."""
        if dim <= cls.k1_max:
            return dim, 0, 0
        if dim <= cls.k1_max + cls.k2_max:
            return cls.k1_max, 0, dim - cls.k1_max
        return cls.k1_max, dim - cls.k1_max - cls.k2_max, cls.k2_max

    @classmethod
    def storage_shapes(cls, dim: int) -> dict[str, tuple[int, ...]]:
        """``A: (k1, k1)``, ``B: (k1, d − k1)``, ``c: (m,)``, ``D: (k2, m)``, ``E: (k2, k2)``."""
        k1, m, k2 = cls.block_sizes(dim)
        return {"A": (k1, k1), "B": (k1, dim - k1), "c": (m,), "D": (k2, m), "E": (k2, k2)}

    def _parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        s = self._storage
        return s["A"], s["B"], s["c"], s["D"], s["E"]

    @classmethod
    def _row_blocks(cls, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The row blocks ``X1, X2, X3`` (``k1``, ``m``, ``k2`` rows) of ``X`` (``d × n``)."""
        k1, m, _ = cls.block_sizes(rows.shape[0])
        return rows[:k1], rows[k1 : k1 + m], rows[k1 + m :]

    def _make(self, a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor) -> Hierarchical:
        return type(self)(self.dim, {"A": a, "B": b, "c": c, "D": d, "E": e})

    @classmethod
    def from_dense(cls, matrix: Tensor) -> Hierarchical:
        """The pattern blocks of ``matrix`` (``d × d``)."""
        dim = check_square(matrix, cls.name)
        k1, m, _ = cls.block_sizes(dim)
        tail = k1 + m
        storage = {
            "A": matrix[:k1, :k1],
            "B": matrix[:k1, k1:],
            "c": matrix.diagonal()[k1:tail],
            "D": matrix[tail:, k1:tail],
            "E": matrix[tail:, tail:],
        }
        return cls(dim, {key: block.clone() for key, block in storage.items()})

    @classmethod
    def project(cls, sym: Tensor) -> Hierarchical:
        """``Π̂(M)`` for symmetric ``M`` (``d × d``): coupling blocks ``B``, ``D`` doubled."""
        member = cls.from_dense(sym)
        member._storage["B"].mul_(2)
        member._storage["D"].mul_(2)
        return member

    @classmethod
    def project_gram(cls, factor: Tensor) -> Hierarchical:
        """``Π̂(X Xᵀ)`` from the row blocks ``X1, X2, X3`` of ``X`` (``d × m``).

        ``A = X1 X1ᵀ``, ``B = 2 X1 [X2; X3]ᵀ``, ``c = rowsum(X2²)``,
        ``D = 2 X3 X2ᵀ``, ``E = X3 X3ᵀ``.
        """
        dim = check_factor(factor, cls.name)
        top, middle, bottom = cls._row_blocks(factor)
        storage = {
            "A": top @ top.T,
            "B": 2 * (top @ factor[len(top) :].T),
            "c": (middle * middle).sum(dim=1),
            "D": 2 * (bottom @ middle.T),
            "E": bottom @ bottom.T,
        }
        return cls(dim, storage)

    def to_dense(self) -> Tensor:
        """The ``d × d`` matrix ``[[A, B1, B2], [0, diag(c), 0], [0, D, E]]``."""
        a, b, c, d, e = self._parts()
        k1, m, _ = self.block_sizes(self.dim)
        tail = k1 + m
        dense = a.new_zeros(self.dim, self.dim)
        dense[:k1, :k1] = a
        dense[:k1, k1:] = b
        dense.diagonal()[k1:tail] = c
        dense[tail:, k1:tail] = d
        dense[tail:, tail:] = e
        return dense

    def matmul(self, other: Tensor) -> Tensor:
        """``K X = [A X1 + B [X2; X3]; c ⊙ X2; D X2 + E X3]`` (``d × m``), promoted dtype."""
        own, x = self._promoted_rows(other)
        a, b, c, d, e = own._parts()
        top, middle, bottom = self._row_blocks(x)
        below = x[len(top) :]  # [X2; X3]
        if records_graph(x, a, b, c, d, e):  # autograd cannot record an ``out=`` write
            return torch.cat([a @ top + b @ below, c[:, None] * middle, d @ middle + e @ bottom])
        out = torch.empty_like(x)  # x's layout: a transposed x gives a transposed out
        out_top, out_middle, out_bottom = self._row_blocks(out)
        # each block written in place (no concatenation), second products accumulated into it
        # (addmm_: no temporary; tests/structures/test_blockwise_products bounds the difference)
        torch.matmul(a, top, out=out_top).addmm_(b, below)
        torch.mul(c[:, None], middle, out=out_middle)
        torch.matmul(d, middle, out=out_bottom).addmm_(e, bottom)
        return out

    def t_matmul(self, other: Tensor) -> Tensor:
        """``Kᵀ X = [Aᵀ X1; B1ᵀ X1 + c ⊙ X2 + Dᵀ X3; B2ᵀ X1 + Eᵀ X3]`` (``d × m``)."""
        own, x = self._promoted_rows(other)
        a, b, c, d, e = own._parts()
        top, middle, bottom = self._row_blocks(x)
        m = middle.shape[0]
        if records_graph(x, a, b, c, d, e):  # autograd cannot record an ``out=`` write
            b_top = b.T @ top  # [B1ᵀ X1; B2ᵀ X1]
            return torch.cat(
                [
                    a.T @ top,
                    b_top[:m] + c[:, None] * middle + d.T @ bottom,
                    b_top[m:] + e.T @ bottom,
                ]
            )
        out = torch.empty_like(x)  # x's layout: a transposed x gives a transposed out
        out_top, out_middle, out_bottom = self._row_blocks(out)
        # each block written in place, the products accumulated into it (addmm_): no
        # d × m temporary (B1ᵀ X1, Dᵀ X3) nor a pass to add it
        torch.matmul(a.T, top, out=out_top)
        torch.mul(c[:, None], middle, out=out_middle).addmm_(b[:, :m].T, top).addmm_(d.T, bottom)
        torch.matmul(e.T, bottom, out=out_bottom).addmm_(b[:, m:].T, top)
        return out

    def __matmul__(self, other: StructuredMatrix) -> Hierarchical:
        """``K L`` block-wise, in the promoted dtype.

        ``A A'``, ``B_new = A B' + [B1 diag(c') + B2 D' | B2 E']``, ``c c'``,
        ``D diag(c') + E D'``, ``E E'``.
        """
        self._check_same(other)
        dtype, own = self._promoted(other)
        a, b, c, d, e = own._parts()
        a2, b2, c2, d2, e2 = (t.to(dtype) for t in other._parts())
        m = c.shape[0]
        b_first, b_second = b[:, :m], b[:, m:]
        coupling = torch.cat([b_first * c2 + b_second @ d2, b_second @ e2], dim=1)
        return self._make(a @ a2, a @ b2 + coupling, c * c2, d * c2 + e @ d2, e @ e2)

    def project_self_inner(self) -> Hierarchical:
        """``Π̂(KᵀK)``: ``AᵀA``, ``2 AᵀB``, ``colsum(B1²) + c² + colsum(D²)``,
        ``2 (B2ᵀ B1 + Eᵀ D)``, ``B2ᵀ B2 + Eᵀ E``.
        """
        a, b, c, d, e = self._parts()
        m = c.shape[0]
        b_first, b_second = b[:, :m], b[:, m:]
        return self._make(
            a.T @ a,
            2 * (a.T @ b),
            (b_first * b_first).sum(dim=0) + c * c + (d * d).sum(dim=0),
            2 * (b_second.T @ b_first + e.T @ d),
            b_second.T @ b_second + e.T @ e,
        )

    def trace(self) -> Tensor:
        """``tr(A) + Σ c + tr(E)``."""
        a, _, c, _, e = self._parts()
        return a.diagonal().sum() + c.sum() + e.diagonal().sum()

    def add_diag_(self, value: float | Tensor) -> Hierarchical:
        """``K ← K + v I``."""
        check_scalar(value, f"{self.name}.add_diag_")
        a, _, c, _, e = self._parts()
        a.diagonal().add_(value)
        c.add_(value)
        e.diagonal().add_(value)
        return self


#: The public singd package's name for the template.
HierarchicalMatrixTemplate = Hierarchical

#: The public singd package's parametric names → registry names.
_PUBLIC_MEMBERS = {
    "Hierarchical15_15Matrix": "hierarchical15_15",
    "Hierarchical3_2Matrix": "hierarchical3_2",
}


def __getattr__(name: str) -> type[StructuredMatrix]:
    """The public package's parametric names, looked up in the registry on first access.

    Not at import time: the registry imports this module to build the class,
    and a lookup from inside that import would make a second class.

    Raises:
        AttributeError: for any other name.
    """
    if name in _PUBLIC_MEMBERS:
        return get_structure(_PUBLIC_MEMBERS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
