"""Memory: storage = free entries × itemsize exactly; bounded temporaries (SPEC §2).

Temporaries are measured with a :class:`TorchDispatchMode` that records the
number of elements of every tensor an aten op *allocates* while one structure
operation runs: every output except those sharing memory with an input (views
such as ``Mᵀ`` or a slice, and in-place results), which allocate nothing.
Sizes ``d = 256`` and ``d = 257`` (a multiple and a non-multiple of small
block sizes), ``X`` of width ``m = 32``.  ``to_dense`` is not checked: its
*result* is ``d × d`` by definition.

* Structures whose storage is o(d²) (fewer than ``d²/4`` free entries, as
  counted by the oracle): nothing with ``d²`` or more elements may appear.
* Structures whose storage is itself Θ(d²) (``dense``, ``tril``, ``triu``):
  a ``d × d`` temporary costs no more than the factor, so the bound is one
  ``d × d`` matrix; operations that need no dense form (scaling, sums, the
  diagonal, reductions, copies) stay within the storage size, and ``dense``
  multiplies ``X`` without copying ``K`` (``d × m``).  Measured: these bounds
  are attained (``tril`` materialises ``L`` per product and projection).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from reference.structures import get_structure as oracle_structure
from singd.structures import STRUCTURE_NAMES, StructuredMatrix, get_structure

COLS = 32  # m: the width of X in K X, Π̂(Kᵀ X Xᵀ K)


def _storage_pointers(tree: object) -> set[int]:
    return {
        leaf.untyped_storage().data_ptr()
        for leaf in tree_leaves(tree)
        if isinstance(leaf, torch.Tensor)
    }


class LargestOutput(TorchDispatchMode):
    """Records the largest ``numel`` of any tensor an aten op allocates, and which op.

    Outputs whose memory is an input's (views, in-place results) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        inputs = _storage_pointers((args, kwargs))
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor) or leaf.untyped_storage().data_ptr() in inputs:
                continue
            if leaf.numel() > self.numel:
                self.numel, self.op = leaf.numel(), str(func)
        return out


Operation = Callable[
    [type[StructuredMatrix], StructuredMatrix, StructuredMatrix, torch.Tensor, torch.Tensor], object
]

#: Every operation of SPEC §2 except ``to_dense``: (cls, K, L, X (d × m), M (d × d sym)).
OPERATIONS: dict[str, Operation] = {
    "matmul": lambda cls, k, ell, x, sym: k.matmul(x),
    "t_matmul": lambda cls, k, ell, x, sym: k.t_matmul(x),
    "structured_product": lambda cls, k, ell, x, sym: k @ ell,
    "project_gram": lambda cls, k, ell, x, sym: cls.project_gram(x),
    "project_inner": lambda cls, k, ell, x, sym: k.project_inner(x),
    "project_self_inner": lambda cls, k, ell, x, sym: k.project_self_inner(),
    "trace": lambda cls, k, ell, x, sym: k.trace(),
    "max_abs": lambda cls, k, ell, x, sym: k.max_abs(),
    "mul_": lambda cls, k, ell, x, sym: k.mul_(0.5),
    "add_": lambda cls, k, ell, x, sym: k.add_(ell, alpha=-0.5),
    "add_diag_": lambda cls, k, ell, x, sym: k.add_diag_(0.25),
    "eye": lambda cls, k, ell, x, sym: cls.eye(k.dim),
    "zeros": lambda cls, k, ell, x, sym: cls.zeros(k.dim),
    "from_dense": lambda cls, k, ell, x, sym: cls.from_dense(sym),
    "project": lambda cls, k, ell, x, sym: cls.project(sym),
    "from_storage": lambda cls, k, ell, x, sym: cls.from_storage(k.dim, k.storage),
    "clone": lambda cls, k, ell, x, sym: k.clone(),
    "to": lambda cls, k, ell, x, sym: k.to(dtype=torch.float64),
}


DIMS = (256, 257)


def storage_is_quadratic(name: str, dim: int) -> bool:
    """Θ(d²) storage (module docstring): at least a quarter of the ``d²`` entries."""
    return 4 * oracle_structure(name).num_free(dim) >= dim * dim


SUBQUADRATIC = [(n, d) for n in STRUCTURE_NAMES for d in DIMS if not storage_is_quadratic(n, d)]
QUADRATIC = [(n, d) for n in STRUCTURE_NAMES for d in DIMS if storage_is_quadratic(n, d)]

#: Operations that read and write the storage only (no dense form needed).
STORAGE_ONLY = frozenset(
    {"trace", "max_abs", "mul_", "add_", "add_diag_", "eye", "zeros", "from_storage", "clone", "to"}
)


def largest_temporary(name: str, operation: str, dim: int) -> tuple[int, str]:
    """Run ``operation`` on members of size ``dim``; the largest allocation and its op."""
    cls = get_structure(name)
    generator = torch.Generator().manual_seed(dim)
    sym = torch.randn(dim, dim, generator=generator)
    sym = sym + sym.T
    k, ell = cls.project(sym), cls.project(sym * 0.5).add_diag_(1.0)
    x = torch.randn(dim, COLS, generator=generator)
    recorder = LargestOutput()
    with recorder:
        OPERATIONS[operation](cls, k, ell, x, sym)
    return recorder.numel, recorder.op


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize(("name", "dim"), SUBQUADRATIC)
def test_no_quadratic_temporaries(name: str, dim: int, operation: str) -> None:
    numel, op = largest_temporary(name, operation, dim)
    assert numel < dim * dim, f"{operation} made {numel} elements in {op}"


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize(("name", "dim"), QUADRATIC)
def test_quadratic_structures_make_at_most_one_dense_matrix(
    name: str, dim: int, operation: str
) -> None:
    if operation in STORAGE_ONLY:
        allowed = oracle_structure(name).num_free(dim)
    elif name == "dense" and operation in ("matmul", "t_matmul"):
        allowed = dim * COLS
    else:
        allowed = dim * dim
    numel, op = largest_temporary(name, operation, dim)
    # exact element counts (module docstring)
    assert numel <= allowed, f"{operation} made {numel} > {allowed} elements in {op}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [1, 256, 257, 1024])
@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_storage_bytes_are_free_entries(name: str, dim: int, dtype: torch.dtype) -> None:
    cls = get_structure(name)
    member = cls.eye(dim, dtype=dtype)
    # exact: one stored number per free entry of the oracle's pattern
    assert member.nbytes == oracle_structure(name).num_free(dim) * dtype.itemsize
    assert cls.storage_numel(dim) == oracle_structure(name).num_free(dim)


def test_recorder_counts_allocations_not_views() -> None:
    """The recorder itself: a dense product is seen; a transpose and an in-place op are not."""
    matrix = torch.ones(8, 8)
    recorder = LargestOutput()
    with recorder:
        matrix.T.diagonal().add_(1.0)
    assert recorder.numel == 0
    with recorder:
        matrix @ matrix
    assert recorder.numel == 64
