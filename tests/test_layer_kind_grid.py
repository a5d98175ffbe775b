"""The layer kinds of SPEC-layers against the oracle along a trajectory, in every dtype.

One case per kind (Conv1d, Conv3d with a Linear head, Embedding expand and
reduce, MultiheadAttention self-attention) and dtype from the default grid's layer-kind cut
(:data:`verification.scenarios.KIND_LAYERS`), four steps: recorded by the
torch optimizer, replayed by the float64 oracle with its own statistics code,
compared along the trajectory, in blocks and one step at a time under the
dtype's worst-case bounds (:mod:`verification.bounds`; rules derived there,
``ratio ≤ 1`` passes).  That these checks catch wrong kinds in every dtype is
shown by the ``conv-patch-order`` and ``embedding-padding-counted`` mutants
(tests/optim/test_mutation.py), and for MHA in float64 and float32 by
``attention-qk-grads-swapped``.  An MHA's internal rows (``o``, ``∂L/∂q``, …)
are the oracle's own (:mod:`reference.attention`, from the recorded call),
so the bounds carry the distance of the model's rows from them
(:func:`verification.replay.attention_row_errors`): in a bfloat16/float16
model that is the model's own attention rounding, and the check is loose there.
"""

from __future__ import annotations

import pytest

from verification.grid import run_case
from verification.scenarios import DTYPES, EMBEDDING_PAIRS, KIND_LAYERS, SCENARIOS, Case


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scenario", KIND_LAYERS)
def test_kind_trajectory_matches_oracle(scenario: str, dtype: str) -> None:
    structures = EMBEDDING_PAIRS[0] if SCENARIOS[scenario].vocab else ("dense", "dense")
    result = run_case(Case(scenario, "singd", structures, dtype, steps=4))
    assert result.passed, result.as_dict()  # rule: module docstring (ratio ≤ 1)
