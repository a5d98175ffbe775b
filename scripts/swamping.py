"""Measure bf16/fp16 update swamping of the SINGD factors and the guards against it.

The case of the stability issue ("case 2"): the pure-bf16 ``64 → 64 → 10`` ReLU
MLP on scikit-learn's digits (:mod:`verification.experiments.digits`: pixels in
[0, 1], fixed split, seeded mini-batches of 64), SINGD with ``lr_cov = 1e-3``,
``T = 1`` and otherwise the digits experiment's hyper-parameters, 100 steps.
The same run (same initial weights, same mini-batches) in float32 and float64
is the reference.  The factor update of SPEC §1.3/§1.4a, ``K ← K − β1·K·m``,
adds an increment of about ``β1·‖m‖ ≈ 5e-4`` to entries of size 1, below half
an ulp of bf16 (``2⁻⁹ ≈ 2e-3``), so without a guard ``K`` never moves.

For every structure and guard variant this prints, per layer and factor, the
fidelities ``‖K_x − K_ref‖_F / ‖K_ref − I‖_F`` against the float32 and the
float64 run, the exact bytes of the optimizer's factor state (storage of every
factor entry of every layer) and the median wall time of ``step()`` and of a
whole iteration (forward, backward, ``step``) over ``--timing-steps`` steps
after ``--warmup`` warm-up steps.  Times are measured, not asserted.

Usage (from the repository root, so that its ``singd`` is imported):
``PYTHONPATH=. python scripts/swamping.py [--steps 100] [--structures dense diagonal]
[--guards none compensated stochastic master] [--dtype bfloat16] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import singd.optim.singd as singd_module
from singd import SINGD
from verification.experiments.digits import BATCH_SIZE, KRONECKER_HYPER, load_data, make_model

#: Hyper-parameters of case 2: the digits experiment's, with the issue's β1 and T.
HYPER = {**KRONECKER_HYPER, "lr_cov": 1e-3, "T": 1}
#: The guard variants by command-line name (``none`` = ``factor_guard=None``).
GUARDS = {
    "none": None,
    "compensated": "compensated",
    "stochastic": "stochastic",
    "master": "master",
    "master-fp32": "master",  # products with the float32 master itself (no half copy)
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Result:
    """One row: a structure × guard variant run in the low precision dtype.

    Attributes:
        structure: Structure of both ``K`` and ``C``.
        guard: ``factor_guard`` name (``"none"`` for ``None``).
        fidelity_fp32: Factor name (``"<layer>.K"``) → ``‖X − X_32‖ / ‖X_32 − I‖``.
        fidelity_fp64: The same against the float64 run.
        used_fp32: Max over factors of the fidelity (vs float32) of the factors as the
            products use them (rounded to the low dtype; differs from the stored
            factors only for ``master``).
        state_bytes: Bytes of every factor-state tensor of every layer.
        step_ms: Median ms of ``step()``.
        iteration_ms: Median ms of forward + backward + ``step()``.
    """

    structure: str
    guard: str
    fidelity_fp32: dict[str, float]
    fidelity_fp64: dict[str, float]
    used_fp32: float
    state_bytes: int
    step_ms: float
    iteration_ms: float


def make_optimizer(model: nn.Module, structure: str, guard: str | None) -> SINGD:
    """SINGD of case 2 on ``model`` with ``factor_guard=guard``."""
    return SINGD(model, structures=(structure, structure), factor_guard=guard, **HYPER)


def train(
    dtype: torch.dtype, structure: str, guard: str | None, steps: int
) -> tuple[dict[str, torch.Tensor], SINGD, nn.Module]:
    """Run case 2 in ``dtype``; return the final factors (dense, float64) by name."""
    if guard == "master-fp32":
        return _with_float32_products(lambda: train(dtype, structure, "master", steps))
    data = load_data(dtype)
    model = make_model(dtype)
    optimizer = make_optimizer(model, structure, guard)
    generator = torch.Generator().manual_seed(0)
    loss_function = nn.CrossEntropyLoss()
    for _ in range(steps):
        batch = torch.randint(len(data.y_train), (BATCH_SIZE,), generator=generator)
        optimizer.zero_grad()
        loss_function(model(data.x_train[batch]), data.y_train[batch]).backward()
        optimizer.step()
    return factors_of(optimizer), optimizer, model


def _with_float32_products(call: Any) -> Any:
    """``call()`` with ``master``'s products done on the float32 master (no half copy)."""
    original = singd_module.compute_copy
    singd_module.compute_copy = lambda factor, dtype: factor
    try:
        return call()
    finally:
        singd_module.compute_copy = original


def factors_of(optimizer: SINGD, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``"<layer>.K"``/``"<layer>.C"`` → the dense factor (rounded to ``dtype``) in float64."""
    return {
        f"{name}.{factor}": optimizer.layer_state(name)[factor]
        .to(dtype=dtype)
        .to_dense()
        .to(torch.float64)
        for name in optimizer.layer_names()
        for factor in ("K", "C")
    }


def fidelity(run: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """``‖X − X_ref‖_F / ‖X_ref − I‖_F`` per factor."""
    out = {}
    for key, reference in ref.items():
        eye = torch.eye(reference.shape[0], dtype=torch.float64)
        out[key] = float((run[key] - reference).norm() / (reference - eye).norm())
    return out


def state_bytes(optimizer: SINGD) -> int:
    """Bytes of every factor-state tensor of every layer (what ``state_dict`` saves)."""
    entry = optimizer.state_dict()["kronecker"]["layers"]
    return sum(
        t.numel() * t.element_size()
        for layer in entry.values()
        for storage in layer["factors"].values()
        for t in storage.values()
    )


def time_steps(
    dtype: torch.dtype, structure: str, guard: str | None, warmup: int, repeats: int
) -> tuple[float, float]:
    """Median ms of ``step()`` and of a whole iteration, after ``warmup`` iterations."""
    if guard == "master-fp32":
        return _with_float32_products(
            lambda: time_steps(dtype, structure, "master", warmup, repeats)
        )
    data = load_data(dtype)
    model = make_model(dtype)
    optimizer = make_optimizer(model, structure, guard)
    generator = torch.Generator().manual_seed(1)
    loss_function = nn.CrossEntropyLoss()
    step_times, iteration_times = [], []
    for index in range(warmup + repeats):
        batch = torch.randint(len(data.y_train), (BATCH_SIZE,), generator=generator)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_function(model(data.x_train[batch]), data.y_train[batch]).backward()
        middle = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        if index >= warmup:
            step_times.append(end - middle)
            iteration_times.append(end - start)
    return 1e3 * statistics.median(step_times), 1e3 * statistics.median(iteration_times)


def run(
    structures: Sequence[str],
    guards: Sequence[str],
    dtype: torch.dtype,
    steps: int,
    warmup: int,
    repeats: int,
) -> list[Result]:
    """Every structure × guard row (the references are computed once per structure)."""
    results = []
    for structure in structures:
        ref32, *_ = train(torch.float32, structure, None, steps)
        ref64, *_ = train(torch.float64, structure, None, steps)
        for name in guards:
            guard = GUARDS[name]
            low, optimizer, _ = train(
                dtype, structure, name if name == "master-fp32" else guard, steps
            )
            used = max(fidelity(factors_of(optimizer, dtype), ref32).values())
            timed = name if name == "master-fp32" else guard
            step_ms, iteration_ms = time_steps(dtype, structure, timed, warmup, repeats)
            results.append(
                Result(
                    structure,
                    name,
                    fidelity(low, ref32),
                    fidelity(low, ref64),
                    used,
                    state_bytes(optimizer),
                    step_ms,
                    iteration_ms,
                )
            )
        exact = fidelity(ref32, ref32)
        results.append(
            Result(structure, "float32 run", exact, fidelity(ref32, ref64), 0.0, 0, 0.0, 0.0)
        )
        rounded = {key: value.to(dtype).to(torch.float64) for key, value in ref32.items()}
        floor = fidelity(rounded, ref32)
        results.append(
            Result(structure, "fp32 run rounded", floor, fidelity(rounded, ref64), 0.0, 0, 0, 0)
        )
    return results


def print_table(results: Sequence[Result]) -> None:
    """Markdown: one row per structure × guard, the worst factor and each factor."""
    keys = list(results[0].fidelity_fp32)
    header = ["structure", "guard", "max vs fp32", "max vs fp64", "used vs fp32", *keys]
    header += ["state B", "step ms", "iter ms"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        cells = [
            r.structure,
            r.guard,
            f"{max(r.fidelity_fp32.values()):.3g}",
            f"{max(r.fidelity_fp64.values()):.3g}",
            f"{r.used_fp32:.3g}",
            *(f"{r.fidelity_fp32[k]:.3g}/{r.fidelity_fp64[k]:.3g}" for k in keys),
            str(r.state_bytes),
            f"{r.step_ms:.3f}",
            f"{r.iteration_ms:.3f}",
        ]
        print("| " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> list[Result]:
    """Command line entry (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--structures", nargs="*", default=["dense", "diagonal"])
    parser.add_argument("--guards", nargs="*", choices=list(GUARDS), default=list(GUARDS))
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--lr-cov", type=float, default=HYPER["lr_cov"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--timing-steps", type=int, default=50)
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    HYPER["lr_cov"] = args.lr_cov
    results = run(
        args.structures, args.guards, DTYPES[args.dtype], args.steps, args.warmup, args.timing_steps
    )
    print_table(results)
    if args.json is not None:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in results], handle, indent=2)
    return results


if __name__ == "__main__":
    main()
