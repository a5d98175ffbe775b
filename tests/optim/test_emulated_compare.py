"""A bf16 / fp16 SINGD run vs the emulated oracle, restarted every step (verification.emulated).

The allowance is the rule derived in ``verification.emulated``'s docstring
(``2 (N_X · ½ · T_X / max|X| + 1)`` ulps of the entry's scale ``eps · max|X|``,
eps = 2**-7 bf16, 2**-10 fp16); a deliberately wrong run — ``W`` scaled by
``1 + 32 eps`` after every step — differs by about 32 ulps of ``W``'s scale and
must break it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from verification.emulated import STORAGE_OF, compare_emulated_local
from verification.recording import RecordedRun
from verification.scenarios import SCENARIOS, VARIANTS, run_and_replay

EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=str)
def recorded(request: pytest.FixtureRequest) -> tuple[RecordedRun, object, torch.dtype]:
    run, _, hyper = run_and_replay(SCENARIOS["mlp"], {}, request.param)
    return run, hyper, request.param


def test_torch_run_obeys_the_rule(recorded: tuple[RecordedRun, object, torch.dtype]) -> None:
    run, hyper, dtype = recorded
    results = compare_emulated_local(run, hyper, STORAGE_OF[dtype], "expand", "batch")
    assert len(results) == 2 * 6
    for agreement in results.values():
        assert agreement.worst_ratio <= 1, agreement
        assert 0 <= agreement.bitwise_fraction <= 1


def test_wrong_run_breaks_the_rule(recorded: tuple[RecordedRun, object, torch.dtype]) -> None:
    run, hyper, dtype = recorded
    scale = 1 + 32 * EPS[dtype]
    storage = STORAGE_OF[dtype]
    steps = []
    for step in run.steps:
        wrong = {}
        for name, layer in step.items():
            w = torch.from_numpy(layer.state["W"] * scale).to(dtype).to(torch.float64).numpy()
            wrong[name] = dataclasses.replace(layer, state={**layer.state, "W": w})
        steps.append(wrong)
    results = compare_emulated_local(
        dataclasses.replace(run, steps=steps), hyper, storage, "expand", "batch"
    )
    assert any(results[name, "W"].worst_ratio > 1 for name in run.layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_lr_cov_schedule(dtype: torch.dtype) -> None:
    """A β1 schedule (a callable) is evaluated at each step in the allowance."""
    run, _, hyper = run_and_replay(SCENARIOS["mlp"], VARIANTS["schedule"], dtype)
    results = compare_emulated_local(run, hyper, STORAGE_OF[dtype], "expand", "batch")
    assert all(agreement.worst_ratio <= 1 for agreement in results.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_alpha1_zero_compares_no_momenta(dtype: torch.dtype) -> None:
    """IKFAC (α1 = 0) keeps m_K, m_C at zero, never read: only K, C, W, m_W are compared."""
    run, _, hyper = run_and_replay(SCENARIOS["mlp"], {"kfac_like": True, "alpha1": 0.0}, dtype)
    results = compare_emulated_local(run, hyper, STORAGE_OF[dtype], "expand", "batch")
    assert {entry for _, entry in results} == {"K", "C", "W", "m_W"}
    assert all(agreement.worst_ratio <= 1 for agreement in results.values())
