"""The oracle's KFAC baseline (SPEC §1.2, with the parameter update of §1.4).

Every ``T`` steps (``steps % T == 0``) the factors move towards this step's
statistics, summed over its backward passes::

    S_K ← (1 − β1) S_K + β1 Σ AᵀA        S_C ← (1 − β1) S_C + β1 Σ GᵀG

and every step the gradient is preconditioned with the (just updated) factors,
``Δ = (S_C + λI)⁻¹ ∇W (S_K + λI)⁻¹``, followed by SPEC §1.4's weight decay,
momentum and learning rate.  The factors start at ``(1 − λ) I``, so the first
preconditioner ``(S + λI)⁻¹ = I`` equals SINGD's ``K = C = I`` (SPEC §1.3,
IKFAC).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reference.numbers import FLOAT64, Numbers
from reference.updates import (
    LrCov,
    StepRecord,
    check_lr_cov,
    check_nonnegative,
    check_period,
    check_record,
    check_unit_interval,
    check_weight,
    lr_cov_at,
    parameter_update,
    trajectory,
)


@dataclass(frozen=True)
class KFACHyperparameters:
    """KFAC's hyper-parameters (SPEC §1.2, §1.4).

    Attributes:
        lr: Learning rate ``β2``.
        momentum: Parameter momentum ``α2`` in ``[0, 1)``.
        damping: Damping ``λ >= 0``, added to each factor.
        weight_decay: ``γ >= 0``, added after preconditioning.
        T: Factors are updated on steps with ``steps % T == 0``.
        lr_cov: EMA weight ``β1``, or a function of the completed steps.
    """

    lr: float = 0.001
    momentum: float = 0.9
    damping: float = 0.001
    weight_decay: float = 0.0
    T: int = 10
    lr_cov: LrCov = 1e-2

    def __post_init__(self) -> None:
        """Validate every field.

        Raises:
            ValueError: Naming the first invalid argument.
        """
        check_nonnegative("lr", self.lr)
        check_unit_interval("momentum", self.momentum)
        check_nonnegative("damping", self.damping)
        check_nonnegative("weight_decay", self.weight_decay)
        check_period(self.T)
        check_lr_cov(self.lr_cov)


@dataclass(frozen=True, eq=False)
class KFACState:
    """KFAC's state for one layer.

    Attributes:
        steps: Completed steps.
        S_K: Input factor (``d_i × d_i``).
        S_C: Output-gradient factor (``d_o × d_o``).
        W: ``W~`` (``d_o × d_i``).
        m_W: Its momentum (``d_o × d_i``).
    """

    steps: int
    S_K: np.ndarray
    S_C: np.ndarray
    W: np.ndarray
    m_W: np.ndarray


def kfac_factor_update(factor: np.ndarray, statistic: np.ndarray, beta1: float) -> np.ndarray:
    """``S ← (1 − β1) S + β1 U`` (SPEC §1.2), for ``S`` and ``U`` of shape ``d × d``."""
    return (1 - beta1) * factor + beta1 * statistic


def kfac_preconditioned_gradient(
    s_k: np.ndarray, s_c: np.ndarray, grad: np.ndarray, damping: float, numbers: Numbers
) -> np.ndarray:
    """``(S_C + λI)⁻¹ ∇W (S_K + λI)⁻¹`` (SPEC §1.2), for ``∇W`` of shape ``d_o × d_i``."""
    d_o, d_i = grad.shape
    inverse_c = numbers.inv(s_c + damping * numbers.eye(d_o))
    inverse_k = numbers.inv(s_k + damping * numbers.eye(d_i))
    return inverse_c @ grad @ inverse_k


def _summed_gram(statistics: Sequence[np.ndarray]) -> np.ndarray:
    """``Σ AᵀA`` over the backward passes of one step (SPEC §1.1)."""
    grams = [s.T @ s for s in statistics]
    total = grams[0]
    for gram in grams[1:]:
        total = total + gram
    return total


def kfac_init(w0: np.ndarray, hyper: KFACHyperparameters, numbers: Numbers = FLOAT64) -> KFACState:
    """Initial state: ``S_K = (1 − λ) I``, ``S_C = (1 − λ) I``, zero momentum.

    Raises:
        ValueError: If ``w0`` is not a matrix.
    """
    check_weight(w0)
    d_o, d_i = np.shape(w0)
    with numbers.context():
        keep = 1 - numbers.scalar(hyper.damping)
        return KFACState(
            steps=0,
            S_K=keep * numbers.eye(d_i),
            S_C=keep * numbers.eye(d_o),
            W=numbers.asarray(w0),
            m_W=numbers.zeros((d_o, d_i)),
        )


def kfac_step(
    state: KFACState, record: StepRecord, hyper: KFACHyperparameters, numbers: Numbers = FLOAT64
) -> KFACState:
    """One KFAC step for one layer (SPEC §1.2 with §1.4; same ``T`` semantics as SINGD).

    Raises:
        ValueError: On shape mismatches or empty ``stats`` on an update step.
    """
    update_factors = state.steps % hyper.T == 0
    check_record(record, state.W.shape, needs_stats=update_factors)
    s_k, s_c = state.S_K, state.S_C
    with numbers.context():
        if update_factors:
            beta1 = lr_cov_at(hyper.lr_cov, state.steps)
            u = _summed_gram([numbers.asarray(a) for a, _ in record.stats])
            gc = _summed_gram([numbers.asarray(g) for _, g in record.stats])
            s_k, s_c = kfac_factor_update(s_k, u, beta1), kfac_factor_update(s_c, gc, beta1)
        preconditioned = kfac_preconditioned_gradient(
            s_k, s_c, numbers.asarray(record.grad), hyper.damping, numbers
        )
        w, m_w = parameter_update(
            state.W,
            state.m_W,
            preconditioned,
            lr=hyper.lr,
            momentum=hyper.momentum,
            weight_decay=hyper.weight_decay,
        )
    return KFACState(steps=state.steps + 1, S_K=s_k, S_C=s_c, W=w, m_W=m_w)


def kfac_trajectory(
    w0: np.ndarray,
    records: Sequence[StepRecord],
    hyper: KFACHyperparameters,
    numbers: Numbers = FLOAT64,
) -> list[KFACState]:
    """The states after each of ``records``, starting from :func:`kfac_init` of ``w0``."""
    return trajectory(kfac_init, kfac_step, w0, records, hyper, numbers)
