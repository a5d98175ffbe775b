"""Hypothesis strategies for the oracle's tests: matrices, SPD matrices, structures.

Entries are float64 in ``[-1, 1]``, either exactly zero or of magnitude at
least ``2**-30``: sums and differences of such numbers never underflow (the
result of a cancellation is a multiple of the smaller operand's ulp, at least
``2**-82``), so the rounding model of ``tests/tolerances.py`` (Higham, no
underflow) holds for every expression the tests form.

SPD matrices are ``Q diag(λ) Qᵀ`` from a drawn orthogonal ``Q`` and drawn
log-eigenvalues whose extremes are pinned, so the condition number is exactly
the one asked for; nothing is filtered with ``assume``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference.structures import STRUCTURE_NAMES

#: Smallest nonzero magnitude of a drawn entry (see the module docstring).
MIN_MAGNITUDE = 2.0**-30

ENTRIES: st.SearchStrategy[float] = st.one_of(
    st.just(0.0),
    st.floats(MIN_MAGNITUDE, 1.0, width=64),
    st.floats(-1.0, -MIN_MAGNITUDE, width=64),
)


def dims(min_value: int = 1, max_value: int = 8) -> st.SearchStrategy[int]:
    """Matrix sizes ``d`` in ``[min_value, max_value]``."""
    return st.integers(min_value, max_value)


def matrices(rows: int, cols: int) -> st.SearchStrategy[np.ndarray]:
    """General float64 matrices (``rows × cols``) with entries from :data:`ENTRIES`."""
    # fill=nothing: every entry is drawn independently (hypothesis otherwise fills
    # most of an array with one repeated value, which hides index bugs).
    return hnp.arrays(np.float64, (rows, cols), elements=ENTRIES, fill=st.nothing())


def symmetric_matrices(d: int) -> st.SearchStrategy[np.ndarray]:
    """Exactly symmetric float64 ``d × d`` matrices ``(X + Xᵀ) / 2``."""
    return matrices(d, d).map(lambda x: (x + x.T) / 2)


def orthogonal_matrices(d: int) -> st.SearchStrategy[np.ndarray]:
    """Orthogonal float64 ``d × d`` matrices: ``Q`` of a Householder QR of a drawn matrix.

    Householder QR returns an orthogonal ``Q`` (to rounding) even for a
    singular or zero input, so no draw is rejected.  Signs are fixed so that
    ``diag(R) >= 0``.
    """

    def orthogonalise(x: np.ndarray) -> np.ndarray:
        q, r = np.linalg.qr(x)
        signs = np.where(np.diag(r) < 0, -1.0, 1.0)
        return q * signs

    return matrices(d, d).map(orthogonalise)


@st.composite
def spd_matrices(draw: st.DrawFn, d: int, cond: float = 1e3, scale: float = 1.0) -> np.ndarray:
    """SPD float64 ``d × d`` matrices with condition number ``cond`` (up to rounding).

    Eigenvalues are ``scale · exp(ℓ_i)`` with ``ℓ`` drawn in ``[−log cond, 0]``;
    for ``d >= 2`` the largest is pinned to ``0`` and the smallest to
    ``−log cond``.  The result is symmetrised exactly.

    Args:
        draw: Hypothesis' draw function.
        d: Matrix size.
        cond: Condition number ``λ_max / λ_min`` (>= 1).
        scale: Largest eigenvalue.
    """
    basis = draw(orthogonal_matrices(d))
    log_cond = float(np.log(cond))
    logs = draw(
        hnp.arrays(
            np.float64, (d,), elements=st.floats(-log_cond, 0.0, width=64), fill=st.nothing()
        )
    )
    if d >= 2:
        logs[0], logs[-1] = 0.0, -log_cond
    spd = (basis * (scale * np.exp(logs))) @ basis.T
    return (spd + spd.T) / 2


def parametric_structure_names(max_param: int = 6) -> st.SearchStrategy[str]:
    """``block<b>diagonal`` and ``hierarchical<K1>_<K2>`` with parameters in ``[1, max_param]``."""
    param = st.integers(1, max_param)
    return st.one_of(
        param.map(lambda b: f"block{b}diagonal"),
        st.tuples(param, param).map(lambda k: f"hierarchical{k[0]}_{k[1]}"),
    )


def structure_names(max_param: int = 6) -> st.SearchStrategy[str]:
    """Every name of :data:`STRUCTURE_NAMES` plus drawn parametric names."""
    return st.one_of(st.sampled_from(STRUCTURE_NAMES), parametric_structure_names(max_param))


def rngs() -> st.SearchStrategy[np.random.Generator]:
    """numpy generators from a drawn seed (for ``Structure.random_member``)."""
    return st.integers(0, 2**32 - 1).map(np.random.default_rng)
