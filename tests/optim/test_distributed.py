"""Two gloo ranks with half the batch each train like one process with the full batch.

Each case runs ``STEPS`` steps (``T = 1``: every step updates the factors) of
a DDP-wrapped model in 2 processes on CPU, each rank with half of every
batch, and compares every rank's factors and parameters with a single-process
full-batch run (:mod:`singd.optim.distributed` derives the reduction).

Tolerance rule: both runs form the same terms; only the order of summation
differs (per-rank partial sums of the statistics and of DDP's gradient
average, against one sum over all ``n`` rows).  Each statistic and gradient
of a step thus differs by at most ``matmul_bound(float64, n)`` relative to its
magnitude; over ``STEPS`` steps of these contractive maps (small ``lr``,
``lr_cov``) the first-order errors add, relative to the compared tensor's
largest entry.  The ranks themselves must agree bitwise: they all-reduce to
the same statistics and gradients and then compute identically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from singd import KFAC, SINGD
from tests.tolerances import matmul_bound

WORLD = 2
STEPS = 3
BATCH = 8
SEQUENCE = 3
DTYPE = torch.float64


Factory = Callable[[nn.Module, float, str | None], Any]


def _singd(structures: tuple[str, str], **kwargs: Any) -> Factory:
    settings = {"lr_cov": 0.1, **kwargs}
    return lambda model, lr, loss_average: SINGD(
        model, lr=lr, T=1, loss_average=loss_average, structures=structures, **settings
    )


#: name → (optimizer from (model, lr, loss_average), loss_average, has a sequence dim)
CASES: dict[str, tuple[Factory, str | None, bool]] = {
    "singd-dense": (_singd(("dense", "dense")), "batch", False),
    "singd-tril-diagonal": (_singd(("tril", "diagonal")), "batch", False),
    "ikfac-block-dense": (
        _singd(("block2diagonal", "dense"), kfac_like=True, alpha1=0.0),
        "batch",
        False,
    ),
    "ikfac-sum-loss": (  # Gc sums over the batch: a smaller β1 keeps the step contractive
        _singd(("dense", "dense"), kfac_like=True, alpha1=0.0, lr_cov=0.01),
        None,
        False,
    ),
    "singd-batch+sequence": (_singd(("dense", "triu")), "batch+sequence", True),
    "singd-layernorm-sum-loss": (  # the elementwise h of the LayerNorm is reduced as well
        _singd(("dense", "dense"), kfac_like=True, alpha1=0.0, lr_cov=0.01),
        None,
        False,
    ),
    "kfac": (
        lambda model, lr, loss_average: KFAC(
            model, lr=lr, T=1, lr_cov=0.1, loss_average=loss_average
        ),
        "batch",
        False,
    ),
}


def _model(norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 4), nn.LayerNorm(4)] if norm else [nn.Linear(5, 4)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)


def _batch(step: int, sequence: bool) -> torch.Tensor:
    shape = (BATCH, SEQUENCE, 5) if sequence else (BATCH, 5)
    generator = torch.Generator().manual_seed(step)
    return torch.randn(shape, generator=generator, dtype=DTYPE)


def _loss(output: torch.Tensor, loss_average: str | None) -> torch.Tensor:
    squares = output.square().sum(dim=-1)
    return squares.sum() if loss_average is None else squares.mean()


def _run(name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Train case ``name`` on rank ``rank``'s share of every batch; its final tensors."""
    make, loss_average, sequence = CASES[name]
    inner = _model(norm="layernorm" in name)
    model, lr = inner, 0.05
    if world > 1:
        model = nn.parallel.DistributedDataParallel(inner)
    elif loss_average is None:
        lr /= WORLD  # DDP averages the gradients of the per-rank sum losses
    opt = make(model, lr, loss_average)
    for step in range(STEPS):
        opt.zero_grad()
        inputs = _batch(step, sequence).chunk(world)[rank]
        _loss(model(inputs), loss_average).backward()
        opt.step()
    tensors = {f"param.{key}": p.detach().clone() for key, p in inner.named_parameters()}
    for layer in opt.layer_names():
        for factor, value in opt.layer_state(layer).items():
            dense = value if isinstance(value, torch.Tensor) else value.to_dense()
            tensors[f"{layer}.{factor}"] = dense.clone()
    for key, p in inner.named_parameters():
        if "elementwise_k" in opt.state[p]:
            tensors[f"{key}.elementwise_k"] = opt.state[p]["elementwise_k"].clone()
    return tensors


def _worker(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.save({name: _run(name, rank, WORLD) for name in CASES}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, dict[str, torch.Tensor]]]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    folder = tmp_path_factory.mktemp("distributed")
    results = str(folder / "results")
    mp.spawn(_worker, args=(str(folder / "store"), results), nprocs=WORLD, join=True)
    return [torch.load(f"{results}.{rank}", weights_only=True) for rank in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_agree_bitwise(rank_results, name):
    first, *others = (results[name] for results in rank_results)
    for other in others:
        assert first.keys() == other.keys()
        assert all(torch.equal(first[key], other[key]) for key in first)  # rule: docstring


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_the_full_batch_run(rank_results, name):
    single = _run(name, rank=0, world=1)
    distributed = rank_results[0][name]
    assert single.keys() == distributed.keys()
    rows = BATCH * SEQUENCE if CASES[name][2] else BATCH
    for key, expected in single.items():
        error = float((distributed[key] - expected).abs().max())
        bound = STEPS * matmul_bound(DTYPE, rows) * float(expected.abs().max())
        assert error <= bound, f"{key}: {error:.3e} > {bound:.3e}"  # rule: docstring
