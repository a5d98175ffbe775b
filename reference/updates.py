"""The oracle's SINGD / IKFAC update rules and stepper (SPEC §1.3, §1.4, §1.4a).

One layer, dense matrices throughout.  ``W`` is ``W~`` (``d_o × d_i``, the
bias column last when the layer has one), ``K`` is ``d_i × d_i`` and ``C`` is
``d_o × d_o``; a structured factor is a dense matrix that is zero outside its
structure's pattern, kept there because the update only multiplies it by
projected (``Π̂``) matrices.  Every array is float64 or an object array of
``mpmath.mpf``; the number system is a :class:`~reference.numbers.Numbers`
parameter, and the whole step runs inside its ``context()``.

One step (``steps`` = number of completed steps before it):

* if ``steps % T == 0`` (SPEC §1.3, with the factors from before the step)::

      H_K = Σ Π̂_K((Kᵀ Aᵀ)(Kᵀ Aᵀ)ᵀ)        H_C = Σ Π̂_C((Cᵀ Gᵀ)(Cᵀ Gᵀ)ᵀ)
      m_K ← α1 m_K + 1/(2 d_o) (tr(H_C) H_K + λ tr(CᵀC) Π̂_K(KᵀK) − d_o I)
      m_C ← α1 m_C + 1/(2 d_i) (tr(H_K) H_C + λ tr(KᵀK) Π̂_C(CᵀC) − d_i I)
      K ← K − β1 K m_K                      C ← C − β1 C m_C

  (IKFAC and the normalised step change only the momentum and ``β1``);
* every step (SPEC §1.4, with the factors after the update)::

      ĝ = C Cᵀ ∇W K Kᵀ + γ W      m_W ← α2 m_W + ĝ      W ← W − β2 m_W
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from reference.numbers import FLOAT64, Numbers
from reference.structures import Structure, get_structure

#: A covariance learning rate: a constant or a function of the completed steps.
LrCov = float | Callable[[int], float]

#: A stepper's per-layer state and hyper-parameters (for :func:`trajectory`).
_State = TypeVar("_State")
_Hyper = TypeVar("_Hyper")


# ------------------------------------------------------------ hyper-parameters
def check_nonnegative(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value >= 0``."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_unit_interval(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``0 <= value < 1``."""
    if not 0 <= value < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")


def check_period(value: int) -> None:
    """Raise ``ValueError`` naming ``T`` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"T must be a positive integer, got {value!r}")


def check_lr_cov(value: LrCov) -> None:
    """Raise ``ValueError`` naming ``lr_cov`` for a negative constant (schedules: see lr_cov_at)."""
    if not callable(value):
        check_nonnegative("lr_cov", value)


def lr_cov_at(lr_cov: LrCov, steps: int) -> float:
    """The covariance learning rate ``β1`` of the step after ``steps`` completed ones (SPEC §1.3).

    Raises:
        ValueError: If a schedule returns a negative value.
    """
    beta1 = lr_cov(steps) if callable(lr_cov) else lr_cov
    if not beta1 >= 0:
        raise ValueError(f"lr_cov schedule returned {beta1!r} at steps={steps}; it must be >= 0")
    return beta1


@dataclass(frozen=True)
class SINGDHyperparameters:
    """SINGD's hyper-parameters (SPEC §1.3, §1.4); names and defaults of the torch ``SINGD``.

    Attributes:
        lr: Learning rate ``β2``.
        momentum: Parameter momentum ``α2`` in ``[0, 1)``.
        damping: Damping ``λ >= 0``.
        alpha1: Factor momentum ``α1`` in ``[0, 1)``; must be 0 with ``kfac_like``.
        weight_decay: ``γ >= 0``, added after preconditioning.
        T: Factors are updated on steps with ``steps % T == 0``.
        lr_cov: Covariance learning rate ``β1``, or a function of the completed steps.
        kfac_like: IKFAC's momentum (trace weights dropped).
        normalize_lr_cov: Bracket scaled by ``½(1 − α1)`` and ``β1 / max(1, ‖m‖_∞)``.
        structures: Structure names of ``(K, C)``.
    """

    lr: float = 0.001
    momentum: float = 0.9
    damping: float = 0.001
    alpha1: float = 0.5
    weight_decay: float = 0.0
    T: int = 10
    lr_cov: LrCov = 1e-2
    kfac_like: bool = False
    normalize_lr_cov: bool = False
    structures: tuple[str, str] = ("dense", "dense")

    def __post_init__(self) -> None:
        """Validate every field.

        Raises:
            ValueError: Naming the first invalid argument.
        """
        check_nonnegative("lr", self.lr)
        check_unit_interval("momentum", self.momentum)
        check_nonnegative("damping", self.damping)
        check_unit_interval("alpha1", self.alpha1)
        check_nonnegative("weight_decay", self.weight_decay)
        check_period(self.T)
        check_lr_cov(self.lr_cov)
        if self.kfac_like and self.alpha1 != 0:
            raise ValueError(f"kfac_like=True requires alpha1 = 0 (SPEC §1.3), got {self.alpha1!r}")
        if not isinstance(self.structures, tuple) or len(self.structures) != 2:
            raise ValueError(f"structures must be a pair (K, C) of names, got {self.structures!r}")
        for name in self.structures:
            get_structure(name)  # raises ValueError for an unknown name


# ------------------------------------------------------------------- records
@dataclass(frozen=True, eq=False)
class StepRecord:
    """What one optimizer step sees for one layer.

    Attributes:
        grad: ``∇W~`` (``d_o × d_i``), the accumulated gradient, bias column last.
        stats: One already scaled pair ``(A, G)`` (``n × d_i``, ``n' × d_o``) per
            backward pass since the last step (SPEC §1.1); several pairs are
            gradient accumulation and their ``H`` are summed.  Used only on
            steps with ``steps % T == 0``.
    """

    grad: np.ndarray
    stats: tuple[tuple[np.ndarray, np.ndarray], ...] = ()


def check_record(record: StepRecord, shape: tuple[int, int], *, needs_stats: bool) -> None:
    """Validate a record against ``W~``'s shape ``(d_o, d_i)``.

    Raises:
        ValueError: On a shape mismatch between ``grad``, ``A``, ``G`` and ``W~``,
            or on empty ``stats`` when the step updates the factors.
    """
    d_o, d_i = shape
    grad_shape = np.shape(record.grad)
    if grad_shape != (d_o, d_i):
        raise ValueError(f"grad has shape {grad_shape} but W~ has shape (d_o, d_i) = {shape}")
    for index, (a, g) in enumerate(record.stats):
        a_shape, g_shape = np.shape(a), np.shape(g)
        if len(a_shape) != 2 or a_shape[1] != d_i:
            raise ValueError(
                f"stats[{index}]: A has shape {a_shape}; expected (n, d_i) with d_i = {d_i} "
                "(input dim of W~, including the bias column)"
            )
        if len(g_shape) != 2 or g_shape[1] != d_o:
            raise ValueError(
                f"stats[{index}]: G has shape {g_shape}; expected (n, d_o) with d_o = {d_o}"
            )
    if needs_stats and not record.stats:
        raise ValueError("stats is empty on a step that updates the factors (steps % T == 0)")


def check_weight(w0: np.ndarray) -> None:
    """Raise ``ValueError`` naming ``W0`` unless it is a ``d_o × d_i`` matrix."""
    if np.ndim(w0) != 2:
        raise ValueError(f"W0 must be a d_o × d_i matrix, got shape {np.shape(w0)}")


# ------------------------------------------------------- SINGD's pure pieces
def project_inner(structure: Structure, k: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``H_K = Π̂((Kᵀ Aᵀ)(Kᵀ Aᵀ)ᵀ) = Π̂(Kᵀ AᵀA K)`` (SPEC §1.1).

    Args:
        structure: The structure of ``K``.
        k: The factor ``K`` (``d × d``).
        a: The statistic ``A`` (``n × d``); ``G`` with ``C`` alike.

    Returns:
        ``H_K`` (``d × d``), a member of ``structure``.
    """
    kt_at = k.T @ a.T
    return structure.project(kt_at @ kt_at.T)


def project_gram(structure: Structure, k: np.ndarray) -> np.ndarray:
    """``Π̂(KᵀK)`` (SPEC §1.3), for a factor ``K`` (``d × d``)."""
    return structure.project(k.T @ k)


def singd_factor_momentum(
    momentum: np.ndarray,
    h: np.ndarray,
    projected_gram: np.ndarray,
    h_other: np.ndarray,
    gram_other: np.ndarray,
    hyper: SINGDHyperparameters,
) -> np.ndarray:
    """The new factor momentum ``m_K`` (SPEC §1.3; ``m_C`` with the roles swapped).

    Default: ``α1 m_K + 1/(2 d_o) (tr(H_C) H_K + λ tr(CᵀC) Π̂(KᵀK) − d_o I)``.
    IKFAC (``kfac_like``, ``α1 = 0``): ``½ (H_K + λ Π̂(KᵀK) − I)``.
    ``normalize_lr_cov``: the bracket's ``½`` becomes ``½ (1 − α1)``.

    Args:
        momentum: The old ``m_K`` (``d_i × d_i``).
        h: ``H_K`` (``d_i × d_i``).
        projected_gram: ``Π̂_K(KᵀK)`` (``d_i × d_i``).
        h_other: ``H_C`` (``d_o × d_o``); only its trace enters.
        gram_other: ``CᵀC`` or ``Π̂_C(CᵀC)`` (``d_o × d_o``); only its trace enters.
        hyper: Supplies ``λ``, ``α1``, ``kfac_like``, ``normalize_lr_cov``.

    Returns:
        The new ``m_K`` (``d_i × d_i``).
    """
    d, d_other = h.shape[0], h_other.shape[0]
    identity = np.eye(d, dtype=h.dtype)
    if hyper.kfac_like:
        bracket = h + hyper.damping * projected_gram - identity
    else:
        c_squared = hyper.damping * np.trace(gram_other)
        bracket = (
            np.trace(h_other) * h + c_squared * projected_gram - d_other * identity
        ) / d_other
    half = (1 - hyper.alpha1) / 2 if hyper.normalize_lr_cov else 0.5
    return hyper.alpha1 * momentum + half * bracket


def factor_step_size(beta1: float, new_momentum: np.ndarray, *, normalize: bool) -> object:
    """``β1``, or ``β1 / max(1, ‖m_new‖_∞)`` with ``normalize_lr_cov`` (SPEC §1.3)."""
    if not normalize:
        return beta1
    return beta1 / max(1, np.abs(new_momentum).max())


def factor_update(k: np.ndarray, new_momentum: np.ndarray, step_size: object) -> np.ndarray:
    """``K ← K − β1 K m_K`` (SPEC §1.4a; first order, no matrix exponential)."""
    return k - step_size * (k @ new_momentum)


def preconditioned_gradient(k: np.ndarray, c: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """``C Cᵀ ∇W K Kᵀ`` (SPEC §1.4), for ``∇W`` of shape ``d_o × d_i``."""
    return c @ ((c.T @ grad) @ k) @ k.T


def parameter_update(
    w: np.ndarray,
    m_w: np.ndarray,
    preconditioned: np.ndarray,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §1.4: ``ĝ = Δ + γ W``, ``m_W ← α2 m_W + ĝ``, ``W ← W − β2 m_W``.

    Args:
        w: ``W~`` (``d_o × d_i``).
        m_w: Its momentum (``d_o × d_i``).
        preconditioned: The preconditioned gradient ``Δ`` (``d_o × d_i``).
        lr: ``β2``.
        momentum: ``α2``.
        weight_decay: ``γ``.

    Returns:
        The new ``(W~, m_W)``.
    """
    g_hat = preconditioned + weight_decay * w
    m_w = momentum * m_w + g_hat
    return w - lr * m_w, m_w


# ------------------------------------------------------------------- stepper
@dataclass(frozen=True, eq=False)
class SINGDState:
    """SINGD's state for one layer (dense arrays of one number system).

    Attributes:
        steps: Completed steps.
        K: ``d_i × d_i``.
        C: ``d_o × d_o``.
        m_K: ``d_i × d_i``.
        m_C: ``d_o × d_o``.
        W: ``W~`` (``d_o × d_i``).
        m_W: ``d_o × d_i``.
    """

    steps: int
    K: np.ndarray
    C: np.ndarray
    m_K: np.ndarray
    m_C: np.ndarray
    W: np.ndarray
    m_W: np.ndarray


def singd_init(
    w0: np.ndarray, hyper: SINGDHyperparameters, numbers: Numbers = FLOAT64
) -> SINGDState:
    """Initial state (SPEC §1.3): ``K = I``, ``C = I``, zero momenta, ``W~ = W0``.

    Args:
        w0: ``W~`` at the start (``d_o × d_i``).
        hyper: The hyper-parameters (validated on construction).
        numbers: The number system.

    Raises:
        ValueError: If ``w0`` is not a matrix.
    """
    del hyper  # the initial state does not depend on it; kept for a uniform signature
    check_weight(w0)
    d_o, d_i = np.shape(w0)
    return SINGDState(
        steps=0,
        K=numbers.eye(d_i),
        C=numbers.eye(d_o),
        m_K=numbers.zeros((d_i, d_i)),
        m_C=numbers.zeros((d_o, d_o)),
        W=numbers.asarray(w0),
        m_W=numbers.zeros((d_o, d_i)),
    )


def _summed_h(
    structure: Structure, factor: np.ndarray, statistics: Sequence[np.ndarray]
) -> np.ndarray:
    """``Σ_passes Π̂(Kᵀ AᵀA K)`` over the backward passes of one step (SPEC §1.1)."""
    terms = [project_inner(structure, factor, s) for s in statistics]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def singd_step(
    state: SINGDState,
    record: StepRecord,
    hyper: SINGDHyperparameters,
    numbers: Numbers = FLOAT64,
) -> SINGDState:
    """One SINGD step for one layer (SPEC §1.3, §1.4, §1.4a).

    Args:
        state: The state before the step (arrays of ``numbers``).
        record: The gradient and, on update steps, the statistics.
        hyper: The hyper-parameters.
        numbers: The number system of ``state``.

    Returns:
        The state after the step.

    Raises:
        ValueError: On shape mismatches or empty ``stats`` on an update step.
    """
    update_factors = state.steps % hyper.T == 0
    check_record(record, state.W.shape, needs_stats=update_factors)
    k, c, m_k, m_c = state.K, state.C, state.m_K, state.m_C
    with numbers.context():
        if update_factors:
            k_structure, c_structure = (get_structure(name) for name in hyper.structures)
            h_k = _summed_h(k_structure, k, [numbers.asarray(a) for a, _ in record.stats])
            h_c = _summed_h(c_structure, c, [numbers.asarray(g) for _, g in record.stats])
            gram_k, gram_c = project_gram(k_structure, k), project_gram(c_structure, c)
            m_k = singd_factor_momentum(m_k, h_k, gram_k, h_c, gram_c, hyper)
            m_c = singd_factor_momentum(m_c, h_c, gram_c, h_k, gram_k, hyper)
            beta1 = lr_cov_at(hyper.lr_cov, state.steps)
            normalize = hyper.normalize_lr_cov
            k = factor_update(k, m_k, factor_step_size(beta1, m_k, normalize=normalize))
            c = factor_update(c, m_c, factor_step_size(beta1, m_c, normalize=normalize))
        w, m_w = parameter_update(
            state.W,
            state.m_W,
            preconditioned_gradient(k, c, numbers.asarray(record.grad)),
            lr=hyper.lr,
            momentum=hyper.momentum,
            weight_decay=hyper.weight_decay,
        )
    return SINGDState(steps=state.steps + 1, K=k, C=c, m_K=m_k, m_C=m_c, W=w, m_W=m_w)


def trajectory(
    init: Callable[[np.ndarray, _Hyper, Numbers], _State],
    step: Callable[[_State, StepRecord, _Hyper, Numbers], _State],
    w0: np.ndarray,
    records: Sequence[StepRecord],
    hyper: _Hyper,
    numbers: Numbers = FLOAT64,
) -> list[_State]:
    """The states after each of ``records``, starting from ``init(w0)``, one ``step`` each.

    Shared by the SINGD (SPEC §1.3/§1.4) and KFAC (SPEC §1.2/§1.4) steppers.
    """
    state = init(w0, hyper, numbers)
    states = []
    for record in records:
        state = step(state, record, hyper, numbers)
        states.append(state)
    return states


def singd_trajectory(
    w0: np.ndarray,
    records: Sequence[StepRecord],
    hyper: SINGDHyperparameters,
    numbers: Numbers = FLOAT64,
) -> list[SINGDState]:
    """The states after each of ``records``, starting from :func:`singd_init` of ``w0``."""
    return trajectory(singd_init, singd_step, w0, records, hyper, numbers)
