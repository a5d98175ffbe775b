"""Arithmetic models: where torch rounds, and in which precision each reduction accumulates.

A rounding-error bound is only as good as its model of the arithmetic.  The
old rule charged every product of reduction length ``n`` with ``(n + 2)·eps``
of the *storage* dtype, the worst case of a sum accumulated in that dtype.
Torch does not compute that way: on CPU a bfloat16/float16 matmul, sum or
mean accumulates in float32 and rounds once, and elementwise kernels compute
in float32 ("opmath") and round once.  So in bf16 the honest per-product
error is ``γ_n(u₃₂)·|A||B| + u_bf16·|AB|`` — about one half-ulp of the result
— where the old rule allowed ``(n + 2)`` ulps (40 % of an entry at ``n = 37``,
and no bound at all once ``n·eps ≥ 1``).

An :class:`ArithmeticModel` states, for one device and storage dtype:

* ``storage``: the dtype every result is rounded to (unit roundoff
  ``u_s = eps/2``);
* ``accumulation``: the dtype of partial sums in matmuls and reductions
  (``u_a``); an inner product of length ``n`` then has error at most
  ``γ_n(u_a) = n·u_a / (1 − n·u_a)`` relative to ``|a|ᵀ|b|`` (Higham,
  *Accuracy and Stability*, Thm. 3.5), plus one rounding ``u_s`` when
  ``storage`` is narrower than ``accumulation``;
* ``input_rounding``: a rounding of the *operands* of a product before it
  (TF32 on CUDA: ``u = 2⁻¹¹``), ``0`` otherwise;
* ``elementwise``: the dtype elementwise kernels compute in before the
  single rounding to ``storage``.

Optionally a **probabilistic** bound (Higham & Mary, SIAM J. Sci. Comput.
41(5), 2019, Thm. 3.1) replaces ``γ_n`` by
``γ̃_n(λ) = exp(λ√n·u_a + n·u_a²/(1 − u_a)) − 1 ≈ λ√n·u_a``, which holds for
one inner product with probability at least ``1 − 2n·exp(−λ²(1 − u_a)²/2)``
when the rounding errors are independent and of mean zero.  It is always
labelled as such (:attr:`ArithmeticModel.label`) and never replaces the
worst-case bound in a verdict.

:func:`model_for` gives the model of torch on a device (reading the CUDA
reduced-precision and TF32 switches); :mod:`verification.probe` measures
the real errors of that device and refuses a model they contradict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

#: Machine epsilon (spacing at 1.0) per dtype; the unit roundoff is half of it.
EPS: dict[torch.dtype, float] = {
    torch.float64: 2.0**-52,
    torch.float32: 2.0**-23,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}

#: Half the spacing of the subnormal numbers per dtype: the absolute error ``η`` of one
#: rounding whose result underflows (Higham, *Accuracy and Stability*, Thm. 2.2 with gradual
#: underflow: ``fl(x op y) = (x op y)(1 + δ) + η``, ``|η| ≤ 2^(e_min − p)``, ``δη = 0``).
#: float16's is 2⁻²⁵ ≈ 3·10⁻⁸: a float16 product of 10⁻⁶ errs by 3 % of itself, far more than
#: its relative ``u``; the others are there for rigour (their values are far below any data).
TINY: dict[torch.dtype, float] = {
    torch.float64: 2.0**-1075,
    torch.float32: 2.0**-150,
    torch.bfloat16: 2.0**-134,
    torch.float16: 2.0**-25,
}

#: TF32's unit roundoff (10 stored mantissa bits), for CUDA float32 matmuls with TF32 on.
TF32_UNIT = 2.0**-11

#: Default ``λ`` of the probabilistic bound: failure probability per inner product of
#: length ``n`` at most ``2n·exp(−λ²/2·(1 − u)²)`` = ``n · 4.6e-11`` at ``λ = 7``.
DEFAULT_LAMBDA = 7.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps/2`` of ``dtype`` (round to nearest)."""
    return EPS[dtype] / 2


def gamma(n: int, unit: float) -> float:
    """``γ_n = n·u / (1 − n·u)`` (Higham Lemma 3.1); ``inf`` once ``n·u ≥ 1``."""
    nu = max(n, 0) * unit
    return nu / (1 - nu) if nu < 1 else math.inf


def probabilistic_gamma(n: int, unit: float, lam: float) -> float:
    """``γ̃_n(λ) = exp(λ√n·u + n·u²/(1 − u)) − 1`` (Higham & Mary 2019, Thm. 2.4)."""
    n = max(n, 0)
    return math.expm1(lam * math.sqrt(n) * unit + n * unit**2 / (1 - unit))


def failure_probability(n: int, unit: float, lam: float) -> float:
    """Probability bound that one inner product of length ``n`` exceeds ``γ̃_n(λ)``."""
    return min(1.0, 2 * n * math.exp(-(lam**2) * (1 - unit) ** 2 / 2))


@dataclass(frozen=True)
class ArithmeticModel:
    """How one device computes in one storage dtype (module docstring).

    Attributes:
        device: ``"cpu"`` or ``"cuda"`` (the device type the model describes).
        storage: The dtype results are rounded to.
        accumulation: The dtype of partial sums of matmuls and reductions.
        elementwise: The dtype elementwise kernels compute in before rounding.
        input_rounding: Unit roundoff applied to matmul operands first (TF32), or 0.
        lam: ``None`` for worst-case bounds, else the ``λ`` of the probabilistic bound.
    """

    device: str
    storage: torch.dtype
    accumulation: torch.dtype
    elementwise: torch.dtype
    input_rounding: float = 0.0
    lam: float | None = None

    @property
    def unit(self) -> float:
        """``u_s``: one rounding to the storage dtype."""
        return unit_roundoff(self.storage)

    @property
    def accumulation_unit(self) -> float:
        """``u_a``: one rounding of a partial sum."""
        return unit_roundoff(self.accumulation)

    @property
    def elementwise_unit(self) -> float:
        """``u_e``: one rounding in the elementwise (opmath) dtype."""
        return unit_roundoff(self.elementwise)

    @property
    def tiny(self) -> float:
        """``η_s``: the absolute error of one rounding to storage that underflows."""
        return TINY[self.storage]

    @property
    def accumulation_tiny(self) -> float:
        """``η_a``: the absolute error of one product in the accumulation dtype that underflows."""
        return TINY[self.accumulation]

    @property
    def elementwise_tiny(self) -> float:
        """Underflow of one elementwise result: in the elementwise dtype, then in storage."""
        return self.tiny + (TINY[self.elementwise] if self.elementwise != self.storage else 0.0)

    def scalar_error(self, value: float) -> float:
        """``|α − fl(α)|``: a Python float converted to the elementwise dtype (torch's opmath).

        Torch hands a Python scalar of ``mul_(s)``, ``add_(y, alpha=α)`` and ``x / s`` to
        the kernel in the dtype it computes in (float32 for float32, bfloat16 and float16
        tensors), so ``α = 1/6`` is already off by ``0.5·u₃₂·α`` before the one rounding of
        the result.  Exact: ``value`` is known.
        """
        if self.elementwise == torch.float64:
            return 0.0
        converted = torch.tensor(value, dtype=torch.float64).to(self.elementwise).item()
        return abs(value - converted)

    @property
    def eps(self) -> float:
        """Machine epsilon of the storage dtype (the unit of reports: ulps of the scale)."""
        return EPS[self.storage]

    @property
    def final_unit(self) -> float:
        """``u_s`` when accumulated results are rounded to a narrower storage dtype, else 0."""
        return self.unit if EPS[self.storage] > EPS[self.accumulation] else 0.0

    def _gamma(self, n: int) -> float:
        """``γ_n(u_a)``, or ``γ̃_n(λ)`` with the probabilistic bound."""
        if self.lam is None:
            return gamma(n, self.accumulation_unit)
        return probabilistic_gamma(n, self.accumulation_unit, self.lam)

    def reduction(self, n: int) -> float:
        """Relative error (to ``Σ|terms|``) of a sum of ``n`` terms, including its storage.

        ``γ_{n−1}`` of the partial sums (``n − 1`` additions; 0 for one term) plus
        one rounding to storage.
        """
        return 0.0 if n <= 1 else self._gamma(n - 1) + self.final_unit

    def accumulated(self, n: int) -> float:
        """Relative error (to ``|A||B|``) of a product's partial sums, before storage.

        Operand rounding (``2·u_in``) and ``n`` accumulated multiply-adds
        (``γ_n(u_a)`` or ``γ̃_n(λ)``).
        """
        return 2 * self.input_rounding + self._gamma(max(n, 1))

    def product(self, n: int) -> float:
        """Relative error (to ``|A||B|``) of one product with reduction length ``n``, stored."""
        return self.accumulated(n) + self.final_unit

    def chain(self, lengths: list[int]) -> float:
        """Relative error of a chain of products (first order: the per-product errors add)."""
        return sum(self.product(n) for n in lengths)

    @property
    def store(self) -> float:
        """Relative error of one elementwise result (computed in ``elementwise``, rounded once)."""
        inner = unit_roundoff(self.elementwise)
        return self.unit + (inner if self.elementwise != self.storage else 0.0)

    def probabilistic(self, lam: float = DEFAULT_LAMBDA) -> ArithmeticModel:
        """The same model with the probabilistic accumulation bound at ``λ = lam``."""
        return replace(self, lam=lam)

    @property
    def label(self) -> str:
        """A one-line statement of the model (for reports)."""
        name = _NAMES[self.storage]
        parts = [
            f"{self.device} {name}: results rounded to {name}",
            f"matmul/sum accumulate in {_NAMES[self.accumulation]}",
            f"elementwise in {_NAMES[self.elementwise]}, one rounding",
        ]
        if self.input_rounding:
            parts.append(f"operands rounded first (u = {self.input_rounding:.3g}, TF32)")
        bound = (
            "worst case γ_n"
            if self.lam is None
            else f"PROBABILISTIC γ̃_n(λ = {self.lam:g}) (Higham & Mary 2019)"
        )
        return "; ".join(parts) + f"; {bound}"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return {
            "device": self.device,
            "storage": _NAMES[self.storage],
            "accumulation": _NAMES[self.accumulation],
            "elementwise": _NAMES[self.elementwise],
            "input_rounding": self.input_rounding,
            "lambda": self.lam,
            "label": self.label,
        }


_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}

_HALF = (torch.bfloat16, torch.float16)


def model_for(dtype: torch.dtype, device: str | torch.device = "cpu") -> ArithmeticModel:
    """The arithmetic model of torch computing in ``dtype`` on ``device``.

    CPU: float64/float32 accumulate in themselves; bfloat16/float16 matmuls,
    sums and elementwise kernels work in float32 and round once.  CUDA: the
    same, except that ``torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_
    precision_reduction`` lets cuBLAS keep partial sums in the narrow dtype
    (modelled as accumulation in ``dtype``), and ``allow_tf32`` rounds float32
    operands to TF32 first.

    Raises:
        ValueError: For a dtype without a model.
    """
    if dtype not in EPS:
        raise ValueError(f"no arithmetic model for dtype {dtype}")
    kind = torch.device(device).type
    flags = cuda_matmul_flags() if kind == "cuda" else {}
    if dtype not in _HALF:
        tf32 = dtype == torch.float32 and flags.get("allow_tf32", False)
        return ArithmeticModel(kind, dtype, dtype, dtype, TF32_UNIT if tf32 else 0.0)
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    reduced = flags.get(f"allow_{name}_reduced_precision_reduction", False)
    return ArithmeticModel(kind, dtype, dtype if reduced else torch.float32, torch.float32)


def cuda_matmul_flags() -> dict[str, bool]:
    """torch's cuBLAS switches that change how CUDA matmuls round (read at call time)."""
    matmul = torch.backends.cuda.matmul
    names = (
        "allow_tf32",
        "allow_bf16_reduced_precision_reduction",
        "allow_fp16_reduced_precision_reduction",
    )
    return {name: bool(getattr(matmul, name, False)) for name in names}


@dataclass(frozen=True)
class Precision:
    """The arithmetic of one run: factors (``K``, ``C``, ``m_K``, ``m_C``, ``H``) and parameters.

    Attributes:
        factors: Model of the factor dtype (statistics, ``H``, momenta, factor step,
            preconditioning products).
        params: Model of the model dtype (``∇W~``, ``W~``, ``m_W~``).
        compensated: Whether bf16/fp16 factors take the compensated (Kahan) factor
            step of ``SINGD(factor_guard="compensated")`` (the default), which keeps
            a compensation term ``c`` beside ``K``; ``False``: the plain step.
    """

    factors: ArithmeticModel
    params: ArithmeticModel
    compensated: bool = False

    @property
    def cast(self) -> float:
        """Rounding of a parameter-side tensor cast to the factor dtype (0 if not narrower)."""
        return self.factors.unit if self.factors.eps > self.params.eps else 0.0

    @property
    def coarsest(self) -> ArithmeticModel:
        """The model with the larger eps (the unit of reports)."""
        return max((self.factors, self.params), key=lambda model: model.eps)

    def probabilistic(self, lam: float = DEFAULT_LAMBDA) -> Precision:
        """Both models with the probabilistic accumulation bound."""
        return Precision(
            self.factors.probabilistic(lam), self.params.probabilistic(lam), self.compensated
        )

    @property
    def label(self) -> str:
        """The models in force, one line."""
        if self.factors == self.params:
            return self.params.label
        return f"factors: {self.factors.label} | parameters: {self.params.label}"


#: ``SINGD``'s ``factor_guard`` values whose factor step the bounds model.
MODELLED_GUARDS = (None, "compensated")


def precision_for(
    dtype: torch.dtype | Precision,
    factor_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    factor_guard: str | None = None,
) -> Precision:
    """The :class:`Precision` of a run with model ``dtype`` and factors in ``factor_dtype``.

    A :class:`Precision` passes through unchanged, so comparison functions
    accept either a dtype (CPU model, factors in the same dtype, no guard) or a
    precision.  ``factor_guard`` is ``SINGD``'s argument; it acts on bf16/fp16
    factors only.

    Raises:
        ValueError: For a guard whose factor step is not modelled (``"stochastic"``,
            ``"master"``: their comparison would need their own rounding rules).
    """
    if isinstance(dtype, Precision):
        return dtype
    if factor_guard not in MODELLED_GUARDS:
        raise ValueError(
            f"factor_guard={factor_guard!r} is not modelled by the bounds; "
            f"use one of {MODELLED_GUARDS}"
        )
    params = model_for(dtype, device)
    factors = params if factor_dtype is None else model_for(factor_dtype, device)
    compensated = factor_guard == "compensated" and factors.storage in _HALF
    return Precision(factors, params, compensated)
