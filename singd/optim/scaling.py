"""Gradient-scale bookkeeping for ``torch.amp.GradScaler`` (SPEC §1.5).

With ``_step_supports_amp_scaling = True`` the scaler calls ``step()`` itself
and sets two attributes on the optimizer for its duration:

* ``found_inf`` — non-zero if any gradient is inf/NaN;
* ``grad_scale`` — the scale ``s_t`` the gradients still carry, or ``None``
  when the user already called ``scaler.unscale_(optimizer)`` (e.g. to clip).

Statistics are collected during backward, before ``step`` knows ``s_t``:
``G`` is divided there by ``sqrt(s_div)`` and the step removes the remaining
factor ``s_div / s_t²``.  Who supplies ``s_div`` and ``s_t``:

==========================  ==========================  =========================
setting                     ``s_div`` (backward)        ``s_t`` (statistics)
==========================  ==========================  =========================
no scaler                   ``init_grad_scale``         1
``scaler.step`` only        ``s_{t−1}`` (last step)     ``grad_scale`` at step
attached scaler             scaler's scale at backward  the same (exactly known)
``unscale_`` + not attached ``s_{t−1}``                 unknown → ``ValueError``
==========================  ==========================  =========================
"""

from __future__ import annotations

from typing import NamedTuple

from torch.optim import Optimizer

from singd.optim.hooks import GradScaleInfo


class AmpStepInfo(NamedTuple):
    """What a ``GradScaler`` told this ``step()`` call.

    Attributes:
        via_scaler: whether the scaler invoked ``step`` (attributes present).
        found_inf: whether the scaler found inf/NaN gradients.
        grad_scale: the scale the ``.grad`` tensors carry (``None``: unscaled).
    """

    via_scaler: bool
    found_inf: bool
    grad_scale: float | None


def read_amp_attributes(optimizer: Optimizer) -> AmpStepInfo:
    """Read (and sync to host) the ``grad_scale``/``found_inf`` set by ``GradScaler.step``."""
    if not hasattr(optimizer, "found_inf"):
        return AmpStepInfo(False, False, None)
    grad_scale = getattr(optimizer, "grad_scale", None)
    return AmpStepInfo(
        True,
        bool(float(optimizer.found_inf) != 0.0),
        None if grad_scale is None else float(grad_scale),
    )


def clear_amp_attributes(optimizer: Optimizer) -> None:
    """Remove the scaler's attributes (``GradScaler`` skips this when ``step`` raises)."""
    optimizer.__dict__.pop("grad_scale", None)
    optimizer.__dict__.pop("found_inf", None)


def statistics_correction(info: GradScaleInfo, amp: AmpStepInfo, layer: str) -> float:
    """``s_div / s²`` that a layer's ``H_C`` (or ``Gc``) still carries (SPEC §1.5).

    Raises:
        ValueError: if the gradients were unscaled by ``scaler.unscale_`` and
            the optimizer had no way to learn the scale of the backward pass.
    """
    if info.scale is not None:
        scale = info.scale
    elif amp.grad_scale is not None:
        scale = amp.grad_scale
    elif amp.via_scaler:
        raise ValueError(
            f"layer {layer!r}: scaler.unscale_(optimizer) was called before scaler.step, so "
            "the scale of the curvature statistics is unknown to the optimizer; call "
            "optimizer.attach_grad_scaler(scaler) once after creating the scaler"
        )
    else:
        scale = 1.0
    return info.divisor / scale**2
