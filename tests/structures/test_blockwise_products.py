"""Products written block by block into their result are the concatenated block products.

Block-diagonal and hierarchical ``K X`` / ``Kᵀ X`` write each block row of the
result in place (no ``torch.cat`` of a ``d × m`` result, issue 9): each block
is the same ``mm``/``bmm``/``mul`` on the same operands, a hierarchical
block's further products accumulated into it (``addmm_``, no temporary).
That is not bitwise the concatenation: ``addmm_`` rounds its sum once where
the concatenation rounds the product and then the sum, and BLAS picks its kernel by
the output's address, so an ``mm`` into a row slice of a larger tensor can
round differently from the same ``mm`` into a fresh one (seen: float64
``hierarchical15_15``, ``d = 25``, ``m = 7``, one entry ``8.9e-16`` apart).

Tolerance: every entry of either result is a sum of at most ``d`` products
``op(K)_ik X_kj`` evaluated in some order, rounded at most ``d + 1`` times
(the promoted dtype's ``u = eps/2``; float32 accumulation in half dtypes is
inside that), so each is within ``γ_{d+1} S_ij`` of the exact value with
``S = |op(K)| |X|`` and ``γ_n = n u / (1 − n u)``, and the two differ by at
most ``2 γ_{d+1} S_ij``.
"""

from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from singd.optim.updates import singd_precondition
from singd.structures import get_structure

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
BLOCKS = ("block2diagonal", "block3diagonal", "block30diagonal")
HIERARCHIES = ("hierarchical1_1", "hierarchical2_3", "hierarchical15_15")


def _operand(d: int, m: int, dtype: torch.dtype, transposed: bool, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if transposed:  # a non-contiguous X, as the preconditioner's Kᵀ-side operand is
        return torch.randn(m, d, generator=generator).to(dtype).T
    return torch.randn(d, m, generator=generator).to(dtype)


def _block_reference(K, x: torch.Tensor, transpose: bool) -> torch.Tensor:
    blocks, last = K.storage["blocks"].to(x.dtype), K.storage["last"].to(x.dtype)
    if transpose:
        blocks, last = blocks.transpose(1, 2), last.T
    n, b = blocks.shape[0], K.block_size
    full = x[: n * b].reshape(n, b, x.shape[1])
    return torch.cat([(blocks @ full).reshape(n * b, x.shape[1]), last @ x[n * b :]])


def _hierarchical_reference(K, x: torch.Tensor, transpose: bool) -> torch.Tensor:
    a, b, c, d, e = (K.storage[key].to(x.dtype) for key in ("A", "B", "c", "D", "E"))
    k1, m = a.shape[0], c.shape[0]
    top, middle, bottom = x[:k1], x[k1 : k1 + m], x[k1 + m :]
    if not transpose:
        return torch.cat([a @ top + b @ x[k1:], c[:, None] * middle, d @ middle + e @ bottom])
    b_top = b.T @ top
    return torch.cat(
        [a.T @ top, b_top[:m] + c[:, None] * middle + d.T @ bottom, b_top[m:] + e.T @ bottom]
    )


def _gamma(n: int, dtype: torch.dtype) -> float:
    """``γ_n = n u / (1 − n u)``, ``u = eps/2`` of ``dtype``."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def _within_bound(
    result: torch.Tensor, expected: torch.Tensor, op: torch.Tensor, x: torch.Tensor
) -> bool:
    """``|result − expected| ≤ 2 γ_{d+1} |op(K)| |X|`` entrywise (module docstring)."""
    scale = op.double().abs() @ x.double().abs()
    bound = 2 * _gamma(op.shape[0] + 1, result.dtype) * scale
    return bool(((result.double() - expected.double()).abs() <= bound).all())


@given(
    name=st.sampled_from(BLOCKS + HIERARCHIES),
    d=st.integers(1, 40),
    m=st.integers(0, 9),
    dtypes=st.tuples(st.sampled_from(DTYPES), st.sampled_from(DTYPES)),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(name="block30diagonal", d=32, m=5, dtypes=(torch.float32,) * 2, transposed=True, seed=0)
@example(
    name="hierarchical15_15",
    d=40,
    m=3,
    dtypes=(torch.bfloat16, torch.float32),
    transposed=False,
    seed=1,
)
@example(name="hierarchical2_3", d=4, m=0, dtypes=(torch.float16,) * 2, transposed=False, seed=2)
@example(  # an mm into a row slice rounded differently from a fresh one (module docstring)
    name="hierarchical15_15", d=25, m=7, dtypes=(torch.float64,) * 2, transposed=False, seed=0
)
def test_blockwise_products_are_the_concatenated_products(name, d, m, dtypes, transposed, seed):
    factor_dtype, x_dtype = dtypes
    structure = get_structure(name)
    generator = torch.Generator().manual_seed(seed + 1)
    K = structure.from_dense(torch.randn(d, d, generator=generator).to(factor_dtype))
    x = _operand(d, m, x_dtype, transposed, seed)
    promoted = torch.promote_types(factor_dtype, x_dtype)
    reference = _block_reference if name in BLOCKS else _hierarchical_reference
    dense = K.to_dense()
    for method, transpose, op in (("matmul", False, dense), ("t_matmul", True, dense.T)):
        result = getattr(K, method)(x)
        expected = reference(K, x.to(promoted), transpose)
        assert result.dtype == promoted and result.shape == (d, m)
        assert _within_bound(result, expected, op, x), (method, name)
    # the right products of Xᵀ (m × d): Xᵀ K = (Kᵀ X)ᵀ and Xᵀ Kᵀ = (K X)ᵀ
    rights = (("right_matmul", True, dense.T), ("right_t_matmul", False, dense))
    for method, transpose, op in rights:
        result = getattr(K, method)(x.T)
        expected = reference(K, x.to(promoted), transpose)
        assert result.dtype == promoted and result.shape == (m, d)
        assert _within_bound(result.T, expected, op, x), (method, name)


def test_a_wrong_block_is_caught() -> None:
    """The bound sees a wrong block product (float32): ``E X3`` for ``Eᵀ X3`` in the
    bottom block rows, and ``K X`` in place of ``Kᵀ X``."""
    generator = torch.Generator().manual_seed(0)
    K = get_structure("hierarchical2_3").from_dense(torch.randn(12, 12, generator=generator))
    x = _operand(12, 64, torch.float32, False, 0)
    a, b, c, d, e = (K.storage[key] for key in ("A", "B", "c", "D", "E"))
    top, middle, bottom = x[:2], x[2:9], x[9:]
    b_top = b.T @ top
    wrong = torch.cat(
        [a.T @ top, b_top[:7] + c[:, None] * middle + d.T @ bottom, b_top[7:] + e @ bottom]
    )
    op = K.to_dense().T
    assert _within_bound(K.t_matmul(x), _hierarchical_reference(K, x, True), op, x)
    assert not _within_bound(K.t_matmul(x), wrong, op, x)
    assert not _within_bound(K.t_matmul(x), K.matmul(x), op, x)


def test_products_stay_differentiable() -> None:
    """With autograd recording (an operand requiring grad) the products are concatenated,
    within the module's bound of the ``out=`` path, and the gradient ``∂⟨W, op(K) X⟩/∂X = op(K)ᵀ W``
    matches the dense product (float64).

    Tolerance: both sides are sums of ``d = 11`` products per entry, each within
    ``γ_d |op(K)|ᵀ|W|`` of the exact value (``γ_d ≈ d·eps``), so they differ by at most
    ``2 d eps₆₄ (|op(K)|ᵀ|W|)`` entrywise.
    """
    generator = torch.Generator().manual_seed(0)
    eps = torch.finfo(torch.float64).eps
    for name in ("block3diagonal", "hierarchical2_3"):
        K = get_structure(name).from_dense(torch.randn(11, 11, generator=generator).double())
        dense = K.to_dense()
        for method, op in (("matmul", dense), ("t_matmul", dense.T)):
            x = torch.randn(11, 4, generator=generator, dtype=torch.float64, requires_grad=True)
            weights = torch.randn(11, 4, generator=generator, dtype=torch.float64)
            with torch.no_grad():
                written = getattr(K, method)(x)
            result = getattr(K, method)(x)
            assert _within_bound(result.detach(), written, op, x.detach())
            (grad,) = torch.autograd.grad((weights * result).sum(), x)
            bound = 2 * 11 * eps * (op.abs().T @ weights.abs())
            assert bool(((grad - op.T @ weights).abs() <= bound).all()), (name, method)
        # X op(K) = (op(K)ᵀ Xᵀ)ᵀ: the same bounds, transposed
        for method, op in (("right_matmul", dense.T), ("right_t_matmul", dense)):
            x = torch.randn(4, 11, generator=generator, dtype=torch.float64, requires_grad=True)
            weights = torch.randn(4, 11, generator=generator, dtype=torch.float64)
            with torch.no_grad():
                written = getattr(K, method)(x)
            result = getattr(K, method)(x)
            assert _within_bound(result.detach().T, written.T, op, x.detach().T)
            (grad,) = torch.autograd.grad((weights * result).sum(), x)
            bound = 2 * 11 * eps * (weights.abs() @ op.abs())
            assert bool(((grad - weights @ op).abs() <= bound).all()), (name, method)


def test_hierarchical_products_keep_the_operands_layout() -> None:
    """A transposed ``X`` gives a transposed ``K X`` and ``Kᵀ X`` (exact: strides).

    The preconditioner's second side passes ``X`` as a transposed view; a
    row-major result would make ``c ⊙ X2`` read ``X2`` at stride ``m`` (10× the
    contiguous time at ``m = 512``) and hand ``ĝ`` back transposed to the
    parameter update.  The preconditioned gradient of a hierarchical layer is
    then contiguous, like the parameter.
    """
    generator = torch.Generator().manual_seed(0)
    d_o, d_i = 40, 48
    K = get_structure("hierarchical15_15").from_dense(torch.randn(d_i, d_i, generator=generator))
    C = get_structure("hierarchical15_15").from_dense(torch.randn(d_o, d_o, generator=generator))
    for x in (
        _operand(d_i, 33, torch.float32, True, 0),
        _operand(d_i, 33, torch.float32, False, 0),
    ):
        for method in ("matmul", "t_matmul"):
            result = getattr(K, method)(x)
            assert result.stride() == x.stride(), (method, result.stride(), x.stride())
    grad = torch.randn(d_o, d_i, generator=generator)
    assert singd_precondition(K, C, grad).is_contiguous()


def test_block_and_dense_right_products_are_row_major() -> None:
    """Block-diagonal ``X K``, ``X Kᵀ``, ``X K Kᵀ`` and dense ``X K``, ``X Kᵀ`` are row-major
    for a row-major and a transposed ``X`` (exact: strides), and so is their layers'
    preconditioned gradient ``ĝ`` with a kept ``P = K Kᵀ`` (block-diagonal: also without).

    The default right product is a transposed view: a ``ĝ`` in that layout made the
    momentum update ``m ← α2 m + ĝ`` read it at stride ``d_i~`` (at ``d_i = 512``
    ten times the contiguous time: issue 9's note).
    """
    generator = torch.Generator().manual_seed(0)
    d_o, d_i = 40, 48
    for name in ("block30diagonal", "dense"):
        structure = get_structure(name)
        K = structure.from_dense(torch.randn(d_i, d_i, generator=generator))
        C = structure.from_dense(torch.randn(d_o, d_o, generator=generator))
        methods = ("right_matmul", "right_t_matmul")
        methods += ("right_self_outer_matmul",) if name != "dense" else ()
        for x in (
            _operand(d_i, 33, torch.float32, True, 0).T,
            _operand(d_i, 33, torch.float32, False, 0).T,
        ):
            for method in methods:
                assert getattr(K, method)(x).is_contiguous(), (name, method, x.stride())
        grad = torch.randn(d_o, d_i, generator=generator)
        outers = (K.self_outer(), C.self_outer())
        assert singd_precondition(K, C, grad, outers).is_contiguous(), name
        # dense K Kᵀ X keeps the default two products: a transposed ĝ
        assert singd_precondition(K, C, grad).is_contiguous() == (name != "dense"), name
