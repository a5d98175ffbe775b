"""Deviations, communication per step and factor-step time of the data-parallel modes.

Usage: ``python scripts/data_parallel_report.py [--width 256] [--layers 4] [--repeats 5]``.

Spawns 2 gloo processes on CPU (one torch thread each) and prints:

1. **Deviations**: for every case of ``tests/optim/test_data_parallel.py``
   (DDP, unwrapped, FSDP2 × sharded or not × T ∈ {1, 3} × dense/diagonal;
   5 float64 steps), the largest ``|rank 0 − single process|`` over the
   parameters and factors, as a fraction of the test's bound
   ``STEPS·(n + 2)·eps·max|expected|``, and ``max |rank 0 − rank 1|``.
2. **Communication**: the collectives the optimizer's ``step()`` issues on a
   factor step and on another step, per mode, with their payload bytes
   (:mod:`tests.optim.collectives`; DDP's own gradient all-reduce in its
   reducer is not seen and is listed separately as the parameter bytes).
3. **Factor-step time per rank**: a float32 MLP of ``--layers`` dense
   ``width × width`` layers, T = 1; the seconds of the factor work
   (``prepare_factor_steps`` and ``plan.new_layer_states``) and of the sharded
   broadcast per step, median over ``--repeats`` steps after one warm-up,
   for 1 rank, 2 ranks unsharded and 2 ranks sharded.

The timings are wall-clock on whatever machine runs this; on a loaded
machine they are noisy (say so when quoting them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from singd import SINGD
from singd.optim import plan, sharded
from tests.optim import test_data_parallel as cases
from tests.optim.collectives import count_collectives


def _deviations(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    return {cases._case_id(case): cases._run(case, rank, cases.WORLD) for case in cases.CASES}


def _communication(wrapper: str, shard: bool, rank: int) -> list[list[tuple[str, int]]]:
    inner = cases._model()
    model = cases._wrap(inner, wrapper, cases.WORLD)
    opt = SINGD(model, lr=0.05, T=3, lr_cov=0.1)
    opt.configure_distributed(shard_factor_work=shard)
    per_step = []
    for step in range(2):
        opt.zero_grad()
        inputs = torch.randn(cases.BATCH, 5, generator=torch.Generator().manual_seed(step))
        model(inputs.to(cases.DTYPE).chunk(cases.WORLD)[rank]).square().sum(-1).mean().backward()
        with count_collectives() as calls:
            opt.step()
        per_step.append([tuple(call) for call in calls])
    return per_step


def _timed(owner: object, name: str, totals: dict[str, float]) -> Callable[[], None]:
    """Accumulate the seconds spent in ``owner.<name>`` into ``totals["factor"]``.

    Returns the call that puts the original back.
    """
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = original(*args, **kwargs)
        totals["factor"] += time.perf_counter() - start
        return result

    setattr(owner, name, timed)
    return lambda: setattr(owner, name, original)


def factor_step_times(
    rank: int, world: int, shard: bool, width: int, layers: int, repeats: int
) -> dict[str, float]:
    """Median seconds per step of the factor work, the broadcast and the whole step."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = SINGD(model, lr=1e-3, T=1, lr_cov=1e-2)
    opt.configure_distributed(shard_factor_work=shard)
    totals = {"factor": 0.0, "broadcast": 0.0}
    _timed(opt._preconditioner, "prepare_factor_steps", totals)
    untime = _timed(plan, "new_layer_states", totals)
    original_broadcast = sharded.broadcast_storages

    def broadcast(*args: Any) -> Any:
        start = time.perf_counter()
        result = original_broadcast(*args)
        totals["broadcast"] += time.perf_counter() - start
        return result

    sharded.broadcast_storages = broadcast
    samples: dict[str, list[float]] = {"factor": [], "broadcast": [], "step": []}
    batch = 64 // world
    try:
        for step in range(repeats + 1):
            inputs = torch.randn(batch, width, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            model(inputs).square().mean().backward()
            totals["factor"] = totals["broadcast"] = 0.0
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if step > 0:  # the first step is a warm-up
                samples["step"].append(elapsed)
                samples["factor"].append(totals["factor"])
                samples["broadcast"].append(totals["broadcast"])
    finally:
        sharded.broadcast_storages = original_broadcast
        untime()
    return {key: statistics.median(values) for key, values in samples.items()}


def _worker(rank: int, store: str, folder: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        timing = (args.width, args.layers, args.repeats)
        result = {
            "deviations": _deviations(rank),
            "communication": {
                f"{wrapper}{'-sharded' if shard else ''}": _communication(wrapper, shard, rank)
                for wrapper in cases.WRAPPERS
                for shard in (False, True)
            },
            "times": {shard: factor_step_times(rank, 2, shard, *timing) for shard in (False, True)},
        }
        torch.save(result, f"{folder}/result.{rank}")
    finally:
        dist.destroy_process_group()


def _report(results: list[dict[str, Any]], single: dict[str, Any], one_rank: dict[str, float]):
    print("1. deviations after 5 float64 steps (fraction of the test's bound; rank 0 vs 1)")
    for case, expected in single.items():
        got, other = results[0]["deviations"][case], results[1]["deviations"][case]
        worst = max(
            float((got[k] - v).abs().max())
            / (cases.STEPS * cases.matmul_bound(cases.DTYPE, cases.BATCH) * float(v.abs().max()))
            for k, v in expected.items()
        )
        absolute = max(float((got[k] - v).abs().max()) for k, v in expected.items())
        ranks = max(float((got[k] - other[k]).abs().max()) for k in got)
        print(f"  {case:28s} |Δ| {absolute:.2e}  {worst:6.3f} of bound   ranks {ranks:.1e}")
    params = sum(p.numel() for p in cases._model().parameters()) * cases.DTYPE.itemsize
    print(f"2. optimizer collectives per step (payload bytes; model parameters: {params} B)")
    for mode, (factor, other) in results[0]["communication"].items():
        show = lambda calls: f"{len(calls)} calls, {sum(b for _, b in calls)} B"  # noqa: E731
        extra = f"  + DDP's own all-reduce of {params} B" if mode.startswith("ddp") else ""
        print(f"  {mode:18s} factor step: {show(factor):18s} other step: {show(other)}{extra}")
    print("3. factor-step seconds per rank (median; machine load applies)")
    print(f"  1 rank            factor {one_rank['factor']:.4f}  step {one_rank['step']:.4f}")
    for shard in (False, True):
        for rank, result in enumerate(results):
            t = result["times"][shard]
            print(
                f"  2 ranks {'sharded  ' if shard else 'unsharded'} r{rank} factor "
                f"{t['factor']:.4f}  broadcast {t['broadcast']:.4f}  step {t['step']:.4f}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(f"{folder}/store", folder, args), nprocs=2, join=True)
        results = [torch.load(f"{folder}/result.{r}", weights_only=True) for r in range(2)]
    torch.set_num_threads(1)
    single = {cases._case_id(case): cases._run(case, 0, 1) for case in cases.CASES}
    one_rank = factor_step_times(0, 1, False, args.width, args.layers, args.repeats)
    _report(results, single, one_rank)


if __name__ == "__main__":
    main()
