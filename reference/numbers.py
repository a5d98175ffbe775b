"""The oracle's number systems: float64 and mpmath, behind one interface.

The oracle's maths is written once, against a :class:`Numbers` instance: a
matrix is a numpy array whose elements are either ``float64`` or
``mpmath.mpf``, and every array operation (``@``, ``+``, ``*``, ``.T``,
slicing, ``np.trace``, ``np.diag``) is plain numpy, which works on ``object``
arrays of ``mpf`` element by element.  Only the few operations numpy cannot
do on ``mpf`` (square root, dense inverse, conversions) go through the
instance.  ``mpf`` arithmetic rounds to mpmath's *global* working precision,
so any computation that needs the instance's precision runs inside
``numbers.context()``.

Two kinds of instance exist: :data:`FLOAT64` and :func:`mpmath_numbers`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from mpmath import mp


class Numbers:
    """A number system for the oracle (SPEC §3: float64 and arbitrary precision).

    Attributes:
        name: ``"float64"`` or ``"mpmath<dps>"`` (e.g. ``"mpmath50"``).
        dps: Decimal digits of an mpmath system; ``None`` for float64.
        eps: Spacing of the numbers at 1 (``2**-52`` for float64,
            ``2**(1 - prec)`` for mpmath with ``prec`` bits).
    """

    def __init__(self, dps: int | None) -> None:
        """Make a number system.

        Args:
            dps: ``None`` for float64, else the mpmath decimal precision (>= 16).

        Raises:
            ValueError: If ``dps`` is below float64's 16 digits.
        """
        if dps is not None and dps < 16:
            raise ValueError(f"mpmath precision dps={dps} is below float64's 16 digits")
        self.dps = dps
        if dps is None:
            self.name = "float64"
            self.eps = float(np.finfo(np.float64).eps)
        else:
            self.name = f"mpmath{dps}"
            with mp.workdps(dps):
                self.eps = float(mp.eps)

    @property
    def is_mpmath(self) -> bool:
        """Whether elements are ``mpmath.mpf`` (object arrays)."""
        return self.dps is not None

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """The precision to compute in: ``mp.workdps(dps)``, or a no-op for float64."""
        if self.dps is None:
            return contextlib.nullcontext()
        return mp.workdps(self.dps)

    def scalar(self, x: Any) -> Any:
        """``x`` as a number of this system (``np.float64`` or ``mpf``)."""
        if self.dps is None:
            return np.float64(x)
        with self.context():
            return mp.mpf(x)

    def asarray(self, x: Any) -> np.ndarray:
        """``x`` (array-like) as a float64 array or an object array of ``mpf``.

        Floats convert exactly to ``mpf`` (53 bits fit in ``prec`` bits);
        ``mpf`` of another precision are rounded to this one.
        """
        if self.dps is None:
            return np.array(x, dtype=np.float64)
        source = np.asarray(x, dtype=object)
        with self.context():
            converted = [mp.mpf(value) for value in source.flat]
        result = np.empty(source.shape, dtype=object)
        result.flat[:] = converted
        return result

    def zeros(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """An array of zeros of this system, of the given shape."""
        return self.asarray(np.zeros(shape))

    def eye(self, n: int) -> np.ndarray:
        """The ``n × n`` identity of this system."""
        return self.asarray(np.eye(n))

    def sqrt(self, x: Any) -> Any:
        """Square root of a scalar of this system."""
        if self.dps is None:
            return np.sqrt(np.float64(x))
        with self.context():
            return mp.sqrt(x)

    def inv(self, m: np.ndarray) -> np.ndarray:
        """Dense inverse of a square matrix ``m`` (``n × n``) of this system.

        Raises:
            ValueError: If ``m`` is not square.
        """
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"inv needs a square matrix, got shape {m.shape}")
        if self.dps is None:
            return np.linalg.inv(np.asarray(m, dtype=np.float64))
        n = m.shape[0]
        with self.context():
            inverse = mp.inverse(mp.matrix(self.asarray(m).tolist()))
            return self.asarray([[inverse[i, j] for j in range(n)] for i in range(n)])

    def to_float64(self, x: Any) -> np.ndarray:
        """``x`` (array or scalar of this system) rounded to float64, for comparison."""
        return np.asarray(x, dtype=np.float64)

    def __repr__(self) -> str:
        return f"Numbers({self.name})"


#: IEEE double precision.
FLOAT64 = Numbers(None)


def mpmath_numbers(dps: int = 50) -> Numbers:
    """The mpmath number system with ``dps`` decimal digits (default 50)."""
    return Numbers(dps)
