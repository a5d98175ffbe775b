"""float16 factors (and a float16 model) with the standard ``GradScaler`` recipe (SPEC §1.5).

The recipe is ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``
with the scaler's defaults (``init_scale=2**16``, ``growth_interval=2000``) or
``init_scale=2**10``; nothing is attached.  The statistics are scale-free (the
hooks normalise ``G`` by a power of two, docs/SPEC.md §1.5 deviation), so:

* a float32 model cannot overflow its gradients at these scales (float32's
  range is ``2^128``; ``s · max|∂ℓ|`` is at most ``2^16`` times a number of
  order one here), so **every** step is taken and the scale never moves
  (30 steps < ``growth_interval``);
* a float16 model may overflow its scaled gradients in the first steps
  (``Σ_rows |s · ∂ℓ/∂logit| · |h|`` can exceed 65504 at ``s = 2^16``): those
  steps are the scaler's to skip, each one halves the scale, so the number of
  steps taken is exactly ``STEPS − log2(init_scale / final_scale)``; no step
  may be skipped for any other reason (no statistics or factor overflow);
* GradScalers' scales are powers of two, which scale every float32 operation
  exactly (away from overflow and underflow), and the normalised statistics
  do not depend on the scale at all: the float32-model run through a
  GradScaler equals the run without one **bitwise** (tolerance 0).
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from torch import nn

from singd import SINGD
from tests.optim.nested import same_state, state_snapshot

STEPS = 30
HALF = (torch.float16, torch.float16)
#: (model dtype, preconditioner_dtype): fp16 factors on a float32 model, and a float16 model.
PRECISIONS = {
    "fp32-model-fp16-factors": (torch.float32, HALF),
    "fp16-model": (torch.float16, (None, None)),
}


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)


def _optimizer(model: nn.Module, preconditioner_dtype: tuple) -> SINGD:
    return SINGD(
        model, lr=0.01, T=1, lr_cov=0.05, damping=0.01, preconditioner_dtype=preconditioner_dtype
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One of four fixed batches of a teacher-labelled task (so the loss can decrease)."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(step % 4))
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(99))
    return x, (x @ teacher).argmax(dim=1)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x, y = _batch(step)
    dtype = next(model.parameters()).dtype
    return nn.functional.cross_entropy(model(x.to(dtype)).float(), y)


def _train(
    model: nn.Module, opt: SINGD, scaler: torch.amp.GradScaler | None, steps: int = STEPS
) -> tuple[list[float], list[str]]:
    """``steps`` steps of the standard recipe; the losses and every warning's text."""
    losses, messages = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = _loss(model, step)
        losses.append(float(loss.detach()))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        messages += [str(w.message) for w in caught]
    return losses, messages


class Run:
    """A finished run: model, optimizer, scaler (or ``None``), losses, warning texts."""

    def __init__(self, precision: str, init_scale: float | None) -> None:
        dtype, preconditioner_dtype = PRECISIONS[precision]
        self.model = _model(dtype)
        self.start = [p.detach().clone() for p in self.model.parameters()]
        self.opt = _optimizer(self.model, preconditioner_dtype)
        self.scaler = None
        if init_scale is not None:  # growth_interval: the default 2000
            self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        self.losses, self.messages = _train(self.model, self.opt, self.scaler)


@functools.cache
def _run(precision: str, init_scale: float | None) -> Run:
    """:class:`Run`, cached: float16 matmuls are slow on CPU, and two tests share runs."""
    return Run(precision, init_scale)


@pytest.mark.parametrize("init_scale", [2.0**16, 2.0**10], ids=["default-2^16", "2^10"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_standard_recipe_trains(precision, init_scale):
    run = _run(precision, init_scale)
    dtype = PRECISIONS[precision][0]
    model, start, opt, scaler = run.model, run.start, run.opt, run.scaler
    losses, messages = run.losses, run.messages

    backoffs = round(math.log2(init_scale / scaler.get_scale()))
    assert scaler.get_scale() == init_scale / 2**backoffs  # no growth within 30 steps
    assert opt.steps == STEPS - backoffs  # every skip is an overflow the scaler backed off from
    assert all("GradScaler found inf/NaN gradients" in m for m in messages), messages
    if dtype == torch.float32:
        assert backoffs == 0 and not messages  # see the module docstring
    assert backoffs <= 2  # fp16 model: max|∂W| ≤ 2^17·max|h| at s = 2^16 (module docstring)
    assert opt.layer_state("0")["C"].dtype == torch.float16
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5])  # measured: ≈ 0.21× (mean 2.28 → 0.48)


def test_scaled_run_equals_the_unscaled_run_bitwise():
    """float32 model, fp16 factors: GradScaler (defaults) == no scaler, bitwise (docstring)."""
    runs = [_run("fp32-model-fp16-factors", scale) for scale in (None, 2.0**16)]
    assert all(not run.messages and run.opt.steps == STEPS for run in runs)
    (plain_model, plain), (scaled_model, scaled) = ((run.model, run.opt) for run in runs)
    for p, q in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for name in plain.layer_names():
        for factor in ("K", "C", "m_K", "m_C"):
            left = plain.layer_state(name)[factor].to_dense()
            assert torch.equal(left, scaled.layer_state(name)[factor].to_dense())


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_inf_gradient_step_is_skipped_named_and_the_scale_backs_off(precision):
    dtype, preconditioner_dtype = PRECISIONS[precision]
    model = _model(dtype)
    opt = _optimizer(model, preconditioner_dtype)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):  # non-trivial factors and momentum buffers
        opt.zero_grad()
        scaler.scale(_loss(model, step)).backward()
        scaler.step(opt)
        scaler.update()
    assert opt.steps == 3
    before, scale = state_snapshot(opt, model), scaler.get_scale()
    opt.zero_grad()
    scaler.scale(_loss(model, 3)).backward()
    model[2].bias.grad[1] = float("inf")  # an overflow in this backward
    with pytest.warns(UserWarning, match=r"found inf/NaN gradients: layer '2': bias gradient"):
        scaler.step(opt)
    scaler.update()
    assert opt.steps == 3 and scaler.get_scale() == scale / 2
    assert same_state(before, state_snapshot(opt, model))
    opt.zero_grad()  # the next step proceeds, with fresh statistics
    scaler.scale(_loss(model, 4)).backward()
    scaler.step(opt)
    assert opt.steps == 4


def test_overflowing_fp16_model_backs_off_and_then_trains():
    """init_scale 2^24 overflows a float16 model's gradients: the scaler halves it until
    they fit; every skipped step is one halving, and training then proceeds."""
    model = _model(torch.float16)
    opt = _optimizer(model, (None, None))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    steps = 20
    losses, messages = _train(model, opt, scaler, steps)
    backoffs = round(math.log2(2.0**24 / scaler.get_scale()))
    assert backoffs >= 1  # the logits' gradient alone reaches 2^24/64 = 2^18 > 65504
    assert opt.steps == steps - backoffs and len(messages) == backoffs
    assert all("GradScaler found inf/NaN gradients" in m for m in messages)
    assert sum(losses[-5:]) < sum(losses[:5])
