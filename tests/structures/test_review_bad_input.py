"""Adversarial review: bad input to the structured-matrix API (SPEC §2).

Cases ``test_operations.test_bad_input_raises`` does not cover.  Every
``ValueError`` case also checks that the operand's storage is bitwise unchanged
(an in-place operation must not stop half-way through its storage tensors).
"""

from __future__ import annotations

import pytest
import torch

from singd.structures import STRUCTURE_NAMES, get_structure
from singd.structures.base import StructuredMatrix
from singd.structures.toeplitz import FFT_MIN_DIM

pytestmark = pytest.mark.parametrize("name", STRUCTURE_NAMES)


def _member(name: str, dim: int = 4) -> StructuredMatrix:
    """A member with distinct entries (not the identity), so changes are visible."""
    cls = get_structure(name)
    dense = torch.arange(1.0, dim * dim + 1).reshape(dim, dim) / dim
    return cls.from_dense(dense + dense.T)


def _storage(member: StructuredMatrix) -> dict[str, torch.Tensor]:
    return {key: t.clone() for key, t in member.storage.items()}


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("size", [3, 4, 5])
def test_in_place_scalars_must_be_scalars(name: str, size: int) -> None:
    """A vector where a scalar is expected: never broadcast silently, never half-applied."""
    member = _member(name)
    before = _storage(member)
    vector = torch.full((size,), 2.0)
    with pytest.raises(ValueError, match="scalar"):
        member.mul_(vector)
    with pytest.raises(ValueError, match="scalar"):
        member.add_(_member(name), alpha=vector)
    with pytest.raises(ValueError, match="scalar"):
        member.add_diag_(vector)
    assert _same(before, member.storage)


def test_in_place_accepts_zero_dim_tensors(name: str) -> None:
    member = _member(name)
    expected = _member(name).mul_(2.0).add_(_member(name), alpha=3.0).add_diag_(-1.0)
    member.mul_(torch.tensor(2.0)).add_(_member(name), alpha=torch.tensor(3.0))
    member.add_diag_(torch.tensor(-1.0))
    assert _same(expected.storage, member.storage)  # same ops, same order: bitwise


def test_from_storage_rejects_non_tensors_and_bad_dtypes(name: str) -> None:
    cls = get_structure(name)
    good = _storage(_member(name))
    first = next(iter(good))
    cases = {
        "tensor": {**good, first: good[first].tolist()},
        "floating": {key: t.to(torch.int64) for key, t in good.items()},
    }
    if len(good) > 1:
        cases["dtype"] = {**good, first: good[first].double()}
    for match, storage in cases.items():
        with pytest.raises(ValueError, match=match):
            cls.from_storage(4, storage)
    with pytest.raises(ValueError, match="dim"):
        cls.from_storage(4.0, good)  # type: ignore[arg-type]


def test_products_with_the_wrong_operand_kind_are_value_errors(name: str) -> None:
    member = _member(name)
    with pytest.raises(ValueError, match="dense"):
        member.matmul(_member(name))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dense"):
        member.t_matmul(_member(name))  # type: ignore[arg-type]
    for method in ("right_matmul", "right_t_matmul", "right_self_outer_matmul"):
        with pytest.raises(ValueError, match="dense m × 4 tensor"):
            getattr(member, method)(_member(name))
        for shape in ((4, 3), (4,), (2, 4, 4)):  # X must be m × d
            with pytest.raises(ValueError, match=r"dense m × 4 matrix, got shape"):
                getattr(member, method)(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"Tensor.*matmul"):
        _ = member @ torch.eye(4)  # type: ignore[operator]
    with pytest.raises(ValueError, match="Tensor"):
        member.add_(torch.eye(4))  # type: ignore[arg-type]


def test_no_columns(name: str) -> None:
    """``X`` with ``m = 0`` columns (an empty batch), also on the Toeplitz FFT path."""
    dim = FFT_MIN_DIM + 1
    member = get_structure(name).eye(dim)
    empty = torch.zeros(dim, 0)
    assert member.matmul(empty).shape == (dim, 0)
    assert member.t_matmul(empty).shape == (dim, 0)
    for method in ("right_matmul", "right_t_matmul", "right_self_outer_matmul"):
        assert getattr(member, method)(empty.T).shape == (0, dim)
    assert torch.equal(member.project_inner(empty).to_dense(), torch.zeros(dim, dim))


def test_max_abs_of_an_empty_member_is_zero(name: str) -> None:
    cls = get_structure(name)
    try:
        member = cls.zeros(0)
    except ValueError as error:  # structures that need d >= 1 say so
        assert "at least 1" in str(error)
        return
    assert member.max_abs().item() == 0.0
