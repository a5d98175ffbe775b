"""The oracle's structures (SPEC §2): a dense mask plus a projection Π̂.

A structure is the set of ``d × d`` matrices whose entries outside a boolean
pattern are zero (and, for the Toeplitz forms, whose diagonals are constant).
Π̂ maps a dense symmetric ``M`` into it.  Except for Toeplitz, the SPEC §2
table reads, entry by entry,

    Π̂(M)_ij = M_ij            where (i, j) is *kept* (dense blocks, diagonals),
    Π̂(M)_ij = M_ij + M_ji     where (i, j) is a *coupling* entry, whose mirror
                              (j, i) lies outside the pattern,
    Π̂(M)_ij = 0               elsewhere,

so each structure here is two boolean masks, ``keep`` and ``couple``; the
pattern is their union.  For symmetric ``M`` the coupling entries are ``2 M_ij``
(the "2·strictly-lower" of tril, the "B = 2·M[:k1, k1:]" of hierarchical).

Everything works on float64 arrays and on object arrays of ``mpmath.mpf``
alike: masks enter by element-wise multiplication, never by assignment of a
float zero, so the result has the input's number type.  Call inside
``Numbers.context()`` for mpmath precision.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

#: Names of all non-parametric structures and example parametric ones.
STRUCTURE_NAMES: tuple[str, ...] = (
    "dense",
    "diagonal",
    "block3diagonal",
    "block30diagonal",
    "hierarchical2_3",
    "hierarchical15_15",
    "tril",
    "triu",
    "triltoeplitz",
    "triutoeplitz",
    "triltopleftdiagonal",
    "trilbottomrightdiagonal",
    "triutopleftdiagonal",
    "triubottomrightdiagonal",
)

#: A function from ``d`` to a ``d × d`` boolean mask.
MaskFn = Callable[[int], np.ndarray]

_FLOAT64_SYMMETRY_FACTOR = 8.0  # |M − Mᵀ| <= 8·eps·max|M| counts as symmetric


def _check_symmetric(m: np.ndarray) -> np.ndarray:
    """Validate a dense symmetric matrix; return it as float64 unless it holds ``mpf``.

    Symmetry is exact for ``mpf`` (object) arrays and within
    ``8 · eps · max|M|`` for float arrays (one rounding of each of ``M_ij``
    and ``M_ji`` from a symmetric product, with slack), ``eps`` that of
    float64 or, for an emulated array (``reference.numbers.EmulatedArray``,
    kept as is), of its storage dtype.

    Raises:
        ValueError: If ``m`` is not a square 2-D matrix, not finite (float) or not symmetric.
    """
    m = np.asanyarray(m)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"Π̂ needs a square d × d matrix, got shape {m.shape}")
    if m.dtype == object:
        if not (m == m.T).all():
            raise ValueError("Π̂ needs a symmetric matrix; the mpf matrix differs from Mᵀ")
        return m
    m = np.asanyarray(m, dtype=np.float64)
    if not np.isfinite(m).all():
        raise ValueError("Π̂ needs a finite matrix; got inf or nan entries")
    eps = getattr(m, "eps", np.finfo(np.float64).eps)
    asymmetry = np.abs(m - m.T).max(initial=0.0)
    allowed = _FLOAT64_SYMMETRY_FACTOR * eps * np.abs(m).max(initial=0.0)
    if not asymmetry <= allowed:
        raise ValueError(
            f"Π̂ needs a symmetric matrix; max |M − Mᵀ| = {asymmetry:.3g} > {allowed:.3g}"
        )
    return m


# ----------------------------------------------------------------- patterns
def _all(d: int) -> np.ndarray:
    return np.ones((d, d), dtype=bool)


def _none(d: int) -> np.ndarray:
    return np.zeros((d, d), dtype=bool)


def _diagonal(d: int) -> np.ndarray:
    return np.eye(d, dtype=bool)


def _strictly_lower(d: int) -> np.ndarray:
    return np.tril(_all(d), k=-1)


def _strictly_upper(d: int) -> np.ndarray:
    return np.triu(_all(d), k=1)


def _first_column_below_diagonal(d: int) -> np.ndarray:
    mask = _none(d)
    mask[1:, 0] = True
    return mask


def _last_row_left_of_diagonal(d: int) -> np.ndarray:
    mask = _none(d)
    mask[-1, :-1] = True
    return mask


def _first_row_right_of_diagonal(d: int) -> np.ndarray:
    mask = _none(d)
    mask[0, 1:] = True
    return mask


def _last_column_above_diagonal(d: int) -> np.ndarray:
    mask = _none(d)
    mask[:-1, -1] = True
    return mask


def _block_diagonal(block_size: int) -> MaskFn:
    """Diagonal blocks of size ``block_size``; the last one smaller if it does not divide d."""

    def mask(d: int) -> np.ndarray:
        result = _none(d)
        for start in range(0, d, block_size):
            result[start : start + block_size, start : start + block_size] = True
        return result

    return mask


def hierarchical_sizes(d: int, k1_max: int, k2_max: int) -> tuple[int, int, int]:
    """Block sizes ``(k1, m, k2)`` of ``hierarchical<K1>_<K2>`` for size ``d`` (SPEC §2)."""
    if d <= k1_max:
        return d, 0, 0
    if d <= k1_max + k2_max:
        return k1_max, 0, d - k1_max
    return k1_max, d - k1_max - k2_max, k2_max


def _hierarchical_keep(k1_max: int, k2_max: int) -> MaskFn:
    """A (k1 × k1), diag(c) (m), E (k2 × k2): the kept blocks of ``[[A,B1,B2],[0,c,0],[0,D,E]]``."""

    def mask(d: int) -> np.ndarray:
        k1, m, _ = hierarchical_sizes(d, k1_max, k2_max)
        result = _none(d)
        result[:k1, :k1] = True
        result[k1 : k1 + m, k1 : k1 + m] = np.eye(m, dtype=bool)
        result[k1 + m :, k1 + m :] = True
        return result

    return mask


def _hierarchical_couple(k1_max: int, k2_max: int) -> MaskFn:
    """B = [B1 | B2] (k1 × (d − k1)) and D (k2 × m): the coupling blocks."""

    def mask(d: int) -> np.ndarray:
        k1, m, _ = hierarchical_sizes(d, k1_max, k2_max)
        result = _none(d)
        result[:k1, k1:] = True
        result[k1 + m :, k1 : k1 + m] = True
        return result

    return mask


# --------------------------------------------------------------- structures
class Structure:
    """A structure given by its kept and coupling masks (SPEC §2).

    Attributes:
        name: The registry name (e.g. ``"tril"``, ``"block30diagonal"``).
    """

    def __init__(self, name: str, keep: MaskFn, couple: MaskFn) -> None:
        """Make a structure from its masks.

        Args:
            name: The registry name.
            keep: ``d ↦`` mask of entries where ``Π̂(M)_ij = M_ij``.
            couple: ``d ↦`` mask of entries where ``Π̂(M)_ij = M_ij + M_ji``.
        """
        self.name = name
        self._keep = keep
        self._couple = couple

    def mask(self, d: int) -> np.ndarray:
        """The pattern (``d × d`` bool; True where an entry may be nonzero)."""
        return self._keep(d) | self._couple(d)

    def num_free(self, d: int) -> int:
        """Number of free entries (= storage size) of a ``d × d`` member."""
        return int(self.mask(d).sum())

    def project(self, m: np.ndarray) -> np.ndarray:
        """Π̂(M) for a dense symmetric ``M`` (SPEC §2 table).

        Args:
            m: ``d × d`` symmetric matrix, float64 or an object array of ``mpf``.

        Returns:
            ``d × d`` member of the structure, of the same number type.

        Raises:
            ValueError: If ``m`` is not square or not symmetric.
        """
        m = _check_symmetric(m)
        d = m.shape[0]
        return m * self._keep(d) + (m + m.T) * self._couple(d)

    def is_member(self, m: np.ndarray, atol: float = 0.0) -> bool:
        """Whether every entry of ``m`` (``d × d``) outside the pattern has ``|·| <= atol``."""
        m = _check_square(m)
        outside = np.abs(m[~self.mask(m.shape[0])])
        return bool((outside <= atol).all())

    def random_member(self, d: int, rng: np.random.Generator) -> np.ndarray:
        """A general (non-symmetric) float64 member with standard-normal free entries."""
        return rng.standard_normal((d, d)) * self.mask(d)

    def __repr__(self) -> str:
        return f"Structure({self.name!r})"


class ToeplitzStructure(Structure):
    """Lower- or upper-triangular Toeplitz matrices (SPEC §2 table, Toeplitz rows).

    A member has one free number per diagonal ``k = 0, …, d − 1`` on its
    triangular side; Π̂ puts there the mean of the ``k``-th sub- and
    super-diagonal of ``M`` taken together: ``(Σ sub_k + Σ super_k) / (d − k)``
    for ``k >= 1`` and ``tr(M) / d`` for ``k = 0``.
    """

    def __init__(self, name: str, lower: bool) -> None:
        """Make a Toeplitz structure.

        Args:
            name: The registry name.
            lower: True for lower-triangular Toeplitz, False for upper.
        """
        triangle = _strictly_lower if lower else _strictly_upper
        super().__init__(name, keep=_diagonal, couple=triangle)
        self.lower = lower

    def num_free(self, d: int) -> int:
        """One free entry per diagonal: ``d``."""
        return d

    def _diagonal_entries(self, m: np.ndarray, k: int) -> np.ndarray:
        """The entries of the ``k``-th diagonal on this structure's side (length ``d − k``)."""
        return np.diagonal(m, offset=-k if self.lower else k)

    def _fill_diagonals(self, result: np.ndarray, values: Sequence[object]) -> np.ndarray:
        """Write ``values[k]`` on the ``k``-th diagonal of ``result`` (this side), in place."""
        d = result.shape[0]
        for k in range(d):
            for i in range(d - k):
                row, col = (i + k, i) if self.lower else (i, i + k)
                result[row, col] = values[k]
        return result

    def project(self, m: np.ndarray) -> np.ndarray:
        """Π̂(M) for a dense symmetric ``M``: diagonal means (class docstring).

        Raises:
            ValueError: If ``m`` is not square or not symmetric.
        """
        m = _check_symmetric(m)
        d = m.shape[0]
        means = [np.trace(m) / d] + [
            (np.diagonal(m, offset=-k).sum() + np.diagonal(m, offset=k).sum()) / (d - k)
            for k in range(1, d)
        ]
        return self._fill_diagonals(m * _none(d), means)  # m * 0: zeros of m's number type

    def is_member(self, m: np.ndarray, atol: float = 0.0) -> bool:
        """Pattern within ``atol`` and each diagonal constant within ``atol``."""
        if not super().is_member(m, atol):
            return False
        m = _check_square(m)
        for k in range(m.shape[0]):
            diagonal = self._diagonal_entries(m, k)
            if not (np.abs(diagonal - diagonal[0]) <= atol).all():
                return False
        return True

    def random_member(self, d: int, rng: np.random.Generator) -> np.ndarray:
        """A general float64 member with standard-normal diagonal values."""
        return self._fill_diagonals(np.zeros((d, d)), list(rng.standard_normal(d)))


def _check_square(m: np.ndarray) -> np.ndarray:
    """Validate a square 2-D matrix.

    Raises:
        ValueError: If ``m`` is not ``d × d``.
    """
    m = np.asarray(m)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square d × d matrix, got shape {m.shape}")
    return m


_FIXED: dict[str, Structure] = {
    structure.name: structure
    for structure in (
        Structure("dense", keep=_all, couple=_none),
        Structure("diagonal", keep=_diagonal, couple=_none),
        Structure("tril", keep=_diagonal, couple=_strictly_lower),
        Structure("triu", keep=_diagonal, couple=_strictly_upper),
        ToeplitzStructure("triltoeplitz", lower=True),
        ToeplitzStructure("triutoeplitz", lower=False),
        # [[a, 0], [b, diag(c)]]
        Structure("trilbottomrightdiagonal", keep=_diagonal, couple=_first_column_below_diagonal),
        # [[diag(a), 0], [bᵀ, c]]
        Structure("triltopleftdiagonal", keep=_diagonal, couple=_last_row_left_of_diagonal),
        # [[a, bᵀ], [0, diag(c)]]
        Structure("triubottomrightdiagonal", keep=_diagonal, couple=_first_row_right_of_diagonal),
        # [[diag(a), b], [0, c]]
        Structure("triutopleftdiagonal", keep=_diagonal, couple=_last_column_above_diagonal),
    )
}

_POSITIVE = r"([1-9][0-9]*)"
_BLOCK = re.compile(rf"block{_POSITIVE}diagonal")
_HIERARCHICAL = re.compile(rf"hierarchical{_POSITIVE}_{_POSITIVE}")


def get_structure(name: str) -> Structure:
    """The structure called ``name`` (SPEC §2 names).

    Parametric names: ``block<b>diagonal`` (``b >= 1``) and
    ``hierarchical<K1>_<K2>`` (``K1, K2 >= 1``), numbers without leading zeros.

    Raises:
        ValueError: If ``name`` is unknown or a malformed parametric name.
    """
    if name in _FIXED:
        return _FIXED[name]
    if match := _BLOCK.fullmatch(name):
        block_size = int(match.group(1))
        return Structure(name, keep=_block_diagonal(block_size), couple=_none)
    if match := _HIERARCHICAL.fullmatch(name):
        k1_max, k2_max = int(match.group(1)), int(match.group(2))
        return Structure(
            name,
            keep=_hierarchical_keep(k1_max, k2_max),
            couple=_hierarchical_couple(k1_max, k2_max),
        )
    raise ValueError(
        f"unknown structure name {name!r}; expected one of {sorted(_FIXED)}, "
        "'block<b>diagonal' or 'hierarchical<K1>_<K2>' with positive integers"
    )
