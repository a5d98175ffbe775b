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

Three kinds of instance exist: :data:`FLOAT64`, :func:`mpmath_numbers` and
:func:`emulated_numbers` (bfloat16 / float16 arithmetic as torch does it on
CPU, SPEC §3's low-precision check: arrays are :class:`EmulatedArray`, float64
values on the storage grid whose ufuncs round every result once, products and
sums accumulated in float32).
"""

from __future__ import annotations

import contextlib
from typing import Any

import ml_dtypes
import numpy as np
import scipy.linalg
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


# ------------------------------------------------------- emulated low precision
#: The storage dtypes an emulated system can round to, by name.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}

#: The dtype matrix products and sums accumulate in (torch on CPU: ``opmath`` of bf16/fp16).
ACCUMULATION_DTYPE = np.dtype(np.float32)

_SPLITTER = 2.0**27 + 1.0  # Veltkamp's constant for float64 (53 = 2 · 26 + 1 bits)


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Veltkamp's split: ``x = hi + lo`` exactly, each half with at most 26 significant bits."""
    scaled = _SPLITTER * x
    hi = scaled - (scaled - x)
    return hi, x - hi


def _product_error(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Dekker's TwoProduct: ``a · b − p`` exactly, for ``p = fl(a · b)`` (no under/overflow)."""
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    return ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _sum_error(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Knuth's TwoSum: ``a + b − s`` exactly, for ``s = fl(a + b)``."""
    b_virtual = s - a
    return (a - (s - b_virtual)) + (b - b_virtual)


def _to_odd(value: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Round-to-odd from a round-to-nearest float64 ``value`` and the sign of its error.

    ``direction`` is ``sign(exact − value)``.  Where the error is nonzero and
    ``value``'s last significand bit is even, step one float64 ulp towards the
    exact value: the result is the exact value rounded to odd at 53 bits.
    Rounding that to nearest-even at ``p <= 51`` bits (bf16: 8, fp16: 11) is
    the correctly rounded exact value (Boldo & Melquiond, "Emulation of FMA
    and correctly rounded sums: proved algorithms using rounding to odd",
    IEEE TC 2008), so one elementwise operation rounds *once*.
    """
    value = np.asarray(value, dtype=np.float64)
    direction = np.asarray(direction, dtype=np.float64)
    even = (value.view(np.int64) & 1) == 0
    fix = even & (direction != 0) & np.isfinite(value) & np.isfinite(direction)
    if not fix.any():
        return value
    towards = np.where(direction > 0, np.inf, -np.inf)
    return np.where(fix, np.nextafter(value, towards), value)


def _exact_binary(ufunc: np.ufunc, a: Any, b: Any) -> np.ndarray:
    """``ufunc(a, b)`` for float64 operands, rounded to odd (see :func:`_to_odd`).

    Only add, subtract, multiply and divide; the error sign comes from an
    error-free transformation (TwoSum, TwoProduct, the exact remainder).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(all="ignore"):
        if ufunc is np.add:
            value = a + b
            return _to_odd(value, np.sign(_sum_error(a, b, value)))
        if ufunc is np.subtract:
            value = a - b
            return _to_odd(value, np.sign(_sum_error(a, -b, value)))
        if ufunc is np.multiply:
            value = a * b
            return _to_odd(value, np.sign(_product_error(a, b, value)))
        value = a / b
        # a − value·b is exact (a float): value·b = p + e exactly and a − p is exact (Sterbenz).
        product = value * b
        remainder = (a - product) - _product_error(value, b, product)
        return _to_odd(value, np.sign(remainder) * np.sign(b))


def _exact_sqrt(a: Any) -> np.ndarray:
    """``sqrt(a)`` for float64 ``a >= 0``, rounded to odd via the exact residual ``a − s²``."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(all="ignore"):
        value = np.sqrt(a)
        square = value * value
        residual = (a - square) - _product_error(value, value, square)
    return _to_odd(value, np.sign(residual))


#: Ufuncs whose float64 result on representable inputs is exact (rounding is the identity).
_EXACT_UFUNCS = frozenset(
    {np.negative, np.positive, np.absolute, np.maximum, np.minimum, np.sign, np.fmax, np.fmin}
)
#: Ufuncs with a non-float (boolean) result: computed on the float64 values as is.
_PREDICATE_UFUNCS = frozenset(
    {
        np.equal,
        np.not_equal,
        np.less,
        np.less_equal,
        np.greater,
        np.greater_equal,
        np.isfinite,
        np.isnan,
        np.isinf,
        np.signbit,
    }
)
_ROUNDED_BINARY = frozenset({np.add, np.subtract, np.multiply, np.divide})


def round_to(values: Any, storage: np.dtype) -> np.ndarray:
    """``values`` rounded once, to nearest even, to ``storage`` (bfloat16 or float16).

    ml-dtypes before 0.7 casts float64 to bfloat16 through float32 (two
    roundings: 1 + 2⁻⁸ + 2⁻⁴⁰ becomes 1, not 1 + 2⁻⁷), and 0.7 needs NumPy 2.
    So a float64 input goes to float32 *rounded to odd* (truncated toward
    zero, last bit set when inexact) and then to bfloat16: rounding to odd
    with 24 ≥ 8 + 2 bits, then to nearest, is one correct rounding (Boldo &
    Melquiond 2008).  float16 is NumPy's own, correct, cast.
    """
    array = np.asarray(values)
    if np.dtype(storage) != np.dtype(ml_dtypes.bfloat16) or array.dtype != np.float64:
        return array.astype(storage)
    with np.errstate(over="ignore", invalid="ignore"):
        nearest = array.astype(np.float32)
        back = nearest.astype(np.float64)
        bits = np.atleast_1d(nearest).view(np.uint32).copy()
        away = np.atleast_1d(np.abs(back) > np.abs(array))  # rounded away from zero
        bits[away] -= np.uint32(1)  # one float32 step back toward zero (sign-magnitude)
        bits[np.atleast_1d(back != array)] |= np.uint32(1)  # sticky bit: round to odd
    return bits.view(np.float32).reshape(array.shape).astype(storage)


class EmulatedArray(np.ndarray):
    """A float64 array whose entries lie on a low-precision grid (bf16 or fp16).

    Design (why a subclass): the oracle's maths (``reference.updates``,
    ``structures``, ``statistics``, ``kfac``) is plain numpy on arrays of a
    :class:`Numbers` system.  Overriding ``__array_ufunc__`` makes every
    operator and ufunc call on such an array (``@``, ``+``, ``−``, ``×``,
    ``÷``, ``sqrt``, ``np.sum``/``.sum``/``np.trace`` via ``add.reduce``)
    compute its result and round it *once* to the storage dtype, so that maths
    runs unchanged in emulated precision, with no second copy to drift from
    the float64 one.  The arithmetic model (torch on CPU):

    * ``matmul`` and ``add.reduce`` (sums, traces, :meth:`mean`) accumulate in
      float32: the operands are cast to float32 (exact, a bf16/fp16 value is a
      float32 value), numpy computes in float32 (BLAS ``sgemm``/``ssyrk``,
      pairwise summation; forward error <= ``γ_n |A||B|``, Higham Thm 3.5) and
      the float32 result is rounded to the storage dtype once.
    * ``+ − × ÷`` and ``sqrt`` (also with float64 scalars such as ``β1``) are
      correctly rounded: the float64 result is rounded to odd with an
      error-free transformation and then to nearest-even in the storage dtype,
      which equals rounding the exact value once (:func:`_to_odd`).
    * negation, ``abs``, ``max``/``min`` (also ``.max()``), ``sign`` are exact;
      comparisons and ``isfinite`` return plain boolean arrays.
    * any other ufunc, and ``accumulate``/``outer``/``at``, raise
      ``TypeError``, so an unmodelled operation cannot pass silently.

    Plain arrays and Python/numpy scalars mixed in are taken as exact float64
    numbers (masks, ``np.eye``, hyper-parameters); a ``matmul`` operand that is
    a plain array is first rounded to the storage dtype (torch multiplies only
    tensors of one dtype).  Slices, transposes and reshapes are views of the
    same class.  Rounding to the storage dtype is numpy's ``astype`` to
    ``ml_dtypes.bfloat16`` / ``np.float16``: round-to-nearest-even, correctly
    rounded also from float64 (torch's ``.to(bfloat16)`` from float64 rounds
    via float32, a double rounding; from float32 the two agree bitwise).

    Attributes:
        storage: The storage dtype (``ml_dtypes.bfloat16`` or ``np.float16``).
    """

    storage: np.dtype

    def __array_finalize__(self, obj: Any) -> None:
        """Carry the storage dtype to views and copies."""
        self.storage = getattr(obj, "storage", getattr(self, "storage", None))

    # ------------------------------------------------------------- helpers
    def _round(self, values: Any) -> EmulatedArray:
        """``values`` rounded once to the storage dtype, as an array of this class."""
        with np.errstate(over="ignore"):  # overflow to ±inf is the modelled rounding
            rounded = round_to(values, self.storage)
        return _view(rounded.astype(np.float64), self.storage)

    @staticmethod
    def _plain(x: Any) -> Any:
        """``x`` without the subclass (a float64 ndarray view), scalars unchanged."""
        return x.view(np.ndarray) if isinstance(x, EmulatedArray) else x

    @property
    def eps(self) -> float:
        """Spacing of the storage dtype at 1 (``2**-7`` bf16, ``2**-10`` fp16)."""
        return float(ml_dtypes.finfo(self.storage).eps)

    def _matmul(self, a: Any, b: Any) -> EmulatedArray:
        """``a @ b`` accumulated in float32, rounded once."""
        plain = [self._plain(x) for x in (a, b)]
        if plain[0].ndim == 2 and _is_transpose(plain[0], plain[1]):
            left = plain[0].astype(ACCUMULATION_DTYPE)
            return self._round(left @ left.T)  # numpy's syrk path: exactly symmetric
        operands = [
            x if isinstance(y, EmulatedArray) else round_to(x, self.storage)
            for x, y in zip(plain, (a, b), strict=True)
        ]
        left, right = (np.asarray(x).astype(ACCUMULATION_DTYPE) for x in operands)
        return self._round(left @ right)

    def _reduce(self, ufunc: np.ufunc, value: Any, kwargs: dict[str, Any]) -> EmulatedArray:
        """``ufunc.reduce``: sums in float32 then rounded once; max/min exact."""
        if kwargs.pop("dtype", None) is not None:
            raise TypeError("an emulated reduction accumulates in float32; dtype= is not supported")
        if ufunc is np.add:
            initial = kwargs.pop("initial", None)
            total = np.add.reduce(self._plain(value).astype(ACCUMULATION_DTYPE), **kwargs)
            if initial is not None:
                total = total + np.float32(initial)
            return self._round(total)
        if ufunc in (np.maximum, np.minimum, np.fmax, np.fmin):
            return self._round(ufunc.reduce(self._plain(value), **kwargs))
        raise TypeError(f"emulated arithmetic does not model {ufunc.__name__}.reduce")

    # ------------------------------------------------------------ protocol
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        """Compute ``ufunc`` with one rounding to the storage dtype (class docstring)."""
        storages = {x.storage for x in inputs if isinstance(x, EmulatedArray)}
        if len(storages) != 1:
            raise TypeError(f"cannot mix emulated storage dtypes {sorted(map(str, storages))}")
        out = kwargs.pop("out", None)
        if method == "reduce":
            result = self._reduce(ufunc, inputs[0], kwargs)
        elif method != "__call__":
            raise TypeError(f"emulated arithmetic does not model {ufunc.__name__}.{method}")
        elif kwargs:
            raise TypeError(f"emulated {ufunc.__name__} takes no keyword arguments, got {kwargs}")
        elif ufunc is np.matmul:
            result = self._matmul(*inputs)
        elif ufunc in _PREDICATE_UFUNCS:
            return ufunc(*(self._plain(x) for x in inputs))
        elif ufunc in _ROUNDED_BINARY:
            result = self._round(_exact_binary(ufunc, *(self._plain(x) for x in inputs)))
        elif ufunc is np.sqrt:
            result = self._round(_exact_sqrt(self._plain(inputs[0])))
        elif ufunc in _EXACT_UFUNCS:
            result = self._round(ufunc(*(self._plain(x) for x in inputs)))
        else:
            raise TypeError(f"emulated arithmetic does not model the ufunc {ufunc.__name__}")
        if out is None:
            return result
        (target,) = out
        np.copyto(self._plain(target), self._plain(result))
        return target

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        """Copying functions (``concatenate``, ``stack``) keep the class; others as numpy does."""
        if func in _COPYING_FUNCTIONS:
            plain = func(*_plain_tree(args), **_plain_tree(kwargs))
            return _view(plain, self.storage)
        return super().__array_function__(func, types, args, kwargs)

    def trace(  # type: ignore[override]
        self, offset: int = 0, axis1: int = 0, axis2: int = 1, dtype: Any = None, out: Any = None
    ) -> EmulatedArray:
        """``np.trace``: the diagonal's sum accumulated in float32, rounded once (a 0-d array)."""
        if dtype is not None or out is not None:
            raise TypeError("emulated trace takes no dtype= or out=")
        return np.diagonal(self, offset, axis1, axis2).sum(axis=-1)

    def mean(  # type: ignore[override]
        self, axis: Any = None, dtype: Any = None, out: Any = None, **kwargs: Any
    ) -> EmulatedArray:
        """Mean as torch computes it: float32 sum divided in float32, rounded once."""
        if dtype is not None or out is not None or set(kwargs) - {"keepdims"}:
            raise TypeError("emulated mean takes only axis= and keepdims=")
        plain = self._plain(self).astype(ACCUMULATION_DTYPE)
        return self._round(np.mean(plain, axis=axis, **kwargs))

    def __repr__(self) -> str:
        return f"EmulatedArray({np.asarray(self).tolist()!r}, storage={self.storage})"


#: numpy functions that only copy entries (exact): their result keeps the emulated class.
_COPYING_FUNCTIONS = frozenset({np.concatenate, np.stack, np.hstack, np.vstack})


def _plain_tree(x: Any) -> Any:
    """``x`` with every EmulatedArray inside lists/tuples/dicts replaced by a plain view."""
    if isinstance(x, EmulatedArray):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain_tree(v) for v in x)
    if isinstance(x, dict):
        return {key: _plain_tree(v) for key, v in x.items()}
    return x


def _is_transpose(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``b`` is the transpose view of the 2-D array ``a`` (same memory)."""
    return (
        b.ndim == 2
        and b.shape == a.shape[::-1]
        and b.strides == a.strides[::-1]
        and b.__array_interface__["data"][0] == a.__array_interface__["data"][0]
    )


def _view(values: np.ndarray, storage: np.dtype) -> EmulatedArray:
    """The float64 array ``values`` (already on the storage grid) viewed as an EmulatedArray."""
    result = np.asarray(values, dtype=np.float64).view(EmulatedArray)
    result.storage = np.dtype(storage)
    return result


def wrap(values: Any, storage: np.dtype) -> EmulatedArray:
    """A float64 copy of ``values`` as an :class:`EmulatedArray` (values must be representable).

    Raises:
        ValueError: If some entry is not exactly representable in ``storage``.
    """
    values = np.array(values, dtype=np.float64)
    if not np.array_equal(values.astype(storage).astype(np.float64), values, equal_nan=True):
        raise ValueError(f"values are not representable in {storage}")
    return _view(values, storage)


def same_system(values: Any, like: Any) -> Any:
    """``values`` in the number system of ``like``: an :class:`EmulatedArray` if ``like`` is one.

    For code that builds arrays by copying (``np.zeros`` then assignment, e.g.
    the patches of a convolution): the copies are exact, so no rounding is
    involved; ``values`` is returned as is when ``like`` is not emulated.
    """
    if isinstance(like, EmulatedArray):
        return wrap(values, like.storage)
    return values


def _mpf_to_float64_odd(value: Any) -> float:
    """An ``mpf`` (or any real) rounded to odd at float64 (see :func:`_to_odd`)."""
    nearest = float(value)
    exact = mp.mpf(value)
    direction = 0.0 if mp.mpf(nearest) == exact else (1.0 if exact > nearest else -1.0)
    return float(_to_odd(np.float64(nearest), np.float64(direction)))


class EmulatedNumbers(Numbers):
    """Emulated bfloat16 / float16 arithmetic with float32 accumulation (torch on CPU).

    Arrays are :class:`EmulatedArray` (float64 values on the storage grid);
    every SPEC-level operation rounds its result once to the storage dtype,
    products and sums accumulated in float32 (:class:`EmulatedArray`).

    Attributes:
        name: ``"emulated-bfloat16"`` or ``"emulated-float16"``.
        storage: The storage dtype's name, ``"bfloat16"`` or ``"float16"``.
        accumulation: The accumulation dtype's name, ``"float32"``.
        eps: Spacing of the storage dtype at 1: ``2**-7`` (bf16), ``2**-10`` (fp16).
        dps: ``None`` (not an mpmath system).
    """

    def __init__(self, storage: str) -> None:
        """Make an emulated system.

        Args:
            storage: ``"bfloat16"`` or ``"float16"``.

        Raises:
            ValueError: On another storage name.
        """
        if storage not in _STORAGE_DTYPES:
            raise ValueError(f"storage must be one of {sorted(_STORAGE_DTYPES)}, got {storage!r}")
        self.dps = None
        self.storage = storage
        self.storage_dtype = _STORAGE_DTYPES[storage]
        self.accumulation = ACCUMULATION_DTYPE.name
        self.name = f"emulated-{storage}"
        self.eps = float(ml_dtypes.finfo(self.storage_dtype).eps)

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """No global state to set: a no-op."""
        return contextlib.nullcontext()

    def scalar(self, x: Any) -> EmulatedArray:
        """``x`` rounded to the storage dtype, as a 0-d array (so later operations round)."""
        return self.asarray(x)

    def asarray(self, x: Any) -> EmulatedArray:
        """``x`` (array-like, float or ``mpf``) correctly rounded to the storage dtype.

        ``mpf`` entries are rounded to odd at float64 first (exact double rounding).
        """
        source = np.asarray(x)
        if source.dtype == object:
            source = np.array([_mpf_to_float64_odd(v) for v in source.flat]).reshape(source.shape)
        rounded = round_to(np.asarray(source, dtype=np.float64), self.storage_dtype)
        return _view(rounded.astype(np.float64), self.storage_dtype)

    def sqrt(self, x: Any) -> EmulatedArray:
        """Square root, correctly rounded to the storage dtype."""
        return np.sqrt(self.asarray(x))

    def inv(self, m: np.ndarray) -> EmulatedArray:
        """Dense inverse computed in float32 (LAPACK ``sgetrf``/``sgetri``), rounded once.

        torch has no bf16/fp16 inverse (SPEC §1.2); the emulated oracle upcasts to
        the accumulation dtype as KFAC in half precision must.

        Raises:
            ValueError: If ``m`` is not square.
        """
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"inv needs a square matrix, got shape {m.shape}")
        matrix = np.asarray(self.asarray(m)).astype(ACCUMULATION_DTYPE)
        return self.asarray(scipy.linalg.inv(matrix))

    def to_float64(self, x: Any) -> np.ndarray:
        """``x`` as a plain float64 array (exact: stored values are float64)."""
        return np.array(x, dtype=np.float64)


def emulated_numbers(storage: str) -> EmulatedNumbers:
    """Emulated ``"bfloat16"`` or ``"float16"`` arithmetic, accumulating in float32."""
    return EmulatedNumbers(storage)
