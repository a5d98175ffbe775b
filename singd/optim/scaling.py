"""Gradient-scale bookkeeping for ``torch.amp.GradScaler`` (SPEC §1.5).

With ``_step_supports_amp_scaling = True`` the scaler calls ``step()`` itself
and sets two attributes on the optimizer for its duration:

* ``found_inf`` — non-zero if any gradient is inf/NaN;
* ``grad_scale`` — the scale ``s_t`` the gradients still carry, or ``None``
  when the user already called ``scaler.unscale_(optimizer)`` (e.g. to clip).

Statistics are collected during backward, before ``step`` knows ``s_t``.
They are made scale-free there instead (SPEC §1.5 as amended in docs/SPEC.md):
the hook multiplies the output gradient by a power of two ``2^k`` chosen from
the gradient itself, so that ``H_C`` (KFAC: ``Gc``) carries ``2^(2k) · s_t²``
and cannot overflow whatever ``s_t`` is; the step removes ``2^(−2k)`` (read
with its other host values) and ``1/s_t²`` (:func:`statistics_correction`) in
float64, where they enter the update.  Nothing depends on the scale of an
earlier step, so a skipped step cannot leave the statistics of the next one
wrongly scaled (the deadlock of the old ``s_{t−1}`` rule).  Who supplies
``s_t``:

==========================  ==============================================
setting                     ``s_t`` (statistics)
==========================  ==============================================
no scaler                   1
``scaler.step`` only        ``grad_scale`` at step
attached scaler             the scaler's scale at backward (exactly known)
``set_current_grad_scale``  the declared ``s``
``unscale_``, neither       unknown → ``ValueError``
==========================  ==============================================

``set_current_grad_scale(s)`` (the public singd package's call) declares ``s``
for the next step: without a scaler the gradients are divided by it; a scaler
calling ``step`` states the gradients' scale itself, which must then agree
with ``s`` (or be ``None`` after ``unscale_``).  ``init_grad_scale`` (the
public package's ``s_div`` of the first step) is accepted and has no effect.
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
        declared_scale: ``set_current_grad_scale``'s value for this step, if any.
    """

    via_scaler: bool
    found_inf: bool
    grad_scale: float | None
    declared_scale: float | None

    @property
    def backward_scale(self) -> float | None:
        """The scale of this step's backward passes, if known at the step."""
        return self.grad_scale if self.declared_scale is None else self.declared_scale


def read_amp_attributes(optimizer: Optimizer, declared_scale: float | None) -> AmpStepInfo:
    """Read (and sync to host) the ``grad_scale``/``found_inf`` set by ``GradScaler.step``.

    Args:
        optimizer: the optimizer whose ``step`` is running.
        declared_scale: the value of ``set_current_grad_scale`` for this step, if any.

    Raises:
        ValueError: if a scaler's ``grad_scale`` contradicts ``declared_scale``.
    """
    if not hasattr(optimizer, "found_inf"):
        return AmpStepInfo(False, False, declared_scale, declared_scale)
    raw_scale = getattr(optimizer, "grad_scale", None)
    grad_scale = None if raw_scale is None else float(raw_scale)
    if declared_scale is not None and grad_scale not in (None, declared_scale):
        clear_amp_attributes(optimizer)  # GradScaler skips this when step raises
        raise ValueError(
            f"set_current_grad_scale({declared_scale}) disagrees with the GradScaler's scale "
            f"{grad_scale}; with scaler.step(optimizer) it is not needed"
        )
    return AmpStepInfo(True, bool(float(optimizer.found_inf) != 0.0), grad_scale, declared_scale)


def clear_amp_attributes(optimizer: Optimizer) -> None:
    """Remove the scaler's attributes (``GradScaler`` skips this when ``step`` raises)."""
    optimizer.__dict__.pop("grad_scale", None)
    optimizer.__dict__.pop("found_inf", None)


def statistics_correction(info: GradScaleInfo, amp: AmpStepInfo, layer: str) -> float:
    """``1 / s²``, the factor that removes the loss scale from ``H_C`` (or ``Gc``) (SPEC §1.5).

    The hook's normalisation ``2^info.log2_factor`` is removed separately by
    the caller (it is a tensor, read in the step's batched host sync).

    Raises:
        ValueError: if the gradients were unscaled by ``scaler.unscale_`` and
            the optimizer had no way to learn the scale of the backward pass.
    """
    if info.scale is not None:
        scale = info.scale
    elif amp.backward_scale is not None:
        scale = amp.backward_scale
    elif amp.via_scaler:
        raise ValueError(
            f"layer {layer!r}: scaler.unscale_(optimizer) was called before scaler.step, so "
            "the scale of the curvature statistics is unknown to the optimizer; call "
            "optimizer.attach_grad_scaler(scaler) once after creating the scaler (or "
            "optimizer.set_current_grad_scale(scaler.get_scale()) before every step)"
        )
    else:
        scale = 1.0
    return 1.0 / scale**2
