"""One-step comparison of a recorded bf16/fp16 torch run with the *emulated* oracle (SPEC §3).

Every step restarts the emulated oracle (``reference.numbers.emulated_numbers``)
from the implementation's own recorded state (already representable in the
run's dtype, so the restart is exact), feeds it the recorded ``∇W~`` and the
statistics ``A``, ``G`` computed in emulated arithmetic from the recorded raw
``a``, ``g``, and compares the one-step result with torch's recorded state,
entry by entry, in ulps of the entry's scale ``ulp = eps · max|X|`` (``X`` the
torch entry ``K``, ``C``, ``m_K``, ``m_C``, ``W`` or ``m_W``).

How far the two may legitimately differ after one step
--------------------------------------------------------
Both round each operation once to the same grid (RN in bf16/fp16, float32
accumulation), so wherever they do the *same* operations in the same order
they agree bitwise, up to float32 summation order (``<= 2 γ_n`` of the abs
products, ``γ_n = n u32/(1 − n u32)``, far below one storage ulp except
where it crosses a rounding boundary: then one ulp).  They differ where torch
places roundings differently (``singd/optim/updates.py``):

* fused ``a.add_(b, alpha=c)`` rounds ``a + c·b`` once; the oracle rounds
  ``c·b`` and then the sum: ``m_K ← RN(RN(tr·H_K) + c²·Π̂)``, ``RN(coef/d·B + α1·m)``,
  ``K ← RN(K − β1·(K m))``, ``W ← RN(W − β2·m_W)``;
* trace weights ``tr(H)``, ``c² = λ tr(CᵀC)`` are float64 numbers in torch,
  rounded to the grid in the oracle; ``mul_(coef/d_o)`` is one product where
  the oracle divides by ``d_o`` and halves;
* the preconditioned gradient associates its four products differently.

One differently placed rounding perturbs the value it feeds by at most
``u = eps/2`` relative to that intermediate's magnitude ``|t|``; after the
final rounding of the entry (both sides round to the same grid) two nearby
values can round one spacing apart, so an entry differs by at most
``Σ_t u|t| + spacing``.  In ulps of the entry's *scale* ``eps · max|X|``
(the spacing of any entry is ``<= 2 eps max|X|``, the largest entry's own
spacing being up to ``2 · eps · max|X| / 2`` times ``2`` at a binade edge),
with ``N_X`` differently placed roundings each bounded by ``u T_X``
(``T_X`` the largest intermediate on the chain, :func:`allowed_ulps`):

    ``|torch − oracle| <= 2 (N_X · ½ · T_X / max|X| + 1)`` ulps of the scale.

``N_X`` (:data:`ROUNDINGS`): ``K``, ``C``: 2 (the fused step; its momentum's
own difference enters multiplied by ``β1``, below one ``u``); ``W``: 2 (the
fused step; the momentum it reads); ``m_W``: 4 (the four products of ``ĝ``);
``m_K``, ``m_C``: 4 (two fused adds, the float64 traces, the coefficient).
Float32 summation order is inside the same ``+1`` spacing.  A run that is
wrong by more than this — e.g. ``W`` scaled by ``1 + 32 eps``, 32 ulps of
its scale against an allowance of about 4 — breaks the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from reference.numbers import EmulatedNumbers, emulated_numbers
from reference.updates import (
    SINGDHyperparameters,
    SINGDState,
    StepRecord,
    lr_cov_at,
    singd_init,
    singd_step,
)
from verification.recording import RecordedRun
from verification.replay import layer_statistics

#: The compared state entries.
ENTRIES: tuple[str, ...] = ("K", "C", "m_K", "m_C", "W", "m_W")

#: ``N_X``: differently placed roundings on each entry's chain (module docstring).
ROUNDINGS: dict[str, int] = {"K": 2, "C": 2, "W": 2, "m_W": 4, "m_K": 4, "m_C": 4}

#: Storage names by torch dtype.
STORAGE_OF: dict[torch.dtype, str] = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class EmulatedAgreement:
    """How one state entry of one layer agrees with the emulated oracle over a run.

    Attributes:
        layer: The layer's qualified name.
        entry: ``"K"``, ``"C"``, ``"m_K"``, ``"m_C"``, ``"W"`` or ``"m_W"``.
        bitwise_fraction: Fraction of entries (all steps) equal bitwise to the oracle's.
        max_ulps: Largest ``|torch − oracle| / (eps · max|torch entry|)`` over the steps.
        allowed_ulps: The rule's allowance (module docstring) at that step.
        worst_step: The step of the largest ratio ``ulps / allowed``.
        worst_ratio: That ratio (the rule holds iff it is ``<= 1``).
    """

    layer: str
    entry: str
    bitwise_fraction: float
    max_ulps: float
    allowed_ulps: float
    worst_step: int
    worst_ratio: float


def _restart(numbers: EmulatedNumbers, recorded: dict[str, np.ndarray], steps: int) -> SINGDState:
    """The recorded torch state as an emulated oracle state (exact: already on the grid).

    Raises:
        ValueError: If a recorded entry is not representable in the storage dtype.
    """
    values = {}
    for key in ENTRIES:
        value = numbers.asarray(recorded[key])
        if not np.array_equal(numbers.to_float64(value), recorded[key]):
            raise ValueError(f"recorded {key} is not representable in {numbers.storage}")
        values[key] = value
    return SINGDState(steps, **values)


def allowed_ulps(
    entry: str, before: SINGDState, after: SINGDState, hyper: SINGDHyperparameters
) -> float:
    """The rule of the module docstring for one entry: ``2 (N_X · ½ · T_X / max|X| + 1)``.

    ``T_X``, the largest intermediate on the entry's chain, from the oracle's
    states (``before`` the step, ``after`` it):

    * ``K``, ``C``: ``max(max|X'|, β1 max(|X||m'|))`` (the fused step's two terms);
    * ``W``: ``max(max|W'|, β2 max|m_W'|)``;
    * ``m_W``: ``max|m_W'| + α2 max|m_W|`` (bounds ``|ĝ| = |m_W' − α2 m_W|``);
    * ``m_K``, ``m_C``: ``max|m'| + α1 max|m| + ½``: the bracket's terms satisfy
      ``½ (t1 + t2)/d = m' − α1 m + ½ I``.

    Returns:
        The allowance in ulps of the entry's scale (``inf`` for an all-zero entry).
    """
    x = np.abs(np.asarray(getattr(after, entry), dtype=np.float64))
    scale = float(x.max())
    if scale == 0:
        return math.inf

    def largest(state: SINGDState, key: str) -> np.ndarray:
        return np.abs(np.asarray(getattr(state, key), dtype=np.float64))

    if entry in ("K", "C"):
        product = largest(before, entry) @ largest(after, "m_" + entry)
        beta1 = lr_cov_at(hyper.lr_cov, before.steps)  # a schedule's value at this step
        term = max(scale, beta1 * float(product.max()))
    elif entry == "W":
        term = max(scale, hyper.lr * float(largest(after, "m_W").max()))
    elif entry == "m_W":
        term = scale + hyper.momentum * float(largest(before, "m_W").max())
    else:
        term = scale + hyper.alpha1 * float(largest(before, entry).max()) + 0.5
    return 2 * (ROUNDINGS[entry] * 0.5 * term / scale + 1)


def compare_emulated_local(
    run: RecordedRun,
    hyper: SINGDHyperparameters,
    storage: str,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> dict[tuple[str, str], EmulatedAgreement]:
    """Per layer and entry: bitwise agreement and ulps of a bf16/fp16 run vs the emulated oracle.

    Each step restarts the emulated oracle from the recorded state (module docstring).

    Args:
        run: A recorded SINGD run in ``storage``'s dtype.
        hyper: Its hyper-parameters.
        storage: ``"bfloat16"`` or ``"float16"``.
        approx: KFAC flavour of the statistics.
        loss_average: Loss reduction of the statistics.

    Returns:
        ``{(layer, entry): EmulatedAgreement}``.
    """
    numbers = emulated_numbers(storage)
    # with α1 = 0 the optimizer never reads m_K, m_C and keeps them zero (SPEC §1.4a)
    entries = [key for key in ENTRIES if hyper.alpha1 != 0 or key not in ("m_K", "m_C")]
    results = {}
    for name, module in run.layers.items():
        before = singd_init(run.initial_weights[name], hyper, numbers)
        equal = dict.fromkeys(entries, 0)
        total = dict.fromkeys(entries, 0)
        worst = {key: (0.0, 0.0, 0, -1.0) for key in entries}  # ulps, allowed, step, ratio
        for t, step in enumerate(run.steps):
            layer = step[name]
            record = StepRecord(
                grad=numbers.asarray(layer.grad),
                stats=tuple(
                    layer_statistics(module, p, approx, loss_average, numbers) for p in layer.passes
                ),
            )
            after = singd_step(before, record, hyper, numbers)
            for key in entries:
                ours = numbers.to_float64(getattr(after, key))
                theirs = layer.state[key]
                equal[key] += int((ours == theirs).sum())
                total[key] += ours.size
                scale = numbers.eps * float(np.abs(theirs).max())
                difference = float(np.abs(ours - theirs).max())
                ulps = difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)
                allowed = allowed_ulps(key, before, after, hyper)
                ratio = ulps / allowed
                if ratio > worst[key][3]:
                    worst[key] = (ulps, allowed, t, ratio)
                if ulps > worst[key][0]:
                    worst[key] = (ulps, *worst[key][1:])
            before = _restart(numbers, layer.state, t + 1)
        for key in entries:
            ulps, allowed, t, ratio = worst[key]
            results[name, key] = EmulatedAgreement(
                name, key, equal[key] / max(total[key], 1), ulps, allowed, t, ratio
            )
    return results
