"""Entrywise running error bounds of one SINGD step, under an arithmetic model.

The bound of a state entry is obtained by evaluating the step a second
time, in float64, on :class:`Bounded` values: an exact value together with
an entrywise bound on how far the implementation's computed value may be
from it.  Every operation follows the implementation's evaluation order
(:mod:`singd.optim.updates`, :mod:`singd.optim.statistics`) and charges the
rounding its :class:`~verification.arithmetic.ArithmeticModel` says it
makes, so in bfloat16 with float32 accumulation a product costs about half
an ulp of its result instead of ``(n + 2)`` ulps of ``|A||B|``.

Rules (rigorous, not just first order, for ``x̂ = x + δx`` with
``|δx| ≤ e_x`` entrywise):

* product ``z = x y`` (reduction ``n``): ``|x̂ŷ − xy| ≤ |x|e_y + e_x|y| + e_x e_y``
  (propagated) and the computed product adds ``γ_n(u_a)·(|x| + e_x)(|y| + e_y)``
  (accumulation, Higham Thm. 3.5) and one rounding ``u_s`` of the stored
  result, ``u_s·(|z| + propagated + accumulated)``;
* a Toeplitz product on the FFT path (``d ≥ FFT_MIN_DIM``) replaces the
  accumulation term by the normwise FFT bound of every column
  ``(2α + 2ε_a)‖t‖₂‖x_j‖₂ + α‖t‖₁‖x_j‖₂`` with ``α = 5·log₂(n)·ε_a``
  (Higham §24.1; ``‖t ∗ x‖₂ ≤ ‖t‖₁‖x‖₂``, Young), and the Π̂ of a Gram
  matrix by the lag-product bound ``(2α + (m + 3)ε_a)‖Y‖_F² + α‖r‖₂``;
* elementwise ``a + αb``, ``s·a``: propagated errors plus ``store·|result|``
  (computed in the elementwise dtype, rounded once);
* a sum of ``n`` terms (trace, mean): ``reduction(n)·Σ|terms|``;
* Π̂ (linear, nonnegative weights): the errors of ``Π̂(M)`` are at most
  ``Π̂(max(E, Eᵀ))`` (mask structures copy or add two entries, exactly);
  Toeplitz means add one accumulated sum and one division.

The comparison adds the float64 oracle's own rounding (the same evaluation
under the float64 model) to the implementation's: both are computed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from reference.structures import Structure, get_structure
from reference.updates import SINGDHyperparameters, SINGDState, StepRecord, lr_cov_at
from singd.optim.updates import outer_pays_for_one_product, self_inner_scale
from singd.structures import get_structure as get_singd_structure
from singd.structures.toeplitz import FFT_MIN_DIM, fft_length
from verification.arithmetic import ArithmeticModel, Precision, model_for

_TOEPLITZ = ("triltoeplitz", "triutoeplitz")

#: Structures whose kernels sum up to three separately rounded block products per entry
#: (``singd.structures.hierarchical``: ``B1ᵀX1 + c ⊙ X2 + DᵀX3``; ``singd.structures.
#: recursive``: ``D X`` plus the spread or gather, the products of two members).
_SUMMED_KERNELS = (
    "hierarchical",
    "triltopleftdiagonal",
    "trilbottomrightdiagonal",
    "triutopleftdiagonal",
    "triubottomrightdiagonal",
)


def kernel_terms(name: str) -> int:
    """Rounded parts per entry of a product with a factor of structure ``name``."""
    return 3 if name.startswith(_SUMMED_KERNELS) else 1


def trace_terms(name: str) -> int:
    """Separately rounded partial sums of ``trace()`` (then added, each sum rounded again).

    ``block<b>diagonal``: full blocks + last block; ``hierarchical``: ``tr A + Σc + tr E``;
    the recursive forms: ``Σa + Σc``.  Dense, diagonal, tril/triu, Toeplitz: one sum.
    """
    if name.startswith("hierarchical"):
        return 3
    if name.startswith("block") or name.startswith(_SUMMED_KERNELS[1:]):
        return 2
    return 1


def square_entries(name: str, dim: int) -> np.ndarray:
    """Diagonal entries of ``project_gram`` formed as ``(x * x).sum()``: squares rounded first.

    ``Diagonal`` and the recursive forms (``_row_norms_squared``) square every row
    elementwise, ``Hierarchical`` the middle rows (``c``); those squares are stored
    numbers (one rounding each) before the sum accumulates them.
    """
    mask = np.zeros(dim, dtype=bool)
    if name == "diagonal" or name.startswith(_SUMMED_KERNELS[1:]):
        mask[:] = True
    elif name.startswith("hierarchical"):
        k1, m, _ = get_singd_structure(name).block_sizes(dim)
        mask[k1 : k1 + m] = True
    return mask


#: Errors are capped here: a bound this large says nothing, and the cap keeps it finite
#: (a bound propagated over many steps can overflow float64; inf·0 would give nan).
VACUOUS = 1e150


@dataclass(frozen=True)
class Bounded:
    """An exact value and an entrywise bound on the computed value's error.

    Attributes:
        value: The exact value (float64 array or scalar).
        error: Entrywise bound, same shape, nonnegative, at most :data:`VACUOUS`.
    """

    value: np.ndarray
    error: np.ndarray

    def capped(self) -> Bounded:
        """The same with non-finite or huge error entries set to :data:`VACUOUS`."""
        if np.all(self.error <= VACUOUS):  # False for nan and inf
            return self
        error = np.nan_to_num(self.error, nan=VACUOUS, posinf=VACUOUS)
        return Bounded(self.value, np.minimum(error, VACUOUS))

    @property
    def magnitude(self) -> np.ndarray:
        """``|value| + error``: a bound on the computed value's magnitude."""
        return np.abs(self.value) + self.error

    @property
    def T(self) -> Bounded:
        """The transpose (exact)."""
        return Bounded(self.value.T, self.error.T)


def exact(value: np.ndarray | float) -> Bounded:
    """A value the implementation knows exactly (recorded inputs, the state a step starts from)."""
    value = np.asarray(value, dtype=np.float64)
    return Bounded(value, np.zeros_like(value))


class Arithmetic:
    """The rounding of one storage dtype: the implementation's model plus the oracle's float64.

    Every rounding term is the sum of the terms of both models (the computed
    implementation value and the computed oracle value each err from the
    exact one).
    """

    def __init__(self, model: ArithmeticModel) -> None:
        self.models = (model, model_for(torch.float64))  # the oracle: float64 numpy on the CPU

    def _sum(self, name: str, *args: float) -> float:
        """``name`` (a rule called with ``args``, or a number) summed over both models."""
        total = 0.0
        for model in self.models:
            value = getattr(model, name)
            total += value(*args) if callable(value) else value
        return total

    @property
    def unit(self) -> float:
        """Rounding of one stored value (``u_s`` of both models)."""
        return self._sum("unit")

    @property
    def store(self) -> float:
        """Rounding of one elementwise result."""
        return self._sum("store")

    @property
    def store_tiny(self) -> float:
        """Absolute underflow error of one elementwise result (``η``, both models)."""
        return self._sum("elementwise_tiny")

    @property
    def tiny(self) -> float:
        """Absolute underflow error of one rounding to storage (``η_s``, both models)."""
        return self._sum("tiny")

    def _final_tiny(self) -> float:
        return sum(model.tiny for model in self.models if model.final_unit)

    def _accumulation_tiny(self, n: int) -> float:
        """``n`` products in the accumulation dtype, each of which may underflow."""
        return max(n, 1) * self._sum("accumulation_tiny")

    def scalar_error(self, value: float) -> float:
        """``|α − fl(α)|`` of a Python scalar handed to a kernel (its opmath dtype)."""
        return self._sum("scalar_error", value)

    def scalar_unit(self) -> float:
        """Unit roundoff of converting an inexactly known Python scalar to the opmath dtype."""
        return sum(
            0.0 if model.elementwise == torch.float64 else model.elementwise_unit
            for model in self.models
        )

    def reduction(self, n: int) -> float:
        """Relative error of a sum of ``n`` terms (to ``Σ|terms|``)."""
        return self._sum("reduction", n)

    def _accumulation(self, n: int) -> float:
        """The partial sums of a product (the product rule without its final rounding)."""
        return self._sum("accumulated", n)

    def _final(self) -> float:
        return self._sum("final_unit")

    def fft_alpha(self, dim: int) -> float:
        """Normwise error of one FFT of length ``fft_length(dim)``: ``5·log₂(n)·ε_a`` (both)."""
        log_n = max(math.log2(fft_length(dim)), 1.0)
        return sum(5 * log_n * 2 * model.accumulation_unit for model in self.models)

    def fft_epsilon(self) -> float:
        """``ε_a`` of both models."""
        return sum(2 * model.accumulation_unit for model in self.models)

    # ------------------------------------------------------------ operations
    def product(
        self,
        x: Bounded,
        y: Bounded,
        *,
        toeplitz_fft: bool = False,
        structured: bool = False,
        terms: int = 1,
    ) -> Bounded:
        """``x @ y`` (module docstring).

        ``toeplitz_fft``: ``x`` is a Toeplitz factor on the FFT path;
        ``structured``: ``y`` is Toeplitz too, so only the first column is
        computed and every entry carries its (largest) column bound.
        ``terms``: the kernel forms each entry as a sum of up to ``terms``
        separately rounded block products (hierarchical, recursive forms):
        the ``terms`` roundings of the parts and the ``terms − 2`` inner sums
        add at most ``(terms − 1)·u_s·|x||y|`` to the final rounding (every
        part and partial sum is at most ``|x||y|``).
        """
        value = x.value @ y.value
        propagated = np.abs(x.value) @ y.error + x.error @ np.abs(y.value) + x.error @ y.error
        if toeplitz_fft:
            accumulated = self._fft_product_error(x, y)
            if structured:
                accumulated = np.full_like(accumulated, accumulated.max())
        else:
            accumulated = self._accumulation(x.value.shape[-1]) * (x.magnitude @ y.magnitude)
            accumulated = accumulated + self._accumulation_tiny(x.value.shape[-1])
        rounding = self._final() * (np.abs(value) + propagated + accumulated) + self._final_tiny()
        if terms > 1:
            rounding = rounding + (terms - 1) * self.unit * (x.magnitude @ y.magnitude)
            rounding = rounding + terms * self.tiny
        return Bounded(value, propagated + accumulated + rounding)

    def _fft_product_error(self, x: Bounded, y: Bounded) -> np.ndarray:
        """Normwise FFT bound per column of ``L X``, ``L`` Toeplitz (first row or column ``t``)."""
        magnitude = x.magnitude
        dim = magnitude.shape[0]
        t = np.maximum(np.abs(magnitude[:, 0]), np.abs(magnitude[0, :]))  # either triangle
        alpha, epsilon = self.fft_alpha(dim), self.fft_epsilon()
        columns = np.linalg.norm(y.magnitude, axis=0)
        per_column = (2 * alpha + 2 * epsilon) * np.linalg.norm(t) * columns
        per_column = per_column + alpha * np.abs(t).sum() * columns
        return np.broadcast_to(per_column, (dim, columns.size)).copy()

    def _converted(self, alpha: float, alpha_error: float) -> float:
        """``alpha_error`` plus the conversion of the computed ``α`` to the opmath dtype."""
        if alpha_error == 0:
            return self.scalar_error(alpha)
        return alpha_error + self.scalar_unit() * (abs(alpha) + alpha_error)

    def add(
        self,
        x: Bounded,
        y: Bounded,
        alpha: float = 1.0,
        alpha_error: float = 0.0,
        *,
        converted: bool = True,
    ) -> Bounded:
        """``x + α y`` in one kernel (``add_(y, alpha=α)``), ``|δα| ≤ alpha_error``.

        ``converted``: ``α`` is a Python float that torch first converts to its
        opmath dtype (float32 for float32/bfloat16/float16 tensors): that
        conversion errs too (:meth:`ArithmeticModel.scalar_error`).
        """
        if converted:
            alpha_error = self._converted(alpha, alpha_error)
        value = x.value + alpha * y.value
        propagated = x.error + abs(alpha) * y.error + alpha_error * y.magnitude
        rounding = self.store * (np.abs(value) + propagated) + self.store_tiny
        return Bounded(value, propagated + rounding)

    def scale(self, x: Bounded, scalar: Bounded, *, converted: bool = True) -> Bounded:
        """``s · x`` in one kernel (``mul_(s)``), with a bounded scalar ``s``.

        ``converted``: as for :meth:`add`; ``False`` for a scalar read from a
        tensor of the storage dtype (a trace), which the opmath dtype holds exactly.
        """
        s, error_s = float(scalar.value), float(scalar.error)
        if converted:
            error_s = self._converted(s, error_s)
        value = s * x.value
        propagated = abs(s) * x.error + error_s * x.magnitude
        rounding = self.store * (np.abs(value) + propagated) + self.store_tiny
        return Bounded(value, propagated + rounding)

    def scale_by_power_of_two(self, x: Bounded, power: float) -> Bounded:
        """``p · x`` (``mul_(p)``), ``p`` a power of two: exact but for underflow.

        A binary format scales by ``2^e`` exactly unless the result falls below its
        smallest normal number, where the rounding to the subnormal grid errs by
        at most the elementwise absolute term ``η``.
        """
        return Bounded(power * x.value, power * x.error + self.store_tiny)

    def add_identity(self, x: Bounded, shift: float) -> Bounded:
        """``x + shift·I`` (``add_diag_``): only the diagonal is rounded."""
        value = x.value + shift * np.eye(x.value.shape[0])
        error = x.error.copy()
        diagonal = np.diag_indices_from(error)
        shift_error = self.scalar_error(shift)
        error[diagonal] += shift_error
        error[diagonal] += self.store * (np.abs(value[diagonal]) + error[diagonal])
        error[diagonal] += self.store_tiny
        return Bounded(value, error)

    def trace(self, x: Bounded, terms: int = 1) -> Bounded:
        """``tr(x)``: a sum of ``d`` diagonal entries, accumulated and rounded once.

        ``terms`` (:func:`trace_terms`): the kernel rounds ``terms`` partial sums
        to storage and adds them (``terms − 1`` more roundings): as for
        :meth:`product`, at most ``(terms − 1)·u_s·Σ|entries|`` more, when the
        storage is narrower than the accumulation (else the ``γ_{d−1}`` of one
        sum already covers every split of it).
        """
        diagonal = np.diag(x.value)
        propagated = float(np.diag(x.error).sum())
        magnitude = float(np.abs(diagonal).sum()) + propagated
        accumulated = self.reduction(diagonal.size) * magnitude
        accumulated += (terms - 1) * self._final() * magnitude + terms * self.tiny
        return Bounded(np.float64(diagonal.sum()), np.float64(propagated + accumulated))

    def cast(self, x: Bounded, unit: float) -> Bounded:
        """Rounding to a narrower dtype with unit roundoff ``unit`` (0: no rounding)."""
        if unit == 0:
            return x
        return Bounded(x.value, x.error + unit * x.magnitude + self.models[0].tiny)

    def project_gram(
        self, structure: Structure, y: Bounded, fft: bool, squares: np.ndarray | None = None
    ) -> Bounded:
        """``Π̂(Y Yᵀ)`` as the structures compute it (Gram product, then Π̂).

        ``squares`` (:func:`square_entries`): diagonal entries the kernel forms as
        ``(y * y).sum()``, rounding every square to storage before the sum:
        ``u_s·Σ_j y_ij²`` more there, when storage is narrower than the accumulation.
        """
        if fft:
            return self._toeplitz_lags(structure, y)
        gram = self.product(y, y.T)
        if squares is not None and squares.any():
            extra = np.zeros_like(gram.error)
            index = np.flatnonzero(squares)
            magnitude = (y.magnitude**2).sum(axis=1)
            extra[index, index] = self._final() * magnitude[index] + y.value.shape[1] * self.tiny
            gram = Bounded(gram.value, gram.error + extra)
        return self.project(structure, gram)

    def project(self, structure: Structure, x: Bounded) -> Bounded:
        """``Π̂(x)`` of a (symmetric) computed matrix (module docstring)."""
        x = x.capped()
        value = structure.project(_symmetric(x.value))
        error = structure.project(np.maximum(x.error, x.error.T))
        if structure.name in _TOEPLITZ:
            dim = value.shape[0]
            counts = 2 * np.maximum(dim - np.abs(np.subtract.outer(range(dim), range(dim))), 1)
            magnitude = structure.project(np.maximum(x.magnitude, x.magnitude.T))
            error = error + self.reduction(int(counts.max())) * magnitude
            error = error + self.store * (np.abs(value) + error) + self.store_tiny
        return Bounded(value, error)

    def _toeplitz_lags(self, structure: Structure, y: Bounded) -> Bounded:
        """Π̂(Y Yᵀ) of a Toeplitz structure from FFT lag products ``r_k``.

        Each computed lag errs by ``L = (2α + (m + 3)ε_a)‖Y‖_F² + α√2‖r‖₂``
        (normwise, every lag), and entry ``k`` is ``c_k r_k`` with ``c_0 = 1/d``,
        ``c_k = 2/(d − k)``; an error ``|δY| ≤ E`` moves the Gram matrix by at
        most ``P = E|Y|ᵀ + |Y|Eᵀ + EEᵀ`` entrywise, which Π̂ (a mean of
        diagonal entries) carries over as ``Π̂(P)``.
        """
        gram = y.value @ y.value.T
        value = structure.project(_symmetric(gram))
        dim, columns = y.value.shape
        alpha, epsilon = self.fft_alpha(dim), self.fft_epsilon()
        frobenius = float(np.linalg.norm(y.magnitude)) ** 2
        lags = np.array([np.trace(gram, -k) for k in range(dim)])
        lag_error = (2 * alpha + (columns + 3) * epsilon) * frobenius
        lag_error += alpha * math.sqrt(2) * float(np.linalg.norm(lags))
        absolute = np.abs(y.value)
        moved = y.error @ absolute.T + absolute @ y.error.T + y.error @ y.error.T
        error = _lag_weights(structure, dim) * lag_error + structure.project(moved)
        return Bounded(value, error + self.store * (np.abs(value) + error) + self.store_tiny)

    def toeplitz_self_lags(self, structure: Structure, factor: Bounded) -> Bounded:
        """``Π̂(LᵀL)`` of a Toeplitz ``L`` on the FFT path: lags of ``t`` and ``w ⊙ t``.

        ``Σ_i (LᵀL)_{i+k,i} = Σ_p (d − k − p) t_p t_{p+k}``: the lag products of
        ``t`` and ``w ⊙ t`` (``w_q = d − q``) err by ``(2α + 4ε_a)‖t‖₂‖w ⊙ t‖₂
        + α√2‖r‖₂`` (two spectra, the spectral product and the weights, the
        inverse FFT), weighted by ``c_k`` as in :meth:`_toeplitz_lags`; an error
        ``|δL| ≤ E`` moves ``LᵀL`` by at most ``Eᵀ|L| + |L|ᵀE + EᵀE``.
        """
        dim = factor.value.shape[0]
        value = structure.project(_symmetric(factor.value.T @ factor.value))
        t, error_t = _toeplitz_column(factor.value), _toeplitz_column(factor.error)
        magnitude_t = np.abs(t) + error_t
        weighted = (dim - np.arange(dim)) * magnitude_t
        alpha, epsilon = self.fft_alpha(dim), self.fft_epsilon()
        lags = np.array(
            [np.dot(t[: dim - k], (dim - np.arange(k, dim)) * t[k:]) for k in range(dim)]
        )
        lag_error = (2 * alpha + 4 * epsilon) * float(
            np.linalg.norm(magnitude_t) * np.linalg.norm(weighted)
        )
        lag_error += alpha * math.sqrt(2) * float(np.linalg.norm(lags))
        absolute = np.abs(factor.value)
        moved = (
            factor.error.T @ absolute + absolute.T @ factor.error + factor.error.T @ factor.error
        )
        error = _lag_weights(structure, dim) * lag_error + structure.project(moved)
        return Bounded(value, error + self.store * (np.abs(value) + error) + self.store_tiny)


def _lag_weights(structure: Structure, dim: int) -> np.ndarray:
    """``c_k`` on diagonal ``k`` of the structure's pattern: ``1/d`` (``k = 0``), ``2/(d − k)``."""
    lag = np.abs(np.subtract.outer(np.arange(dim), np.arange(dim)))
    weights = np.where(lag == 0, 1.0 / dim, 2.0 / np.maximum(dim - lag, 1))
    return np.where(structure.mask(dim), weights, 0.0)


def _toeplitz_column(matrix: np.ndarray) -> np.ndarray:
    """The defining column ``t`` of a lower (or row of an upper) triangular Toeplitz matrix."""
    return matrix[:, 0] if np.abs(matrix[:, 0]).sum() >= np.abs(matrix[0, :]).sum() else matrix[0]


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    """``(M + Mᵀ)/2``: the exact Gram matrix, free of float64 asymmetry, for Π̂."""
    return (matrix + matrix.T) / 2


# ------------------------------------------------------------ one SINGD step
@dataclass(frozen=True)
class StepBounds:
    """Entrywise error bounds of one layer's state after one step.

    Attributes:
        K, C, m_K, m_C, W, m_W: :class:`Bounded` (value: the float64 evaluation).
    """

    K: Bounded
    C: Bounded
    m_K: Bounded
    m_C: Bounded
    W: Bounded
    m_W: Bounded
    c_K: Bounded | None = None
    c_C: Bounded | None = None


def bounded_state(state: SINGDState, errors: StepBounds | None) -> StepBounds:
    """``state``'s values with the incoming ``errors`` (``None``: exactly known)."""
    keys = ("K", "C", "m_K", "m_C", "W", "m_W")  # the compensations enter as recorded values
    if errors is None:
        return StepBounds(**{key: exact(getattr(state, key)) for key in keys})
    return StepBounds(
        **{key: Bounded(getattr(state, key), getattr(errors, key).error).capped() for key in keys}
    )


@dataclass(frozen=True)
class StatisticPass:
    """One pass's ``A``, ``G`` with magnitude bounds of the values they average.

    Attributes:
        a, g: The oracle's scaled statistics (``n × d_i``, ``n × d_o``).
        a_abs, g_abs: The same statistics of ``|a|``, ``|g|`` (``≥ |A|``, ``|G|``).
        a_error, g_error: Bounds on how far the statistics of the rows the model
            computed lie from ``a``, ``g`` (0: the model's rows are the oracle's, as
            recorded; an MHA's internal rows are computed by both, SPEC §1.6).
    """

    a: np.ndarray
    g: np.ndarray
    a_abs: np.ndarray
    g_abs: np.ndarray
    a_error: np.ndarray | float = 0.0
    g_error: np.ndarray | float = 0.0


def _statistic(
    arith: Arithmetic,
    value: np.ndarray,
    magnitude: np.ndarray,
    cast: float,
    shared: int,
    error: np.ndarray | float = 0.0,
) -> Bounded:
    """A scaled statistic: cast to the factor dtype, mean/sum over ``shared`` positions, scaling.

    The scaling ``rows / sqrt(n)`` (``rows * sqrt(N)``) divides by a Python float that
    torch converts to its opmath dtype first (:meth:`Arithmetic.scalar_unit`), and a
    mean divides its float32 sum by the count before the rounding to storage.
    """
    relative = cast + arith.reduction(shared) + arith.store + arith.scalar_unit()
    if shared > 1:  # a mean: the sum divided by the count in the accumulation dtype
        relative += arith._sum("accumulation_unit")
    return Bounded(value, relative * magnitude + 3 * arith.store_tiny + error)


def _is_fft(name: str, dim: int) -> bool:
    return name in _TOEPLITZ and dim >= FFT_MIN_DIM


def _summed_h(
    arith: Arithmetic,
    structure: Structure,
    name: str,
    factor: Bounded,
    statistics: Sequence[Bounded],
) -> Bounded:
    """``Σ_passes Π̂((Kᵀ Aᵀ)(Kᵀ Aᵀ)ᵀ)`` (hooks: one ``project_inner`` per pass, then sums)."""
    fft = _is_fft(name, factor.value.shape[0])
    total = None
    for statistic in statistics:
        y = arith.product(factor.T, statistic.T, toeplitz_fft=fft, terms=kernel_terms(name))
        h = arith.project_gram(structure, y, fft, square_entries(name, y.value.shape[0]))
        total = h if total is None else arith.add(total, h)
    assert total is not None
    return total


def _gram(
    arith: Arithmetic, structure: Structure, name: str, factor: Bounded, power: float
) -> Bounded:
    """``Π̂((pK)ᵀ(pK))`` (``singd_self_inners``: ``mul_(p)``, then ``project_self_inner``)."""
    if power != 1.0:
        factor = arith.scale_by_power_of_two(factor, power)
    if _is_fft(name, factor.value.shape[0]):
        return arith.toeplitz_self_lags(structure, factor)
    gram = arith.product(factor.T, factor, terms=kernel_terms(name))
    if name.startswith("hierarchical"):
        # c = colsum(B1²) + c² + colsum(D²): squares rounded, two partial sums rounded, then
        # two additions: one rounding more (u_s·Σ) than the three parts of ``kernel_terms``
        squares = square_entries(name, factor.value.shape[0])
        index = np.flatnonzero(squares)
        magnitude = (factor.magnitude**2).sum(axis=0)
        extra = np.zeros_like(gram.error)
        extra[index, index] = arith._final() * magnitude[index]
        gram = Bounded(gram.value, gram.error + extra)
    return arith.project(structure, gram)


def singd_step_bounds(
    precision: Precision,
    hyper: SINGDHyperparameters,
    before: SINGDState,
    incoming: StepBounds | None,
    record: StepRecord,
    passes: Sequence[StatisticPass],
    shared: int,
    compensations: tuple[np.ndarray, np.ndarray] | None = None,
) -> StepBounds:
    """Entrywise bounds of the state after one SINGD step from ``before`` (SPEC §1.3–§1.4a).

    Mirrors :func:`singd.optim.updates.singd_update_factors` and
    :func:`~singd.optim.updates.singd_precondition`, then
    :func:`~singd.optim.updates.momentum_parameter_updates`, operation by
    operation.  ``record`` gives ``∇W~`` (exact: recorded); ``passes`` the
    statistics with their magnitudes; ``shared`` the positions averaged into
    one row of ``A`` (1 for expand); ``compensations`` the implementation's
    ``(c_K, c_C)`` before the step when ``precision.compensated``
    (:func:`compensated_factor_step`).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # a vacuous bound may overflow: capped
        return _singd_step_bounds(
            precision, hyper, before, incoming, record, passes, shared, compensations
        )


def _singd_step_bounds(
    precision: Precision,
    hyper: SINGDHyperparameters,
    before: SINGDState,
    incoming: StepBounds | None,
    record: StepRecord,
    passes: Sequence[StatisticPass],
    shared: int,
    compensations: tuple[np.ndarray, np.ndarray] | None,
) -> StepBounds:
    factors = Arithmetic(precision.factors)
    params = Arithmetic(precision.params)
    state = bounded_state(before, incoming)
    k, c, m_k, m_c = state.K, state.C, state.m_K, state.m_C
    if before.steps % hyper.T == 0:
        name_k, name_c = hyper.structures
        s_k, s_c = get_structure(name_k), get_structure(name_c)
        a = [_statistic(factors, p.a, p.a_abs, precision.cast, shared, p.a_error) for p in passes]
        g = [_statistic(factors, p.g, p.g_abs, precision.cast, shared, p.g_error) for p in passes]
        h_k = _summed_h(factors, s_k, name_k, k, a)
        h_c = _summed_h(factors, s_c, name_c, c, g)
        power = self_inner_scale(hyper.damping)
        inner_k = _gram(factors, s_k, name_k, k, power)
        inner_c = _gram(factors, s_c, name_c, c, power)
        own_k, own_c = (h_k, inner_k, m_k), (h_c, inner_c, m_c)
        m_k, m_c = _momenta(factors, hyper, own_k, own_c, power * power)
        beta1 = lr_cov_at(hyper.lr_cov, before.steps)
        if precision.compensated:
            assert compensations is not None, "the compensated step needs the recorded c_K, c_C"
            k_before, c_before = k, c
            k = compensated_factor_step(factors, hyper, name_k, k, m_k, beta1, compensations[0])
            c = compensated_factor_step(factors, hyper, name_c, c, m_c, beta1, compensations[1])
            guard = (
                compensation_bound(factors, k_before, k),
                compensation_bound(factors, c_before, c),
            )
        else:
            k = _factor_step(factors, hyper, name_k, k, m_k, beta1)
            c = _factor_step(factors, hyper, name_c, c, m_c, beta1)
            guard = (None, None)
    elif precision.compensated:  # no factor step: the compensations must not change at all
        assert compensations is not None, "the compensated step needs the recorded c_K, c_C"
        guard = tuple(Bounded(x, np.zeros_like(x)) for x in compensations)
    else:
        guard = (None, None)
    preconditioned = _precondition(factors, precision.cast, hyper, k, c, record.grad)
    w, m_w = _parameter_update(params, hyper, state.W, state.m_W, preconditioned)
    bounded = [x.capped() for x in (k, c, m_k, m_c, w, m_w)]
    return StepBounds(*bounded, *(None if x is None else x.capped() for x in guard))


def _momenta(
    arith: Arithmetic,
    hyper: SINGDHyperparameters,
    own_k: tuple[Bounded, Bounded, Bounded],
    own_c: tuple[Bounded, Bounded, Bounded],
    scale: float,
) -> tuple[Bounded, Bounded]:
    """New ``m_K``, ``m_C`` in :func:`singd.optim.updates.singd_factor_momenta`'s order.

    The inners are ``p²Π̂(KᵀK)``, ``p²Π̂(CᵀC)`` with ``scale = p²``; their weights
    divide ``p²`` out in float64, exactly (a power of two).
    """
    (h_k, inner_k, m_k), (h_c, inner_c, m_c) = own_k, own_c
    d_i, d_o = h_k.value.shape[0], h_c.value.shape[0]
    coef = 0.5 * (1 - hyper.alpha1) if hyper.normalize_lr_cov else 0.5
    if hyper.kfac_like:
        results = []
        for h, inner in ((h_k, inner_k), (h_c, inner_c)):
            bracket = arith.add_identity(arith.add(h, inner, hyper.damping / scale), -1.0)
            results.append(arith.scale(bracket, exact(coef)))
        return results[0], results[1]
    terms_k, terms_c = (trace_terms(name) for name in hyper.structures)
    trace_h_k, trace_h_c = arith.trace(h_k, terms_k), arith.trace(h_c, terms_c)
    trace_k, trace_c = arith.trace(inner_k, terms_k), arith.trace(inner_c, terms_c)
    results = []
    for h, inner, m_old, trace_other, trace_gram_other, d_other in (
        (h_k, inner_k, m_k, trace_h_c, trace_c, d_o),
        (h_c, inner_c, m_c, trace_h_k, trace_k, d_i),
    ):
        weight = hyper.damping / scale / scale  # c² = λ tr(CᵀC) = λ·(p² tr(CᵀC))/p², over p²
        damping = Bounded(weight * trace_gram_other.value, weight * trace_gram_other.error)
        bracket = arith.scale(h, trace_other, converted=False)  # a stored value
        bracket = arith.add(bracket, inner, float(damping.value), float(damping.error))
        bracket = arith.add_identity(bracket, -float(d_other))
        scaled = arith.scale(bracket, exact(coef / d_other))
        results.append(arith.add(scaled, m_old, hyper.alpha1))
    return results[0], results[1]


def _normalized_step(
    hyper: SINGDHyperparameters, momentum: Bounded, beta1: float
) -> tuple[float, float]:
    """``β`` (``β1``, or ``β1 / max(1, ‖m‖_∞)`` with ``normalize_lr_cov``) and a bound on ``|δβ|``.

    ``1/max(1, x)`` is 1-Lipschitz for ``x ≥ 0``, so ``|δβ| ≤ β1·max|δm|``.
    """
    if not hyper.normalize_lr_cov:
        return beta1, 0.0
    step = beta1 / max(1.0, float(np.abs(momentum.value).max()))
    return step, beta1 * float(momentum.error.max())


def _factor_step(
    arith: Arithmetic,
    hyper: SINGDHyperparameters,
    name: str,
    factor: Bounded,
    momentum: Bounded,
    beta1: float,
) -> Bounded:
    """``K ← K − β K m`` (``clone().add_(K @ m, alpha=−β)``), ``β`` normalised if asked."""
    step, step_error = _normalized_step(hyper, momentum, beta1)
    fft = _is_fft(name, factor.value.shape[0])
    product = arith.product(
        factor, momentum, toeplitz_fft=fft, structured=True, terms=kernel_terms(name)
    )
    return arith.add(factor, product, -step, step_error)


def compensated_factor_step(
    arith: Arithmetic,
    hyper: SINGDHyperparameters,
    name: str,
    factor: Bounded,
    momentum: Bounded,
    beta1: float,
    compensation: np.ndarray,
) -> Bounded:
    """``K' = fl(K + fl(c − β·fl(K m)))`` (:func:`singd.optim.updates.compensated_factor_step`).

    The oracle's exact step from the same ``K`` is ``K − βKm``; the computed
    ``K'`` also carries the implementation's incoming compensation ``c`` (what
    earlier roundings of ``K`` dropped, a recorded value), so its distance from
    the oracle is the bound of the two roundings and the product plus ``|c|``.
    ``c`` itself is held to :func:`compensation_bound` at the step that made it.
    """
    step, step_error = _normalized_step(hyper, momentum, beta1)
    fft = _is_fft(name, factor.value.shape[0])
    product = arith.product(
        factor, momentum, toeplitz_fft=fft, structured=True, terms=kernel_terms(name)
    )
    increment = arith.add(exact(compensation), product, -step, step_error)
    new = arith.add(factor, increment)
    return Bounded(new.value - compensation, new.error + np.abs(compensation))


def compensation_bound(arith: Arithmetic, before: Bounded, after: Bounded) -> Bounded:
    """The compensation ``c' = fl(y − fl(K' − K))`` after a step, against the oracle's 0.

    ``c'`` is what the rounding of ``K' = fl(K + y)`` dropped, up to the roundings
    of ``d = fl(K' − K)`` and of ``y − d`` (exact in Fast2Sum's case ``|y| ≤ |K|``):
    ``|c'| ≤ u(|K'| + |K' − K|)(1 + 2u) + 2η`` entrywise, with the computed
    ``|K'|`` and ``|K' − K|`` bounded by the oracle's values plus their errors.
    """
    changed = np.abs(after.value - before.value) + after.error + before.error
    unit, tiny = arith.unit, arith.tiny
    error = unit * (after.magnitude + changed) * (1 + 2 * unit) + 2 * tiny
    return Bounded(np.zeros_like(after.value), error)


def _precondition(
    arith: Arithmetic,
    cast: float,
    hyper: SINGDHyperparameters,
    k: Bounded,
    c: Bounded,
    grad: np.ndarray,
) -> Bounded:
    """``C Cᵀ ∇W~`` then ``(K Kᵀ leftᵀ)ᵀ`` (:func:`singd.optim.updates.singd_precondition`)."""
    name_k, name_c = hyper.structures
    g = arith.cast(exact(grad), cast)
    left = _self_outer_product(arith, name_c, c, g, hyper.T)
    return _self_outer_product(arith, name_k, k, left.T, hyper.T).T


#: Structures whose ``F Fᵀ`` SINGD keeps between factor steps when ``T > 1``, and forms
#: for the step's one product when ``T = 1`` where that pays (``SingdPreconditioner.outers``:
#: closed under ``F Fᵀ``; the diagonal always forms ``f ⊙ f``).
_KEPT_OUTERS = ("dense", "block")


def _self_outer_product(
    arith: Arithmetic, name: str, f: Bounded, x: Bounded, period: int
) -> Bounded:
    """``F Fᵀ X`` in the implementation's order.

    ``(F Fᵀ) X`` — ``fl(F Fᵀ)`` rounded to the factor's dtype, then one
    product — for the diagonal (``self_outer_matmul`` rounds ``f ⊙ f`` first)
    and, for the structures of :data:`_KEPT_OUTERS`, with ``T > 1`` (the kept
    ``K Kᵀ`` of :func:`singd.optim.updates.singd_precondition`, the same
    numbers every step until the next factor step) or with ``T = 1`` where the
    step forms it for its one product
    (:func:`singd.optim.updates.outer_pays_for_one_product`); ``F (Fᵀ X)`` otherwise.
    """
    dim, columns = x.value.shape
    kernel = {"toeplitz_fft": _is_fft(name, dim), "terms": kernel_terms(name)}
    kept = name.startswith(_KEPT_OUTERS) and (
        period > 1 or outer_pays_for_one_product(get_singd_structure(name), dim, columns)
    )
    if name == "diagonal" or kept:
        return arith.product(arith.product(f, f.T, **kernel), x, **kernel)
    return arith.product(f, arith.product(f.T, x, **kernel), **kernel)


def _parameter_update(
    arith: Arithmetic,
    hyper: SINGDHyperparameters,
    w: Bounded,
    m_w: Bounded,
    preconditioned: Bounded,
) -> tuple[Bounded, Bounded]:
    """``ĝ += γ W~``; ``m ← α2 m + ĝ``; ``W~ ← W~ − β2 m`` (``momentum_parameter_updates``)."""
    direction = preconditioned
    if hyper.weight_decay != 0.0:
        direction = arith.add(direction, w, hyper.weight_decay)
    momentum = arith.add(arith.scale(m_w, exact(hyper.momentum)), direction)
    return arith.add(w, momentum, -hyper.lr), momentum
