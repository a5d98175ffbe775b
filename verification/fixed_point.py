"""The IKFAC fixed point on stationary statistics in low precision (the issue's "case 3").

IKFAC (``kfac_like=True``, ``α1 = 0``) fed the same ``A`` every step moves
``K`` towards ``K Kᵀ = (U + λI)⁻¹`` (SPEC §1.3, ``U = AᵀA``).  This module
builds such a stream with a chosen ``cond(U)``, runs it through the torch
``SINGD`` in a precision, through the float64 oracle and through the emulated
bf16/fp16 oracle (``reference.numbers.emulated_numbers``), and measures

    residual = ‖K Kᵀ − (U_r + λI)⁻¹‖₂ / ‖(U_r + λI)⁻¹‖₂,

with ``U_r`` formed in float64 from the inputs *as the factors see them*
(rounded to the factor dtype), so the data's own rounding is not counted.

The attainable accuracy (derivation; also in ``docs/verification.md``)
--------------------------------------------------------------------------
Let ``M = U + λI`` with eigenvalues ``μ_min ≤ … ≤ μ_max``, ``κ = μ_max/μ_min``,
``u = eps/2`` of the factor dtype.  From ``K_0 = I`` every iterate is a
polynomial in ``M`` (``K ← K − β1 K · ½(KᵀMK − I)``), so in exact arithmetic
``K → M^{-1/2}``; in each eigendirection ``k ← k(1 − ½β1(μk² − 1))``, whose
derivative at ``k* = μ^{-1/2}`` is ``1 − β1``: a contraction by ``1 − β1`` per
step whatever ``μ`` (after a growth phase of ``≈ log(k*)/log(1 + β1/2)`` steps).

1. *Representation.*  Storing ``K`` rounds every entry: ``|δK| ≤ u|K|``.  Then
   ``‖δ(KKᵀ)‖₂ ≤ 2‖δK‖₂‖K‖₂ ≤ 2u‖|K|‖₂‖K‖₂``, a relative error of at most
   ``2u·‖|K|‖₂/‖K‖₂ ≤ 2u√d`` of ``KKᵀ``: independent of ``κ``.
2. *What the iteration sees.*  The step is driven by the residual
   ``E = KᵀMK − I`` of the *stored* ``K``.  Writing ``K = M^{-1/2}X`` (``XᵀX =
   I + E``), an entrywise rounding ``δK`` changes ``E`` by ``δKᵀMK + KᵀMδK``,
   of norm up to ``2u‖K‖‖MK‖ = 2u·√(μ_max/μ_min) = 2u√κ``: unless ``U``'s
   eigenvectors are the coordinate axes, no ``K`` on the bf16 grid has a
   residual below about ``u√κ``.  ``E`` is mostly along ``M``'s large
   eigendirections, where it barely changes ``KKᵀ`` (relative to ‖M⁻¹‖ the
   ``(min, min)`` part of the ``KKᵀ`` error is ``O(u)``, the coupling part
   ``O(u√κ·κ^{-1/2}) = O(u)``), but it drives the step: ``m = ½E``.
3. *Swamping.*  ``K ← fl(K − β1 K m)`` leaves an entry unchanged when
   ``|β1 (K m)_ij| < ½ ulp(K_ij)``: the iteration can stall at ``‖E‖ ≈ 2u/β1``;
   while the ``u√κ`` part of ``E`` keeps ``β1‖m‖ > u`` it cannot stall: every
   step rewrites and re-rounds ``K``.
4. *Stationary level* (:func:`floor_terms`).  With ``F = M^{1/2}KKᵀM^{1/2} − I``
   the step is ``F ← (1 − β1)F − β1(1 − β1/4)F² + η`` (exact algebra of the
   first-order step; ``η`` the re-rounding of ``K``).  Linear part: an AR(1)
   process, stationary ``F_ij ≈ η_ij/√(2β1)``, ``η_ij ≈ s√(μ_i + μ_j)``,
   ``s = u‖K‖_F/(√3 d)``; mapped back to ``KKᵀ`` relative to ``‖M⁻¹‖`` its
   Frobenius norm is ``s μ_min √(d tr(M⁻¹)/β1)`` (*noise*).  Quadratic part:
   ``E[F] = −E[F²]``, so the couplings ``F_{min,k}`` excited in ``M``'s large
   eigendirections bias the smallest one by ``Σ_k F_{min,k}² ≈ s² tr(M)/(2β1)``
   (*drift*), growing like ``u² tr(M) tr(M⁻¹)/(d²β1)``, i.e. with ``κ``; it
   dominates at ``κ ≈ 1e6`` in bf16 (0.48 predicted, 0.37–0.47 measured).
   Plus ``2u`` from the rounding of ``m``'s bracket (*bracket*).  This is an
   rms estimate, not a bound (it over-estimates where ``K`` is exactly
   representable, e.g. ``κ = 1``); :func:`residual_bound` multiplies it by
   ``3√3``.  It is physical for ``K`` stored in the dtype: only storing ``K``
   wider (``preconditioner_dtype=float32``) or compensating its update removes
   the ``s``-terms; a smaller ``β1`` makes them larger.
5. *Range (fp16).*  ``Π̂(KᵀK) → M⁻¹`` has entries up to ``1/μ_min``, which
   overflows float16 (65504) for ``μ_min < 1.5e-5``.  In the paper's order,
   ``λ·fl(Π̂(KᵀK))``, every later step is non-finite and skipped and ``K``
   freezes where ``KᵀK`` first overflows (:func:`overflow_limit`; the emulated
   oracle keeps this order).  This is not physical: ``KᵀMK = I`` and ``M ⪰ λI``
   give ``λKᵀK ⪯ I``, so the term the bracket needs is at most 1.  ``singd``
   forms it as ``(λ/p²)·Π̂((pK)ᵀ(pK))`` with a power of two ``p² ∈ (2^10 λ,
   2^12 λ]`` (:func:`singd.optim.updates.self_inner_scale`): at most ``2^12``
   (``2^13`` after a tril/triu Π̂), and bitwise the old product wherever that
   one was finite and normal.  :func:`paper_order` restores the old order for
   the before/after measurement (:func:`case3_cells`).  What stays is the
   representation of ``K`` itself (entries up to ``μ_min^{-1/2}``: float16
   holds them for ``μ_min > 2.4e-10``) and, with ``lr > 0``, a preconditioned
   gradient ``KKᵀ∇W`` beyond 65504: a result float16 cannot hold, physical.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from reference.numbers import FLOAT64, Numbers, emulated_numbers
from reference.structures import get_structure
from reference.updates import (
    SINGDHyperparameters,
    SINGDState,
    StepRecord,
    singd_init,
    singd_step,
)
from singd import SINGD
from singd.optim import updates

#: Factor dtype name → torch dtype.
TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Unit roundoff ``u = eps/2`` by factor dtype name (bf16 2^-8, fp16 2^-11, fp32 2^-24).
UNIT = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}

#: The largest finite float16 (range limit of fp16 factors).
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class Stream:
    """A stationary statistics stream: the same inputs every step.

    Attributes:
        inputs: ``x`` (``n × d``, float64) with ``xᵀx/n = U``; ``n`` a power of 4 so
            that SPEC §1.1's ``A = x/√n`` is exact in every binary format.
        cond: ``cond(U)`` (eigenvalues log-spaced from 1 down to ``1/cond``).
        seed: Seed of ``U``'s random eigenvectors.
    """

    inputs: np.ndarray
    cond: float
    seed: int

    @property
    def dim(self) -> int:
        """``d``."""
        return self.inputs.shape[1]

    @property
    def rows(self) -> int:
        """``n``."""
        return self.inputs.shape[0]


def stationary_stream(dim: int, cond: float, seed: int = 0) -> Stream:
    """``x = [√n · diag(√σ) Qᵀ; 0]`` (``n × d``): ``xᵀx/n = Q diag(σ) Qᵀ = U``.

    ``σ`` is log-spaced in ``[1/cond, 1]``; ``Q`` a seeded random orthogonal
    matrix.  Rounding the rows of ``diag(√σ) Qᵀ`` entrywise keeps ``cond(U)``
    up to a factor ``1 + O(u·d)`` (a row-scaled well-conditioned matrix), so
    the rounded stream has the condition number it was built with.
    """
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))
    sigma = np.logspace(0.0, -math.log10(cond), dim) if cond > 1 else np.ones(dim)
    rows = 4 ** math.ceil(math.log(dim, 4))
    x = np.zeros((rows, dim))
    x[:dim] = math.sqrt(rows) * np.sqrt(sigma)[:, None] * q.T
    return Stream(x, cond, seed)


def rounded_inputs(stream: Stream, dtype: str) -> np.ndarray:
    """The inputs as a run in ``dtype`` sees them (float64 values on that grid)."""
    return torch.from_numpy(stream.inputs).to(TORCH_DTYPES[dtype]).double().numpy()


def target(stream: Stream, dtype: str, damping: float) -> np.ndarray:
    """``(U_r + λI)⁻¹``, ``U_r = x_rᵀx_r/n`` formed in float64 from the ``dtype``-rounded inputs."""
    x = rounded_inputs(stream, dtype)
    u = x.T @ x / stream.rows
    return np.linalg.inv(u + damping * np.eye(stream.dim))


def residual(k: np.ndarray, reference: np.ndarray) -> float:
    """``‖KKᵀ − R‖₂ / ‖R‖₂`` (``inf`` for a non-finite ``K``)."""
    if not np.all(np.isfinite(k)):
        return math.inf
    return float(np.linalg.norm(k @ k.T - reference, 2) / np.linalg.norm(reference, 2))


def spectrum(stream: Stream, damping: float) -> np.ndarray:
    """Eigenvalues ``μ`` of ``M = U + λI`` (ascending) of the float64 stream."""
    u = stream.inputs.T @ stream.inputs / stream.rows
    return np.linalg.eigvalsh(u + damping * np.eye(stream.dim))


def condition(stream: Stream, damping: float) -> float:
    """``κ = cond(U + λI)`` of the float64 stream."""
    mu = spectrum(stream, damping)
    return float(mu[-1] / mu[0])


def floor_terms(dtype: str, mu: np.ndarray, lr_cov: float) -> dict[str, float]:
    """The three terms of the module docstring's estimate of the stationary residual.

    ``s = u‖K‖_F/(√3 d)`` with ``‖K‖_F² = tr(M⁻¹)`` (the std of a rounding error
    uniform in ``±u|K_ij|``, spread evenly over the ``d²`` entries):

    * ``bracket = 2u``: the rounding of ``m``'s bracket shifts the computed
      fixed point by ``E ≈ 2u`` (the bracket's diagonal entries are ``O(1)``);
    * ``noise = s·μ_min·√(d·tr(M⁻¹)/β1)``: the Frobenius norm, relative to
      ``‖M⁻¹‖``, of the stationary AR(1) response ``F ← (1 − β1)F + η`` to the
      re-rounding of ``K`` every step;
    * ``drift = s²·tr(M)/(2β1)``: the bias ``E[F] = −E[F²]`` of the flow's own
      nonlinearity (``dF/dt = −(F + F²)``) fed by that noise in ``M``'s large
      eigendirections, seen in the smallest one.
    """
    u = UNIT[dtype]
    d = len(mu)
    trace_inv, trace = float(np.sum(1 / mu)), float(np.sum(mu))
    s = u * math.sqrt(trace_inv) / (math.sqrt(3) * d)
    return {
        "bracket": 2 * u,
        "noise": s * float(mu[0]) * math.sqrt(d * trace_inv / lr_cov),
        "drift": s**2 * trace / (2 * lr_cov),
    }


def derived_floor(dtype: str, mu: np.ndarray, lr_cov: float) -> float:
    """The estimate ``2u + noise + drift`` of :func:`floor_terms` (an rms level, not a bound)."""
    return sum(floor_terms(dtype, mu, lr_cov).values())


#: Safety factor of :func:`residual_bound` over :func:`derived_floor`: ``√3`` turns the
#: rounding error's std (uniform in ``±u|K_ij|``) into its maximum, and 3 standard
#: deviations cover the stationary fluctuation of the AR(1) residual.
BOUND_FACTOR = 3 * math.sqrt(3)


def residual_bound(dtype: str, mu: np.ndarray, lr_cov: float) -> float:
    """``BOUND_FACTOR · derived_floor``: what the tests require of a converged run."""
    return BOUND_FACTOR * derived_floor(dtype, mu, lr_cov)


def overflow_limit(dtype: str, stream: Stream, damping: float) -> bool:
    """Whether ``‖M⁻¹‖_max``, the size of ``Π̂(KᵀK)`` at the fixed point, overflows ``dtype``.

    The limit of the paper's order (:func:`paper_order`, the emulated oracle), not of ``singd``.
    """
    if dtype != "float16":
        return False
    return float(np.abs(target(stream, "float64", damping)).max()) > FLOAT16_MAX


def ikfac_hyper(lr_cov: float, damping: float, structure: str = "dense") -> SINGDHyperparameters:
    """IKFAC with ``lr = 0`` (only the factors move), ``T = 1``, the given ``β1``, ``λ``."""
    return SINGDHyperparameters(
        lr=0.0,
        momentum=0.0,
        damping=damping,
        alpha1=0.0,
        T=1,
        lr_cov=lr_cov,
        kfac_like=True,
        structures=(structure, "dense"),
    )


@dataclass(frozen=True)
class Run:
    """One run of the stream.

    Attributes:
        system: ``"torch"``, ``"float64"`` or ``"emulated"``.
        dtype: The factor dtype (the model's for torch; the storage for emulated).
        factors: ``K`` (dense float64) after each step in ``checkpoints``.
        checkpoints: Step counts (1-based) at which ``factors`` were taken.
        skipped: Steps the torch optimizer skipped (non-finite); 0 for the oracles.
        seconds: Wall time.
    """

    system: str
    dtype: str
    factors: tuple[np.ndarray, ...]
    checkpoints: tuple[int, ...]
    skipped: int
    seconds: float


def _layer(dim: int, dtype: torch.dtype) -> nn.Module:
    """``Linear(d, 1, bias=False)``: only ``K`` (``d × d``) and a scalar ``C``."""
    return nn.Linear(dim, 1, bias=False).to(dtype)


def run_torch(
    stream: Stream,
    hyper: SINGDHyperparameters,
    steps: int,
    dtype: str,
    factor_dtype: str | None = None,
    checkpoints: Sequence[int] = (),
    **singd_kwargs: object,
) -> Run:
    """Drive the torch ``SINGD`` with the stream for ``steps`` steps.

    The loss ``Σ out·r`` with ``r = 1/√n`` gives ``G`` with ``Gᵀ G = 1``
    (``loss_average=None``), so ``C`` is a scalar that converges to
    ``(1 + λ)^{-1/2}`` and ``K`` sees ``U`` alone.  ``singd_kwargs`` go to the
    ``SINGD`` constructor (e.g. a guard option of a later version).
    """
    start = time.perf_counter()
    torch_dtype = TORCH_DTYPES[dtype]
    layer = _layer(stream.dim, torch_dtype)
    factor = None if factor_dtype is None else TORCH_DTYPES[factor_dtype]
    optimizer = SINGD(
        layer,
        lr=hyper.lr,
        momentum=hyper.momentum,
        damping=hyper.damping,
        alpha1=hyper.alpha1,
        T=hyper.T,
        lr_cov=hyper.lr_cov,
        kfac_like=hyper.kfac_like,
        structures=hyper.structures,
        loss_average=None,
        preconditioner_dtype=(factor, factor),
        **singd_kwargs,
    )
    inputs = torch.from_numpy(stream.inputs).to(torch_dtype)
    weights = torch.full((stream.rows, 1), 1.0 / math.sqrt(stream.rows), dtype=torch_dtype)
    wanted = set(checkpoints) | {steps}
    factors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, steps + 1):
            optimizer.zero_grad()
            (layer(inputs) * weights).sum().backward()
            optimizer.step()
            if step in wanted:
                k = optimizer.layer_state(optimizer.layer_names()[0])["K"].to_dense()
                factors.append(k.double().numpy().copy())
    return Run(
        "torch",
        factor_dtype or dtype,
        tuple(factors),
        tuple(sorted(wanted)),
        steps - optimizer.steps,
        time.perf_counter() - start,
    )


def run_oracle(
    stream: Stream,
    hyper: SINGDHyperparameters,
    steps: int,
    numbers: Numbers = FLOAT64,
    dtype: str = "float64",
    checkpoints: Sequence[int] = (),
) -> Run:
    """Step the oracle on the stream: float64 (``numbers=FLOAT64``) or emulated bf16/fp16.

    The oracle gets ``A = x_r/√n`` of the ``dtype``-rounded inputs (exact) and
    ``G = 1/√n``.  The emulated oracle rounds every operation once to its
    storage grid with float32 accumulation, like torch on the CPU; where the
    two agree statistically the residual is the algorithm's in that
    arithmetic, not an implementation defect.
    """
    start = time.perf_counter()
    a = rounded_inputs(stream, dtype) / math.sqrt(stream.rows)
    g = np.full((stream.rows, 1), 1.0 / math.sqrt(stream.rows))
    record = StepRecord(grad=np.zeros((1, stream.dim)), stats=((a, g),))
    state = singd_init(np.zeros((1, stream.dim)), hyper, numbers)
    wanted = set(checkpoints) | {steps}
    factors = []
    skipped = 0
    for step in range(1, steps + 1):
        candidate = _guarded_step(state, record, hyper, numbers)
        if candidate is None:
            skipped += 1  # as torch does: a non-finite step changes no state
        else:
            state = candidate
        if step in wanted:
            factors.append(numbers.to_float64(state.K).copy())
    system = "float64" if numbers is FLOAT64 else "emulated"
    seconds = time.perf_counter() - start
    return Run(system, dtype, tuple(factors), tuple(sorted(wanted)), skipped, seconds)


def _guarded_step(
    state: SINGDState, record: StepRecord, hyper: SINGDHyperparameters, numbers: Numbers
) -> SINGDState | None:
    """One oracle step, or ``None`` where it overflows (torch skips such a step)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            new = singd_step(state, record, hyper, numbers)
    except ValueError:  # Π̂ refuses a non-finite matrix
        return None
    finite = all(np.all(np.isfinite(numbers.to_float64(x))) for x in (new.K, new.C, new.W))
    return new if finite else None


@contextlib.contextmanager
def paper_order() -> Iterator[None]:
    """Within the block torch ``SINGD`` forms ``λ·fl(Π̂(KᵀK))`` (``p = 1``), as before the fix."""
    original = updates.self_inner_scale
    updates.self_inner_scale = lambda damping: 1.0
    try:
        yield
    finally:
        updates.self_inner_scale = original


def numbers_for(dtype: str) -> Numbers:
    """The oracle's number system for a factor dtype: emulated bf16/fp16, else float64."""
    return emulated_numbers(dtype) if dtype in ("bfloat16", "float16") else FLOAT64


@dataclass(frozen=True)
class Measurement:
    """The residual of one (cond, λ, dtype, system) cell.

    Attributes:
        cond: ``cond(U)``.
        damping: ``λ``.
        kappa: ``cond(U + λI)``.
        dtype: Factor dtype.
        system: ``"torch"``, ``"emulated"`` or ``"float64"`` (float64 fed the rounded inputs).
        residual: Final relative residual (module docstring).
        tail_median: Median residual over the last half of the checkpoints (the
            stationary level of a run that fluctuates).
        floor: :func:`derived_floor`.
        overflow: :func:`overflow_limit` (fp16 range of the paper's order).
        skipped: Steps the torch optimizer skipped.
        seconds: Wall time.
        order: ``"range-safe"`` (``singd``) or ``"paper"`` (torch under :func:`paper_order`,
            and the oracles, which implement the paper's order).
    """

    cond: float
    damping: float
    kappa: float
    dtype: str
    system: str
    residual: float
    tail_median: float
    floor: float
    overflow: bool
    skipped: int
    seconds: float
    order: str

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return asdict(self)


def measure(
    cond: float,
    damping: float,
    dtype: str,
    systems: Sequence[str] = ("torch", "emulated", "float64"),
    steps: int = 1000,
    lr_cov: float = 0.1,
    dim: int = 32,
    seed: int = 0,
    structure: str = "dense",
) -> list[Measurement]:
    """Residuals of the stream ``(dim, cond, seed)`` after ``steps`` IKFAC steps, per system.

    ``"emulated"`` is skipped for float32/float64 (no emulated system);
    ``"torch-paper"`` is torch under :func:`paper_order`.
    """
    stream = stationary_stream(dim, cond, seed)
    hyper = ikfac_hyper(lr_cov, damping, structure)
    reference = target(stream, dtype, damping)
    mu = spectrum(stream, damping)
    kappa = float(mu[-1] / mu[0])
    checkpoints = tuple(range(steps // 20, steps + 1, steps // 20)) if steps >= 20 else ()
    results = []
    for system in systems:
        if system == "torch":
            run = run_torch(stream, hyper, steps, dtype, checkpoints=checkpoints)
        elif system == "torch-paper":
            with paper_order():
                run = run_torch(stream, hyper, steps, dtype, checkpoints=checkpoints)
        elif system == "emulated":
            if dtype not in ("bfloat16", "float16"):
                continue
            run = run_oracle(stream, hyper, steps, numbers_for(dtype), dtype, checkpoints)
        else:
            run = run_oracle(stream, hyper, steps, FLOAT64, dtype, checkpoints)
        series = [residual(k, reference) for k in run.factors]
        tail = series[len(series) // 2 :]
        results.append(
            Measurement(
                cond,
                damping,
                kappa,
                dtype,
                "torch" if system == "torch-paper" else system,
                series[-1],
                float(np.median(tail)),
                derived_floor(dtype, mu, lr_cov),
                overflow_limit(dtype, stream, damping),
                run.skipped,
                run.seconds,
                "range-safe" if system == "torch" else "paper",  # the oracle's order is the paper's
            )
        )
    return results


def structure_mask(structure: str, dim: int) -> np.ndarray:
    """Where members of ``structure`` may be nonzero (``d × d`` boolean)."""
    return get_structure(structure).mask(dim)


#: The issue's case-3 cells: ``(cond(U), λ)``.
CASE3_CELLS = ((1e4, 1e-3), (1e8, 1e-6))


def case3_cells(steps: int = 1000) -> list[Measurement]:
    """Case 3 before/after: every cell × float32/bfloat16/float16, ``d = 32``, ``β1 = 0.1``.

    Systems: torch (range-safe), the emulated oracle (paper's order) and float64
    on the rounded inputs; for float16 also torch in the paper's order (before
    the fix).  In float32/bfloat16 the two orders are bitwise equal (their range;
    ``tests/optim/test_self_inner_range.py``), so they are run once.
    """
    results = []
    for (cond, damping), dtype in itertools.product(
        CASE3_CELLS, ("float32", "bfloat16", "float16")
    ):
        systems = ["torch", "emulated", "float64"]
        if dtype == "float16":
            systems.insert(1, "torch-paper")
        results += measure(cond, damping, dtype, systems=systems, steps=steps)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m verification.fixed_point [--steps N] [--json PATH]``: the case-3 cells."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.steps < 20:
        parser.error(f"--steps must be at least 20 (checkpoints every steps/20), got {args.steps}")
    cells = case3_cells(args.steps)
    for cell in cells:
        print(
            f"cond {cell.cond:.0e} λ {cell.damping:.0e} {cell.dtype:<9} {cell.system:<8} "
            f"{cell.order:<10} residual {cell.residual:.3g} (tail {cell.tail_median:.3g}) "
            f"level {cell.floor:.3g} skipped {cell.skipped} {cell.seconds:.1f}s",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([cell.as_dict() for cell in cells], handle, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
