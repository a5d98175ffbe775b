"""SPEC §3 laws for the oracle's structures (``reference/structures.py``).

Every law runs over every name of ``STRUCTURE_NAMES`` and drawn parametric
names, with sizes that include ``d = 1``, ``d`` below the block size, ``d``
not a multiple of it and every hierarchical split (pinned with ``@example``).

Rounding: the mask structures' Π̂ is exact up to the one addition
``M_ij + M_ji`` of a coupling entry; the Toeplitz forms average ``2(d − k)``
entries.  Bounds come from ``tests/tolerances.py`` (``n · eps`` for a
reduction of length ``n``, relative to the magnitudes involved).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from reference.numbers import FLOAT64, mpmath_numbers
from reference.structures import STRUCTURE_NAMES, get_structure
from tests.reference.strategies import ENTRIES, dims, structure_names, symmetric_matrices
from tests.tolerances import EPS, matmul_bound

EPS64 = EPS[torch.float64]
TOEPLITZ = ("triltoeplitz", "triutoeplitz")
RECURSIVE = (
    "triltopleftdiagonal",
    "trilbottomrightdiagonal",
    "triutopleftdiagonal",
    "triubottomrightdiagonal",
)

#: Hard sizes: d = 1, d < block size, d not a multiple of it, every hierarchical split.
HARD_CASES: tuple[tuple[str, int], ...] = (
    ("dense", 1),
    ("diagonal", 1),
    ("tril", 1),
    ("triltoeplitz", 1),
    ("triutoeplitz", 2),
    ("trilbottomrightdiagonal", 1),
    ("triutopleftdiagonal", 2),
    ("block3diagonal", 2),  # d < b
    ("block3diagonal", 7),  # b ∤ d
    ("block30diagonal", 5),  # d < b
    ("block1diagonal", 4),  # = diagonal
    ("hierarchical2_3", 1),  # d <= K1: (d, 0, 0)
    ("hierarchical2_3", 2),  # d = K1
    ("hierarchical2_3", 4),  # K1 < d <= K1+K2: (K1, 0, d-K1)
    ("hierarchical2_3", 5),  # d = K1+K2: m = 0
    ("hierarchical2_3", 8),  # (K1, d-K1-K2, K2)
    ("hierarchical1_1", 3),  # smallest blocks with a middle part
    ("hierarchical15_15", 16),
)


def _symmetric(d: int, seed: int = 0) -> np.ndarray:
    """A fixed symmetric ``d × d`` matrix for pinned examples."""
    x = np.random.default_rng(seed).standard_normal((d, d))
    return (x + x.T) / 2


@st.composite
def symmetric_cases(draw: st.DrawFn, count: int = 1) -> tuple[str, list[np.ndarray]]:
    """A structure name and ``count`` symmetric matrices of one drawn size ``d <= 9``."""
    name = draw(structure_names())
    d = draw(dims(1, 9))
    return name, [draw(symmetric_matrices(d)) for _ in range(count)]


def pin_hard_cases(make_case: Callable[[str, int], object], **fixed: object) -> Callable:
    """Decorator: ``@example(case=make_case(name, d), **fixed)`` per :data:`HARD_CASES` entry."""

    def decorate(test: Callable) -> Callable:
        for name, d in HARD_CASES:
            test = example(case=make_case(name, d), **fixed)(test)
        return test

    return decorate


def _max_abs(x: np.ndarray) -> float:
    return float(np.abs(x).max(initial=0.0))


def _projection_reduction_length(name: str, d: int) -> int:
    """Terms summed into one entry of Π̂(M): ``2d`` for Toeplitz means, else 2 (``M_ij + M_ji``)."""
    return 2 * d if name in TOEPLITZ else 2


# --------------------------------------------------------------- SPEC table
def _hierarchical_split(d: int, k1_max: int, k2_max: int) -> tuple[int, int, int]:
    """SPEC §2 block sizes (restated here, independently of the oracle)."""
    if d <= k1_max:
        return d, 0, 0
    if d <= k1_max + k2_max:
        return k1_max, 0, d - k1_max
    return k1_max, d - k1_max - k2_max, k2_max


def _spec_projection(name: str, m: np.ndarray) -> np.ndarray:
    """Π̂(M) written block by block from the SPEC §2 table, for symmetric float64 ``M``."""
    d = m.shape[0]
    out = np.zeros((d, d))
    diag = np.diag(np.diag(m))
    if name == "dense":
        return m.copy()
    if name == "diagonal":
        return diag
    if name == "tril":
        return diag + 2 * np.tril(m, -1)
    if name == "triu":
        return diag + 2 * np.triu(m, 1)
    if name in TOEPLITZ:
        for k in range(d):
            if k == 0:
                value = sum(m[i, i] for i in range(d)) / d
            else:
                value = sum(m[i + k, i] + m[i, i + k] for i in range(d - k)) / (d - k)
            for i in range(d - k):
                out[(i + k, i) if name == "triltoeplitz" else (i, i + k)] = value
        return out
    if name == "trilbottomrightdiagonal":  # [[a, 0], [b, diag(c)]]
        out[1:, 0] = m[1:, 0] + m[0, 1:]
        return diag + out
    if name == "triltopleftdiagonal":  # [[diag(a), 0], [bᵀ, c]]
        out[-1, :-1] = m[-1, :-1] + m[:-1, -1]
        return diag + out
    if name == "triubottomrightdiagonal":  # [[a, bᵀ], [0, diag(c)]]
        out[0, 1:] = m[0, 1:] + m[1:, 0]
        return diag + out
    if name == "triutopleftdiagonal":  # [[diag(a), b], [0, c]]
        out[:-1, -1] = m[:-1, -1] + m[-1, :-1]
        return diag + out
    if match := re.fullmatch(r"block(\d+)diagonal", name):
        b = int(match.group(1))
        for s in range(0, d, b):
            out[s : s + b, s : s + b] = m[s : s + b, s : s + b]
        return out
    match = re.fullmatch(r"hierarchical(\d+)_(\d+)", name)
    assert match is not None, name
    k1, mid, _ = _hierarchical_split(d, int(match.group(1)), int(match.group(2)))
    out[:k1, :k1] = m[:k1, :k1]  # A
    out[:k1, k1:] = 2 * m[:k1, k1:]  # B = [B1 | B2]
    out[k1 : k1 + mid, k1 : k1 + mid] = np.diag(np.diag(m)[k1 : k1 + mid])  # diag(c)
    out[k1 + mid :, k1 : k1 + mid] = 2 * m[k1 + mid :, k1 : k1 + mid]  # D
    out[k1 + mid :, k1 + mid :] = m[k1 + mid :, k1 + mid :]  # E
    return out


def _spec_num_free(name: str, d: int) -> int:
    """Storage sizes from the task statement's formulas."""
    if name == "dense":
        return d * d
    if name in ("diagonal", *TOEPLITZ):
        return d
    if name in ("tril", "triu"):
        return d * (d + 1) // 2
    if name in RECURSIVE:
        return 2 * d - 1
    if match := re.fullmatch(r"block(\d+)diagonal", name):
        b = int(match.group(1))
        return (d // b) * b * b + (d % b) ** 2
    match = re.fullmatch(r"hierarchical(\d+)_(\d+)", name)
    assert match is not None, name
    k1, mid, k2 = _hierarchical_split(d, int(match.group(1)), int(match.group(2)))
    return k1 * k1 + k1 * (d - k1) + mid + k2 * mid + k2 * k2


@given(case=symmetric_cases())
@pin_hard_cases(lambda name, d: (name, [_symmetric(d)]))
def test_project_matches_spec_table(case: tuple[str, list[np.ndarray]]) -> None:
    name, (m,) = case
    projected = get_structure(name).project(m)
    expected = _spec_projection(name, m)
    d = m.shape[0]
    # Same entries, summed in a possibly different order: n·eps·max|M|, n = terms per entry.
    bound = matmul_bound(torch.float64, _projection_reduction_length(name, d)) * _max_abs(m)
    assert _max_abs(projected - expected) <= bound


@pytest.mark.parametrize(
    ("name", "d", "pattern"),
    [
        ("trilbottomrightdiagonal", 4, ["1000", "1100", "1010", "1001"]),
        ("triltopleftdiagonal", 4, ["1000", "0100", "0010", "1111"]),
        ("triubottomrightdiagonal", 4, ["1111", "0100", "0010", "0001"]),
        ("triutopleftdiagonal", 4, ["1001", "0101", "0011", "0001"]),
        # (k1, m, k2) = (2, 1, 3): [[A, B1, B2], [0, c, 0], [0, D, E]]
        (
            "hierarchical2_3",
            6,
            ["111111", "111111", "001000", "001111", "001111", "001111"],
        ),
        ("block3diagonal", 4, ["1110", "1110", "1110", "0001"]),
        ("triltoeplitz", 3, ["100", "110", "111"]),
        ("triutoeplitz", 3, ["111", "011", "001"]),
    ],
)
def test_mask_literal(name: str, d: int, pattern: list[str]) -> None:
    expected = np.array([[c == "1" for c in row] for row in pattern])
    np.testing.assert_array_equal(get_structure(name).mask(d), expected)


@st.composite
def member_cases(draw: st.DrawFn) -> tuple[str, int, int]:
    """A structure name, a size ``d <= 9`` and a seed for ``random_member``."""
    return draw(structure_names()), draw(dims(1, 9)), draw(st.integers(0, 2**32 - 1))


@given(case=member_cases())
@pin_hard_cases(lambda name, d: (name, d, 0))
def test_num_free_matches_formula(case: tuple[str, int, int]) -> None:
    name, d, _ = case
    structure = get_structure(name)
    assert structure.num_free(d) == _spec_num_free(name, d)
    if name not in TOEPLITZ:  # storage = pattern, except Toeplitz's one number per diagonal
        assert structure.num_free(d) == structure.mask(d).sum()


# ------------------------------------------------------------ SPEC §3 laws
@given(case=symmetric_cases(count=2), alpha=ENTRIES, beta=ENTRIES)
@pin_hard_cases(lambda name, d: (name, [_symmetric(d, 0), _symmetric(d, 1)]), alpha=0.5, beta=-0.3)
def test_project_is_linear(case: tuple[str, list[np.ndarray]], alpha: float, beta: float) -> None:
    name, (a, b) = case
    structure = get_structure(name)
    combined = structure.project(alpha * a + beta * b)
    separate = alpha * structure.project(a) + beta * structure.project(b)
    scale = abs(alpha) * _max_abs(a) + abs(beta) * _max_abs(b)
    n = _projection_reduction_length(name, a.shape[0])
    # |Π̂(X)| <= 2|X| entrywise-max (a coupling entry adds two entries, a Toeplitz entry is
    # 2(d-k) entries over d-k); each side rounds an n-term reduction plus the combination.
    assert _max_abs(combined - separate) <= 2 * matmul_bound(torch.float64, n) * scale


@given(case=symmetric_cases())
@pin_hard_cases(lambda name, d: (name, [_symmetric(d)]))
def test_project_maps_into_structure(case: tuple[str, list[np.ndarray]]) -> None:
    name, (m,) = case
    structure = get_structure(name)
    # Exact: zeros outside the pattern are products with False, Toeplitz diagonals one value.
    assert structure.is_member(structure.project(m), atol=0.0)


@given(case=symmetric_cases())
@pin_hard_cases(lambda name, d: (name, [_symmetric(d)]))
def test_project_preserves_trace(case: tuple[str, list[np.ndarray]]) -> None:
    name, (m,) = case
    d = m.shape[0]
    projected = get_structure(name).project(m)
    # Diagonal copied (exact) or d copies of tr(M)/d summed back: 2d-term reduction of |M_ii|.
    bound = matmul_bound(torch.float64, 2 * d) * np.abs(np.diag(m)).sum()
    assert abs(np.trace(projected) - np.trace(m)) <= bound


@given(case=symmetric_cases())
@pin_hard_cases(lambda name, d: (name, [_symmetric(d)]))
def test_project_of_symmetrised_projection_is_itself(case: tuple[str, list[np.ndarray]]) -> None:
    name, (m,) = case
    structure = get_structure(name)
    projected = structure.project(m)
    again = structure.project((projected + projected.T) / 2)
    if name in TOEPLITZ:
        # Diagonal k: 2(d-k) halves of t_k summed, then divided: 2d-term reduction of |t_k|.
        bound = matmul_bound(torch.float64, 2 * m.shape[0]) * _max_abs(projected)
        assert _max_abs(again - projected) <= bound
    else:
        # Exact: halving and re-adding the two halves of a coupling entry are exact in binary.
        np.testing.assert_array_equal(again, projected)


@given(d=dims(1, 12), name=structure_names())
@example(d=1, name="hierarchical2_3")
def test_identity_is_member_and_fixed(d: int, name: str) -> None:
    structure = get_structure(name)
    identity = np.eye(d)
    assert structure.is_member(identity, atol=0.0)  # exact: 0/1 entries
    np.testing.assert_array_equal(structure.project(identity), identity)  # exact: 1 = d/d, 0


@given(case=member_cases(), scalar=ENTRIES)
@pin_hard_cases(lambda name, d: (name, d, 0), scalar=-0.3)
def test_general_members_closed_under_sum_scale_product(
    case: tuple[str, int, int], scalar: float
) -> None:
    name, d, seed = case
    structure = get_structure(name)
    rng = np.random.default_rng(seed)
    a, b = structure.random_member(d, rng), structure.random_member(d, rng)
    mask = structure.mask(d)
    np.testing.assert_array_equal(a != 0, mask)  # general: every free entry used (a.s.)
    for result in (a + b, scalar * a, a @ b):
        np.testing.assert_array_equal(result[~mask], 0.0)  # exact: every term is an exact 0
    assert structure.is_member(a + b, atol=0.0)  # exact: equal values summed alike
    assert structure.is_member(scalar * a, atol=0.0)
    # Toeplitz diagonals of A B: the same d-term sums, possibly in another order.
    atol = matmul_bound(torch.float64, d) * _max_abs(np.abs(a) @ np.abs(b))
    assert structure.is_member(a @ b, atol=atol)


# ------------------------------------------------------------ float64 vs mpmath
def _float64_vs_mpmath(name: str, m: np.ndarray) -> float:
    """max |Π̂_float64(M) − Π̂_mpmath50(M)| (both from the same float64 ``M``)."""
    structure = get_structure(name)
    numbers = mpmath_numbers(50)
    with numbers.context():
        exact = structure.project(numbers.asarray(m))
    assert exact.dtype == object
    assert structure.is_member(exact, atol=0.0)
    return _max_abs(structure.project(m) - numbers.to_float64(exact))


def _float64_vs_mpmath_bound(name: str, m: np.ndarray) -> float:
    """Allowed discrepancy of :func:`_float64_vs_mpmath` for an exactly symmetric ``M``.

    Mask structures: 0 (each entry is a copy or ``M_ij + M_ji = 2 M_ij``, exact in
    both systems).  Toeplitz: a ``2d``-term mean, ``n·eps64·max|M|`` with
    ``n = 2d`` plus the final rounding of the reference (``matmul_bound`` adds 2).
    """
    if name not in TOEPLITZ:
        return 0.0
    return matmul_bound(torch.float64, 2 * m.shape[0]) * _max_abs(m)


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_float64_matches_mpmath_small(name: str) -> None:
    m = _symmetric(5, seed=3)
    assert _float64_vs_mpmath(name, m) <= _float64_vs_mpmath_bound(name, m)


@pytest.mark.oracle
@given(name=structure_names(max_param=8), m=dims(1, 16).flatmap(symmetric_matrices))
@example(name="hierarchical15_15", m=_symmetric(16))
@example(name="block30diagonal", m=_symmetric(16))
def test_float64_matches_mpmath(name: str, m: np.ndarray) -> None:
    assert _float64_vs_mpmath(name, m) <= _float64_vs_mpmath_bound(name, m)


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_mpmath_projection_keeps_50_digits(name: str) -> None:
    d = 5
    numbers = mpmath_numbers(50)
    weights = _spec_projection(name, np.ones((d, d)))  # 0, 1 or 2 per entry, exactly
    with numbers.context():
        third = numbers.scalar(1) / 3
        projected = get_structure(name).project(numbers.asarray(np.ones((d, d))) * third)
        error = np.abs(projected - numbers.asarray(weights) * third).max()
    # Π̂ of J/3 is weights/3; a 2d-term reduction at 50 digits: (2d + 2)·eps50·(2/3).
    assert error <= (2 * d + 2) * numbers.eps


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "name",
    [
        "foo",
        "",
        "Dense",
        "block0diagonal",
        "blockdiagonal",
        "block03diagonal",
        "block-1diagonal",
        "hierarchical3",
        "hierarchical0_2",
        "hierarchical3_0",
        "hierarchical3_",
        "hierarchical_3_3",
    ],
)
def test_bad_name_raises(name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        get_structure(name)


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
@pytest.mark.parametrize("shape", [(2, 3), (3,), (2, 2, 2)])
def test_non_square_raises(name: str, shape: tuple[int, ...]) -> None:
    structure = get_structure(name)
    with pytest.raises(ValueError, match="square"):
        structure.project(np.zeros(shape))
    with pytest.raises(ValueError, match="square"):
        structure.is_member(np.zeros(shape))


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_non_symmetric_raises(name: str) -> None:
    structure = get_structure(name)
    with pytest.raises(ValueError, match="symmetric"):
        structure.project(np.array([[1.0, 1.0], [0.0, 1.0]]))
    numbers = mpmath_numbers(50)
    with numbers.context():
        m = numbers.asarray(np.ones((2, 2)))
        m[0, 1] += numbers.scalar(10) ** -40  # invisible in float64, not in mpf
        with pytest.raises(ValueError, match="symmetric"):
            structure.project(m)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        get_structure("tril").project(np.array([[1.0, bad], [bad, 1.0]]))


def test_float64_symmetry_threshold() -> None:
    structure = get_structure("dense")
    # |M − Mᵀ| = 8·eps·1 <= 8·eps·max|M|: accepted; 16·eps: rejected.
    accepted = np.array([[1.0, 1.0], [1.0 + 8 * EPS64, 1.0]])
    rejected = np.array([[1.0, 1.0], [1.0 + 16 * EPS64, 1.0]])
    structure.project(accepted)
    with pytest.raises(ValueError, match="symmetric"):
        structure.project(rejected)


def test_structure_names_resolve() -> None:
    for name in STRUCTURE_NAMES:
        assert get_structure(name).name == name
    assert FLOAT64.name == "float64"
