"""Short version of the real-data training runs (``verification.training``; full: 1000 steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from verification import cli, training
from verification.experiments.digits import BATCH_SIZE
from verification.tolerances import EPS_BY_NAME

STEPS = 3


def _float32_rule(model: str) -> float:
    """Largest relative ``KKᵀ``/``CCᵀ`` distance float32 may have from float64 after ``STEPS``.

    Per step the longest sum is ``n`` terms (the statistics' rows: the batch,
    times the 64 output positions for the conv layer, plus the ``d`` of a
    product), each step errs by at most ``γ_n = n·u`` relative (Higham Thm. 3.5;
    ``u = eps/2``), ``KKᵀ`` doubles it, and the steps add up: ``2·STEPS·n·u``.
    """
    rows = BATCH_SIZE * (64 if model == "conv" else 1)
    return 2 * STEPS * (rows + 129) * EPS_BY_NAME["float32"] / 2


def test_every_precision_trains_and_the_json_is_complete(tmp_path: Path) -> None:
    """Both models, float64 and every precision: finite, nothing skipped, deviations present."""
    path = tmp_path / "training.json"
    assert training.main(["--steps", str(STEPS), "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    runs = result["runs"]
    assert result["steps"] == STEPS
    expected = [(m, p) for m in training.MODELS for p in ("float64", *training.PRECISIONS)]
    assert [(run["model"], run["precision"]) for run in runs] == expected
    for run in runs:
        assert run["skipped"] == 0 and run["non_finite_losses"] == 0, run
        assert 0.0 <= run["test_accuracy"] <= 1.0 and math.isfinite(run["final_train_loss"])
        assert run["checkpoints"] == [STEPS]
        assert all(0.0 <= share <= 1.0 for share in run["rounded_to_nothing"].values())
        assert run["condition_KKt"] >= 1.0  # λ_max/λ_min, both power-iteration estimates
        if run["precision"] == "float64":
            assert run["deviation"] == {"K": [], "C": []}
            continue
        deviations = run["deviation"]["K"] + run["deviation"]["C"]
        assert all(math.isfinite(value) for value in deviations)
        rule = _float32_rule(run["model"])
        if run["precision"] == "float32":
            assert max(deviations) <= rule  # rule: _float32_rule
        if run["precision"] == "bfloat16":
            assert max(deviations) > rule  # the float32 rule rejects bf16's rounding
    text = "\n".join(training.markdown(result))
    assert "## Training on digits" in text and "float16+GradScaler" in text


def test_bad_steps_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``--steps 0`` is an error, not an empty report; so is ``singd-verify --training -1``."""
    with pytest.raises(SystemExit) as error:
        training.main(["--steps", "0"])
    assert error.value.code == 2
    assert "--steps must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--training", "-1"])
    assert "--training must be a number of steps" in capsys.readouterr().err
