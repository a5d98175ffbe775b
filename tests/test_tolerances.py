"""The eps table every tolerance is built from: one entry per dtype the suites use, each exact."""

from __future__ import annotations

import pytest
import torch

from tests.structures.strategies import DTYPES
from tests.tolerances import EPS, EPS_BY_NAME, matmul_bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eps_is_the_dtypes_machine_epsilon(dtype: torch.dtype) -> None:
    """``EPS[dtype]`` is torch's ``finfo(dtype).eps`` (a power of two: compared exactly)."""
    assert EPS[dtype] == torch.finfo(dtype).eps
    assert EPS_BY_NAME[str(dtype).removeprefix("torch.")] == EPS[dtype]


def test_matmul_bound_is_n_plus_two_eps() -> None:
    """The product rule ``(n + 2)·eps`` (Higham Thm 3.5 plus two roundings), exactly."""
    assert matmul_bound(torch.float32, 10) == 12 * torch.finfo(torch.float32).eps
    assert matmul_bound(torch.float32, 0) == 3 * torch.finfo(torch.float32).eps  # n ≥ 1
