"""Cases for the generic structure tests: structure × dimension × width × dtype.

A case is drawn as plain numbers (sizes, a dtype, a seed); the matrices are
made from the seed by the oracle (:mod:`reference.structures`), so a failing
case is reproduced exactly from its printout.  Low-precision inputs are drawn
in float64 and rounded once to the case's dtype; every reference is computed
in float64 from the *rounded* numbers, so a bound covers only the operation's
own rounding.

Nonzero entries have magnitudes in ``[1/2, ∞)`` (a standard-normal draw ``x``
becomes ``sign(x)·(1/2 + |x|/2)``), and drawn scalars are 0 or of magnitude at
least ``1/16``, so no product of two numbers underflows, even in fp16: the
rounding model of ``tests/tolerances.py`` (no underflow) holds.  The map keeps
zeros and constant diagonals, so members stay members.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

from reference.structures import Structure
from reference.structures import get_structure as oracle_structure
from singd.structures import StructuredMatrix, get_structure

DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

#: Sizes that hit every edge of the registered structures: d = 1, d below a
#: block (3, 30), d not a multiple of it, and the three hierarchical regimes
#: of (2, 3) and (15, 15) (d ≤ K1, K1 < d ≤ K1 + K2, d > K1 + K2).
EDGE_DIMS: tuple[int, ...] = (1, 2, 4, 5, 6, 15, 29, 30, 31, 33)

#: Scalars for scale/add: zero or of magnitude in [1/16, 4] (no underflow).
SCALARS: st.SearchStrategy[float] = st.one_of(
    st.just(0.0), st.floats(1 / 16, 4.0, width=32), st.floats(-4.0, -1 / 16, width=32)
)

MAX_DIM = 40  # fp16/bf16 matmuls are slow on CPU; 40 covers every edge above
MAX_COLS = 8


@dataclass(frozen=True)
class Case:
    """One drawn case: ``dim × dim`` members, ``dim × cols`` dense operands, in ``dtype``."""

    name: str
    dim: int
    cols: int
    dtype: torch.dtype
    seed: int

    @property
    def oracle(self) -> Structure:
        return oracle_structure(self.name)

    @property
    def cls(self) -> type[StructuredMatrix]:
        return get_structure(self.name)

    def rng(self, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream])

    def round(self, array: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """``array`` moved away from zero (module docstring) and rounded to the dtype.

        Returns:
            The rounded torch tensor and its exact float64 value.
        """
        away = np.sign(array) * (0.5 + np.abs(array) / 2)
        rounded = torch.from_numpy(away).to(self.dtype)
        return rounded, rounded.double().numpy()

    def member(self, stream: int = 0) -> tuple[StructuredMatrix, np.ndarray]:
        """A general (non-symmetric) member and its exact dense float64 value."""
        tensor, dense = self.round(self.oracle.random_member(self.dim, self.rng(stream)))
        return self.cls.from_dense(tensor), dense

    def dense(self, rows: int, cols: int, stream: int) -> tuple[torch.Tensor, np.ndarray]:
        """A standard-normal ``rows × cols`` matrix, rounded (torch) and exact (float64)."""
        return self.round(self.rng(stream).standard_normal((rows, cols)))


def cases(
    name: str, dtypes: tuple[torch.dtype, ...] = DTYPES, max_dim: int = MAX_DIM
) -> st.SearchStrategy[Case]:
    """Cases for structure ``name``: edge sizes or any ``1 ≤ d ≤ max_dim``."""
    return st.builds(
        Case,
        name=st.just(name),
        dim=st.one_of(st.sampled_from(EDGE_DIMS), st.integers(1, max_dim)),
        cols=st.integers(1, MAX_COLS),
        dtype=st.sampled_from(dtypes),
        seed=st.integers(0, 2**32 - 1),
    )


def assert_within(
    actual: torch.Tensor,
    expected: np.ndarray,
    magnitude: np.ndarray,
    bound: float,
    absolute: np.ndarray | float = 0.0,
) -> None:
    """``|actual − expected| ≤ bound · magnitude + absolute`` entry by entry.

    ``bound · magnitude`` is Higham's componentwise form; ``absolute`` carries
    normwise bounds (the Toeplitz FFT path).  Entries whose allowance is zero
    (outside the pattern) must match exactly.
    """
    got = actual.double().numpy()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    error = np.abs(got - expected)
    allowed = bound * magnitude + absolute
    worst = np.unravel_index(np.argmax(error - allowed), error.shape) if error.size else None
    assert (error <= allowed).all(), (
        f"error {error[worst]:.3g} > allowed {allowed[worst]:.3g} at {worst} (bound {bound:.3g})"
    )
