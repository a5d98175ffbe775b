"""The torch optimizer against the float64 oracle on real small models (SPEC §3, last point).

Two layers of checks:

* the optimizer's pure statistics functions (``singd.optim.statistics``)
  equal ``reference.statistics`` on the same raw inputs/gradients;
* whole training runs: :mod:`verification.recording` records a run of the
  torch ``SINGD`` with its own hooks, :mod:`verification.replay` replays it
  through the oracle stepper in float64 and :mod:`verification.comparison`
  compares factors, factor momenta, parameters and parameter momenta after
  every step, with the bound derived there;
* every step on its own: one oracle step from the implementation's own state
  before it, against the one-step bound (``compare_*_local``), and SINGD also
  in teacher-forced blocks of ``BLOCK`` steps (``compare_singd_blocks``).

SINGD's bounds are entrywise, from :mod:`verification.bounds` under the run's
arithmetic model (:mod:`verification.arithmetic`: model and factor dtypes on
the CPU); KFAC's are the scalar first-order rules of
:mod:`verification.comparison`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from reference.kfac import KFACHyperparameters
from reference.updates import SINGDHyperparameters
from singd import KFAC
from singd.optim.kinds import layer_grad_matrix
from singd.optim.kinds import layer_input_statistic as layer_input_matrix
from tests.tolerances import chain_bound
from verification.arithmetic import Precision, precision_for
from verification.comparison import (
    compare_kfac,
    compare_kfac_local,
    compare_singd,
    compare_singd_blocks,
    compare_singd_local,
    violations,
)
from verification.grid import BLOCK
from verification.recording import LayerPass, RecordedRun, record_run, to_numpy
from verification.replay import layer_statistics, replay_kfac
from verification.scenarios import (
    EMBEDDING_PAIRS,
    FACTOR_GUARD,
    SCENARIOS,
    STRUCTURE_PAIRS,
    VARIANTS,
    Scenario,
    any_structure,
    beta1_schedule,
    loss_function,
    mlp,
    run_and_replay,
)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
APPROXIMATIONS = ("expand", "reduce")
LOSS_AVERAGES = ("batch", "batch+sequence", None)


# ----------------------------------------------------------------- statistics
@dataclass(frozen=True)
class LayerCase:
    """A layer and the shape of its input.

    Attributes:
        name: Test id.
        make: Builds the layer (seeded by the caller).
        input_shape: Shape of the layer input.
        shared: Number of shared positions ``S`` of the layer.
        groups: Channel groups (1 for Linear).
    """

    name: str
    make: type[nn.Module] | object
    input_shape: tuple[int, ...]
    shared: int
    groups: int = 1


LAYER_CASES = (
    LayerCase("linear", lambda: nn.Linear(5, 3), (4, 5), 1),
    LayerCase("linear-nobias", lambda: nn.Linear(5, 3, bias=False), (4, 5), 1),
    LayerCase("linear-seq", lambda: nn.Linear(5, 3), (3, 4, 5), 4),
    LayerCase("linear-2shared", lambda: nn.Linear(4, 2, bias=False), (2, 3, 2, 4), 6),
    LayerCase(
        "conv-stride-pad-groups",
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        (2, 4, 5, 5),
        9,
        2,
    ),
    LayerCase(
        "conv-dilation-nobias",
        lambda: nn.Conv2d(2, 3, 2, dilation=2, padding="same", bias=False),
        (2, 2, 4, 4),
        16,
    ),
)


@pytest.mark.parametrize("loss_average", LOSS_AVERAGES, ids=str)
@pytest.mark.parametrize("approx", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda case: case.name)
def test_statistics_match_reference(
    case: LayerCase, dtype: torch.dtype, approx: str, loss_average: str | None
) -> None:
    """``A``, ``G`` of ``singd.optim.statistics`` equal the oracle's from the same ``a``, ``g``."""
    torch.manual_seed(0)
    module = case.make().to(dtype)
    inputs = torch.randn(case.input_shape).to(dtype)
    output_grads = torch.randn(module(inputs).shape).to(dtype)
    torch_a = layer_input_matrix(module, inputs, approx=approx)
    torch_g = layer_grad_matrix(module, output_grads, approx=approx, loss_average=loss_average)
    oracle_a, oracle_g = layer_statistics(
        module, LayerPass(inputs, output_grads), approx, loss_average
    )
    # The same statistic of |a| and |g| is the magnitude of every entry (it is linear).
    magnitude_a, magnitude_g = layer_statistics(
        module, LayerPass(inputs.abs(), output_grads.abs()), approx, loss_average
    )
    reduced = case.shared if approx == "reduce" else 1
    # A: averages over `reduced` positions and `groups` channel groups, one scaling.
    bound_a = chain_bound(dtype, [reduced, case.groups]) * magnitude_a
    # G: sums over `reduced` positions, one scaling.
    bound_g = chain_bound(dtype, [reduced]) * magnitude_g
    assert torch_a.dtype == dtype and torch_g.dtype == dtype
    assert np.all(np.abs(to_numpy(torch_a) - oracle_a) <= bound_a)
    assert np.all(np.abs(to_numpy(torch_g) - oracle_g) <= bound_g)


# --------------------------------------------------------------- trajectories
def _assert_within_bounds(
    run: RecordedRun,
    oracle: dict,
    hyper: SINGDHyperparameters,
    dtype: torch.dtype | Precision,
    scenario: Scenario,
) -> None:
    """Every state entry of every layer stays within its bound: trajectory, blocks, per step."""
    settings = (dtype, scenario.approx, scenario.loss_average)
    deviations = compare_singd(run, oracle, hyper, *settings)
    assert {d.key for d in deviations} >= {"K", "C", "W", "m_W"}
    # Entrywise bound propagated from the initial W~ (verification.bounds, the run's model).
    assert violations(deviations) == []
    blocks = compare_singd_blocks(run, hyper, *settings, block=BLOCK)
    assert {d.key for d in blocks} == {d.key for d in deviations}
    # The same rules, restarted from the recorded state every BLOCK steps.
    assert violations(blocks) == []
    local = compare_singd_local(run, hyper, *settings)
    assert {d.key for d in local} == {d.key for d in deviations}
    # One-step bound: the same rules with zero incoming error, at every step.
    assert violations(local) == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("scenario", sorted(filter(any_structure, SCENARIOS)))
def test_float64_trajectory_matches_oracle(scenario: str, variant: str) -> None:
    """float64 model and optimizer: 20 steps agree with the oracle within the float64 model."""
    case = SCENARIOS[scenario]
    run, oracle, hyper = run_and_replay(case, VARIANTS[variant])
    _assert_within_bounds(run, oracle, hyper, torch.float64, case)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("scenario", sorted(name for name in SCENARIOS if not any_structure(name)))
def test_float64_embedding_trajectory_matches_oracle(scenario: str, variant: str) -> None:
    """Embeddings (K diagonal whatever the group names: the oracle is told so) in every mode."""
    case = SCENARIOS[scenario]
    overrides = {**VARIANTS[variant], "structures": EMBEDDING_PAIRS[0]}
    run, oracle, hyper = run_and_replay(case, overrides)
    _assert_within_bounds(run, oracle, hyper, torch.float64, case)


@pytest.mark.parametrize("structures", STRUCTURE_PAIRS, ids="-".join)
@pytest.mark.parametrize("scenario", ["mlp", "conv"])
def test_structured_trajectory_matches_oracle(scenario: str, structures: tuple[str, str]) -> None:
    """Structured factors (blocks/hierarchy splitting small layers, Toeplitz, tri, recursive)."""
    case = SCENARIOS[scenario]
    run, oracle, hyper = run_and_replay(case, {"structures": structures, "T": 2})
    _assert_within_bounds(run, oracle, hyper, torch.float64, case)


LOW_PRECISION_CASES = (
    # (model dtype, preconditioner dtype)
    (torch.float32, None),
    (torch.bfloat16, None),
    (torch.float16, None),
    (torch.float32, torch.bfloat16),
)


@pytest.mark.parametrize("variant", ["singd", "ikfac"])
@pytest.mark.parametrize(
    "structures", [("dense", "dense"), ("block2diagonal", "tril")], ids="-".join
)
@pytest.mark.parametrize(
    ("dtype", "preconditioner_dtype"), LOW_PRECISION_CASES, ids=lambda d: str(d).split(".")[-1]
)
def test_low_precision_trajectory_matches_oracle(
    dtype: torch.dtype,
    preconditioner_dtype: torch.dtype | None,
    structures: tuple[str, str],
    variant: str,
) -> None:
    """Low precision: the oracle is fed the same recorded low-precision tensors upcast exactly.

    The bound uses the model of each side: factors in the preconditioner dtype,
    parameters in the model dtype (verification.arithmetic.Precision).
    """
    case = SCENARIOS["mlp"]
    overrides = {**VARIANTS[variant], "structures": structures}
    run, oracle, hyper = run_and_replay(case, overrides, dtype, preconditioner_dtype)
    precision = precision_for(dtype, preconditioner_dtype, factor_guard=FACTOR_GUARD)
    _assert_within_bounds(run, oracle, hyper, precision, case)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("scenario", sorted(filter(any_structure, SCENARIOS)))
def test_kfac_trajectory_matches_oracle(scenario: str, T: int) -> None:
    """The KFAC baseline (float64) against the oracle's KFAC stepper (SPEC §1.2)."""
    case = SCENARIOS[scenario]
    torch.manual_seed(0)
    model = case.make_model().to(torch.float64)
    hyper = KFACHyperparameters(
        lr=0.05, momentum=0.5, damping=1e-2, weight_decay=0.1, T=T, lr_cov=beta1_schedule
    )
    optimizer = KFAC(
        model,
        lr=hyper.lr,
        momentum=hyper.momentum,
        damping=hyper.damping,
        weight_decay=hyper.weight_decay,
        T=hyper.T,
        lr_cov=hyper.lr_cov,
        loss_average=case.loss_average,
        kfac_approx=case.approx,
    )
    run = record_run(model, optimizer, loss_function(case, torch.float64), 20, case.micro_batches)
    oracle = replay_kfac(run, hyper, case.approx, case.loss_average)
    deviations = compare_kfac(run, oracle, hyper, torch.float64, case.approx, case.loss_average)
    assert {d.key for d in deviations} == {"S_K", "S_C", "W", "m_W"}
    # Bound per entry: propagated rounding incl. κ-scaled Cholesky solves (compare_kfac).
    assert violations(deviations) == []
    local = compare_kfac_local(run, hyper, torch.float64, case.approx, case.loss_average)
    assert {d.key for d in local} == {"S_K", "S_C", "W", "m_W"}
    # One-step bound: the same rules with zero incoming error, at every step.
    assert violations(local) == []


GRID_SETTINGS = [
    (approx, loss_average) for approx in APPROXIMATIONS for loss_average in LOSS_AVERAGES
]


@pytest.mark.oracle
@pytest.mark.parametrize("structures", STRUCTURE_PAIRS, ids="-".join)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("approx", "loss_average"), GRID_SETTINGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_full_grid_matches_oracle(
    dtype: torch.dtype,
    approx: str,
    loss_average: str | None,
    variant: str,
    structures: tuple[str, str],
) -> None:
    """Slow tier: every flavour × loss average × variant × structure pair × dtype, 20 steps."""
    case = Scenario("grid", "MLP on [B,S,d]", mlp, (3, 4, 6), approx, loss_average)
    run, oracle, hyper = run_and_replay(
        case, {**VARIANTS[variant], "structures": structures}, dtype
    )
    _assert_within_bounds(run, oracle, hyper, dtype, case)
