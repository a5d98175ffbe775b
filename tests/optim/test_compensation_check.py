"""The verifier's check of the compensated factor step (``SINGD(factor_guard="compensated")``).

The default SINGD keeps, for bf16/fp16 factors, a compensation ``c`` beside
each factor.  :mod:`verification.bounds` models the step and
:mod:`verification.comparison` compares ``c`` after a factor step with the
oracle's 0 against ``|c'| <= u(|K'| + |K' − K|)(1 + 2u) + 2η`` and requires it
unchanged, bitwise, on steps without a factor update.  Both halves must be able
to fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from verification.arithmetic import precision_for
from verification.comparison import compare_singd_local
from verification.grid import ratio
from verification.recording import RecordedRun
from verification.scenarios import FACTOR_GUARD, SCENARIOS, VARIANTS, run_and_replay

DTYPES = (torch.bfloat16, torch.float16)


def _worst(run: RecordedRun, hyper: object, dtype: torch.dtype, key: str) -> float:
    precision = precision_for(dtype, factor_guard=FACTOR_GUARD)
    deviations = compare_singd_local(run, hyper, precision, "expand", "batch")
    return max(ratio(d) for d in deviations if d.key == key)


def _with_state(run: RecordedRun, step: int, key: str, value: np.ndarray) -> RecordedRun:
    """``run`` with layer "0"'s recorded ``key`` after ``step`` replaced by ``value``."""
    steps = list(run.steps)
    layer = steps[step]["0"]
    steps[step] = {
        **steps[step],
        "0": dataclasses.replace(layer, state={**layer.state, key: value}),
    }
    return dataclasses.replace(run, steps=steps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compensations_are_checked_and_pass(dtype: torch.dtype) -> None:
    """A correct guarded run (T = 3: factor and other steps) passes, c_K and c_C included."""
    run, _, hyper = run_and_replay(SCENARIOS["mlp"], VARIANTS["T3"], dtype, steps=8)
    assert "c_K" in run.steps[0]["0"].state
    assert _worst(run, hyper, dtype, "c_K") <= 1 and _worst(run, hyper, dtype, "c_C") <= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_compensation_changed_without_a_factor_step_fails(dtype: torch.dtype) -> None:
    """Step 1 (T = 3) updates no factor: c_K must equal step 0's bitwise (bound 0)."""
    run, _, hyper = run_and_replay(SCENARIOS["mlp"], VARIANTS["T3"], dtype, steps=4)
    c = run.steps[1]["0"].state["c_K"]
    nudged = c.copy()
    nudged.flat[0] = np.nextafter(np.float32(c.flat[0]), np.float32(1)).astype(np.float64)
    assert _worst(_with_state(run, 1, "c_K", nudged), hyper, dtype, "c_K") == np.inf


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_compensation_above_its_bound_fails(dtype: torch.dtype) -> None:
    """After a factor step, a c_K of 4 ulps of K (the bound allows about half an ulp) fails.

    ``|c'| <= u(|K'| + |K' − K|)(1 + 2u) + 2η`` with ``|K' − K| << |K'|``:
    4·eps·|K| is about 8 times the bound, so error/bound >= 4 is asserted.
    """
    run, _, hyper = run_and_replay(SCENARIOS["mlp"], VARIANTS["singd"], dtype, steps=2)
    k = run.steps[0]["0"].state["K"]
    eps = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    wrong = np.zeros_like(k)
    wrong[0, 0] = 4 * eps * abs(k[0, 0])
    assert _worst(_with_state(run, 0, "c_K", wrong), hyper, dtype, "c_K") >= 4
