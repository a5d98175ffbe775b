"""Checkpoints: ``weights_only`` loads, bitwise resume, validated loads that change nothing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from singd.structures import STRUCTURE_NAMES
from tests.optim.nested import nested_tensors, owns_exactly_its_bytes, same_state, state_snapshot

OPTIMIZERS: dict[str, Callable[[nn.Module], Any]] = {
    "singd-dense": lambda m: SINGD(m, lr=0.05, T=2, lr_cov=0.1, weight_decay=1e-3),
    "singd-structured": lambda m: SINGD(
        m, lr=0.05, T=2, lr_cov=0.1, structures=("diagonal", "block2diagonal")
    ),
    "ikfac-schedule": lambda m: SINGD(
        m, lr=0.05, T=1, kfac_like=True, alpha1=0.0, lr_cov=lambda step: 0.1 / (1 + step)
    ),
    "kfac": lambda m: KFAC(m, lr=0.05, T=2, lr_cov=0.1),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.Tanh(),
        nn.Linear(5, 2),
    )


def _batch(step: int) -> torch.Tensor:
    return torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1000 + step))


def _train(model: nn.Module, opt: Any, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        model(_batch(step)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("stop", [3, 4])  # T = 2: the next step is a plain / statistics step
def test_resume_is_bitwise_identical(tmp_path, name, stop):
    """Save after ``stop`` steps, load with ``weights_only`` into fresh objects, continue."""
    total = 7
    model = _model()
    opt = OPTIMIZERS[name](model)
    _train(model, opt, range(stop))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, range(stop, total))

    resumed_model = _model(seed=1)  # different initial weights: everything must come from disk
    resumed_opt = OPTIMIZERS[name](resumed_model)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    assert resumed_opt.steps == stop
    _train(resumed_model, resumed_opt, range(stop, total))

    assert resumed_opt.steps == opt.steps == total
    assert same_state(state_snapshot(opt, model), state_snapshot(resumed_opt, resumed_model))


def test_state_dict_holds_factor_storages_by_layer_name():
    model = _model()
    opt = SINGD(model, structures=("diagonal", "dense"))
    entry = opt.state_dict()["kronecker"]
    assert set(entry["layers"]) == {"0", "3", "5"}
    layer = entry["layers"]["3"]
    assert layer["layout"] == {"K": "diagonal", "C": "dense", "m_K": "diagonal", "m_C": "dense"}
    (storage,) = layer["factors"]["K"].values()
    assert storage.shape == (3 * 4 * 4 + 1,)  # d_i + bias column
    assert entry["steps"] == 0


def _corruptions() -> dict[str, Callable[[dict[str, Any]], None]]:
    def factors(sd: dict[str, Any]) -> dict[str, Any]:
        return sd["kronecker"]["layers"]["3"]["factors"]

    def set_storage(sd: dict[str, Any], value: Any) -> None:
        storage = factors(sd)["K"]
        storage[next(iter(storage))] = value

    return {
        "missing entry": lambda sd: sd.pop("kronecker"),
        "missing layer": lambda sd: sd["kronecker"]["layers"].pop("3"),
        "extra layer": lambda sd: sd["kronecker"]["layers"].update(
            extra=sd["kronecker"]["layers"]["0"]
        ),
        "wrong shape": lambda sd: set_storage(sd, torch.zeros(3, 3)),
        "non-finite": lambda sd: set_storage(sd, torch.full((49, 49), float("nan"))),
        "integer tensor": lambda sd: set_storage(sd, torch.zeros(49, 49, dtype=torch.int64)),
        "missing factor": lambda sd: factors(sd).pop("m_C"),
        "structure mismatch": lambda sd: sd["kronecker"]["layers"]["3"]["layout"].update(
            K="diagonal"
        ),
        "negative steps": lambda sd: sd["kronecker"].update(steps=-1),
        "bad grad scale": lambda sd: sd["kronecker"].update(grad_scale_prev=float("inf")),
        "group structures": lambda sd: sd["param_groups"][0].update(
            structures=("diagonal", "dense")
        ),
        "group lr": lambda sd: sd["param_groups"][0].update(lr=-1.0),
        "group count": lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])),
        "momentum shape": lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(2)),
        "state index": lambda sd: sd["state"].update({99: sd["state"][0]}),
    }


@pytest.mark.parametrize("corruption", list(_corruptions()))
def test_corrupted_checkpoint_raises_and_changes_nothing(corruption):
    model = _model()
    opt = SINGD(model, lr=0.05, T=1)
    _train(model, opt, range(2))
    saved = copy.deepcopy(opt.state_dict())
    _corruptions()[corruption](saved)
    _train(model, opt, range(2, 3))
    before = state_snapshot(opt, model)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    with pytest.raises(ValueError, match=r"load_state_dict|lr|loaded state dict"):
        opt.load_state_dict(saved)
    assert opt.steps == 3
    assert same_state(before, state_snapshot(opt, model))
    assert groups_before == [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
    ]


def test_callable_lr_cov_needs_callable_in_loader():
    model = _model()
    saved = SINGD(model, lr_cov=lambda step: 0.1).state_dict()
    with pytest.raises(ValueError, match="callable"):
        SINGD(model, lr_cov=0.1).load_state_dict(saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_moves_state_to_the_parameters_device(tmp_path):
    model = _model()
    opt = SINGD(model, T=1)
    _train(model, opt, range(2))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    gpu_model = _model().cuda()
    gpu_opt = SINGD(gpu_model, T=1)
    gpu_opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert all(t.is_cuda for t in nested_tensors(gpu_opt.state_dict()))
    gpu_model(_batch(2).cuda()).square().mean().backward()
    gpu_opt.step()


@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
@pytest.mark.parametrize("T", [1, 3])
def test_state_tensors_own_exactly_their_bytes(structure: str, T: int) -> None:
    """Every tensor of ``state_dict()`` after 4 steps is backed by its own entries only.

    Rule: exact (bytes).  A state tensor viewing a larger buffer (a Toeplitz
    product is a view of its inverse-FFT buffer) keeps that buffer resident
    and ``torch.save`` writes all of it.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 80), nn.ReLU(), nn.Linear(80, 10))
    optimizer = SINGD(model, lr=1e-3, T=T, alpha1=0.5, structures=(structure, structure))
    inputs, targets = torch.randn(32, 64), torch.randint(10, (32,))
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    assert all(owns_exactly_its_bytes(t) for t in nested_tensors(optimizer.state_dict()))
