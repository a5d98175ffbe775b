"""Emulated bfloat16 / float16 arithmetic (``reference.numbers.emulated_numbers``).

Tolerances, all derived from the storage dtype's unit roundoff ``u = eps/2``
(bf16 ``eps = 2**-7``, fp16 ``2**-10``) and float32's ``u32 = 2**-24``:

* one elementwise operation (``+ − × ÷ sqrt``) rounds the exact value once, so
  the result is bitwise ``RN(exact)``, the exact 50-digit mpmath value rounded
  to nearest-even in the storage dtype (no tolerance);
* a product or sum of length ``n`` is accumulated in float32 with forward
  error at most ``γ_n Σ|a_k b_k|``, ``γ_n = n u32 / (1 − n u32)`` (Higham,
  Thm 3.5), then rounded once; round-to-nearest is monotone, so the result
  lies in ``[RN(exact − γ), RN(exact + γ)]`` and equals ``RN(exact)`` bitwise
  when those two ends coincide.

The exact values are exact: entries are bf16/fp16 numbers in ``[-1, 1]`` of
magnitude >= ``2**-30`` (or zero), so products need <= 22 significand bits
and sums of <= 300 of them fit in 22 + 60 + 9 bits, far below mpmath's 169.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from mpmath import mp

from reference.numbers import (
    FLOAT64,
    EmulatedArray,
    EmulatedNumbers,
    emulated_numbers,
    mpmath_numbers,
)
from reference.structures import STRUCTURE_NAMES, get_structure
from reference.updates import SINGDHyperparameters, SINGDState, StepRecord, singd_step
from tests.reference.strategies import ENTRIES

STORAGES = ("bfloat16", "float16")
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
EPS = {"bfloat16": 2.0**-7, "float16": 2.0**-10}
U32 = 2.0**-24  # float32 unit roundoff
MP50 = mpmath_numbers(50)


def gamma(n: int) -> float:
    """Higham's ``γ_n = n u32 / (1 − n u32)`` for float32 accumulation of length ``n``."""
    return n * U32 / (1 - n * U32)


# ------------------------------------------------- an independent rounding to the grid
def _key(bits: int) -> int:
    """An ordering key of a 16-bit float's bit pattern (sign-magnitude to two's complement)."""
    return -(bits & 0x7FFF) if bits & 0x8000 else bits


def _from_key(key: int, dtype: np.dtype) -> float:
    bits = (-key) | 0x8000 if key < 0 else key
    return float(np.array([bits], dtype=np.uint16).view(dtype)[0])


def _bits(value: float, dtype: np.dtype) -> int:
    return int(np.array([value], dtype=np.float64).astype(dtype).view(np.uint16)[0])


def round_nearest(exact: mp.mpf, storage: str) -> float:
    """``exact`` rounded to nearest-even in ``storage``, by search in exact arithmetic.

    Independent of numpy's and ml_dtypes' casts: it only enumerates the grid
    (bit patterns) and compares with ``exact`` in mpmath.
    """
    dtype = DTYPES[storage]
    largest = float(ml_dtypes.finfo(dtype).max)
    # Overflow from max + ulp(max)/2 on (a tie goes to even: inf); ulp(max) = max·eps/(2 − eps).
    eps = EPS[storage]
    if abs(exact) >= largest + largest * eps / (2 - eps) / 2:
        return math.copysign(math.inf, exact)
    nearby = float(exact) if abs(exact) <= largest else math.copysign(largest, exact)
    key = _key(_bits(nearby, dtype))
    while _from_key(key, dtype) > exact:
        key -= 1
    while _from_key(key + 1, dtype) <= exact:
        key += 1
    low, high = _from_key(key, dtype), _from_key(key + 1, dtype)
    if low == exact:
        return low
    below, above = exact - low, high - exact
    if below != above:
        return low if below < above else high
    return low if _bits(low, dtype) % 2 == 0 else high


def exact_values(x: np.ndarray) -> np.ndarray:
    """``x`` (float64) as an object array of 50-digit ``mpf`` (exact)."""
    return MP50.asarray(x)


def check_accumulated(
    result: np.ndarray, exact: np.ndarray, magnitude: np.ndarray, n: int, storage: str
) -> None:
    """Each entry lies in ``[RN(e − γ_n m), RN(e + γ_n m)]``, bitwise RN(e) if the ends agree."""
    with MP50.context():
        for value, e, m in zip(result.flat, exact.flat, magnitude.flat, strict=True):
            slack = mp.mpf(gamma(n)) * m
            low, high = round_nearest(e - slack, storage), round_nearest(e + slack, storage)
            assert low <= value <= high
            if low == high:
                assert value == round_nearest(e, storage)


def storage_matrices(storage: str, rows: int, cols: int) -> st.SearchStrategy[np.ndarray]:
    """``rows × cols`` float64 matrices of entries from ``ENTRIES`` rounded to ``storage``."""
    return st.lists(ENTRIES, min_size=rows * cols, max_size=rows * cols).map(
        lambda v: np.array(v).reshape(rows, cols).astype(DTYPES[storage]).astype(np.float64)
    )


def representable(x: np.ndarray, storage: str) -> bool:
    """Whether every entry survives the round trip through the storage dtype."""
    plain = np.asarray(x, dtype=np.float64)
    return np.array_equal(plain.astype(DTYPES[storage]).astype(np.float64), plain)


# ------------------------------------------------------------------ the system
@pytest.mark.parametrize("storage", STORAGES)
def test_system_attributes(storage: str) -> None:
    numbers = emulated_numbers(storage)
    assert isinstance(numbers, EmulatedNumbers)
    assert numbers.name == f"emulated-{storage}"
    assert numbers.eps == EPS[storage]
    assert numbers.accumulation == "float32"
    assert not numbers.is_mpmath
    for array in (numbers.eye(3), numbers.zeros((2, 3)), numbers.asarray([[0.1]])):
        assert isinstance(array, EmulatedArray)
        assert representable(array, storage)


def test_unknown_storage_raises() -> None:
    with pytest.raises(ValueError, match="float8"):
        emulated_numbers("float8")


@pytest.mark.parametrize("storage", STORAGES)
@given(x=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=20))
def test_asarray_equals_torch_from_float32(storage: str, x: list[float]) -> None:
    values = np.array(x, dtype=np.float32)
    ours = emulated_numbers(storage).to_float64(emulated_numbers(storage).asarray(values))
    theirs = torch.from_numpy(values).to(TORCH_DTYPES[storage]).to(torch.float64).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("storage", STORAGES)
@given(x=st.floats(-1e4, 1e4, width=64))
@example(x=1 + 2**-8 + 2**-40)  # bf16: float32 would round to the midpoint 1 + 2**-8 first
@example(x=1 + 2**-11 + 2**-40)  # fp16 alike
def test_asarray_is_correctly_rounded_from_float64(storage: str, x: float) -> None:
    value = float(emulated_numbers(storage).asarray(x))
    with MP50.context():
        assert value == round_nearest(mp.mpf(x), storage)


@pytest.mark.parametrize("storage", STORAGES)
def test_unmodelled_operations_raise(storage: str) -> None:
    x = emulated_numbers(storage).asarray([0.5, 0.25])
    with pytest.raises(TypeError, match="exp"):
        np.exp(x)
    with pytest.raises(TypeError, match="accumulate"):
        np.add.accumulate(x)
    with pytest.raises(TypeError, match="mix"):
        x + emulated_numbers("float16" if storage == "bfloat16" else "bfloat16").asarray(1.0)


# ------------------------------------------------ single operations vs mpmath
@pytest.mark.parametrize("storage", STORAGES)
@given(data=st.data(), n=st.integers(1, 300))
@example(data=None, n=256)
@example(data=None, n=257)
@example(data=None, n=300)
def test_matmul(storage: str, data: st.DataObject | None, n: int) -> None:
    if data is None:  # an @example: deterministic entries of mixed sign and size
        rng = np.random.default_rng(n)
        a, b = (rng.uniform(-1, 1, shape).astype(DTYPES[storage]) for shape in [(2, n), (n, 3)])
        a, b = a.astype(np.float64), b.astype(np.float64)
    else:
        a = data.draw(storage_matrices(storage, 2, n))
        b = data.draw(storage_matrices(storage, n, 3))
    numbers = emulated_numbers(storage)
    result = numbers.to_float64(numbers.asarray(a) @ numbers.asarray(b))
    with MP50.context():
        exact = exact_values(a) @ exact_values(b)
        magnitude = np.abs(exact_values(a)) @ np.abs(exact_values(b))
    check_accumulated(result, exact, magnitude, n, storage)
    assert representable(result, storage)


@pytest.mark.parametrize("storage", STORAGES)
@given(data=st.data(), n=st.integers(1, 300))
@example(data=None, n=300)
def test_sum_and_trace(storage: str, data: st.DataObject | None, n: int) -> None:
    if data is None:
        x = np.linspace(-1, 1, n).astype(DTYPES[storage]).astype(np.float64).reshape(1, n)
    else:
        x = data.draw(storage_matrices(storage, 1, n))
    numbers = emulated_numbers(storage)
    emulated = numbers.asarray(x)
    square = numbers.asarray(np.diag(x[0]))
    with MP50.context():
        exact = exact_values(x)
        total, magnitude = sum(exact.flat), sum(abs(v) for v in exact.flat)
    for result in (emulated.sum(), np.sum(emulated), np.trace(square), emulated.sum(axis=1)):
        assert isinstance(result, EmulatedArray)
        check_accumulated(
            np.asarray(result).reshape(1), np.array([total]), np.array([magnitude]), n, storage
        )


@pytest.mark.parametrize("storage", STORAGES)
def test_float32_accumulation_matters(storage: str) -> None:
    # A storage-dtype accumulator stalls where the spacing reaches 2: at 2**8 (bf16, 8 bits)
    # or 2**11 (fp16, 11 bits): 2**p + 1 rounds to even 2**p.  float32 counts on exactly.
    stall = 2.0 ** (8 if storage == "bfloat16" else 11)
    n = int(2 * stall)
    numbers = emulated_numbers(storage)
    ones = numbers.asarray(np.ones(n))
    naive = numbers.scalar(0.0)
    for value in ones:
        naive = naive + value  # each addition rounded to the storage dtype
    assert float(naive) == stall
    assert float(ones.sum()) == n
    assert float((ones.reshape(1, n) @ ones.reshape(n, 1))[0, 0]) == n
    assert float(np.trace(numbers.eye(n))) == n


ELEMENTWISE: dict[str, Callable[[object, object], object]] = {
    "add": lambda x, y: x + y,
    "subtract": lambda x, y: x - y,
    "multiply": lambda x, y: x * y,
    "divide": lambda x, y: x / y,
}


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("operation", sorted(ELEMENTWISE))
@given(x=ENTRIES, y=ENTRIES, scalar=st.floats(-10, 10, width=64))
@example(x=1.0, y=2.0**-9, scalar=1e-3)  # bf16: 1 + half an ulp, a tie: stays 1
@example(x=1.0, y=3.0, scalar=0.1)
def test_elementwise_is_rounded_once(
    storage: str, operation: str, x: float, y: float, scalar: float
) -> None:
    numbers = emulated_numbers(storage)
    rounded = numbers.asarray([x, y])
    a, b = float(rounded[0]), float(rounded[1])
    if operation == "divide" and b == 0:
        b = 1.0
    function = ELEMENTWISE[operation]
    # Emulated ⊙ emulated and (float64 scalar) ⊙ emulated, each exactly rounded once.
    cases = [
        (numbers.asarray(a), numbers.asarray(b), a, b),
        (scalar, numbers.asarray(b), scalar, b),
    ]
    if operation == "divide" and a != 0:
        cases.append((numbers.asarray(b), numbers.asarray(a), b, a))
    for left, right, exact_left, exact_right in cases:
        result = float(function(left, right))
        with MP50.context():
            exact = function(mp.mpf(exact_left), mp.mpf(exact_right))
            assert result == round_nearest(exact, storage)


@pytest.mark.parametrize("storage", STORAGES)
@given(x=st.floats(0, 1e4, width=64))
@example(x=2.0)
def test_sqrt_is_rounded_once(storage: str, x: float) -> None:
    numbers = emulated_numbers(storage)
    value = float(numbers.asarray(x))
    result = float(numbers.sqrt(value))
    with MP50.context():
        assert result == round_nearest(mp.sqrt(mp.mpf(value)), storage)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("name", STRUCTURE_NAMES)
@given(data=st.data(), d=st.integers(1, 7))
def test_projection(storage: str, name: str, data: st.DataObject, d: int) -> None:
    """Π̂ of an emulated symmetric M.

    Kept entries are copies and coupling entries one rounded sum ``M_ij + M_ji``,
    so non-Toeplitz results are bitwise ``RN(exact Π̂(M))``.  A Toeplitz entry
    is ``RN(RN(RN(s_sub) + RN(s_sup)) / (d − k))`` with float32 sums of ``d − k``
    entries each: at most ``γ_{d−k} S`` from accumulation and ``u (1 + …) S``
    from each of three roundings, ``S`` the sum of the diagonals' ``|·|``; so
    ``|Π̂ − exact| <= (γ_d + 4u) S / (d − k) + 3η`` (4u: 3 roundings plus the
    second-order products of ``(1 + δ)``, each ``<= u²``, far below one ``u``;
    ``η``, half the smallest subnormal, is each rounding's absolute error in
    the underflow range, Higham §2.1: fp16 subnormals start at ``2**-14``,
    above the drawn ``2**-30``).
    """
    x = data.draw(storage_matrices(storage, d, d))
    m = np.triu(x) + np.triu(x, 1).T  # exactly symmetric, representable
    structure = get_structure(name)
    numbers = emulated_numbers(storage)
    result = numbers.to_float64(structure.project(numbers.asarray(m)))
    assert representable(result, storage)
    with MP50.context():
        exact = structure.project(exact_values(m))
        if name.endswith("toeplitz"):
            u = mp.mpf(EPS[storage]) / 2
            for k in range(d):
                diagonals = [np.diagonal(m, -k), np.diagonal(m, k)] if k else [np.diagonal(m)]
                size = sum(abs(mp.mpf(v)) for diagonal in diagonals for v in diagonal)
                eta = mp.mpf(float(ml_dtypes.finfo(DTYPES[storage]).smallest_subnormal)) / 2
                bound = (mp.mpf(gamma(d)) + 4 * u) * size / (d - k) + 3 * eta
                offset = -k if name.startswith("tril") else k
                for value, e in zip(
                    np.diagonal(result, offset), np.diagonal(exact, offset), strict=True
                ):
                    assert abs(mp.mpf(value) - e) <= bound
        else:
            expected = np.array([[round_nearest(e, storage) for e in row] for row in exact])
            np.testing.assert_array_equal(result, expected)


# ------------------------------------------------------------- a SINGD step
def _abs(x: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(x, dtype=np.float64))


def singd_step_bounds(
    state: SINGDState, record: StepRecord, hyper: SINGDHyperparameters, storage: str
) -> dict[str, np.ndarray]:
    """Entrywise first-order bounds on ``|emulated step − float64 step|`` from one state.

    Dense K, C, default mode (``α1`` momentum, not IKFAC, not normalised), one
    pass of statistics.  Each rounded operation adds at most ``r = u + γ_n``
    (one float32 accumulation of length <= ``n``, the largest of the rows of
    ``A`` and the dims, and one rounding; ``u`` alone for an elementwise
    operation) times the entrywise magnitude ``|·|`` of the exact expression:

    * ``M = α1|m_K| + ½ (tr|H_C| |H_K| + λ tr(|C|ᵀ|C|) |K|ᵀ|K| + d_o I) / d_o``
      majorises the new ``|m_K|`` (``|H_K| <= |K|ᵀ|A|ᵀ|A||K|``).  Its longest
      chain of roundings is ``tr(H_C)·H_K``: ``H_C`` (two products, the first's
      error entering twice: 3r), its trace (r), the product with ``H_K`` (3r
      + u), then two additions, the division by ``d_o``, ``α1 m`` and the final
      addition (4u): at most 12 r to first order; ``(1 + r)^12 − 1 − 12 r <=
      66 r² (1 + r)^10 <= r`` for ``r <= 1/100``, so ``e_m = 13 r M``.
    * ``K' = K − β1 (K m)``: ``|K'| <= K̄ = |K| + β1 |K| M``; error
      ``u K̄`` (subtraction) ``+ (r + u) β1 |K| M`` (product, scaling by β1)
      ``+ β1 |K| e_m`` (``m``'s error); second order ``<= u`` of it, taken up by
      using ``15 r`` for ``14 r + u``.
    * ``ĝ = C' C'ᵀ ∇W K' K'ᵀ``: with ``X̄ = K̄ + e_K`` (``C`` alike), the factors'
      errors give ``P̄ − P`` with ``P̄ = C̄C̄ᵀ|∇W|X̄X̄ᵀ`` and ``P`` the chain
      without errors, and four products ``(1 + r)^4 − 1 <= 5 r`` times ``P̄``.
    * ``m_W' = α2 m_W + ĝ``: ``M_W = α2|m_W| + P̄``; error ``2u(1 + u) M_W +
      (1 + u) e_ĝ``.  ``W' = W − β2 m_W'``: ``2u (|W| + β2 M_W) + (1 + 3u) β2 e_mW``.

    The float64 step's own roundings (``<= 2**-53`` relative each, a few dozen)
    lie far below the ``r`` of slack added above (``r >= 2**-11``).
    """
    u = EPS[storage] / 2
    k, c, m_k, m_c = (_abs(x) for x in (state.K, state.C, state.m_K, state.m_C))
    w, m_w, grad = _abs(state.W), _abs(state.m_W), _abs(record.grad)
    ((a, g),) = record.stats
    a, g = _abs(a), _abs(g)
    n = max(a.shape[0], *k.shape, *c.shape)
    r = u + gamma(n)
    assert r <= 1 / 100  # the second-order argument above
    h_k, h_c = k.T @ a.T @ a @ k, c.T @ g.T @ g @ c
    beta1 = hyper.lr_cov

    def factor(
        f: np.ndarray, m: np.ndarray, h: np.ndarray, h_other: np.ndarray, other: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d_other = h_other.shape[0]
        c_bar = hyper.damping * np.trace(other.T @ other)
        big_m = (
            hyper.alpha1 * m
            + 0.5 * (np.trace(h_other) * h + c_bar * (f.T @ f) + d_other * np.eye(len(f))) / d_other
        )
        e_m = 13 * r * big_m
        f_bar = f + beta1 * f @ big_m
        e_f = u * f_bar + 15 * r * beta1 * f @ big_m
        return f_bar, e_f, e_m

    k_bar, e_k, e_m_k = factor(k, m_k, h_k, h_c, c)
    c_bar, e_c, e_m_c = factor(c, m_c, h_c, h_k, k)
    chain = c_bar @ c_bar.T @ grad @ k_bar @ k_bar.T
    x_k, x_c = k_bar + e_k, c_bar + e_c
    perturbed = x_c @ x_c.T @ grad @ x_k @ x_k.T
    e_g = 5 * r * perturbed + (perturbed - chain)
    m_w_bar = hyper.momentum * m_w + perturbed
    e_m_w = 2 * u * (1 + u) * m_w_bar + (1 + u) * e_g
    e_w = 2 * u * (w + hyper.lr * m_w_bar) + (1 + 3 * u) * hyper.lr * e_m_w
    return {"K": e_k, "C": e_c, "m_K": e_m_k, "m_C": e_m_c, "W": e_w, "m_W": e_m_w}


def _records(storage: str, steps: int, scale: float, seed: int = 0) -> list[StepRecord]:
    """Records with representable ``∇W`` (3 × 5), ``A`` (6 × 5), ``G`` (6 × 3) of size ``scale``."""
    rng = np.random.default_rng(seed)

    def draw(shape: tuple[int, int], size: float) -> np.ndarray:
        return (size * rng.standard_normal(shape)).astype(DTYPES[storage]).astype(np.float64)

    return [
        StepRecord(grad=draw((3, 5), 1.0), stats=((draw((6, 5), scale), draw((6, 3), scale)),))
        for _ in range(steps)
    ]


STATE_ENTRIES = ("K", "C", "m_K", "m_C", "W", "m_W")


@pytest.mark.parametrize("storage", STORAGES)
def test_singd_steps_within_first_order_bound(storage: str) -> None:
    """Each step from the emulated state: emulated vs float64 within the derived bound, not 0."""
    numbers = emulated_numbers(storage)
    hyper = SINGDHyperparameters(lr=0.05, momentum=0.5, alpha1=0.5, T=1, lr_cov=0.02)
    w0 = (np.random.default_rng(1).standard_normal((3, 5))).astype(DTYPES[storage])
    state = singd_init_for(numbers, w0.astype(np.float64), hyper)
    largest = dict.fromkeys(STATE_ENTRIES, 0.0)
    for record in _records(storage, steps=6, scale=0.5):
        emulated = singd_step(state, record, hyper, numbers)
        plain = SINGDState(
            state.steps, *(numbers.to_float64(getattr(state, key)) for key in STATE_ENTRIES)
        )
        exact = singd_step(plain, record, hyper, FLOAT64)
        bounds = singd_step_bounds(plain, record, hyper, storage)
        for key in STATE_ENTRIES:
            value = getattr(emulated, key)
            assert isinstance(value, EmulatedArray)
            assert representable(value, storage)
            difference = np.abs(numbers.to_float64(value) - getattr(exact, key))
            assert (difference <= bounds[key]).all(), key
            largest[key] = max(largest[key], float(difference.max()))
        state = emulated
    # The emulation really rounds: every entry differs from float64 somewhere (> 0).
    assert all(value > 0 for value in largest.values()), largest


def singd_init_for(numbers: EmulatedNumbers, w0: np.ndarray, hyper: SINGDHyperparameters):
    """:func:`reference.updates.singd_init` (imported late to keep the names above short)."""
    from reference.updates import singd_init

    return singd_init(w0, hyper, numbers)


def test_swamping_keeps_bf16_identity() -> None:
    """``K = I`` and ``β1 |m_ii| < 2**-9`` (half an ulp below 1): ``1 − β1 m_ii`` rounds to 1.

    Diagonal structures keep ``m`` diagonal, so the off-diagonal zeros stay
    zero and the whole emulated K is exactly I; float64's moves by ``β1 |m|``.
    Small statistics (scale ``2**-4``) make ``m ≈ −½ I``: ``β1 |m| ≈ 5e-4 <
    2**-9 ≈ 2e-3``.
    """
    numbers = emulated_numbers("bfloat16")
    hyper = SINGDHyperparameters(T=1, lr_cov=1e-3, structures=("diagonal", "diagonal"))
    records = _records("bfloat16", steps=5, scale=2.0**-4)
    w0 = np.zeros((3, 5))
    from reference.updates import singd_trajectory

    emulated = singd_trajectory(w0, records, hyper, numbers)
    exact = singd_trajectory(w0, records, hyper, FLOAT64)
    for e_state in emulated:
        assert float(np.abs(e_state.m_K).max()) * hyper.lr_cov < 2.0**-9
        np.testing.assert_array_equal(numbers.to_float64(e_state.K), np.eye(5))
        np.testing.assert_array_equal(numbers.to_float64(e_state.C), np.eye(3))
    # float64 K moves by about β1·|m| per step (>= β1/4 after the first step: |m| ~ ½).
    assert np.abs(exact[-1].K - np.eye(5)).max() >= hyper.lr_cov / 4


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(
    "structures",
    [
        ("dense", "dense"),
        ("tril", "triu"),
        ("triltoeplitz", "hierarchical2_3"),
        ("diagonal", "block2diagonal"),
    ],
)
def test_trajectory_stays_on_the_grid(storage: str, structures: tuple[str, str]) -> None:
    from reference.updates import singd_trajectory

    numbers = emulated_numbers(storage)
    hyper = SINGDHyperparameters(T=2, structures=structures, normalize_lr_cov=True)
    states = singd_trajectory(np.ones((3, 5)) / 3, _records(storage, 4, 0.5), hyper, numbers)
    for state in states:
        for key in STATE_ENTRIES:
            assert isinstance(getattr(state, key), EmulatedArray)
            assert representable(getattr(state, key), storage)


@pytest.mark.parametrize("storage", STORAGES)
def test_kfac_and_statistics_run_emulated(storage: str) -> None:
    from reference.kfac import KFACHyperparameters, kfac_trajectory
    from reference.statistics import conv2d_statistics, linear_statistics

    numbers = emulated_numbers(storage)
    states = kfac_trajectory(
        np.ones((3, 5)) / 3, _records(storage, 3, 0.5), KFACHyperparameters(T=1), numbers
    )
    for state in states:
        for value in (state.S_K, state.S_C, state.W, state.m_W):
            assert isinstance(value, EmulatedArray) and representable(value, storage)
    rng = np.random.default_rng(0)
    outputs = [
        linear_statistics(
            numbers.asarray(rng.standard_normal((2, 3, 4))),
            numbers.asarray(rng.standard_normal((2, 3, 2))),
            bias=True,
            approx="reduce",
        ),
        conv2d_statistics(
            numbers.asarray(rng.standard_normal((2, 2, 4, 4))),
            numbers.asarray(rng.standard_normal((2, 2, 2, 2))),
            kernel_size=3,
            bias=True,
        ),
    ]
    for a, g in outputs:
        assert isinstance(a, EmulatedArray) and isinstance(g, EmulatedArray)
        assert representable(a, storage) and representable(g, storage)


def test_float64_and_mpmath_unchanged() -> None:
    # Plain float64 / mpf arrays never become emulated ones.
    assert type(FLOAT64.eye(2) @ FLOAT64.eye(2)) is np.ndarray
    assert MP50.eye(2).dtype == object
    assert math.isclose(float(FLOAT64.sqrt(2.0)), math.sqrt(2.0))
