"""The oracle's number systems (``reference/numbers.py``): float64 and mpmath agree.

Tolerances: an inverse computed by LU has a normwise forward error of at most
``c_n · κ · u`` and a residual ``‖M X − I‖ <= c_n · κ · u`` (Higham, Ch. 14);
we use ``c_n = (n + 2) · n`` with ``u`` replaced by ``eps`` (``matmul_bound``
times ``n``), ``κ`` the drawn (pinned) condition number.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mpmath import mp

from reference.numbers import FLOAT64, Numbers, mpmath_numbers
from tests.reference.strategies import ENTRIES, dims, matrices, spd_matrices
from tests.tolerances import EPS, matmul_bound

COND = 1e4  # condition number of the drawn SPD matrices


def test_float64_system() -> None:
    assert FLOAT64.name == "float64"
    assert FLOAT64.eps == EPS[torch.float64]
    assert not FLOAT64.is_mpmath
    assert FLOAT64.asarray([[1, 2], [3, 4]]).dtype == np.float64
    assert FLOAT64.zeros((2, 3)).shape == (2, 3)
    np.testing.assert_array_equal(FLOAT64.eye(3), np.eye(3))


@pytest.mark.parametrize("dps", [20, 50])
def test_mpmath_system(dps: int) -> None:
    numbers = mpmath_numbers(dps)
    assert numbers.name == f"mpmath{dps}"
    assert numbers.is_mpmath
    # eps = 2**(1 - prec) with prec = ⌈dps·log2(10)⌉ + a few guard bits: just below 10**(1 - dps).
    assert 10.0 ** (-dps - 1) <= numbers.eps <= 10.0 ** (1 - dps)
    for array in (numbers.zeros((2, 3)), numbers.eye(3), numbers.asarray([[1.5]])):
        assert array.dtype == object
        assert all(isinstance(value, mp.mpf) for value in array.flat)
    assert isinstance(numbers.scalar(2), mp.mpf)


def test_mpmath_default_is_50_digits() -> None:
    assert mpmath_numbers().name == "mpmath50"


def test_context_sets_and_restores_precision() -> None:
    numbers = mpmath_numbers(50)
    outside = mp.dps
    with numbers.context():
        assert mp.dps == 50
        third = numbers.scalar(1) / 3
        two = numbers.sqrt(numbers.scalar(2))
        # One rounding each at 50 digits: |3·(1/3) − 1| <= 2·eps50, |√2² − 2| <= 4·eps50.
        assert abs(3 * third - 1) <= 2 * numbers.eps
        assert abs(two * two - 2) <= 4 * numbers.eps
        # 1/3 at 50 digits differs from float64's 1/3 by float64's rounding, <= eps64/2.
        assert 0 < abs(third - 1 / 3) <= EPS[torch.float64] / 2
    assert mp.dps == outside
    with FLOAT64.context():
        assert mp.dps == outside


@given(x=dims(1, 6).flatmap(lambda d: matrices(d, d)))
def test_round_trip_is_exact(x: np.ndarray) -> None:
    numbers = mpmath_numbers(50)
    # Exact: 53-bit floats fit in mpmath's 169 bits and come back unchanged.
    np.testing.assert_array_equal(numbers.to_float64(numbers.asarray(x)), x)
    np.testing.assert_array_equal(FLOAT64.to_float64(FLOAT64.asarray(x)), x)


@given(m=dims(1, 8).flatmap(lambda d: spd_matrices(d, cond=COND)))
def test_inverse_agrees_between_systems(m: np.ndarray) -> None:
    d = m.shape[0]
    numbers = mpmath_numbers(50)
    with numbers.context():
        exact = numbers.inv(numbers.asarray(m))
    reference = numbers.to_float64(exact)
    error = np.linalg.norm(FLOAT64.inv(m) - reference, 2)
    # Forward error of an LU inverse: n·(n + 2)·eps64·κ relative to ‖M⁻¹‖.
    bound = d * matmul_bound(torch.float64, d) * COND * np.linalg.norm(reference, 2)
    assert error <= bound


@given(m=dims(1, 6).flatmap(lambda d: spd_matrices(d, cond=COND)))
def test_mpmath_inverse_residual(m: np.ndarray) -> None:
    d = m.shape[0]
    numbers = mpmath_numbers(50)
    with numbers.context():
        matrix = numbers.asarray(m)
        residual = matrix @ numbers.inv(matrix) - numbers.eye(d)
        size = max(abs(value) for value in residual.flat)
    # Residual of an LU inverse at 50 digits: n·(n + 2)·eps50·κ (max-norm <= 2-norm).
    assert size <= d * (d + 2) * numbers.eps * COND


@given(x=ENTRIES)
def test_scalar_sqrt_agree(x: float) -> None:
    numbers = mpmath_numbers(50)
    value = abs(x)
    # float64 sqrt is correctly rounded: within eps64/2 relative of the 50-digit one.
    assert abs(FLOAT64.sqrt(value) - float(numbers.sqrt(numbers.scalar(value)))) <= (
        EPS[torch.float64] * np.sqrt(value)
    )


@pytest.mark.parametrize("numbers", [FLOAT64, mpmath_numbers(50)], ids=lambda n: n.name)
@pytest.mark.parametrize("shape", [(2, 3), (3,)])
def test_inv_non_square_raises(numbers: Numbers, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="square"):
        numbers.inv(numbers.zeros(shape))


@pytest.mark.parametrize("dps", [0, 10, 15])
def test_low_precision_raises(dps: int) -> None:
    with pytest.raises(ValueError, match=f"dps={dps}"):
        mpmath_numbers(dps)


@given(x=st.lists(ENTRIES, min_size=1, max_size=5))
def test_asarray_rounds_mpf_of_other_precision(x: list[float]) -> None:
    high, low = mpmath_numbers(60), mpmath_numbers(20)
    with high.context():
        precise = high.asarray(x) / 3
    coarse = low.asarray(precise)
    with low.context():
        # Rounded to 20 digits: within eps20/2 relative of the 60-digit value.
        assert all(abs(c - p) <= low.eps * abs(p) for c, p in zip(coarse, precise, strict=True))
