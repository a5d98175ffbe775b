"""Toeplitz-specific checks: FFT and direct kernels, the FFT path of every product, memory.

The generic suite (``test_operations.py``) draws ``d ≤ 40``, where the direct
sums run, plus one pinned case per operation on the FFT path; here ``d``
ranges over the FFT path (``d ≥ FFT_MIN_DIM``).  The FFT bounds are derived
in :mod:`tests.structures.fft_bounds`; the direct kernels are bounded
componentwise like a dense product (:mod:`tests.tolerances`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from reference.structures import get_structure as oracle_structure
from singd.optim.updates import singd_factor_step
from singd.structures.toeplitz import (
    FFT_MIN_DIM,
    TrilToeplitz,
    TriuToeplitz,
    _toeplitz_times,
    convolve_direct,
    convolve_fft,
    fft_length,
    lag_products_direct,
    lag_products_fft,
)
from tests.optim.nested import owns_exactly_its_bytes
from tests.structures.fft_bounds import (
    convolution_bound,
    diagonal_means_bound,
    lag_bound,
    rounding,
)
from tests.tolerances import matmul_bound

FFT_DTYPES = (torch.float64, torch.float32)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
CLASSES = (TrilToeplitz, TriuToeplitz)


# -------------------------------------------------------------- references
def lower_toeplitz(t: np.ndarray) -> np.ndarray:
    """Dense lower Toeplitz with first column ``t`` (float64)."""
    return scipy.linalg.toeplitz(t, np.zeros_like(t))


def exact_lags(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``r_k = Σ_j Σ_i a_ij b_{i+k,j}`` in float64 (exact for the integer data used)."""
    d = a.shape[0]
    return np.array([(a[: d - k] * b[k:]).sum() for k in range(d)])


def integers(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Integers in ``[−64, 64]``: every float64 sum below is exact, so references are exact."""
    return rng.integers(-64, 65, size=shape).astype(np.float64)


DIMS = st.one_of(
    st.sampled_from([1, 2, 3, FFT_MIN_DIM - 1, FFT_MIN_DIM, 64, 256, 257]),
    st.integers(1, 300),
)
SEEDS = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------- kernels
def test_fft_length_is_smallest_five_smooth_wrap_free_length() -> None:
    def smooth(n: int) -> bool:
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1

    for dim in range(1, 400):
        n = fft_length(dim)
        assert n >= 2 * dim - 1 and smooth(n)
        assert not any(smooth(k) for k in range(2 * dim - 1, n))


@pytest.mark.parametrize("dtype", FFT_DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
@given(dim=DIMS, cols=st.integers(1, 6), seed=SEEDS)
@example(dim=1, cols=1, seed=0)
@example(dim=2, cols=3, seed=1)
def test_convolution_fft_and_direct_match_exact(
    dtype: torch.dtype, transpose: bool, dim: int, cols: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    t, x = integers(rng, dim), integers(rng, dim, cols)
    dense = lower_toeplitz(t)
    op = dense.T if transpose else dense
    exact = op @ x
    t_torch, x_torch = torch.from_numpy(t).to(dtype), torch.from_numpy(x).to(dtype)
    fft = convolve_fft(t_torch, x_torch, transpose).double().numpy()
    direct = convolve_direct(t_torch, x_torch, transpose).double().numpy()
    # FFT: normwise per column (module docstring)
    assert (np.abs(fft - exact) <= convolution_bound(dtype, t, x)).all()
    # direct: componentwise, one product of reduction length d
    assert (np.abs(direct - exact) <= matmul_bound(dtype, dim) * (np.abs(op) @ np.abs(x))).all()


@pytest.mark.parametrize("dtype", FFT_DTYPES)
@pytest.mark.parametrize("same", [True, False])
@given(dim=DIMS, cols=st.integers(1, 6), seed=SEEDS)
@example(dim=1, cols=1, seed=0)
@example(dim=2, cols=2, seed=1)
def test_lag_products_fft_and_direct_match_exact(
    dtype: torch.dtype, same: bool, dim: int, cols: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    a = integers(rng, dim, cols)
    b = a if same else integers(rng, dim, cols)
    exact = exact_lags(a, b)
    a_torch = torch.from_numpy(a).to(dtype)
    b_torch = a_torch if same else torch.from_numpy(b).to(dtype)
    fft = lag_products_fft(a_torch, b_torch).double().numpy()
    direct = lag_products_direct(a_torch, b_torch).double().numpy()
    assert (np.abs(fft - exact) <= lag_bound(dtype, a, b)).all()  # normwise (module docstring)
    # direct: m products per row, then d − k rows: reduction lengths m and d
    magnitude = exact_lags(np.abs(a), np.abs(b))
    bound = matmul_bound(dtype, cols) + matmul_bound(dtype, dim)
    assert (np.abs(direct - exact) <= bound * magnitude).all()


def test_half_precision_is_computed_in_float32_and_rounded_once() -> None:
    rng = np.random.default_rng(7)
    t, x = rng.standard_normal(300), rng.standard_normal((300, 4))
    for dtype in (torch.bfloat16, torch.float16):
        t_half, x_half = torch.from_numpy(t).to(dtype), torch.from_numpy(x).to(dtype)
        out = _toeplitz_times(t_half, x_half, transpose=False)
        assert out.dtype == dtype
        in_float32 = convolve_fft(t_half.float(), x_half.float(), transpose=False)
        torch.testing.assert_close(out, in_float32.to(dtype), rtol=0, atol=0)  # exact: same ops


# ------------------------------------------------------- class, FFT path
def member_and_dense(
    cls: type[TrilToeplitz], dim: int, dtype: torch.dtype, rng: np.random.Generator
) -> tuple[TrilToeplitz, np.ndarray, np.ndarray]:
    """A member in ``dtype``, its exact dense value and its (rounded) diagonals ``t``."""
    t = torch.from_numpy(rng.standard_normal(dim)).to(dtype)
    lower = TrilToeplitz(dim, {"diagonals": t.clone()})
    member = cls.from_dense(lower.to_dense() if cls is TrilToeplitz else lower.to_dense().mT)
    t64 = t.double().numpy()
    dense = lower_toeplitz(t64)
    return member, (dense if cls is TrilToeplitz else dense.T), t64


def toeplitz_diagonals(member: TrilToeplitz) -> np.ndarray:
    return member.storage["diagonals"].double().numpy()


FFT_DIMS = st.one_of(st.sampled_from([FFT_MIN_DIM, 256, 257]), st.integers(FFT_MIN_DIM, 200))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@given(dim=FFT_DIMS, cols=st.integers(1, 6), seed=SEEDS)
def test_products_on_the_fft_path(
    cls: type[TrilToeplitz], dtype: torch.dtype, dim: int, cols: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    member, k, t = member_and_dense(cls, dim, dtype, rng)
    other, ell, s = member_and_dense(cls, dim, dtype, rng)
    x_torch = torch.from_numpy(rng.standard_normal((dim, cols))).to(dtype)
    x = x_torch.double().numpy()
    for out, exact in ((member.matmul(x_torch), k @ x), (member.t_matmul(x_torch), k.T @ x)):
        assert out.dtype == dtype
        # FFT convolution, normwise per column, plus the final half rounding
        bound = convolution_bound(dtype, t, x) + rounding(dtype, exact)
        assert (np.abs(out.double().numpy() - exact) <= bound).all()
    product = member @ other
    exact = (k @ ell)[:, 0] if cls is TrilToeplitz else (k @ ell)[0]
    # first column of L₁L₂ = L₁ t₂: one FFT convolution with m = 1
    bound = convolution_bound(dtype, t, s[:, None])[0] + rounding(dtype, exact)
    assert (np.abs(toeplitz_diagonals(product) - exact) <= bound).all()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@given(dim=FFT_DIMS, cols=st.integers(1, 6), seed=SEEDS)
def test_projections_on_the_fft_path(
    cls: type[TrilToeplitz], dtype: torch.dtype, dim: int, cols: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    oracle = oracle_structure(cls.name)
    x_torch = torch.from_numpy(rng.standard_normal((dim, cols))).to(dtype)
    x = x_torch.double().numpy()
    gram = cls.project_gram(x_torch)
    assert gram.dtype == dtype
    exact = toeplitz_diagonals(cls.from_dense(torch.from_numpy(oracle.project(x @ x.T))))
    bound = diagonal_means_bound(dtype, lag_bound(dtype, x, x), exact)  # lags of X with X
    assert (np.abs(toeplitz_diagonals(gram) - exact) <= bound).all()

    member, k, t = member_and_dense(cls, dim, dtype, rng)
    inner = member.project_self_inner()
    assert inner.dtype == dtype
    exact = toeplitz_diagonals(cls.from_dense(torch.from_numpy(oracle.project(k.T @ k))))
    weighted = np.arange(dim, 0, -1) * t
    # lags of t with (d − q)·t, m = 1
    bound = diagonal_means_bound(dtype, lag_bound(dtype, t[:, None], weighted[:, None]), exact)
    assert (np.abs(toeplitz_diagonals(inner) - exact) <= bound).all()


@pytest.mark.parametrize("cls", CLASSES)
def test_paths_agree_at_the_threshold(cls: type[TrilToeplitz]) -> None:
    """``d = FFT_MIN_DIM − 1`` (direct) and ``FFT_MIN_DIM`` (FFT) against the oracle, fp64."""
    rng = np.random.default_rng(3)
    for dim in (FFT_MIN_DIM - 1, FFT_MIN_DIM):
        member, k, t = member_and_dense(cls, dim, torch.float64, rng)
        x = rng.standard_normal((dim, 3))
        out = member.matmul(torch.from_numpy(x)).numpy()
        # the looser of the two bounds: FFT normwise, direct componentwise
        bound = np.maximum(
            convolution_bound(torch.float64, t, x),
            matmul_bound(torch.float64, dim) * (np.abs(k) @ np.abs(x)),
        )
        assert (np.abs(out - k @ x) <= bound).all()


# ------------------------------------------------------------------ memory
class Recorder(TorchDispatchMode):
    """Largest ``numel`` any aten op returns, and the names of the ops seen."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.numel = max(self.numel, leaf.numel())
        return out


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("dim", [256, 257])
def test_temporaries_are_linear_in_d(cls: type[TrilToeplitz], dtype: torch.dtype, dim: int) -> None:
    """Every op's largest output is at most the ``n × m`` inverse-FFT buffer (``n < 4d``)."""
    cols = 8
    generator = torch.Generator().manual_seed(dim)
    member = cls(dim, {"diagonals": torch.randn(dim, generator=generator).to(dtype)})
    other = member.clone().add_diag_(1.0)
    x = torch.randn(dim, cols, generator=generator).to(dtype)
    width = {
        "matmul": cols,
        "t_matmul": cols,
        "project_gram": cols,
        "project_inner": cols,
        "project_self_inner": 1,
        "product": 1,
    }
    ops = {
        "matmul": lambda: member.matmul(x),
        "t_matmul": lambda: member.t_matmul(x),
        "project_gram": lambda: cls.project_gram(x),
        "project_inner": lambda: member.project_inner(x),
        "project_self_inner": lambda: member.project_self_inner(),
        "product": lambda: member @ other,
    }
    for name, op in ops.items():
        recorder = Recorder()
        with recorder:
            op()
        assert "aten._fft_r2c.default" in recorder.ops, name  # the FFT path ran
        # exact count: the largest buffer is n × width real (or (n/2 + 1) × width complex)
        assert recorder.numel <= fft_length(dim) * width[name] < dim * dim, (name, recorder.numel)


class TransformLayout(TorchDispatchMode):
    """The stride of every FFT operand along the axes it transforms."""

    def __init__(self) -> None:
        super().__init__()
        self.strides: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        if func in (torch.ops.aten._fft_r2c.default, torch.ops.aten._fft_c2r.default):
            operand, dims = args[0], args[1]
            self.strides += [(str(func), operand.stride(dim)) for dim in dims]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("layout", ["row-major", "transposed"])
def test_transforms_run_along_a_contiguous_axis(cls: type[TrilToeplitz], layout: str) -> None:
    """Each length-``n`` transform reads consecutive entries (module docstring, "Layout").

    Along axis 0 of a row-major ``X`` the stride would be ``m`` (here 512, whose
    cache-set collisions made ``L X`` 3× slower); exact: every stride is 1.
    """
    dim, cols = 64, 512
    generator = torch.Generator().manual_seed(3)
    member = cls(dim, {"diagonals": torch.randn(dim, generator=generator)})
    x = torch.randn(dim, cols, generator=generator)
    if layout == "transposed":  # a view as the preconditioner's second side passes it
        x = torch.randn(cols, dim, generator=generator).T
    for name, op in {
        "matmul": lambda: member.matmul(x),
        "t_matmul": lambda: member.t_matmul(x),
        "project_gram": lambda: cls.project_gram(x),
        "project_inner": lambda: member.project_inner(x),
        "chained": lambda: member.matmul(member.t_matmul(x)),
    }.items():
        recorder = TransformLayout()
        with recorder:
            op()
        assert recorder.strides, name  # the FFT path ran
        assert all(stride == 1 for _, stride in recorder.strides), (name, recorder.strides)


@pytest.mark.parametrize("cls", CLASSES)
def test_structured_results_own_their_storage(cls: type[TrilToeplitz]) -> None:
    """No factor made by a product or projection keeps an FFT buffer alive (exact: bytes).

    A product is a view of its ``n``-long inverse-FFT buffer; a factor stored from
    one would keep ``n > d`` entries resident and write them into a checkpoint.
    Checked for every structured result on the FFT path and for the SINGD factor
    step ``K − β1 K m`` built from them.
    """
    dim = 64
    generator = torch.Generator().manual_seed(5)
    member = cls(dim, {"diagonals": torch.randn(dim, generator=generator)})
    other = cls(dim, {"diagonals": torch.randn(dim, generator=generator)})
    x = torch.randn(dim, 16, generator=generator)
    results = {
        "product": member @ other,
        "project_gram": cls.project_gram(x),
        "project_inner": member.project_inner(x),
        "project_self_inner": member.project_self_inner(),
        "factor step": singd_factor_step(member, other, 0.1),
    }
    for name, result in results.items():
        assert owns_exactly_its_bytes(result.storage["diagonals"]), name


# --------------------------------------------------------------- edge cases
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dim", [1, 2])
def test_tiny_dimensions_exact(cls: type[TrilToeplitz], dim: int) -> None:
    """``d = 1, 2`` with small integers: every operation is exact in float64."""
    rng = np.random.default_rng(dim)
    member, k, _ = member_and_dense(cls, dim, torch.float64, rng)
    member = cls.from_dense(torch.from_numpy(np.round(4 * k)))
    k = member.to_dense().numpy()
    x = np.round(4 * rng.standard_normal((dim, 3)))
    oracle = oracle_structure(cls.name)
    # exact: integers below 2⁵³ throughout
    np.testing.assert_array_equal(member.matmul(torch.from_numpy(x)).numpy(), k @ x)
    np.testing.assert_array_equal(member.t_matmul(torch.from_numpy(x)).numpy(), k.T @ x)
    np.testing.assert_array_equal((member @ member).to_dense().numpy(), k @ k)
    y = k.T @ x
    np.testing.assert_array_equal(
        member.project_inner(torch.from_numpy(x)).to_dense().numpy(), oracle.project(y @ y.T)
    )
    np.testing.assert_array_equal(
        member.project_self_inner().to_dense().numpy(), oracle.project(k.T @ k)
    )
    assert member.trace().item() == np.trace(k)


def test_bad_dimension_raises() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        TrilToeplitz.zeros(0)
