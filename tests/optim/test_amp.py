"""``torch.amp``: GradScaler protocol (SPEC §1.5) including clipping after ``unscale_``.

Tolerance rule for scaler-vs-plain runs in float32: **bitwise** (tolerance 0).
A GradScaler's scales are powers of two (init ``2^k``, growth 2, backoff 1/2),
and scaling by a power of two is exact in binary floating point away from
overflow and underflow: the backward, ``unscale_``, clipping and ``H_K`` agree
bitwise, the hooks normalise ``G`` by a power of two chosen from ``G`` itself
(so the normalised ``G`` has the same bits at any scale), and the step removes
``2^(−2k)/s²`` in float64, exactly (SPEC §1.5, docs/SPEC.md deviation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from tests.optim.nested import same_state, state_snapshot

STEPS = 6
BATCH = 8
OPTIMIZERS: dict[str, Callable[[nn.Module], Any]] = {
    "singd": lambda m: SINGD(m, lr=0.05, T=2, lr_cov=0.1),
    "kfac": lambda m: KFAC(m, lr=0.05, T=2, lr_cov=0.1),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, 6, generator=gen)
    return model(x).square().mean()


def _run(
    name: str,
    *,
    scaler: torch.amp.GradScaler | None,
    clip: float | None,
    unscale: bool,
    attach: bool,
) -> nn.Module:
    model = _model()
    opt = OPTIMIZERS[name](model)
    if attach:
        opt.attach_grad_scaler(scaler)
    for step in range(STEPS):
        opt.zero_grad()
        loss = _loss(model, step)
        if scaler is None:
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            continue
        scaler.scale(loss).backward()
        if unscale:
            scaler.unscale_(opt)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
    assert opt.steps == STEPS
    return model


def _bitwise_equal(left: nn.Module, right: nn.Module) -> bool:
    pairs = zip(left.parameters(), right.parameters(), strict=True)
    return all(torch.equal(a, b) for a, b in pairs)


def _scaler(init_scale: float) -> torch.amp.GradScaler:
    # growth every 2 steps: the scale changes between statistics steps (s_prev ≠ s_t)
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_clipping_after_unscale_matches_plain_run(name):
    """``unscale_`` + ``clip_grad_norm_`` + attached scaler == the same run without scaler."""
    clip = 0.05  # small enough to clip on every step
    plain = _run(name, scaler=None, clip=clip, unscale=False, attach=False)
    scaled = _run(name, scaler=_scaler(2.0**10), clip=clip, unscale=True, attach=True)
    assert _bitwise_equal(plain, scaled)  # rule: module docstring


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("attach", [False, True])
def test_scaler_step_without_unscale_matches_plain_run(name, attach):
    """Plain ``scaler.step``: ``grad_scale`` arrives at step, statistics corrected by 1/s²."""
    plain = _run(name, scaler=None, clip=None, unscale=False, attach=False)
    scaled = _run(name, scaler=_scaler(2.0**13), clip=None, unscale=False, attach=attach)
    assert _bitwise_equal(plain, scaled)  # rule: module docstring (odd and even powers alike)


def test_unscale_without_attached_scaler_raises_on_statistics_step():
    """The backward's scale is unknown: a clear error, never silently wrong statistics."""
    model = _model()
    opt = SINGD(model, T=1)
    scaler = _scaler(2.0**8)
    scaler.scale(_loss(model, 0)).backward()
    scaler.unscale_(opt)
    before = state_snapshot(opt, model)
    with pytest.raises(ValueError, match="attach_grad_scaler"):
        scaler.step(opt)
    assert opt.steps == 0 and not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert same_state(before, state_snapshot(opt, model))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_inf_step_is_skipped_and_leaves_state_untouched(name):
    model = _model()
    opt = OPTIMIZERS[name](model)
    opt.attach_grad_scaler(scaler := _scaler(2.0**8))
    for step in range(3):  # reach a state with non-trivial factors and buffers
        opt.zero_grad()
        scaler.scale(_loss(model, step)).backward()
        scaler.step(opt)
        scaler.update()
    before, scale = state_snapshot(opt, model), scaler.get_scale()
    opt.zero_grad()
    scaler.scale(_loss(model, 3)).backward()
    model[0].weight.grad[0, 0] = float("inf")  # an overflow in this backward
    with pytest.warns(UserWarning, match="skipped"):
        scaler.step(opt)
    scaler.update()
    assert opt.steps == 3 and scaler.get_scale() == scale / 2
    assert same_state(before, state_snapshot(opt, model))
    opt.zero_grad()  # the next step proceeds with fresh statistics
    scaler.scale(_loss(model, 3)).backward()
    scaler.step(opt)
    assert opt.steps == 4


@pytest.mark.parametrize(
    "preconditioner_dtype",
    [(None, None), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
def test_autocast_bfloat16_keeps_factor_dtypes(preconditioner_dtype):
    """Under bf16 autocast the statistics are formed in each factor's own dtype."""
    model = _model()
    opt = SINGD(model, T=1, lr=0.05, preconditioner_dtype=preconditioner_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _loss(model, step)
            loss.backward()
            opt.step()
    assert opt.steps == 3
    state = opt.layer_state("0")
    assert state["K"].dtype == (preconditioner_dtype[0] or torch.float32)
    assert state["C"].dtype == (preconditioner_dtype[1] or torch.float32)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["singd", "kfac"])
def test_hook_statistics_under_autocast_are_those_without_it(name):
    """The hooks turn autocast off (only where it is on): under bf16 autocast, the
    first layer's input summary (its input is the float32 batch) has exactly the
    bits of a run without autocast.  A hook left under autocast forms it with a
    bf16 matmul, so it differs."""
    summaries = []
    for autocast in (False, True):
        model = _model()
        opt = OPTIMIZERS[name](model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model[0](torch.randn(BATCH, 6, generator=torch.Generator().manual_seed(1)))
        loss.float().square().mean().backward()
        summaries.append(opt._collector._pending["0"].summary_tensors()[0])
    for plain, cast in zip(*summaries, strict=True):
        assert plain.dtype == cast.dtype == torch.float32
        assert torch.equal(plain, cast)  # rule: the same operations on the same inputs, exact
