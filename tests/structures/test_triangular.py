"""Checks of ``tril``/``triu`` and of the lower ↔ upper mirror shared by the triangular family.

Every upper form is stored as the lower member ``L = Kᵀ``
(:mod:`singd.structures.lower_upper`).  The mirror laws below hold exactly:
both sides run the same floating-point operations on the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference.structures import get_structure as oracle_structure
from singd.structures import get_structure
from singd.structures.triangular import Tril, Triu
from tests.tolerances import matmul_bound


def assert_equal(actual: object, expected: object) -> None:
    """Exact equality (same dtype, shape and numbers)."""
    torch.testing.assert_close(actual, expected)


#: (lower, upper) pairs of the triangular family.
PAIRS = [
    ("tril", "triu"),
    ("triltoeplitz", "triutoeplitz"),
    ("trilbottomrightdiagonal", "triubottomrightdiagonal"),
    ("triltopleftdiagonal", "triutopleftdiagonal"),
]
NAMES = [name for pair in PAIRS for name in pair]
DIMS = st.one_of(st.sampled_from([1, 2, 3, 48, 64]), st.integers(1, 70))
SEEDS = st.integers(0, 2**32 - 1)


def random_upper(name: str, dim: int, rng: np.random.Generator) -> torch.Tensor:
    """A general member of the upper structure ``name`` (float64)."""
    return torch.from_numpy(oracle_structure(name).random_member(dim, rng))


# ---------------------------------------------------------------- tril / triu
@given(dim=DIMS, seed=SEEDS)
def test_storage_order(dim: int, seed: int) -> None:
    """``tril`` stores its lower entries row by row; ``triu`` stores ``Kᵀ``'s the same way."""
    matrix = torch.from_numpy(np.random.default_rng(seed).standard_normal((dim, dim)))
    rows, cols = torch.tril_indices(dim, dim)
    assert_equal(Tril.from_dense(matrix).storage["entries"], matrix[rows, cols])
    assert_equal(Triu.from_dense(matrix).storage["entries"], matrix[cols, rows])


@given(dim=DIMS, seed=SEEDS)
def test_trace_and_diagonal_positions(dim: int, seed: int) -> None:
    matrix = torch.from_numpy(np.random.default_rng(seed).standard_normal((dim, dim)))
    for cls in (Tril, Triu):
        member = cls.from_dense(matrix)
        shifted = member.clone().add_diag_(2.0).to_dense() - member.to_dense()
        assert_equal(shifted, 2 * torch.eye(dim, dtype=torch.float64))
        # a sum of d diagonal entries
        bound = matmul_bound(torch.float64, dim) * matrix.diagonal().abs().sum().item()
        assert abs(member.trace().item() - matrix.diagonal().sum().item()) <= bound


# ---------------------------------------------------------------- mirror laws
@pytest.mark.parametrize(("lower", "upper"), PAIRS)
@given(dim=DIMS, seed=SEEDS)
def test_upper_form_is_the_transposed_lower_form(
    lower: str, upper: str, dim: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    lower_cls, upper_cls = get_structure(lower), get_structure(upper)
    k_dense = random_upper(upper, dim, rng)
    other_dense = random_upper(upper, dim, rng)
    k, other = upper_cls.from_dense(k_dense), upper_cls.from_dense(other_dense)
    ell, ell_other = lower_cls.from_dense(k_dense.mT), lower_cls.from_dense(other_dense.mT)
    x = torch.from_numpy(rng.standard_normal((dim, 3)))
    # the same operations on the same stored numbers
    assert_equal(k.to_dense(), k_dense)
    assert_equal(k.matmul(x), ell.t_matmul(x))
    assert_equal(k.t_matmul(x), ell.matmul(x))
    assert_equal((k @ other).to_dense(), (ell_other @ ell).to_dense().mT)
    sym = k_dense + k_dense.mT
    assert_equal(upper_cls.project(sym).to_dense(), lower_cls.project(sym).to_dense().mT)
    assert_equal(upper_cls.project_gram(x).storage, lower_cls.project_gram(x).storage)


@pytest.mark.parametrize("name", NAMES)
@given(dim=DIMS, seed=SEEDS)
def test_project_reads_the_symmetric_part(name: str, dim: int, seed: int) -> None:
    """``Π̂(M) = Π̂(sym(M))``: coupling entries are ``M_ij + M_ji`` even for non-symmetric ``M``."""
    cls = get_structure(name)
    matrix = torch.from_numpy(np.random.default_rng(seed).standard_normal((dim, dim)))
    direct = cls.project(matrix).to_dense()
    via_sym = cls.project((matrix + matrix.mT) / 2).to_dense()
    # Toeplitz sums up to 2d entries per diagonal in another order; the rest is exact
    bound = matmul_bound(torch.float64, 2 * dim) * matrix.abs().max().item()
    assert (direct - via_sym).abs().max().item() <= bound


@pytest.mark.parametrize("name", NAMES)
@given(dim=DIMS, seed=SEEDS)
def test_projection_is_idempotent_on_its_symmetric_part(name: str, dim: int, seed: int) -> None:
    """SPEC §3: ``Π̂(sym(Π̂(M))) = Π̂(M)``."""
    cls = get_structure(name)
    matrix = torch.from_numpy(np.random.default_rng(seed).standard_normal((dim, dim)))
    projected = cls.project(matrix + matrix.mT).to_dense()
    again = cls.project((projected + projected.mT) / 2).to_dense()
    # Toeplitz: a mean of 2(d − k) equal halves; others exact
    bound = matmul_bound(torch.float64, 2 * dim) * projected.abs()
    assert ((again - projected).abs() <= bound).all()


def test_bad_dimension_raises() -> None:
    for name in NAMES:
        with pytest.raises(ValueError, match="at least 1"):
            get_structure(name).eye(0)
