"""Smoke test of the bf16 digits experiment (``verification.experiments.digits``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from verification.experiments import digits


def test_data_split_is_fixed_and_bf16() -> None:
    """The split is deterministic, stratified 70/30, images in bf16 scaled to [0, 1]."""
    first, second = digits.load_data(), digits.load_data()
    assert first.x_train.dtype == torch.bfloat16
    assert torch.equal(first.y_test, second.y_test)
    assert len(first.y_train) + len(first.y_test) == 1797
    assert 0.0 <= float(first.x_train.min()) and float(first.x_train.max()) <= 1.0


def test_few_steps_run_and_write_json(tmp_path: Path) -> None:
    """Each optimizer trains a few pure-bf16 steps; plain KFAC raises (no bf16 inverse)."""
    path = tmp_path / "digits.json"
    results = digits.main(["--steps", "5", "--json", str(path)])
    by_name = {result.optimizer: result for result in results}
    assert set(by_name) == set(digits.OPTIMIZERS)
    for name in ("singd_dense", "singd_diagonal", "adamw", "kfac_upcast"):
        assert by_name[name].error is None, by_name[name].error
        assert 0.0 <= by_name[name].test_accuracy <= 1.0
        assert math.isfinite(by_name[name].final_train_loss)
    error = by_name["kfac"].error  # plain KFAC refuses bf16 for want of a Cholesky there
    assert error is not None and error.startswith("ValueError") and "Cholesky" in error
    assert math.isnan(by_name["kfac"].test_accuracy)
    assert [entry["optimizer"] for entry in json.loads(path.read_text())] == list(by_name)


def test_model_and_optimizer_state_stay_bf16() -> None:
    """Pure bf16: parameters and every floating optimizer-state tensor are bf16."""
    data = digits.load_data()
    model = digits.make_model()
    optimizer = digits.OPTIMIZERS["singd_dense"](model)
    loss = torch.nn.functional.cross_entropy(model(data.x_train[:32]), data.y_train[:32])
    loss.backward()
    optimizer.step()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == torch.bfloat16
