"""Long-horizon factor dynamics on a fixed statistics stream, in every precision.

One ``Linear(d_i → d_o)`` layer is fed a seeded stream: inputs ``x_t = z_t L``
(``z_t`` standard normal, ``LᵀL = U`` of a chosen ``cond(U)``) and output
gradients ``g_t = r_t`` (a loss ``Σ out · r_t`` with ``loss_average=None``:
``G`` does not depend on ``W``), the *same* stream for every precision.  Each
case is recorded (:mod:`verification.recording`) and judged twice, separately:

* **implementation vs its model**: :func:`verification.comparison.
  compare_singd_blocks`, teacher-forced blocks of :data:`BLOCK` steps against
  the float64 oracle under the run's arithmetic model (a bound that does not
  compound however long the run; passes iff ``error/bound ≤ 1``);
* **the algorithm's own drift**: the relative distance of ``KKᵀ`` (and
  ``CCᵀ``) of the low-precision torch run from the float64 oracle fed the same
  recorded tensors, after every step (``drift_torch``), and the same for the
  *emulated* bf16/fp16 oracle run on its own along the whole trajectory
  (``drift_emulated``).  Where the two drifts agree in size the drift is the
  algorithm's in that arithmetic, not an implementation defect.  The drift is
  reported, not judged: the arithmetic makes it what it is (see
  :mod:`verification.fixed_point` for its size at a fixed point).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from reference.numbers import emulated_numbers
from reference.statistics import linear_statistics
from reference.structures import STRUCTURE_NAMES
from reference.updates import SINGDHyperparameters, StepRecord, singd_trajectory
from verification.arithmetic import precision_for
from verification.comparison import compare_singd_blocks
from verification.recording import LossFunction, RecordedRun, record_run, to_numpy
from verification.replay import replay_singd
from verification.scenarios import (
    BASE_HYPER,
    DTYPES,
    FACTOR_GUARD,
    VARIANTS,
    Scenario,
    make_singd,
)

#: Steps per teacher-forced block (as in ``singd-verify``'s grid).
BLOCK = 5

#: Layer sizes and rows per step of the stream.
D_IN, D_OUT, ROWS = 8, 4, 16

#: Precisions: ``(model dtype, factor dtype or None)``.
PRECISIONS: dict[str, tuple[str, str | None]] = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "float16": ("float16", None),
    "float32+bfloat16 factors": ("float32", "bfloat16"),
}

#: Condition numbers of ``U``.
CONDITIONS = (1.0, 1e4, 1e8)

#: Modes (keys of :data:`verification.scenarios.VARIANTS`).
MODES = ("singd", "ikfac")

_SCENARIO = Scenario(
    "stream",
    "Linear(8→4), fixed seeded stream",
    lambda: nn.Linear(D_IN, D_OUT),
    (ROWS, D_IN),
    loss_average=None,
)


@dataclass(frozen=True)
class Case:
    """One long-horizon case.

    Attributes:
        structures: ``(K, C)`` structure names.
        precision: Key of :data:`PRECISIONS`.
        cond: ``cond(U)``.
        mode: Key of :data:`verification.scenarios.VARIANTS`.
        steps: Optimizer steps.
    """

    structures: tuple[str, str]
    precision: str
    cond: float
    mode: str
    steps: int = 1000


@dataclass(frozen=True)
class Result:
    """The measurements of one case.

    Attributes:
        case: The case.
        block_ratio: Worst ``error/bound`` of the teacher-forced blocks over all entries.
        block_key: The state entry where it is worst.
        drift_torch: Largest relative ``KKᵀ``/``CCᵀ`` distance of torch from the float64 replay.
        drift_torch_final: The same after the last step.
        drift_emulated: The same for the emulated oracle's own trajectory (``None``
            for float32 model or factors).
        drift_emulated_final: The same after the last step.
        skipped: Steps the torch optimizer skipped.
        seconds: Wall time.
    """

    case: Case
    block_ratio: float
    block_key: str
    drift_torch: float
    drift_torch_final: float
    drift_emulated: float | None
    drift_emulated_final: float | None
    skipped: int
    seconds: float

    @property
    def passed(self) -> bool:
        """Whether the implementation stays within its model's bound (blocks)."""
        return self.block_ratio <= 1.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        fields = asdict(self)
        fields["case"] = {**asdict(self.case), "structures": list(self.case.structures)}
        fields["passed"] = self.passed
        return fields


def stream_factor(cond: float, seed: int = 0) -> np.ndarray:
    """``L = diag(√σ) Qᵀ`` (``d_i × d_i``) with ``σ`` log-spaced in ``[1/cond, 1]``."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((D_IN, D_IN)))
    q = q * np.sign(np.diag(r))
    sigma = np.logspace(0.0, -math.log10(cond), D_IN) if cond > 1 else np.ones(D_IN)
    return np.sqrt(sigma)[:, None] * q.T


def _loss_function(cond: float, dtype: torch.dtype, seed: int = 0) -> LossFunction:
    """``loss_fn(model, index)`` of :func:`verification.recording.record_run` on the stream."""
    factor = torch.from_numpy(stream_factor(cond, seed))
    generator = torch.Generator().manual_seed(seed + 1)

    def loss_fn(module: nn.Module, index: int) -> Tensor:
        z = torch.randn((ROWS, D_IN), generator=generator, dtype=torch.float64)
        r = torch.randn((ROWS, D_OUT), generator=generator, dtype=torch.float64)
        inputs = (z @ factor).to(dtype)
        return (module(inputs) * r.to(dtype)).sum()

    return loss_fn


def hyper_of(case: Case) -> SINGDHyperparameters:
    """The base hyper-parameters of ``singd-verify`` with the case's mode and structures."""
    return SINGDHyperparameters(
        **{**BASE_HYPER, **VARIANTS[case.mode], "structures": case.structures}
    )


def record_case(case: Case, seed: int = 0) -> tuple[RecordedRun, SINGDHyperparameters, int]:
    """Record the torch run of ``case``; returns the run, its hyper-parameters, skipped steps."""
    model_dtype, factor_dtype = PRECISIONS[case.precision]
    torch.manual_seed(seed)
    model = _SCENARIO.make_model().to(DTYPES[model_dtype])
    hyper = hyper_of(case)
    factor = None if factor_dtype is None else DTYPES[factor_dtype]
    optimizer = make_singd(model, _SCENARIO, hyper, factor)
    loss_fn = _loss_function(case.cond, DTYPES[model_dtype], seed)
    run = record_run(model, optimizer, loss_fn, case.steps)
    return run, hyper, case.steps - optimizer.steps


def _gram_distance(x: np.ndarray, reference: np.ndarray) -> float:
    """``‖XXᵀ − RRᵀ‖_F / ‖RRᵀ‖_F`` (``inf`` if ``X`` is not finite)."""
    if not np.all(np.isfinite(x)):
        return math.inf
    target = reference @ reference.T
    return float(np.linalg.norm(x @ x.T - target) / np.linalg.norm(target))


def _emulated_trajectory(
    run: RecordedRun, hyper: SINGDHyperparameters, storage: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(K, C)`` after every step of the emulated oracle on the recorded stream (no restarts)."""
    numbers = emulated_numbers(storage)
    (name,) = run.layers
    records = []
    for step in run.steps:
        layer = step[name]
        stats = tuple(
            linear_statistics(
                numbers.asarray(to_numpy(p.inputs)),
                numbers.asarray(to_numpy(p.output_grads)),
                bias=True,
                approx="expand",
                loss_average=None,
            )
            for p in layer.passes
        )
        records.append(StepRecord(grad=numbers.asarray(layer.grad), stats=stats))
    states = singd_trajectory(run.initial_weights[name], records, hyper, numbers)
    return [(numbers.to_float64(s.K), numbers.to_float64(s.C)) for s in states]


def run_case(case: Case, seed: int = 0) -> Result:
    """Record, compare in blocks, and measure both drifts of one case."""
    start = time.perf_counter()
    run, hyper, skipped = record_case(case, seed)
    model_dtype, factor_dtype = PRECISIONS[case.precision]
    precision = precision_for(
        DTYPES[model_dtype],
        None if factor_dtype is None else DTYPES[factor_dtype],
        factor_guard=FACTOR_GUARD,
    )
    blocks = compare_singd_blocks(run, hyper, precision, "expand", None, block=BLOCK)
    worst = max(blocks, key=lambda d: 0.0 if d.error == 0 else d.error / d.bound)
    block_ratio = 0.0 if worst.error == 0 else worst.error / worst.bound
    (name,) = run.layers
    replay = replay_singd(run, hyper, "expand", None)[name]
    torch_drift = [
        max(
            _gram_distance(step[name].state["K"], state.K),
            _gram_distance(step[name].state["C"], state.C),
        )
        for step, state in zip(run.steps, replay, strict=True)
    ]
    emulated_drift = None
    storage = factor_dtype or model_dtype
    if storage in ("bfloat16", "float16") and factor_dtype is None:
        emulated = _emulated_trajectory(run, hyper, storage)
        emulated_drift = [
            max(_gram_distance(k, state.K), _gram_distance(c, state.C))
            for (k, c), state in zip(emulated, replay, strict=True)
        ]
    return Result(
        case,
        block_ratio,
        worst.key,
        max(torch_drift),
        torch_drift[-1],
        None if emulated_drift is None else max(emulated_drift),
        None if emulated_drift is None else emulated_drift[-1],
        skipped,
        time.perf_counter() - start,
    )


def default_cases(steps: int = 100) -> tuple[Case, ...]:
    """The short version: two structure pairs × bf16/fp16 × cond {1, 1e8} × IKFAC."""
    return tuple(
        Case(pair, precision, cond, "ikfac", steps)
        for pair, precision, cond in itertools.product(
            (("dense", "dense"), ("tril", "diagonal")), ("bfloat16", "float16"), (1.0, 1e8)
        )
    )


def full_cases(steps: int = 1000, structures: Sequence[str] = STRUCTURE_NAMES) -> tuple[Case, ...]:
    """Every structure (for ``K`` and ``C`` alike) × precision × cond × mode, ``steps`` each."""
    return tuple(
        Case((structure, structure), precision, cond, mode, steps)
        for structure, precision, cond, mode in itertools.product(
            structures, PRECISIONS, CONDITIONS, MODES
        )
    )


#: Structures of the ``medium`` grid: the dense, diagonal, triangular, Toeplitz and
#: hierarchical families, one member each.
MEDIUM_STRUCTURES = ("dense", "diagonal", "tril", "triltoeplitz", "hierarchical2_3")


def grid_cases(grid: str) -> tuple[Case, ...]:
    """``default`` (100 steps, 8 cases), ``medium`` (1000 steps, :data:`MEDIUM_STRUCTURES`,
    120 cases) or ``full`` (1000 steps, every structure, 336 cases).

    Raises:
        ValueError: an unknown grid name.
    """
    if grid == "default":
        return default_cases(100)
    if grid == "medium":
        return full_cases(1000, MEDIUM_STRUCTURES)
    if grid == "full":
        return full_cases(1000)
    raise ValueError(f"long-horizon grid must be 'default', 'medium' or 'full', got {grid!r}")


def summary(results: Sequence[Result], grid: str, seconds: float) -> dict[str, object]:
    """JSON-ready: the grid, pass count, wall time and every result."""
    return {
        "grid": grid,
        "passed": sum(r.passed for r in results),
        "cases": len(results),
        "seconds": seconds,
        "results": [r.as_dict() for r in results],
    }


def markdown(result: dict[str, object]) -> list[str]:
    """The ``singd-verify --long-horizon`` report section of :func:`summary`'s result."""
    lines = [
        "## Long-horizon factor dynamics (fixed statistics stream)",
        "",
        f"Grid `{result['grid']}`: {result['passed']}/{result['cases']} cases within the "
        f"teacher-forced block bound (blocks of {BLOCK} steps, error/bound ≤ 1), "
        f"{result['seconds']:.0f} s (`verification/longhorizon.py`). Drift: relative distance of "
        "KKᵀ/CCᵀ from the float64 replay after the last step (reported, not judged).",
        "",
        "| K/C | precision | cond(U) | mode | steps | block error/bound | drift torch | "
        "drift emulated | skipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["results"]:  # type: ignore[union-attr]
        case = row["case"]
        emulated = row["drift_emulated_final"]
        lines.append(
            f"| {'/'.join(case['structures'])} | {case['precision']} | {case['cond']:.0e} | "
            f"{case['mode']} | {case['steps']} | {row['block_ratio']:.2f} | "
            f"{row['drift_torch_final']:.2g} | {'–' if emulated is None else f'{emulated:.2g}'} "
            f"| {row['skipped']} |"
        )
    return [*lines, ""]


def run_cases(cases: Sequence[Case], progress: bool = False) -> list[Result]:
    """Run every case (optionally printing one line each)."""
    results = []
    for case in cases:
        result = run_case(case)
        results.append(result)
        if progress:
            print(format_row(result), flush=True)
    return results


def format_row(result: Result) -> str:
    """One line: case, block ratio, drifts, skipped steps, time."""
    case = result.case
    emulated = "–" if result.drift_emulated is None else f"{result.drift_emulated_final:.2g}"
    return (
        f"{'/'.join(case.structures):<34} {case.precision:<25} cond {case.cond:<6.0e} "
        f"{case.mode:<6} blocks {result.block_ratio:5.2f} ({result.block_key}) "
        f"drift torch {result.drift_torch_final:.2g} (max {result.drift_torch:.2g}) "
        f"emulated {emulated} skipped {result.skipped} {result.seconds:.1f}s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m verification.longhorizon [--grid G] [--structures S…] [--steps N] [--json P]``.

    Exit status 1 if a case exceeds its block bound.
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=("default", "medium", "full"), default="default")
    parser.add_argument("--full", action="store_true", help="the same as --grid full")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--structures", nargs="*", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be positive, got {args.steps}")
    grid = "full" if args.full else args.grid
    if args.structures:
        cases = full_cases(args.steps or 1000, args.structures)
    elif args.steps is not None:
        cases = tuple(replace(case, steps=args.steps) for case in grid_cases(grid))
    else:
        cases = grid_cases(grid)
    start = time.perf_counter()
    results = run_cases(cases, progress=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary(results, grid, time.perf_counter() - start), handle, indent=1)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
