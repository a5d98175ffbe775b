"""Every structure operation (SPEC §2 list) against the oracle's dense computation.

Members are general (non-symmetric), so ``K`` and ``Kᵀ`` differ.  References
are float64 dense products of the *rounded* inputs, followed by the oracle's
Π̂ where SPEC §2 says so.  Bounds are componentwise (Higham):
``|computed − exact| ≤ bound · magnitude`` with ``magnitude`` the same
expression evaluated on absolute values; each ``bound`` comes from
:mod:`tests.tolerances` with the reduction lengths named next to it.  Closure:
every result's entries outside the pattern are exactly zero.

The draws stop at ``d = 40``; the pinned example of each product and
projection runs the Toeplitz structures at ``d = FFT_MIN_DIM`` in float32,
on the FFT path, against the normwise bounds of
:mod:`tests.structures.fft_bounds` instead of the componentwise ones.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from singd.structures import STRUCTURE_NAMES, get_structure
from singd.structures.toeplitz import FFT_MIN_DIM
from tests.structures import fft_bounds
from tests.structures.strategies import (
    DTYPES,
    SCALARS,
    Case,
    assert_within,
    cases,
)
from tests.tolerances import chain_bound, matmul_bound

pytestmark = pytest.mark.parametrize("name", STRUCTURE_NAMES)


def edge(name: str, dim: int, dtype: torch.dtype = torch.float64, cols: int = 3) -> Case:
    return Case(name, dim, cols, dtype, seed=dim)


TOEPLITZ = ("triltoeplitz", "triutoeplitz")


def pinned(name: str, dim: int) -> Case:
    """The pinned example: :func:`edge` at ``dim``, Toeplitz on its FFT path (float32)."""
    if name in TOEPLITZ:
        return Case(name, FFT_MIN_DIM, 3, torch.float32, seed=FFT_MIN_DIM)
    return edge(name, dim)


def on_fft_path(case: Case) -> bool:
    return case.name in TOEPLITZ and case.dim >= FFT_MIN_DIM


def lower_column(case: Case, k: np.ndarray) -> np.ndarray:
    """``t``, the first column of the lower Toeplitz ``L`` (``K`` for tril, ``Kᵀ`` for triu)."""
    return k[:, 0] if case.name == "triltoeplitz" else k[0]


def toeplitz_dense(case: Case, diagonals: np.ndarray) -> np.ndarray:
    """The ``d × d`` member with ``diagonals[k]`` on its ``k``-th sub- (tril) or super-diagonal."""
    lower = scipy.linalg.toeplitz(diagonals, np.zeros_like(diagonals))
    return lower if case.name == "triltoeplitz" else lower.T


def assert_member(case: Case, result: torch.Tensor) -> None:
    """Closure: entries outside the pattern are exactly zero (and Toeplitz diagonals constant)."""
    assert case.oracle.is_member(result.double().numpy(), atol=0.0)


# ------------------------------------------------------------------ conversion
@given(data=st.data())
def test_dense_round_trip(name: str, data: st.DataObject) -> None:
    case = data.draw(cases(name))
    member, dense = case.member()
    out = member.to_dense()
    assert out.dtype == case.dtype
    np.testing.assert_array_equal(out.double().numpy(), dense)  # exact: no arithmetic
    general, _ = case.dense(case.dim, case.dim, stream=1)
    assert_member(case, case.cls.from_dense(general).to_dense())


@pytest.mark.parametrize("dim", [1, 7, 31])
def test_from_dense_reads_strided_views(name: str, dim: int) -> None:
    """Transposed, offset and step-2 views read the same entries as a contiguous copy."""
    cls = get_structure(name)
    generator = torch.Generator().manual_seed(dim)
    parent = torch.randn(2 * dim + 2, 2 * dim + 2, generator=generator, dtype=torch.float64)
    views = [parent[:dim, :dim].T, parent[1 : dim + 1, 2 : dim + 2], parent[::2, ::2][:dim, :dim]]
    for view in views:
        expected = cls.from_dense(view.contiguous()).to_dense()
        torch.testing.assert_close(cls.from_dense(view).to_dense(), expected, rtol=0, atol=0)


@given(data=st.data())
def test_storage_is_free_entries(name: str, data: st.DataObject) -> None:
    case = data.draw(cases(name))
    member, _ = case.member()
    assert case.cls.storage_numel(case.dim) == case.oracle.num_free(case.dim)
    assert member.nbytes == case.oracle.num_free(case.dim) * member.dtype.itemsize
    assert all(t.dtype == case.dtype for t in member.storage.values())


@given(data=st.data())
def test_eye_and_zeros(name: str, data: st.DataObject) -> None:
    case = data.draw(cases(name))
    eye = case.cls.eye(case.dim, dtype=case.dtype)
    zeros = case.cls.zeros(case.dim, dtype=case.dtype)
    assert eye.dtype == zeros.dtype == case.dtype
    np.testing.assert_array_equal(eye.to_dense().double().numpy(), np.eye(case.dim))  # exact
    np.testing.assert_array_equal(zeros.to_dense().double().numpy(), 0.0)  # exact


@given(data=st.data())
def test_storage_serialises_as_plain_tensors(name: str, data: st.DataObject) -> None:
    case = data.draw(cases(name))
    member, dense = case.member()
    buffer = io.BytesIO()
    torch.save(member.storage, buffer)
    buffer.seek(0)
    loaded = case.cls.from_storage(case.dim, torch.load(buffer, weights_only=True))
    np.testing.assert_array_equal(loaded.to_dense().double().numpy(), dense)  # exact copy


# -------------------------------------------------------------------- products
@given(data=st.data())
@example(data=None)
def test_matmul_and_t_matmul(name: str, data: st.DataObject | None) -> None:
    case = data.draw(cases(name)) if data else pinned(name, 1)
    member, k = case.member()
    x_t, x = case.dense(case.dim, case.cols, stream=1)
    bound, fft = matmul_bound(case.dtype, case.dim), 0.0  # one product, reduction length d
    if on_fft_path(case):  # one FFT convolution (correlation), normwise per column
        bound, fft = 0.0, fft_bounds.convolution_bound(case.dtype, lower_column(case, k), x)
    out = member.matmul(x_t)
    assert out.dtype == case.dtype
    assert_within(out, k @ x, np.abs(k) @ np.abs(x), bound, fft)
    out_t = member.t_matmul(x_t)
    assert out_t.dtype == case.dtype
    assert_within(out_t, k.T @ x, np.abs(k).T @ np.abs(x), bound, fft)


@given(data=st.data())
@example(data=None)
def test_self_outer_matmul(name: str, data: st.DataObject | None) -> None:
    """``K Kᵀ X``: the dense value within two products of reduction length ``d``."""
    case = data.draw(cases(name)) if data else pinned(name, 1)
    member, k = case.member()
    x_t, x = case.dense(case.dim, case.cols, stream=1)
    out = member.self_outer_matmul(x_t)
    assert out.dtype == case.dtype
    if on_fft_path(case):  # the default kernel: bounded through test_matmul_and_t_matmul
        torch.testing.assert_close(out, member.matmul(member.t_matmul(x_t)), rtol=0, atol=0)
        return
    magnitude = np.abs(k) @ np.abs(k).T @ np.abs(x)
    # K (Kᵀ X), or fl(k ⊙ k) ⊙ X for the diagonal: two roundings in either order
    assert_within(out, k @ k.T @ x, magnitude, chain_bound(case.dtype, [case.dim, case.dim]), 0.0)


@given(data=st.data())
@example(data=None)
def test_right_products(name: str, data: st.DataObject | None) -> None:
    """``X K``, ``X Kᵀ`` (one product of reduction length ``d``) and ``X K Kᵀ`` (two),
    ``X`` of shape ``m × d``: the dense values within the bounds of the left products.

    On the FFT path (Toeplitz keeps the default ``(Kᵀ Xᵀ)ᵀ`` …) the results are
    exactly the transposed left products, bounded by test_matmul_and_t_matmul.
    """
    case = data.draw(cases(name)) if data else pinned(name, 1)
    member, k = case.member()
    x_t, x = case.dense(case.cols, case.dim, stream=1)
    products = {
        "right_matmul": (x @ k, np.abs(x) @ np.abs(k), lambda: member.t_matmul(x_t.T).T),
        "right_t_matmul": (x @ k.T, np.abs(x) @ np.abs(k).T, lambda: member.matmul(x_t.T).T),
    }
    for method, (expected, magnitude, transposed) in products.items():
        out = getattr(member, method)(x_t)
        assert out.dtype == case.dtype and out.shape == (case.cols, case.dim), method
        if on_fft_path(case):
            torch.testing.assert_close(out, transposed(), rtol=0, atol=0)
        else:
            assert_within(out, expected, magnitude, matmul_bound(case.dtype, case.dim))
    out = member.right_self_outer_matmul(x_t)
    assert out.dtype == case.dtype and out.shape == (case.cols, case.dim)
    if on_fft_path(case):
        torch.testing.assert_close(out, member.self_outer_matmul(x_t.T).T, rtol=0, atol=0)
        return
    magnitude = np.abs(x) @ np.abs(k) @ np.abs(k).T
    # (X K) Kᵀ, (K (Kᵀ Xᵀ))ᵀ or fl(k ⊙ k) ⊙ X: two roundings in either order
    bound = chain_bound(case.dtype, [case.dim, case.dim])
    assert_within(out, x @ k @ k.T, magnitude, bound, 0.0)


@given(data=st.data())
@example(data=None)
def test_structured_product(name: str, data: st.DataObject | None) -> None:
    case = data.draw(cases(name)) if data else pinned(name, 1)
    (member, k), (other, ell) = case.member(0), case.member(1)
    product = member @ other
    assert type(product) is type(member)
    assert product.dtype == case.dtype
    out = product.to_dense()
    assert_member(case, out)
    bound, fft = matmul_bound(case.dtype, case.dim), 0.0  # one product, reduction length d
    if on_fft_path(case):  # one convolution of the two first columns, m = 1
        t, s = lower_column(case, k), lower_column(case, ell)
        column = fft_bounds.convolution_bound(case.dtype, t, s[:, None])[0, 0]
        bound, fft = 0.0, toeplitz_dense(case, np.full(case.dim, column))
    assert_within(out, k @ ell, np.abs(k) @ np.abs(ell), bound, fft)


# ----------------------------------------------------------------- projections
@given(data=st.data())
def test_project(name: str, data: st.DataObject) -> None:
    case = data.draw(cases(name))
    _, x = case.dense(case.dim, case.dim, stream=1)
    sym_t, sym = case.round((x + x.T) / 2)
    out = case.cls.project(sym_t).to_dense()
    assert out.dtype == case.dtype
    assert_member(case, out)
    # Π̂ sums at most d entries (Toeplitz diagonal mean; 2 for coupling entries)
    bound = matmul_bound(case.dtype, case.dim)
    assert_within(out, case.oracle.project(sym), case.oracle.project(np.abs(sym)), bound)


@given(data=st.data())
@example(data=None)
def test_project_gram(name: str, data: st.DataObject | None) -> None:
    case = data.draw(cases(name)) if data else pinned(name, 33)
    x_t, x = case.dense(case.dim, case.cols, stream=1)
    out = case.cls.project_gram(x_t).to_dense()
    assert out.dtype == case.dtype
    assert_member(case, out)
    expected = case.oracle.project(x @ x.T)
    magnitude = case.oracle.project(np.abs(x) @ np.abs(x).T)
    # X Xᵀ (reduction m), then Π̂'s sum of at most d entries
    bound, fft = chain_bound(case.dtype, [case.cols, case.dim]), 0.0
    if on_fft_path(case):  # FFT lags of X with X, then the diagonal means
        lag_error = fft_bounds.lag_bound(case.dtype, x, x)
        means = lower_column(case, expected)
        allowance = fft_bounds.diagonal_means_bound(case.dtype, lag_error, means)
        bound, fft = 0.0, toeplitz_dense(case, allowance)
    assert_within(out, expected, magnitude, bound, fft)


@given(data=st.data())
@example(data=None)
def test_project_inner(name: str, data: st.DataObject | None) -> None:
    case = data.draw(cases(name)) if data else pinned(name, 31)
    member, k = case.member()
    x_t, x = case.dense(case.dim, case.cols, stream=1)
    out = member.project_inner(x_t)
    assert type(out) is type(member)
    assert out.dtype == case.dtype
    assert_member(case, out.to_dense())
    y, y_abs = k.T @ x, np.abs(k).T @ np.abs(x)
    # Kᵀ X (reduction d) enters twice, Y Yᵀ (reduction m), Π̂ sums ≤ d entries
    bound, fft = chain_bound(case.dtype, [case.dim, case.dim, case.cols, case.dim]), 0.0
    expected = case.oracle.project(y @ y.T)
    if on_fft_path(case):  # Ŷ = Kᵀ X by one FFT correlation, then the lags of Ŷ
        y_error = fft_bounds.convolution_bound(case.dtype, lower_column(case, k), x)
        y_computed = member.t_matmul(x_t).double().numpy()
        lag_error = fft_bounds.lags_of_computed_bound(case.dtype, y_computed, y, y_error)
        means = lower_column(case, expected)
        allowance = fft_bounds.diagonal_means_bound(case.dtype, lag_error, means)
        bound, fft = 0.0, toeplitz_dense(case, allowance)
    magnitude = case.oracle.project(y_abs @ y_abs.T)
    assert_within(out.to_dense(), expected, magnitude, bound, fft)


@given(data=st.data())
@example(data=None)
def test_project_self_inner(name: str, data: st.DataObject | None) -> None:
    case = data.draw(cases(name)) if data else pinned(name, 1)
    member, k = case.member()
    out = member.project_self_inner()
    assert type(out) is type(member)
    assert out.dtype == case.dtype
    assert_member(case, out.to_dense())
    magnitude = case.oracle.project(np.abs(k).T @ np.abs(k))
    # KᵀK (reduction d), then Π̂'s sum of at most d entries
    bound, fft = chain_bound(case.dtype, [case.dim, case.dim]), 0.0
    expected = case.oracle.project(k.T @ k)
    if on_fft_path(case):  # FFT lags of t with (d − q)·t, m = 1
        t = lower_column(case, k)
        weighted = np.arange(case.dim, 0, -1) * t
        lag_error = fft_bounds.lag_bound(case.dtype, t[:, None], weighted[:, None])
        means = lower_column(case, expected)
        allowance = fft_bounds.diagonal_means_bound(case.dtype, lag_error, means)
        bound, fft = 0.0, toeplitz_dense(case, allowance)
    assert_within(out.to_dense(), expected, magnitude, bound, fft)


# ------------------------------------------------------------------ reductions
@given(data=st.data())
def test_trace_and_max_abs(name: str, data: st.DataObject) -> None:
    case = data.draw(cases(name))
    member, k = case.member()
    trace = member.trace()
    assert trace.ndim == 0
    # a sum of d diagonal entries
    assert_within(trace, np.trace(k), np.trace(np.abs(k)), matmul_bound(case.dtype, case.dim))
    assert member.max_abs().item() == np.abs(k).max()  # exact: a stored entry


# -------------------------------------------------------------------- in place
@given(data=st.data(), scale=SCALARS, alpha=SCALARS)
def test_in_place_ops(name: str, data: st.DataObject, scale: float, alpha: float) -> None:
    case = data.draw(cases(name))
    (member, k), (other, ell) = case.member(0), case.member(1)
    one_rounding = matmul_bound(case.dtype, 1)  # s·K: one product, one rounding
    out = member.clone().mul_(scale)
    assert out.dtype == case.dtype
    assert_member(case, out.to_dense())
    assert_within(out.to_dense(), scale * k, np.abs(scale * k), one_rounding)
    # K + α L: one product and one sum, each rounded: reduction length 2
    out = member.clone().add_(other, alpha=alpha)
    assert out.dtype == case.dtype
    assert_member(case, out.to_dense())
    magnitude = np.abs(k) + abs(alpha) * np.abs(ell)
    assert_within(out.to_dense(), k + alpha * ell, magnitude, matmul_bound(case.dtype, 2))
    out = member.clone().add_diag_(alpha)
    assert out.dtype == case.dtype
    assert_member(case, out.to_dense())
    eye = np.eye(case.dim)
    # one sum, rounded once, on the diagonal; elsewhere untouched (exact)
    assert_within(out.to_dense(), k + alpha * eye, np.abs(k) + abs(alpha) * eye, one_rounding)
    np.testing.assert_array_equal(member.to_dense().double().numpy(), k)  # clones untouched


@given(data=st.data(), scale=SCALARS, alpha=SCALARS)
def test_out_of_place_ops_are_the_in_place_ones(
    name: str, data: st.DataObject, scale: float, alpha: float
) -> None:
    """``K.mul(s)``, ``K.add(L, α)`` run the kernels of ``clone().mul_``/``clone().add_``.

    Rule: bitwise (the same operator on the same operands), in the member's
    dtype, also with a 0-dim tensor ``α`` (a float32 one beside a half member).
    """
    case = data.draw(cases(name))
    (member, k), (other, _) = case.member(0), case.member(1)
    tensor_alpha = torch.tensor(alpha, dtype=torch.float32)
    pairs = [
        (member.mul(scale), member.clone().mul_(scale)),
        (member.mul(tensor_alpha), member.clone().mul_(tensor_alpha)),
        (member.add(other, alpha=alpha), member.clone().add_(other, alpha=alpha)),
        (member.add(other, alpha=tensor_alpha), member.clone().add_(other, alpha=tensor_alpha)),
    ]
    for out, reference in pairs:
        assert out.dtype == case.dtype
        for key, tensor in reference.storage.items():
            assert torch.equal(out.storage[key], tensor), key
    np.testing.assert_array_equal(member.to_dense().double().numpy(), k)  # operands untouched


@given(data=st.data(), alpha=SCALARS)
def test_add_onto_is_add_written_into_the_addend(
    name: str, data: st.DataObject, alpha: float
) -> None:
    """``L.add_onto_(K, α)`` is ``K.add(L, α)`` written into ``L``'s storage.

    Rule: bitwise (the same kernel, its output aliasing ``L``), in the
    member's dtype; ``K`` is untouched and ``L``'s storage tensors are kept.
    """
    case = data.draw(cases(name))
    (member, k), (other, _) = case.member(0), case.member(1)
    reference = member.add(other, alpha=alpha)
    before = {key: t.data_ptr() for key, t in other.storage.items()}
    out = other.add_onto_(member, alpha=alpha)
    assert out is other
    for key, tensor in reference.storage.items():
        assert torch.equal(out.storage[key], tensor), key
        assert out.storage[key].data_ptr() == before[key], key
    np.testing.assert_array_equal(member.to_dense().double().numpy(), k)  # K untouched


def test_add_onto_refuses_shared_storage_and_other_dtypes(name: str) -> None:
    """The aliasing ``add_onto_`` needs: ``K`` and ``L`` apart, of one dtype (else ValueError)."""
    structure = get_structure(name)
    member = structure.eye(7)
    with pytest.raises(ValueError, match="share storage"):
        member.add_onto_(member, alpha=-0.5)
    with pytest.raises(ValueError, match="dtypes"):
        member.add_onto_(structure.eye(7, dtype=torch.float64), alpha=-0.5)


# ------------------------------------------------------------------ dtype rule
@pytest.mark.parametrize("own", DTYPES)
@pytest.mark.parametrize("operand", DTYPES)
def test_mixed_dtypes_promote(name: str, own: torch.dtype, operand: torch.dtype) -> None:
    cls = get_structure(name)
    promoted = torch.promote_types(own, operand)
    member = cls.eye(5, dtype=own)
    x = torch.ones(5, 2, dtype=operand)
    assert member.matmul(x).dtype == promoted
    assert member.t_matmul(x).dtype == promoted
    assert member.project_inner(x).dtype == promoted
    assert (member @ cls.eye(5, dtype=operand)).dtype == promoted
    assert member.clone().add_(cls.eye(5, dtype=operand)).dtype == own  # in place keeps own
    assert member.clone().mul_(torch.tensor(2.0, dtype=operand)).dtype == own
    assert member.add(cls.eye(5, dtype=operand)).dtype == own  # out of place too
    assert member.mul(torch.tensor(2.0, dtype=operand)).dtype == own


def test_to_changes_dtype(name: str) -> None:
    member = get_structure(name).eye(4, dtype=torch.float32)
    half = member.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert member.dtype == torch.float32
    np.testing.assert_array_equal(half.to_dense().double().numpy(), np.eye(4))  # exact


# ------------------------------------------------------------------- bad input
def test_bad_input_raises(name: str) -> None:
    cls = get_structure(name)
    member = cls.eye(4)
    with pytest.raises(ValueError, match="square"):
        cls.from_dense(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="square"):
        cls.project(torch.zeros(4))
    with pytest.raises(ValueError, match="d × m"):
        cls.project_gram(torch.zeros(4))
    with pytest.raises(ValueError, match="4 × m"):
        member.matmul(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="4 × m"):
        member.t_matmul(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="4 × m"):
        member.project_inner(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dim 4"):
        member.add_(cls.eye(5))
    with pytest.raises(ValueError, match="dim 4"):
        _ = member @ cls.eye(5)
    with pytest.raises(ValueError, match="storage"):
        cls.from_storage(4, {})
    wrong = {key: torch.zeros(*t.shape, 7) for key, t in member.storage.items()}
    with pytest.raises(ValueError, match="shape"):
        cls.from_storage(4, wrong)


def test_other_structure_is_rejected(name: str) -> None:
    cls = get_structure(name)
    other = "diagonal" if name != "diagonal" else "dense"
    with pytest.raises(ValueError, match=f"expected a {name} matrix"):
        cls.eye(4).add_(get_structure(other).eye(4))
