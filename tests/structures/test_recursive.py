"""Checks of the four recursive forms beyond the generic suite.

Storage follows the task's block names (``a``, ``b``, ``c``); ``d = 1`` is the
``1 × 1`` matrix; every operation's largest temporary is ``O(d·m)``, measured
with a dispatch-mode recorder (the generic suite only asks for ``< d²``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from reference.structures import get_structure as oracle_structure
from singd.structures import get_structure

SHAPES = {
    "trilbottomrightdiagonal": lambda d: {"a": (1,), "b": (d - 1,), "c": (d - 1,)},
    "triubottomrightdiagonal": lambda d: {"a": (1,), "b": (d - 1,), "c": (d - 1,)},
    "triltopleftdiagonal": lambda d: {"a": (d - 1,), "b": (d - 1,), "c": (1,)},
    "triutopleftdiagonal": lambda d: {"a": (d - 1,), "b": (d - 1,), "c": (1,)},
}
NAMES = sorted(SHAPES)
DIMS = st.one_of(st.sampled_from([1, 2, 3]), st.integers(1, 50))
SEEDS = st.integers(0, 2**32 - 1)


def blocks(name: str, m: np.ndarray) -> dict[str, np.ndarray]:
    """The task's blocks of a dense member ``m`` of ``name``, read by index."""
    d = m.shape[0]
    diagonal = np.diagonal(m)
    if name == "trilbottomrightdiagonal":  # [[a, 0], [b, diag(c)]]
        return {"a": m[:1, 0], "b": m[1:, 0], "c": diagonal[1:]}
    if name == "triubottomrightdiagonal":  # [[a, bᵀ], [0, diag(c)]]
        return {"a": m[:1, 0], "b": m[0, 1:], "c": diagonal[1:]}
    if name == "triltopleftdiagonal":  # [[diag(a), 0], [bᵀ, c]]
        return {"a": diagonal[: d - 1], "b": m[-1, : d - 1], "c": m[-1, -1:]}
    return {"a": diagonal[: d - 1], "b": m[: d - 1, -1], "c": m[-1, -1:]}  # [[diag(a), b], [0, c]]


@pytest.mark.parametrize("name", NAMES)
@given(dim=DIMS, seed=SEEDS)
def test_storage_is_the_named_blocks(name: str, dim: int, seed: int) -> None:
    cls = get_structure(name)
    assert cls.storage_shapes(dim) == SHAPES[name](dim)
    assert cls.storage_numel(dim) == 2 * dim - 1
    dense = oracle_structure(name).random_member(dim, np.random.default_rng(seed))
    member = cls.from_dense(torch.from_numpy(dense))
    for key, value in blocks(name, dense).items():
        np.testing.assert_array_equal(member.storage[key].numpy(), value)  # exact: copies


@pytest.mark.parametrize("name", NAMES)
@given(dim=DIMS, seed=SEEDS)
def test_projection_formulas(name: str, dim: int, seed: int) -> None:
    """Π̂(M) for symmetric M: diagonal kept, coupling block ``M_ij + M_ji = 2 M_ij``."""
    x = np.random.default_rng(seed).standard_normal((dim, dim))
    sym = x + x.T
    member = get_structure(name).project(torch.from_numpy(sym))
    expected = blocks(name, sym)
    expected["b"] = 2 * expected["b"]  # M_ij + M_ji of a symmetric M: exact doubling
    for key, value in expected.items():
        np.testing.assert_array_equal(member.storage[key].numpy(), value)  # exact


@pytest.mark.parametrize("name", NAMES)
def test_one_by_one(name: str) -> None:
    """``d = 1``: the member is the number ``k``; every operation is scalar arithmetic (exact)."""
    cls = get_structure(name)
    member = cls.from_dense(torch.tensor([[3.0]]))
    other = cls.from_dense(torch.tensor([[-2.0]]))
    x = torch.tensor([[1.0, 2.0, -4.0]])
    assert [t.numel() for t in member.storage.values()] in ([1, 0, 0], [0, 0, 1])
    np.testing.assert_array_equal(member.matmul(x).numpy(), 3 * x.numpy())
    np.testing.assert_array_equal(member.t_matmul(x).numpy(), 3 * x.numpy())
    np.testing.assert_array_equal((member @ other).to_dense().numpy(), [[-6.0]])
    np.testing.assert_array_equal(member.project_self_inner().to_dense().numpy(), [[9.0]])
    np.testing.assert_array_equal(member.project_inner(x).to_dense().numpy(), [[9.0 * 21.0]])
    np.testing.assert_array_equal(cls.project_gram(x).to_dense().numpy(), [[21.0]])
    assert member.trace().item() == 3.0
    assert member.max_abs().item() == 3.0
    np.testing.assert_array_equal(member.clone().add_diag_(1.0).to_dense().numpy(), [[4.0]])


class LargestOutput(TorchDispatchMode):
    """Records the largest ``numel`` any non-view aten op returns (views allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.numel = max(self.numel, leaf.numel())
        return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dim", [256, 257])
def test_temporaries_are_linear(name: str, dim: int) -> None:
    """Largest output: ``d × m`` for products with ``X``, ``d`` for the rest (``M`` is input)."""
    cols = 8
    cls = get_structure(name)
    generator = torch.Generator().manual_seed(dim)
    sym = torch.randn(dim, dim, generator=generator)
    sym = sym + sym.T
    member, other = cls.project(sym), cls.project(sym * 0.5).add_diag_(1.0)
    x = torch.randn(dim, cols, generator=generator)
    ops = {
        "matmul": (lambda: member.matmul(x), dim * cols),
        "t_matmul": (lambda: member.t_matmul(x), dim * cols),
        "project_gram": (lambda: cls.project_gram(x), dim * cols),
        "project_inner": (lambda: member.project_inner(x), dim * cols),
        "project_self_inner": (lambda: member.project_self_inner(), dim),
        "product": (lambda: member @ other, dim),
        "project": (lambda: cls.project(sym), dim),
        "from_dense": (lambda: cls.from_dense(sym), dim),
        "trace": (lambda: member.trace(), dim),
        "add_diag_": (lambda: member.clone().add_diag_(1.0), dim),
    }
    for op_name, (op, allowed) in ops.items():
        recorder = LargestOutput()
        with recorder:
            op()
        assert 0 < recorder.numel <= allowed, (op_name, recorder.numel)  # exact element count
