"""The oracle's self-check: float64 against mpmath, and the laws of SPEC §3.

Every check measures one number and compares it with a bound derived from
rounding-error analysis or from the algorithm's maths.  The cases (sizes,
modes, random records) and bounds are the one source that ``tests/reference``
also uses; this module needs only ``reference`` and numpy:

* Π̂ (SPEC §2) in float64 against mpmath(50), per structure;
* a short SINGD trajectory (SPEC §1.3, §1.4) in float64 against mpmath(50),
  per structure (as both ``K`` and ``C``), over every mode;
* the IKFAC fixed point ``K Kᵀ → (U + λI)⁻¹`` at its derived rate;
* the empirical order of the IKFAC–KFAC gap in ``β1`` (SPEC §1.3, ≈ 1);
* the batch-size-1 identity ``U ⊗ Gc`` = empirical Fisher (SPEC §1.1, §3);
* KFAC-expand / -reduce exactness on deep linear networks (SPEC §1.1).

A rounding bound is stated in units of ``eps64 · scale`` with the scale
named in the check's ``unit``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from reference.fisher import (
    DeepLinearProblem,
    empirical_fisher,
    exact_ggn,
    ggn_backprop_vectors,
    layer_inputs,
    output_gradients,
)
from reference.kfac import KFACHyperparameters, kfac_trajectory
from reference.numbers import FLOAT64, mpmath_numbers
from reference.statistics import kfac_factors, linear_statistics
from reference.structures import STRUCTURE_NAMES, get_structure
from reference.updates import (
    SINGDHyperparameters,
    SINGDState,
    StepRecord,
    singd_init,
    singd_step,
    singd_trajectory,
)

EPS64 = float(np.finfo(np.float64).eps)
DPS = 50

#: Sizes that give every structure of ``STRUCTURE_NAMES`` a non-trivial pattern at
#: d_i = 7 and d_o = 6: block3diagonal has blocks (3, 3, 1) / (3, 3),
#: hierarchical2_3 has (k1, m, k2) = (2, 2, 3) / (2, 1, 3).
D_OUT, D_IN, N_ROWS = 6, 7, 3
TRAJECTORY_STEPS = 4

#: SPEC §1.3 / §1.4 modes of the trajectory check (``--quick``: the first only).
MODES: dict[str, dict[str, object]] = {
    "default": {},
    "ikfac": {"kfac_like": True, "alpha1": 0.0},
    "normalize": {"normalize_lr_cov": True},
    "normalize_ikfac": {"normalize_lr_cov": True, "kfac_like": True, "alpha1": 0.0},
    "schedule": {"lr_cov": lambda steps: 0.1 / (1 + steps)},
    "period2": {"T": 2},
    "weight_decay": {"weight_decay": 0.3},
    "alpha1_zero": {"alpha1": 0.0},
    "accumulation": {},  # two (A, G) pairs per step, see make_records
}

#: Trajectory hyper-parameters: β1 and β2 small enough that every step is a
#: near-identity map (Lipschitz constant 1 + O(β1), so errors add over steps).
BASE = {"lr": 0.1, "momentum": 0.5, "damping": 0.01, "lr_cov": 0.1, "T": 1}

#: IKFAC vs KFAC order study.
BETA1S = (0.1, 0.05, 0.025, 0.0125)
HORIZON, ORDER_DAMPING, MIN_ORDER = 0.4, 0.1, 0.9


@dataclass(frozen=True)
class Check:
    """One measured quantity against its bound.

    Attributes:
        name: What is checked (e.g. ``"Π̂ f64 vs mp50 [tril]"``).
        measured: The measured value, in ``unit``.
        bound: The derived bound, in ``unit``.
        unit: The unit of both numbers.
        rule: How the bound is derived (one line).
        lower: True when ``bound`` is a lower bound (``measured >= bound`` passes).
    """

    name: str
    measured: float
    bound: float
    unit: str
    rule: str
    lower: bool = False

    @property
    def passed(self) -> bool:
        """Whether the measured value satisfies the bound."""
        if self.lower:
            return bool(self.measured >= self.bound)
        return bool(self.measured <= self.bound)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields, ``passed`` included."""
        numbers = {"measured": float(self.measured), "bound": float(self.bound)}
        return {**asdict(self), **numbers, "passed": self.passed}


# --------------------------------------------------------------------- Π̂
def projection_check(name: str, rng: np.random.Generator, d: int = 7) -> Check:
    """Π̂ of a random symmetric matrix (entries in [-1, 1]) in float64 against mpmath(50)."""
    x = rng.uniform(-1.0, 1.0, size=(d, d))
    m = (x + x.T) / 2  # exactly symmetric in float64
    structure = get_structure(name)
    numbers = mpmath_numbers(DPS)
    with numbers.context():
        exact = numbers.to_float64(structure.project(numbers.asarray(m)))
    error = float(np.abs(structure.project(m) - exact).max()) / float(np.abs(m).max())
    return Check(
        name=f"Π̂ f64 vs mp{DPS} [{name}]",
        measured=error / EPS64,
        bound=2 * d + 2,
        unit="eps64·max|M|",
        rule="entry-wise M_ij, M_ij+M_ji, or a Toeplitz mean of <= 2d entries: (2d+2)·eps",
    )


# ----------------------------------------------------- SINGD trajectories
def make_hyper(structures: tuple[str, str], mode: str) -> SINGDHyperparameters:
    """Hyper-parameters of one mode (key of :data:`MODES`) with structures ``(K, C)``."""
    return SINGDHyperparameters(**{**BASE, **MODES[mode]}, structures=structures)


def make_records(
    rng: np.random.Generator, steps: int, passes: int = 1, d_out: int = D_OUT, d_in: int = D_IN
) -> list[StepRecord]:
    """Records with entries uniform in [-1, 1]: ``passes`` (A, G) pairs per step."""

    def uniform(*shape: int) -> np.ndarray:
        return rng.uniform(-1.0, 1.0, size=shape)

    return [
        StepRecord(
            grad=uniform(d_out, d_in),
            stats=tuple((uniform(N_ROWS, d_in), uniform(N_ROWS, d_out)) for _ in range(passes)),
        )
        for _ in range(steps)
    ]


#: Reduction lengths of the products along the longest dependency chain of one
#: step (SPEC §1.3, §1.4): ``Kᵀ Aᵀ`` (d_i), ``X Xᵀ`` (n), the other factor's
#: trace (d_o), ``K m_K`` (d_i), then ``Cᵀ ∇W`` (d_o), ``· K`` (d_i),
#: ``C ·`` (d_o), ``· Kᵀ`` (d_i).
CHAIN_LENGTHS = (D_IN, N_ROWS, D_OUT, D_IN, D_OUT, D_IN, D_OUT, D_IN)


def trajectory_bound(steps: int, passes: int) -> float:
    """Bound on :func:`scaled_discrepancy` of float64 against exact, after ``steps`` steps.

    Rule (verification/tolerances.py): a product of reduction length ``ℓ`` errs
    by ``(ℓ + 2)·eps`` relative to ``|X||Y|``; first-order errors add along the
    chain (``CHAIN_LENGTHS``) and over the steps (β1 = β2 = 0.1 make each step a
    near-identity map, Lipschitz 1 + O(0.1)); gradient accumulation adds
    ``passes`` sums of ``H``.  Every product but ``AᵀA``/``GᵀG`` has a
    near-identity factor (``K``, ``C``, ``I − β1 m``), so ``|X||Y|`` is within
    the result's scale; ``|A|ᵀ|A|`` may exceed ``|AᵀA|`` by at most ``n``
    (entries in [-1, 1]).  Hence, relative to ``max(1, max|field|)``:
    ``steps · (Σ_ℓ (ℓ + 2) + passes) · n · eps64``.
    """
    per_step = sum(length + 2 for length in CHAIN_LENGTHS) + passes
    return steps * per_step * N_ROWS * EPS64


def scaled_discrepancy(fast: list[SINGDState], exact: list[SINGDState]) -> float:
    """``max |fast − exact| / max(1, max|exact|)`` over fields and steps."""
    worst = 0.0
    for f, e in zip(fast, exact, strict=True):
        for field in ("K", "C", "m_K", "m_C", "W", "m_W"):
            reference = np.asarray(getattr(e, field), dtype=np.float64)
            error = float(np.abs(getattr(f, field) - reference).max())
            worst = max(worst, error / max(1.0, float(np.abs(reference).max())))
    return worst


def trajectory_check(name: str, modes: list[str], rng: np.random.Generator) -> Check:
    """SINGD with structure ``name`` as K and C, float64 vs mpmath(50), worst over ``modes``."""
    worst_ratio, worst_error, worst_bound = -1.0, 0.0, 0.0
    for mode in modes:
        passes = 2 if mode == "accumulation" else 1
        hyper = make_hyper((name, name), mode)
        records = make_records(rng, TRAJECTORY_STEPS, passes)
        w0 = rng.uniform(-1.0, 1.0, (D_OUT, D_IN))
        fast = singd_trajectory(w0, records, hyper, FLOAT64)
        exact = singd_trajectory(w0, records, hyper, mpmath_numbers(DPS))
        error = scaled_discrepancy(fast, exact) / EPS64
        bound = trajectory_bound(TRAJECTORY_STEPS, passes) / EPS64
        if error / bound > worst_ratio:
            worst_ratio, worst_error, worst_bound = error / bound, error, bound
    return Check(
        name=f"SINGD f64 vs mp{DPS} [{name}] ({len(modes)} modes)",
        measured=worst_error,
        bound=worst_bound,
        unit="eps64·max(1,|field|)",
        rule="steps·(Σ(ℓ+2) + passes)·n·eps over the step's product chain",
    )


# ------------------------------------------------------- IKFAC fixed point
def spd_matrix(rng: np.random.Generator, d: int, cond: float, scale: float) -> np.ndarray:
    """``Q diag(scale·exp(ℓ)) Qᵀ`` with extremes pinned: condition number ``cond``."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    logs = rng.uniform(-np.log(cond), 0.0, d)
    logs[0], logs[-1] = 0.0, -np.log(cond)
    spd = (q * (scale * np.exp(logs))) @ q.T
    return (spd + spd.T) / 2


def ikfac_rate(beta1: float, eigenvalues: np.ndarray) -> float:
    """Per-step contraction factor of IKFAC's residual, derived for constant statistics.

    With constant ``U``, ``B = U + λI`` and ``K_0 = I``, IKFAC's step is
    ``K ← K (I − β1 E/2)`` with ``E = KᵀBK − I``; all iterates are functions
    of ``B``, so each eigenvalue ``b`` evolves alone:
    ``e ← f(e) = (1 + e)(1 − β1 e/2)² − 1``, i.e.
    ``f(e)/e = 1 − β1 (1 + e)(1 − β1 e/4)``.  For ``β1 · b_max <= 1``, ``e``
    moves monotonically from ``b − 1`` to 0 without crossing it, so
    ``1 + e ∈ [min(b, 1), max(b, 1)]`` and the factor is at most
    ``ρ = max_b 1 − β1 min(b, 1)(1 − β1 max(b − 1, 0)/4)``.
    Near the fixed point it is ``1 − β1`` whatever the spectrum.
    """
    return float(
        max(1 - beta1 * min(b, 1.0) * (1 - beta1 * max(b - 1.0, 0.0) / 4) for b in eigenvalues)
    )


def ikfac_fixed_point_bound(beta1: float, eigenvalues: np.ndarray, steps: int) -> float:
    """Bound on ‖K Kᵀ − B⁻¹‖₂ after ``steps`` IKFAC steps from ``K_0 = I`` (constant ``B``).

    ``‖KKᵀ − B⁻¹‖₂ = max |e|/b <= ρ^steps · max|b − 1|/b`` (:func:`ikfac_rate`),
    plus the rounding floor: a contractive map keeps per-step rounding (a chain
    of 4 products of length d, (d + 2)·eps each, relative to ``‖B⁻¹‖ <= 1/b_min``)
    within its geometric sum, ``÷ (1 − ρ)``.
    """
    d = len(eigenvalues)
    rho = ikfac_rate(beta1, eigenvalues)
    floor = 4 * (d + 2) * d * EPS64 / eigenvalues.min() / (1 - rho)
    return rho**steps * float(np.max(np.abs(eigenvalues - 1) / eigenvalues)) + floor


def ikfac_fixed_point_check(rng: np.random.Generator, steps: int = 200) -> Check:
    """IKFAC, dense, constant U (d = 4, cond 10): ‖K Kᵀ − (U + λI)⁻¹‖₂ after ``steps``."""
    beta1, damping, d = 0.5, 1e-3, 4
    u = spd_matrix(rng, d, cond=10.0, scale=1.5)
    a = np.linalg.cholesky(u).T  # AᵀA = U
    hyper = SINGDHyperparameters(
        lr=0.0, kfac_like=True, alpha1=0.0, damping=damping, lr_cov=beta1, T=1
    )
    record = StepRecord(grad=np.zeros((1, d)), stats=((a, np.ones((1, 1))),))
    state = singd_init(record.grad, hyper)
    for _ in range(steps):
        state = singd_step(state, record, hyper)
    b = np.linalg.eigvalsh(u) + damping
    rho = ikfac_rate(beta1, b)
    residual = float(
        np.linalg.norm(state.K @ state.K.T - np.linalg.inv(u + damping * np.eye(d)), 2)
    )
    return Check(
        name=f"IKFAC fixed point ‖KKᵀ − (U+λI)⁻¹‖₂ (β1={beta1}, {steps} steps, ρ={rho:.3f})",
        measured=residual,
        bound=ikfac_fixed_point_bound(beta1, b, steps),
        unit="absolute",
        rule="ρ^steps·max|b−1|/b + rounding floor 4(d+2)d·eps/(b_min(1−ρ))",
    )


# ---------------------------------------------------------- IKFAC vs KFAC
def ikfac_kfac_gap(beta1: float, rng_seed: int) -> float:
    """Max gap (KKᵀ vs (S_K+λI)⁻¹, CCᵀ vs (S_C+λI)⁻¹, W) at the horizon ``β1 · steps = 0.4``."""
    rng = np.random.default_rng(rng_seed)
    d_o, d_i = 3, 4
    a0, a1 = rng.uniform(-1, 1, (N_ROWS, d_i)), rng.uniform(-1, 1, (N_ROWS, d_i))
    g0, g1 = rng.uniform(-1, 1, (N_ROWS, d_o)), rng.uniform(-1, 1, (N_ROWS, d_o))
    grad0, grad1 = rng.uniform(-1, 1, (d_o, d_i)), rng.uniform(-1, 1, (d_o, d_i))
    w0 = rng.uniform(-1, 1, (d_o, d_i))
    records = [
        StepRecord(grad=grad0 + t * grad1, stats=((a0 + t * a1, g0 + t * g1),))
        for t in (beta1 * step for step in range(round(HORIZON / beta1)))
    ]
    common = {"lr": beta1, "momentum": 0.0, "damping": ORDER_DAMPING, "lr_cov": beta1, "T": 1}
    ikfac_hyper = SINGDHyperparameters(**common, kfac_like=True, alpha1=0.0)
    ikfac = singd_trajectory(w0, records, ikfac_hyper)[-1]
    kfac = kfac_trajectory(w0, records, KFACHyperparameters(**common))[-1]
    inverse_k = np.linalg.inv(kfac.S_K + ORDER_DAMPING * np.eye(d_i))
    inverse_c = np.linalg.inv(kfac.S_C + ORDER_DAMPING * np.eye(d_o))
    return max(
        float(np.abs(ikfac.K @ ikfac.K.T - inverse_k).max()),
        float(np.abs(ikfac.C @ ikfac.C.T - inverse_c).max()),
        float(np.abs(ikfac.W - kfac.W).max()),
    )


def ikfac_kfac_order_check(seed: int) -> Check:
    """Empirical order of the IKFAC–KFAC gap in β1 (log-log slope over BETA1S)."""
    gaps = [ikfac_kfac_gap(beta1, seed) for beta1 in BETA1S]
    slope = float(np.polyfit(np.log(BETA1S), np.log(gaps), 1)[0])
    return Check(
        name=f"IKFAC vs KFAC order in β1 (β1·steps = {HORIZON}, β1 ∈ {list(BETA1S)})",
        measured=slope,
        bound=MIN_ORDER,
        unit="log-log slope",
        rule="O(β1²) local error over 1/β1 steps: slope ≈ 1; a first-order mismatch gives ≈ 0",
        lower=True,
    )


# ------------------------------------------------------ Fisher identities
def empirical_fisher_check(rng: np.random.Generator) -> Check:
    """Batch size 1, one Linear layer (MSE, bias): ``U ⊗ Gc`` against the empirical Fisher."""
    d_in, d_out = 3, 2
    weights = [rng.uniform(-1, 1, (d_out, d_in + 1))]
    x, y = rng.uniform(-1, 1, (1, d_in)), rng.uniform(-1, 1, (1, d_out))
    problem = DeepLinearProblem(weights, (True,), x, y, "mse", "batch")
    a, g = linear_statistics(x, output_gradients(problem)[0], bias=True, loss_average="batch")
    u, gc = kfac_factors(a, g)
    magnitude = np.kron(np.abs(u), np.abs(gc))
    error = np.abs(np.kron(u, gc) - empirical_fisher(problem)[0]) / np.where(
        magnitude > 0, magnitude, 1
    )
    return Check(
        name="batch-size-1 U⊗Gc vs empirical Fisher (Linear, bias, MSE)",
        measured=float(error.max()) / EPS64,
        bound=3.0,
        unit="eps64·|U|⊗|Gc|",
        rule="the same four factors a_i a_j g_k g_l rounded in another order: (1+2)·eps",
    )


def absolute_problem(problem: DeepLinearProblem) -> DeepLinearProblem:
    """The same problem with ``|W~_l|``, ``|x|`` and (MSE) ``|y|``: the magnitudes of the sums."""
    y = np.abs(problem.y) if problem.loss == "mse" else problem.y
    return DeepLinearProblem(
        [np.abs(w) for w in problem.weights],
        problem.bias,
        np.abs(problem.x),
        y,
        problem.loss,
        problem.loss_average,
        problem.reduce_after,
    )


def kfac_block(problem: DeepLinearProblem, layer: int, approx: str) -> np.ndarray:
    """``U ⊗ Gc`` from exact-Fisher backprop vectors, ``Gc`` summed over the backward passes."""
    inputs = layer_inputs(problem)[layer]
    grad_factor: np.ndarray | float = 0.0
    for column in ggn_backprop_vectors(problem)[layer]:  # one backward pass per column of Λ^½
        a, g = linear_statistics(
            inputs,
            column,
            bias=problem.bias[layer],
            approx=approx,
            loss_average=problem.loss_average,
        )
        input_factor, pass_factor = kfac_factors(a, g)
        grad_factor = grad_factor + pass_factor
    return np.kron(input_factor, grad_factor)


def kfac_exactness_check(rng: np.random.Generator, approx: str) -> Check:
    """Deep linear net (3 layers, MSE, B = 2, S = 3): KFAC-``approx`` = exact GGN, every layer."""
    widths, bias = (3, 3, 2, 2), (True, False, True)
    weights = [rng.uniform(-1, 1, (widths[i + 1], widths[i] + bias[i])) for i in range(3)]
    x = rng.uniform(-1, 1, (2, 3, widths[0]))
    reduce_after = 1 if approx == "reduce" else None
    y = rng.uniform(-1, 1, (2, widths[-1]) if reduce_after is not None else (2, 3, widths[-1]))
    problem = DeepLinearProblem(weights, bias, x, y, "mse", "batch", reduce_after)
    ggn, magnitude = exact_ggn(problem), exact_ggn(absolute_problem(problem))
    worst = 0.0
    for layer in range(len(weights)):
        error = np.abs(kfac_block(problem, layer, approx) - ggn[layer])
        scale = np.where(magnitude[layer] > 0, magnitude[layer], 1)
        worst = max(worst, float((error / scale).max()) / EPS64)
    terms = problem.batch_size * problem.shared
    lengths = [w.shape[1] for w in weights] + [w.shape[0] for w in weights]
    lengths += [problem.shared, terms * widths[-1]]
    return Check(
        name=f"KFAC-{approx} exact on a 3-layer deep linear net ({approx} setting)",
        measured=worst,
        bound=float(sum(length + 2 for length in lengths)),
        unit="eps64·GGN(|W|,|x|,|y|)",
        rule="forward/backward chains, the mean over S, the final sum: Σ(ℓ+2)·eps",
    )


# ------------------------------------------------------------------ driver
def run_selfcheck(quick: bool = False, seed: int = 0) -> list[Check]:
    """All checks; ``quick`` runs only the default mode in the trajectory checks.

    Args:
        quick: Restrict the trajectory checks to the default mode.
        seed: Seed of the random data.

    Returns:
        The checks, in display order.
    """
    rng = np.random.default_rng(seed)
    modes = ["default"] if quick else list(MODES)
    steps: list[Callable[[], list[Check]]] = [
        lambda: [projection_check(name, rng) for name in STRUCTURE_NAMES],
        lambda: [trajectory_check(name, modes, rng) for name in STRUCTURE_NAMES],
        lambda: [ikfac_fixed_point_check(rng)],
        lambda: [ikfac_kfac_order_check(seed)],
        lambda: [empirical_fisher_check(rng)],
        lambda: [kfac_exactness_check(rng, "expand"), kfac_exactness_check(rng, "reduce")],
    ]
    return [check for step in steps for check in step()]


def format_table(checks: list[Check]) -> str:
    """A fixed-width table: check, measured, bound, unit, verdict; then the overall verdict."""
    width = max(len(check.name) for check in checks)
    header = f"{'check':<{width}}  {'measured':>11}  {'bound':>11}  {'unit':<24} verdict"
    lines = [header, "-" * len(header)]
    for check in checks:
        relation = ">=" if check.lower else "<="
        verdict = "PASS" if check.passed else "FAIL"
        lines.append(
            f"{check.name:<{width}}  {check.measured:>11.4g}  {relation}{check.bound:>9.4g}  "
            f"{check.unit:<24} {verdict}"
        )
    failed = sum(not check.passed for check in checks)
    lines.append("-" * len(header))
    lines.append(
        f"{len(checks) - failed}/{len(checks)} passed"
        + ("" if not failed else f", {failed} FAILED")
    )
    return "\n".join(lines)
