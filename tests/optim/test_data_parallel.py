"""Two gloo ranks: wrapped (DDP), unwrapped and FSDP2 models, sharded and unsharded factor work.

Every case (SINGD with dense or diagonal factors, or KFAC; and an FSDP2
model with a Conv2d and a GroupNorm) trains ``STEPS`` float64 steps in 2 processes
on CPU, each rank with half of every batch, and compares every rank's
parameters (gathered in full under FSDP2) and factors with a single-process
full-batch run; drift checks run after every step of every case (no false
alarm).  Also: mutants that must be caught (gradients not all-reduced,
factors of sharded work not broadcast, a perturbed rank under the drift
check), the collectives the optimizer issues per step, a
``torch.distributed.checkpoint`` round trip, and the README's ``torchrun``
example.

Tolerance rule (against the single-process run): both runs form the same
terms and differ only in the order of summation (per-rank partial sums of
the statistics and of the gradient average, against one sum over all
``n = BATCH`` rows), so each step's statistics and gradients differ by at
most ``matmul_bound(float64, n) = (n + 2)·eps`` relative to their magnitude;
over ``STEPS`` steps of these contractive maps (small ``lr``, ``lr_cov``) the
first-order errors add: ``STEPS·(n + 2)·eps·max|expected|`` per compared
tensor.  Across ranks the rule is bitwise equality: the ranks reduce to the
same statistics and gradients (or receive the owner's factors bit for bit)
and then compute identically.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from singd import KFAC, SINGD
from singd.optim import distributed, drift, sharded
from singd.optim.dcp import dcp_state_dict
from tests.optim.collectives import count_collectives
from tests.tolerances import matmul_bound

WORLD = 2
STEPS = 5
BATCH = 8
DTYPE = torch.float64
STRUCTURES = {"dense": ("dense", "dense"), "diagonal": ("diagonal", "diagonal")}
WRAPPERS = ("ddp", "unwrapped", "fsdp2")
#: (wrapper, sharded factor work, T, SINGD's structure or "kfac": the KFAC optimizer)
CASES = [
    (wrapper, shard, T, structure)
    for wrapper in WRAPPERS
    for shard in (False, True)
    for T in (1, 3)
    for structure in STRUCTURES
] + [(wrapper, shard, T, "kfac") for wrapper in WRAPPERS for shard, T in ((False, 1), (True, 3))]
#: Variants that must fail the equality tests: unwrapped gradients not all-reduced,
#: sharded factor steps whose results are not broadcast.
MUTANTS = {"no-grad-all-reduce": ("unwrapped", False), "no-broadcast": ("ddp", True)}


def _case_id(case: tuple[Any, ...]) -> str:
    wrapper, shard, T, structure = case
    return f"{wrapper}-{'sharded' if shard else 'unsharded'}-T{T}-{structure}"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)
    ).to(DTYPE)


def _wrap(inner: nn.Module, wrapper: str, world: int) -> nn.Module:
    if world == 1 or wrapper == "unwrapped":
        return inner
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(inner)
    for layer in inner:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(inner)
    return inner


def _optimizer(model: nn.Module, T: int, structure: str, shard: bool) -> SINGD | KFAC:
    if structure == "kfac":
        opt = KFAC(model, lr=0.05, T=T, lr_cov=0.1)
    else:
        opt = SINGD(model, lr=0.05, T=T, lr_cov=0.1, structures=STRUCTURES[structure])
    opt.configure_distributed(shard_factor_work=shard, drift_check_every=1)
    return opt


def _train(model: nn.Module, opt: SINGD | KFAC, steps: range, rank: int, world: int) -> None:
    for step in steps:
        opt.zero_grad()
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(BATCH, 5, generator=generator, dtype=DTYPE).chunk(world)[rank]
        model(inputs).square().sum(dim=-1).mean().backward()
        opt.step()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _final(inner: nn.Module, opt: SINGD | KFAC) -> dict[str, torch.Tensor]:
    tensors = {f"param.{key}": _full(p) for key, p in inner.named_parameters()}
    for layer in opt.layer_names():
        for factor, value in opt.layer_state(layer).items():
            dense = value if isinstance(value, torch.Tensor) else value.to_dense()
            tensors[f"{layer}.{factor}"] = dense.clone()
    return tensors


def _run(case: tuple[Any, ...], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Train ``case`` on rank ``rank``'s share of every batch; its final tensors."""
    wrapper, shard, T, structure = case
    inner = _model()
    model = _wrap(inner, wrapper, world)
    opt = _optimizer(model, T, structure, shard)
    _train(model, opt, range(STEPS), rank, world)
    return _final(inner, opt)


def _mutant(name: str, rank: int) -> dict[str, torch.Tensor]:
    wrapper, shard = MUTANTS[name]
    patch = pytest.MonkeyPatch()
    try:
        if name == "no-grad-all-reduce":  # the optimizer believes a wrapper averaged them
            patch.setattr(distributed, "wrapper_averages_gradients", lambda model: True)
        else:  # the owners keep their new factors to themselves
            patch.setattr(
                sharded,
                "broadcast_storages",
                lambda owners, computed, templates: {
                    n: computed.get(n, templates[n]) for n in owners
                },
            )
        inner = _model()
        model = _wrap(inner, wrapper, WORLD)
        opt = SINGD(model, lr=0.05, T=1, lr_cov=0.1)
        opt.configure_distributed(shard_factor_work=shard)
        _train(model, opt, range(STEPS), rank, WORLD)
        return _final(inner, opt)
    finally:
        patch.undo()


def _perturbed_rank_error(rank: int) -> str:
    """The drift check's message after rank 1 moved one weight entry by one ulp."""
    inner = _model()
    opt = _optimizer(inner, 1, "dense", False)
    _train(inner, opt, range(2), rank, WORLD)
    if rank == 1:
        with torch.no_grad():
            weight = inner[2].weight
            weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0, dtype=DTYPE))
    try:
        _train(inner, opt, range(2, 3), rank, WORLD)
    except RuntimeError as error:
        return str(error)
    return ""


def _inf_on_one_rank(wrapper: str, rank: int) -> dict[str, Any]:
    """A GradScaler run where only rank 1's step-1 loss overflows: steps taken, or the error."""
    inner = _model()
    model = _wrap(inner, wrapper, WORLD)
    opt = _optimizer(model, 1, "dense", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    try:
        for step in range(STEPS):
            opt.zero_grad()
            generator = torch.Generator().manual_seed(step)
            inputs = torch.randn(BATCH, 5, generator=generator, dtype=DTYPE).chunk(WORLD)[rank]
            loss = model(inputs).square().sum(dim=-1).mean()
            if step == 1 and rank == 1:
                loss = loss * torch.inf
            scaler.scale(loss).backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the skip warning
                scaler.step(opt)
            scaler.update()
    except RuntimeError as error:
        return {"error": str(error), "steps": opt.steps}
    return {"error": "", "steps": opt.steps, "final": _final(inner, opt)}


def _collectives_per_step(wrapper: str, rank: int) -> list[list[tuple[str, int]]]:
    """(name, payload bytes) of the collectives of every ``step()``, T = 3."""
    inner = _model()
    model = _wrap(inner, wrapper, WORLD)
    opt = SINGD(model, lr=0.05, T=3, lr_cov=0.1)
    per_step = []
    for step in range(STEPS):
        opt.zero_grad()
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(BATCH, 5, generator=generator, dtype=DTYPE).chunk(WORLD)[rank]
        model(inputs).square().sum(dim=-1).mean().backward()
        with count_collectives() as calls:
            opt.step()
        per_step.append([tuple(call) for call in calls])
    return per_step


def _resumed(wrapper: str, rank: int, folder: str) -> dict[str, dict[str, torch.Tensor]]:
    """Uninterrupted ``STEPS`` steps, and 3 steps, DCP save, load into fresh objects, the rest."""
    inner = _model()
    model = _wrap(inner, wrapper, WORLD)
    opt = _optimizer(model, 1, "dense", False)
    _train(model, opt, range(3), rank, WORLD)
    path = f"{folder}/{wrapper}"
    dcp.save({"model": inner.state_dict(), "optim": dcp_state_dict(opt)}, checkpoint_id=path)
    _train(model, opt, range(3, STEPS), rank, WORLD)
    fresh_inner = _model()
    fresh_model = _wrap(fresh_inner, wrapper, WORLD)
    fresh_opt = _optimizer(fresh_model, 1, "dense", False)
    state = {"model": fresh_inner.state_dict(), "optim": dcp_state_dict(fresh_opt)}
    dcp.load(state, checkpoint_id=path)
    fresh_inner.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["optim"])
    _train(fresh_model, fresh_opt, range(3, STEPS), rank, WORLD)
    return {"uninterrupted": _final(inner, opt), "resumed": _final(fresh_inner, fresh_opt)}


#: The conv case's rows per batch: a 3×3 kernel on 4×4 inputs has 2·2 output locations.
CONV_ROWS = BATCH * 4


def _conv_run(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Conv2d, GroupNorm, Linear (FSDP2 on two ranks): 4-D weight shards, FSDPConv2d, and
    fallback parameters that are DTensor shards (the GroupNorm's; a LayerNorm would get
    SINGD's elementwise rule unsharded and fall back sharded)."""
    torch.manual_seed(0)
    inner = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.GroupNorm(1, 16), nn.Linear(16, 3)
    ).to(DTYPE)
    if world > 1:
        for index in (0, 3, 4):
            fully_shard(inner[index])
        fully_shard(inner)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GroupNorm's parameters fall back to SGD
        opt = _optimizer(inner, 1, "dense", False)
    assert opt.layer_names() == ["0", "4"]
    for step in range(STEPS):
        opt.zero_grad()
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(BATCH, 2, 4, 4, generator=generator, dtype=DTYPE)
        inner(inputs.chunk(world)[rank]).square().sum(dim=-1).mean().backward()
        opt.step()
    return _final(inner, opt)


def _worker(rank: int, store: str, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {
            "cases": {_case_id(case): _run(case, rank, WORLD) for case in CASES},
            "conv": _conv_run(rank, WORLD),
            "mutants": {name: _mutant(name, rank) for name in MUTANTS},
            "drift": _perturbed_rank_error(rank),
            "inf": {w: _inf_on_one_rank(w, rank) for w in ("ddp", "unwrapped")},
            "collectives": {w: _collectives_per_step(w, rank) for w in WRAPPERS},
            "dcp": {w: _resumed(w, rank, folder) for w in ("ddp", "fsdp2")},
        }
        torch.save(results, f"{folder}/results.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, Any]]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    folder = tmp_path_factory.mktemp("data_parallel")
    mp.spawn(_worker, args=(str(folder / "store"), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(f"{folder}/results.{rank}", weights_only=True) for rank in range(WORLD)]


def _bitwise_equal(first: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    return first.keys() == other.keys() and all(torch.equal(first[k], other[k]) for k in first)


def _violations(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rows: int = BATCH
) -> list[str]:
    """The tensors outside the module docstring's bound ``STEPS·(n + 2)·eps·max|expected|``."""
    assert got.keys() == expected.keys()
    out = []
    for key, want in expected.items():
        error = float((got[key] - want).abs().max())
        bound = STEPS * matmul_bound(DTYPE, rows) * float(want.abs().max())
        if error > bound:
            out.append(f"{key}: {error:.3e} > {bound:.3e}")
    return out


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, torch.Tensor]]:
    return {_case_id(case): _run(case, rank=0, world=1) for case in CASES}


@pytest.mark.parametrize("case", [_case_id(case) for case in CASES])
def test_ranks_agree_bitwise(rank_results, case):
    assert _bitwise_equal(rank_results[0]["cases"][case], rank_results[1]["cases"][case])


@pytest.mark.parametrize("case", [_case_id(case) for case in CASES])
def test_two_ranks_equal_the_full_batch_run(rank_results, single_process, case):
    for results in rank_results:
        assert not _violations(results["cases"][case], single_process[case])  # rule: docstring


def test_fsdp2_conv_equals_the_full_batch_run(rank_results):
    """As the module docstring's rule, with ``n`` the conv's rows ``B·L`` (the longest sum)."""
    expected = _conv_run(rank=0, world=1)
    assert _bitwise_equal(rank_results[0]["conv"], rank_results[1]["conv"])
    assert not _violations(rank_results[0]["conv"], expected, rows=CONV_ROWS)


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutants_are_caught(rank_results, single_process, name):
    """Each mutant fails the cross-rank check and the full-batch check of its case."""
    first, second = (results["mutants"][name] for results in rank_results)
    assert not _bitwise_equal(first, second)
    wrapper, shard = MUTANTS[name]
    assert _violations(second, single_process[_case_id((wrapper, shard, 1, "dense"))])


def test_drift_check_names_the_perturbed_layer(rank_results):
    for results in rank_results:
        assert "layer '2': parameters differs between rank 0 and rank(s) [1]" in results["drift"]


def test_overflow_on_one_rank_skips_the_step_on_every_rank_under_ddp(rank_results):
    first, second = (results["inf"]["ddp"] for results in rank_results)
    assert first["steps"] == second["steps"] == STEPS - 1
    assert _bitwise_equal(first["final"], second["final"])


def test_overflow_on_one_rank_of_an_unwrapped_model_raises_on_every_rank(rank_results):
    """Unaveraged gradients: the scalers disagree; every rank stops at the same step."""
    for results in rank_results:
        assert "DistributedDataParallel" in results["inf"]["unwrapped"]["error"]
        assert results["inf"]["unwrapped"]["steps"] == 1


def test_statistics_are_reduced_on_factor_steps_only(rank_results):
    """T = 3, one dtype: a factor step issues the exponents' MIN and one bucket of statistics;
    an unwrapped model adds its gradients to that bucket (alone on other steps), an FSDP2
    model gathers all its gradient shards in one collective every step."""
    calls = rank_results[0]["collectives"]
    gather = ["all_gather_into_tensor"]
    for step in range(STEPS):
        statistics = ["all_reduce"] * 2 if step % 3 == 0 else []
        names = {wrapper: [name for name, _ in calls[wrapper][step]] for wrapper in WRAPPERS}
        assert names["ddp"] == statistics
        assert names["unwrapped"] == (statistics or ["all_reduce"])
        assert names["fsdp2"] == statistics + gather
    params = sum(p.numel() for p in _model().parameters()) * DTYPE.itemsize
    assert [nbytes for _, nbytes in calls["unwrapped"][1]] == [params]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_dcp_resume_equals_the_uninterrupted_run(rank_results, wrapper):
    for results in rank_results:
        run = results["dcp"][wrapper]
        assert _bitwise_equal(run["uninterrupted"], run["resumed"])  # the same state, resumed


def test_data_parallel_over_several_devices_points_to_ddp():
    model = nn.DataParallel(_model())
    model.device_ids = [0, 1]  # as on a machine with two GPUs; checked before any use
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        SINGD(model)


@pytest.mark.parametrize(
    "kwargs", [{"shard_factor_work": 1}, {"drift_check_every": 0}, {"drift_check_every": 2.0}]
)
def test_configure_distributed_rejects_bad_input(kwargs):
    opt = SINGD(_model())
    with pytest.raises(ValueError):
        opt.configure_distributed(**kwargs)
    assert not opt._shard_factor_work and opt._drift_check_every is None  # unchanged


def test_owners_balance_the_factor_step_cost():
    """LPT: costliest first, each to the least-loaded rank (ties: lowest rank, module order)."""
    owners = sharded.assign_owners({"a": 8.0, "b": 1.0, "c": 1.0, "d": 6.0, "e": 2.0}, 2)
    assert owners == {"a": 0, "d": 1, "e": 1, "b": 0, "c": 1}  # loads 9 and 9
    assert sharded.assign_owners({"a": 1.0}, 2) == {"a": 0}


def test_checksum_takes_scalars_and_complex_tensors():
    cpu = torch.device("cpu")
    for tensor in (torch.tensor(1.5), torch.ones(3, dtype=torch.complex128)):
        assert drift.checksum([tensor], cpu) != drift.checksum([2 * tensor], cpu)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_checksum_sees_a_one_ulp_change(dtype):
    tensor = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    moved = tensor.clone()
    moved[3, 2] = torch.nextafter(moved[3, 2], torch.tensor(torch.inf, dtype=dtype))
    cpu = torch.device("cpu")
    assert drift.checksum([tensor], cpu) == drift.checksum([tensor.clone()], cpu)
    assert drift.checksum([tensor], cpu) != drift.checksum([moved], cpu)


def test_torchrun_example_runs():
    """The README's ``torchrun --nproc_per_node 2`` example, briefly (it checks drift and DCP)."""
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(root / "examples" / "torchrun_data_parallel.py")]
    command += ["--mode", "unwrapped", "--steps", "3", "--drift-check-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: 3 steps on 2 ranks (unwrapped); checkpoint round trip ok" in result.stdout
