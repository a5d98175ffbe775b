"""The swamping guard of half-precision factors (``SINGD(..., factor_guard=...)``).

Case 2 of the stability issue: the pure-bf16 64-64-10 MLP on digits with
``lr_cov = 1e-3``, ``T = 1``: ``β1·K·m`` is below half an ulp of ``K``, so
without a guard ``K`` never leaves ``I``.  See ``docs/optimizer.md``,
"Swamping guard", and ``scripts/swamping.py`` for the measurements.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from singd import SINGD
from singd.optim import updates
from singd.structures import get_structure
from tests.optim.nested import same_state, state_snapshot
from tests.tolerances import EPS
from verification.experiments.digits import BATCH_SIZE, KRONECKER_HYPER, load_data, make_model

CASE2 = {**KRONECKER_HYPER, "lr_cov": 1e-3, "T": 1}
GUARDS = ("compensated", "stochastic", "master")
load_data = functools.lru_cache(load_data)  # the split is fixed; tests only read it


def _digits_run(
    dtype: torch.dtype, structure: str, steps: int, **kwargs: Any
) -> tuple[SINGD, nn.Module]:
    data = load_data(dtype)
    model = make_model(dtype)
    opt = SINGD(model, structures=(structure, structure), **{**CASE2, **kwargs})
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(data.y_train), (BATCH_SIZE,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
        opt.step()
    return opt, model


def _dense(opt: SINGD, name: str, factor: str) -> torch.Tensor:
    return opt.layer_state(name)[factor].to_dense().to(torch.float64)


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_default_guard_tracks_float32_in_case2(structure):
    """‖K_bf16 − K_fp32‖ / ‖K_fp32 − I‖ ≤ 10 % for every factor after 100 steps.

    10 % is the issue's target, not a tolerance fitted to the result.  What no
    bf16 factor can beat is the rounding of the float32 factors to bf16
    (``scripts/swamping.py``: 3.9 %); the guarded run measures the same 3.9 %.
    """
    guarded, _ = _digits_run(torch.bfloat16, structure, 100)
    reference, _ = _digits_run(torch.float32, structure, 100)
    for name in reference.layer_names():
        for factor in ("K", "C"):
            ref = _dense(reference, name, factor)
            eye = torch.eye(ref.shape[0], dtype=torch.float64)
            ratio = (_dense(guarded, name, factor) - ref).norm() / (ref - eye).norm()
            assert ratio <= 0.10, (name, factor, float(ratio))


def test_guard_off_reproduces_the_swamped_update(monkeypatch):
    """``factor_guard=None``: the unguarded path; diagonal ``K``, ``C`` stay ``I`` exactly."""
    seen = []
    original = updates.singd_update_factors

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("factor_steps"))
        return original(*args, **kwargs)

    monkeypatch.setattr(updates, "singd_update_factors", spy)
    monkeypatch.setattr("singd.optim.singd.singd_update_factors", spy)
    opt, _ = _digits_run(torch.bfloat16, "diagonal", 20, factor_guard=None)
    assert seen and all(steps is None for steps in seen)  # the unguarded code path
    for name in opt.layer_names():
        assert set(opt.layer_state(name)) == {"K", "C", "m_K", "m_C"}
        for factor in ("K", "C"):
            matrix = opt.layer_state(name)[factor]
            assert torch.equal(matrix.to_dense(), torch.eye(matrix.dim, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("guard", GUARDS)
def test_guard_is_inactive_for_wide_factors(dtype, guard):
    """float32/float64 factors: no guard state, bitwise the run without a guard."""
    guarded, guarded_model = _digits_run(dtype, "dense", 3, factor_guard=guard)
    plain, plain_model = _digits_run(dtype, "dense", 3, factor_guard=None)
    for name in guarded.layer_names():
        assert set(guarded.layer_state(name)) == {"K", "C", "m_K", "m_C"}
    plain_state, guarded_state = plain.state_dict(), guarded.state_dict()
    for groups in (plain_state["param_groups"], guarded_state["param_groups"]):
        for group in groups:
            group.pop("factor_guard")
    plain_snapshot = state_snapshot(plain, plain_model)
    guarded_snapshot = state_snapshot(guarded, guarded_model)
    assert plain_snapshot.tensors and len(plain_snapshot.tensors) == len(guarded_snapshot.tensors)
    for a, b in zip(plain_snapshot.tensors, guarded_snapshot.tensors, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_half_k_with_float32_c_guards_only_k():
    """Per factor: ``preconditioner_dtype=(bf16, float32)`` keeps ``c_K`` but no ``c_C``."""
    model = make_model(torch.float32)
    opt = SINGD(model, preconditioner_dtype=(torch.bfloat16, torch.float32))
    assert set(opt.layer_state("0")) == {"K", "C", "m_K", "m_C", "c_K"}


def _numel(structure: str, dim: int) -> int:
    return get_structure(structure).storage_numel(dim)


@pytest.mark.parametrize(
    ("guard", "factor_bytes", "momentum_bytes", "extra_bytes"),
    [(None, 2, 2, 0), ("compensated", 2, 2, 2), ("stochastic", 2, 2, 0), ("master", 4, 2, 0)],
)
@pytest.mark.parametrize("structure", ["dense", "diagonal", "block3diagonal"])
def test_state_bytes_equal_the_formula(guard, factor_bytes, momentum_bytes, extra_bytes, structure):
    """Bytes = Σ_layers (n_K + n_C)·(s_factor + s_momentum + s_guard) (docs/optimizer.md)."""
    opt, _ = _digits_run(torch.bfloat16, structure, 2, factor_guard=guard)
    layers = opt.state_dict()["kronecker"]["layers"]
    measured = sum(
        t.numel() * t.element_size()
        for layer in layers.values()
        for storage in layer["factors"].values()
        for t in storage.values()
    )
    dims = [(65, 64), (65, 10)]  # (d_i~, d_o) of Linear(64, 64) and Linear(64, 10)
    per_entry = factor_bytes + momentum_bytes + extra_bytes
    assert measured == sum(
        (_numel(structure, d_i) + _numel(structure, d_o)) * per_entry for d_i, d_o in dims
    )


@pytest.mark.parametrize("structure", ["tril", "block3diagonal", "triutoeplitz"])
def test_guard_state_keeps_the_structure(structure):
    """``c_K``/``c_C`` share ``K``'s structure; entries outside the pattern stay exactly zero."""
    opt, _ = _digits_run(torch.bfloat16, structure, 5)
    cls = get_structure(structure)
    for name in opt.layer_names():
        state = opt.layer_state(name)
        for factor, comp in (("K", "c_K"), ("C", "c_C")):
            assert type(state[comp]) is type(state[factor]) is cls
            assert state[comp].dtype == torch.bfloat16
            dense = state[factor].to_dense()
            pattern = cls.from_dense(torch.ones_like(dense)).to_dense() != 0
            assert torch.equal(dense[~pattern], torch.zeros_like(dense[~pattern]))
            assert torch.equal(state[comp].to_dense()[~pattern], dense[~pattern])
        assert bool(state["c_K"].max_abs() > 0)  # the guard did something


def _train(model: nn.Module, opt: SINGD, steps: range) -> None:
    data = load_data(torch.bfloat16)
    for step in steps:
        batch = torch.randint(
            len(data.y_train), (BATCH_SIZE,), generator=torch.Generator().manual_seed(step)
        )
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
        opt.step()


@pytest.mark.parametrize("guard", GUARDS)
def test_guard_state_round_trips_bitwise(tmp_path, guard):
    """Save after 3 steps, load into fresh objects (``weights_only``), continue: bitwise equal."""
    model = make_model(torch.bfloat16)
    opt = SINGD(model, factor_guard=guard, **CASE2)
    _train(model, opt, range(3))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, range(3, 6))
    resumed_model = make_model(torch.bfloat16, seed=1)
    resumed = SINGD(resumed_model, factor_guard=guard, **CASE2)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    _train(resumed_model, resumed, range(3, 6))
    assert same_state(state_snapshot(opt, model), state_snapshot(resumed, resumed_model))


def _guard_corruptions() -> dict[str, Callable[[dict[str, Any]], None]]:
    def storage(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
        return sd["kronecker"]["layers"]["0"]["factors"]["c_K"]

    def scaled(sd: dict[str, Any], value: float) -> None:
        storage(sd)["matrix"] = torch.full_like(storage(sd)["matrix"], value)

    return {
        "missing c_K": lambda sd: sd["kronecker"]["layers"]["0"]["factors"].pop("c_K"),
        "non-finite c_K": lambda sd: scaled(sd, float("nan")),
        "c_K too large": lambda sd: scaled(sd, 0.5),
        "c_K shape": lambda sd: storage(sd).update(matrix=torch.zeros(3, 3)),
        "guard differs": lambda sd: sd["param_groups"][0].update(factor_guard="master"),
    }


@pytest.mark.parametrize("corruption", list(_guard_corruptions()))
def test_corrupted_guard_entry_is_rejected(corruption):
    model = make_model(torch.bfloat16)
    opt = SINGD(model, **CASE2)
    _train(model, opt, range(2))
    saved = copy.deepcopy(opt.state_dict())
    _guard_corruptions()[corruption](saved)
    before = state_snapshot(opt, model)
    with pytest.raises(ValueError, match=r"load_state_dict"):
        opt.load_state_dict(saved)
    assert same_state(before, state_snapshot(opt, model))


def test_skipped_step_leaves_guard_state_alone():
    model = make_model(torch.bfloat16)
    opt = SINGD(model, **CASE2)
    _train(model, opt, range(3))
    before = state_snapshot(opt, model)
    opt.zero_grad()
    model(load_data(torch.bfloat16).x_train[:8]).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="skipped"):
        opt.step()
    assert same_state(before, state_snapshot(opt, model))


def test_stochastic_rounding_is_unbiased_and_seeded():
    """Mean of N draws of x = 1 + 0.3 ulp (bf16) is x within 5 standard errors.

    Each draw is 1 or 1 + ulp with p = 0.3, so the mean's standard error is
    ``ulp·sqrt(p(1 − p)/N)``; 5σ fails a correct rounding with probability < 1e-6.
    """
    ulp = EPS[torch.bfloat16]  # the spacing of bf16 above 1, 2⁻⁷
    count, p = 100_000, 0.3
    exact = torch.full((count,), 1.0 + p * ulp, dtype=torch.float32)
    draws = updates.stochastic_round(exact, torch.bfloat16, torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) == {1.0, 1.0 + ulp}
    error = abs(draws.double().mean().item() - (1.0 + p * ulp))
    assert error <= 5 * ulp * (p * (1 - p) / count) ** 0.5
    again = updates.stochastic_round(exact, torch.bfloat16, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    on_grid = torch.tensor([1.0, 0.5, -3.0])
    assert torch.equal(
        updates.stochastic_round(on_grid, torch.bfloat16, torch.Generator()).float(), on_grid
    )


def test_bad_factor_guard_is_rejected():
    with pytest.raises(ValueError, match="factor_guard"):
        SINGD(make_model(torch.bfloat16), factor_guard="kahan")
