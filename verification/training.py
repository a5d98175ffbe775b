"""Training on real data in every precision, against the float64 run (stability issue, "b").

SINGD (SPEC §1.3–§1.5) trains two models on scikit-learn's digits
(:mod:`verification.experiments.digits`: the fixed 70/30 split, mini-batches
of 64 from a seeded generator, the digits experiment's hyper-parameters) in

* ``float32``: model and factors in float32;
* ``bfloat16``: model, activations and factors in bfloat16 (no master copy);
* ``float16+GradScaler``: a float16 model and factors with the standard
  recipe ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``
  (scaler defaults, ``init_scale = 2^16``);
* ``float32+bfloat16 factors``: a float32 model, ``preconditioner_dtype = bfloat16``;

and once in float64 (model and factors), from the same initial weights (the
float32 initialisation, rounded to the run's dtype) and the same mini-batch
order.  Per run: test accuracy, final training loss, steps the optimizer
skipped, non-finite losses, the telemetry of the last step (``SINGD(...,
telemetry=True)``: the largest share over layers of factor entries the step
rounded to nothing, and the largest power-iteration condition number of
``KKᵀ``), and the preconditioner's deviation from the
float64 run, ``‖KKᵀ − K₆₄K₆₄ᵀ‖_F / ‖K₆₄K₆₄ᵀ‖_F`` (and ``CCᵀ``), the largest over
layers, at every checkpoint.  The deviation is the whole trajectory's: the
runs see different rounding, so weights, statistics and factors part ways.

Models: the digits MLP ``64 → 64 → 10`` and a small convolutional net
``Conv2d(1 → 8, 3×3, pad 1) → ReLU → AvgPool(2) → Linear(128 → 10)`` on the
8×8 images.

Run ``python -m verification.training [--steps N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from singd import SINGD
from verification.experiments.digits import BATCH_SIZE, KRONECKER_HYPER, SEED, load_data

#: Optimizer steps of the full run (the issue's "≥ 1000").
DEFAULT_STEPS = 1000
#: Steps between two deviation measurements.
CHECKPOINT_EVERY = 100

#: Precision name → (model dtype, factor dtype or ``None`` for the model's, GradScaler).
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None, bool]] = {
    "float32": (torch.float32, None, False),
    "bfloat16": (torch.bfloat16, None, False),
    "float16+GradScaler": (torch.float16, None, True),
    "float32+bfloat16 factors": (torch.float32, torch.bfloat16, False),
}
#: The reference run's precision.
REFERENCE = (torch.float64, None, False)


def mlp() -> nn.Module:
    """The digits MLP ``64 → 64 → 10`` (ReLU)."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def conv_net() -> nn.Module:
    """``Conv2d(1 → 8, 3×3, pad 1) → ReLU → AvgPool2d(2) → Linear(128 → 10)`` on 8×8 images."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


#: Model name → constructor (float32 parameters, initialised from the global seed).
MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "conv": conv_net}


@dataclass(frozen=True)
class TrainingRun:
    """One run's outcome.

    Attributes:
        model: Key of :data:`MODELS`.
        precision: Key of :data:`PRECISIONS`, or ``"float64"``.
        steps: ``step()`` calls (mini-batches).
        skipped: Calls that left the state unchanged (non-finite values: the
            scaler's inf check or the optimizer's own).
        non_finite_losses: Mini-batches whose loss was not finite.
        test_accuracy: Fraction of the 540 test images classified correctly.
        final_train_loss: Cross-entropy on the whole training set after the last step.
        deviation: ``{"K": [...], "C": [...]}``: the largest relative distance over
            layers of ``KKᵀ`` (``CCᵀ``) from the float64 run at each checkpoint
            (empty for the float64 run itself).
        checkpoints: Step counts of ``deviation``.
        rounded_to_nothing: ``{"K": share, "C": share}``: the largest over layers of
            the share of entries the last factor step left unchanged (telemetry).
        condition_KKt: The largest power-iteration ``cond(KKᵀ)`` over layers, at the end.
        seconds: Wall time.
    """

    model: str
    precision: str
    steps: int
    skipped: int
    non_finite_losses: int
    test_accuracy: float
    final_train_loss: float
    deviation: dict[str, list[float]]
    checkpoints: list[int]
    rounded_to_nothing: dict[str, float]
    condition_KKt: float
    seconds: float

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return asdict(self)


#: ``{step: {layer: {"K": KKᵀ, "C": CCᵀ}}}`` (float64 arrays).
Grams = dict[int, dict[str, dict[str, np.ndarray]]]


def _grams(optimizer: SINGD) -> dict[str, dict[str, np.ndarray]]:
    """``KKᵀ`` and ``CCᵀ`` of every layer, formed in float64."""
    grams = {}
    for name in optimizer.layer_names():
        state = optimizer.layer_state(name)
        grams[name] = {}
        for factor in ("K", "C"):
            dense = state[factor].to_dense().to(torch.float64).cpu().numpy()
            grams[name][factor] = dense @ dense.T
    return grams


def _distance(x: np.ndarray, reference: np.ndarray) -> float:
    """``‖X − R‖_F / ‖R‖_F`` (``inf`` for a non-finite ``X``)."""
    if not np.all(np.isfinite(x)):
        return math.inf
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def _evaluate(model: nn.Module, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor) -> tuple:
    """Test accuracy and whole-training-set loss (logits upcast to float32 at least)."""
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)), y
        )
        accuracy = (model(x_test).argmax(dim=1) == y_test).double().mean()
    return float(accuracy), float(loss)


def train(
    model_name: str,
    precision: tuple[torch.dtype, torch.dtype | None, bool],
    label: str,
    steps: int,
    reference: Grams | None = None,
    seed: int = SEED,
    device: str = "cpu",
) -> tuple[TrainingRun, Grams]:
    """Train one model in one precision; returns the run and its checkpoint grams.

    Args:
        model_name: Key of :data:`MODELS`.
        precision: ``(model dtype, factor dtype or None, GradScaler)``.
        label: The precision's name in the result.
        steps: Mini-batches.
        reference: The float64 run's grams, to measure the deviation against.
        seed: Seed of the initialisation and the mini-batch order.
        device: Where the model and data live.
    """
    start = time.perf_counter()
    dtype, factor_dtype, scaled = precision
    data = load_data(torch.float64)
    x, y = data.x_train.to(device, dtype), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device, dtype), data.y_test.to(device)
    torch.manual_seed(seed)
    model = MODELS[model_name]().to(device, dtype)
    optimizer = SINGD(
        model,
        structures=("dense", "dense"),
        preconditioner_dtype=(factor_dtype, factor_dtype),
        telemetry=True,
        **KRONECKER_HYPER,
    )
    scaler = torch.amp.GradScaler(device) if scaled else None
    generator = torch.Generator().manual_seed(seed)
    loss_dtype = torch.promote_types(dtype, torch.float32)
    non_finite, grams = 0, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped steps are counted, not printed
        for step in range(1, steps + 1):
            batch = torch.randint(len(y), (BATCH_SIZE,), generator=generator).to(device)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]).to(loss_dtype), y[batch])
            non_finite += int(not math.isfinite(float(loss.detach())))
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            if step % CHECKPOINT_EVERY == 0 or step == steps:
                grams[step] = _grams(optimizer)
    deviation: dict[str, list[float]] = {"K": [], "C": []}
    if reference is not None:
        for step, layers in grams.items():
            for factor in deviation:
                deviation[factor].append(
                    max(
                        _distance(g[factor], reference[step][name][factor])
                        for name, g in layers.items()
                    )
                )
    accuracy, final_loss = _evaluate(model, x, y, x_test, y_test)
    report = optimizer.telemetry().values()
    stuck = {
        f: max(getattr(layer, f"rounded_to_nothing_{f}") or 0.0 for layer in report) for f in "KC"
    }
    run = TrainingRun(
        model_name,
        label,
        steps,
        steps - optimizer.steps,
        non_finite,
        accuracy,
        final_loss,
        deviation,
        sorted(grams),
        stuck,
        max(layer.gram_K.condition for layer in report),
        time.perf_counter() - start,
    )
    return run, grams


def run_all(
    steps: int = DEFAULT_STEPS,
    models: Sequence[str] = tuple(MODELS),
    precisions: Sequence[str] = tuple(PRECISIONS),
    device: str = "cpu",
    progress: bool = False,
) -> list[TrainingRun]:
    """The float64 run and every precision's run of every model."""
    results = []
    for model_name in models:
        reference, grams = train(model_name, REFERENCE, "float64", steps, device=device)
        results.append(reference)
        if progress:
            print(format_row(reference), flush=True)
        for name in precisions:
            run, _ = train(model_name, PRECISIONS[name], name, steps, grams, device=device)
            results.append(run)
            if progress:
                print(format_row(run), flush=True)
    return results


def summary(runs: Sequence[TrainingRun], seconds: float) -> dict[str, object]:
    """JSON-ready: the runs, the step count and the wall time (``singd-verify --training``)."""
    return {
        "steps": runs[0].steps if runs else 0,
        "seconds": seconds,
        "runs": [run.as_dict() for run in runs],
    }


def table_rows(runs: Sequence[dict]) -> list[list[str]]:
    """One Markdown row per run (of :meth:`TrainingRun.as_dict`): the figures of the report."""
    rows = []
    for run in runs:
        deviation = ["–", "–"]
        if run["deviation"]["K"]:
            deviation = [
                f"{run['deviation'][f][-1]:.2g} / {max(run['deviation'][f]):.2g}" for f in "KC"
            ]
        rows.append(
            [
                run["model"],
                run["precision"],
                f"{run['test_accuracy']:.4f}",
                f"{run['final_train_loss']:.2g}",
                str(run["skipped"]),
                str(run["non_finite_losses"]),
                *deviation,
                f"{run['rounded_to_nothing']['K']:.2f} / {run['rounded_to_nothing']['C']:.2f}",
                f"{run['condition_KKt']:.2g}",
            ]
        )
    return rows


#: Header of :func:`table_rows`.
TABLE_HEADER = [
    "model",
    "precision",
    "test accuracy",
    "final train loss",
    "skipped steps",
    "non-finite losses",
    "KKᵀ deviation: final / max",
    "CCᵀ deviation: final / max",
    "rounded to nothing, last step: K / C",
    "cond(KKᵀ)",
]


def markdown(result: dict[str, object]) -> list[str]:
    """The ``singd-verify`` report section of :func:`summary`'s result."""
    rows = table_rows(result["runs"])  # type: ignore[arg-type]
    return [
        "## Training on digits in every precision",
        "",
        f"{result['steps']} steps per run, {result['seconds']:.0f} s "
        "(`verification/training.py`). Deviation: the largest over layers of "
        "‖KKᵀ − K₆₄K₆₄ᵀ‖_F/‖K₆₄K₆₄ᵀ‖_F against the float64 run (same initial weights and "
        f"mini-batches), every {CHECKPOINT_EVERY} steps. Not part of the verdict.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def format_row(run: TrainingRun) -> str:
    """One line per run."""
    deviation = ""
    if run.deviation["K"]:
        deviation = (
            f" KKᵀ dev {run.deviation['K'][-1]:.2g} (max {max(run.deviation['K']):.2g})"
            f" CCᵀ dev {run.deviation['C'][-1]:.2g} (max {max(run.deviation['C']):.2g})"
        )
    return (
        f"{run.model:<5} {run.precision:<25} acc {run.test_accuracy:.4f} "
        f"loss {run.final_train_loss:.4f} skipped {run.skipped} "
        f"non-finite {run.non_finite_losses}{deviation} {run.seconds:.0f}s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: one line per run; ``--json`` writes the runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument(
        "--precisions", nargs="*", choices=list(PRECISIONS), default=list(PRECISIONS)
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be positive, got {args.steps}")
    start = time.perf_counter()
    runs = run_all(args.steps, args.models, args.precisions, args.device, progress=True)
    if args.json is not None:
        with open(args.json, "w") as handle:
            json.dump(summary(runs, time.perf_counter() - start), handle, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
