"""The layer kinds of SPEC-layers against the oracle along a trajectory, in every dtype.

One case per kind (Conv1d, Conv3d with a Linear head, Embedding expand and
reduce, MultiheadAttention self-attention) and dtype from the default grid's layer-kind cut
(:data:`verification.scenarios.KIND_LAYERS`), four steps: recorded by the
torch optimizer, replayed by the float64 oracle with its own statistics code,
compared along the trajectory, in blocks and one step at a time under the
dtype's worst-case bounds (:mod:`verification.bounds`; rules derived there,
``ratio ≤ 1`` passes).  That these checks catch wrong kinds in every dtype is
shown by the ``conv-patch-order`` and ``embedding-padding-counted`` mutants
(tests/optim/test_mutation.py), and for MHA by q's curvature taken from k's
gradient block (``test_attention_catches_*``).  An MHA's internal rows (``o``,
``∂L/∂q``, …) are the oracle's own (:mod:`reference.attention`, from the
recorded call), so the bounds carry the distance of the model's rows from
them (:func:`verification.replay.attention_row_errors`): in a bfloat16/float16
model that is the model's own attention rounding (``chain_bound`` of its dtype,
about 0.4 of the magnitude), too loose to see a q/k mix-up, and with bfloat16
factors the factor bounds are (visible by 60 ulps there, ratio 0.95).  That
slip is therefore not in the mutation suite, whose rule is that every visible
mutant is killed in every precision; it is checked here where it is killed.
"""

from __future__ import annotations

import pytest
import torch

from singd.optim.hooks import CurvatureCollector
from verification.grid import run_case
from verification.scenarios import DTYPES, EMBEDDING_PAIRS, KIND_LAYERS, SCENARIOS, Case


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scenario", KIND_LAYERS)
def test_kind_trajectory_matches_oracle(scenario: str, dtype: str) -> None:
    structures = EMBEDDING_PAIRS[0] if SCENARIOS[scenario].vocab else ("dense", "dense")
    result = run_case(Case(scenario, "singd", structures, dtype, steps=4))
    assert result.passed, result.as_dict()  # rule: module docstring (ratio ≤ 1)


_ATTENTION_GRAD_HOOK = CurvatureCollector._attention_grad_hook


def _qk_grads_swapped(collector, name, kind, module, summary, batch, columns, grad_outputs):
    """q's curvature from k's block of the packed projection's output gradient (and k's
    from q's); the parameter directions stay right."""
    embed = module.embed_dim
    if kind.role in ("q", "k") and grad_outputs[0].shape[1] == 3 * embed:
        shift = embed if kind.role == "q" else -embed
        columns = slice(columns.start + shift, columns.stop + shift)
    _ATTENTION_GRAD_HOOK(collector, name, kind, module, summary, batch, columns, grad_outputs)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_attention_catches_q_curvature_from_k_gradients(
    dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    monkeypatch.setattr(CurvatureCollector, "_attention_grad_hook", _qk_grads_swapped)
    result = run_case(Case("attention", "singd", ("dense", "dense"), dtype, steps=8))
    assert result.local_worst_ratio > (1e6 if dtype == "float64" else 10), result.as_dict()
