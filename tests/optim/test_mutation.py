"""Mutation check: the oracle comparison must fail, by a wide margin, on a wrong optimizer.

Each mutant replaces one of the optimizer's pure update functions
(``singd.optim.updates``) with a deliberately wrong variant, in every
``singd.optim`` module that binds it, and reruns a float64 trajectory
through :mod:`verification`.  A comparison that passes a mutant proves nothing; the
mutants here are the classic slips of SPEC §1.3/§1.4a:

* ``K`` where ``Kᵀ`` belongs (only visible once ``K`` is not symmetric, i.e.
  after the second factor update);
* the ``½`` of the factor-momentum bracket dropped;
* the gradient preconditioned with the factors from *before* the update;
* ``d_i`` and ``d_o`` swapped in the trace weights.

Both comparisons must catch each of them: the trajectory comparison and the
one-step comparison (oracle restarted from the implementation's own state
every step).  A last, subtle mutant, an error of ``LATE_ERROR`` eps in one
entry of ``K`` added on every factor update from step ``LATE_STEP`` on, must
fail both as well.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch

import singd.optim.updates as updates
from verification.comparison import compare_singd, compare_singd_local
from verification.grid import ratio
from verification.scenarios import SCENARIOS, run_and_replay
from verification.tolerances import EPS

#: A mutant must exceed its bound at least this many times over somewhere.
WIDE_MARGIN = 1e3

#: The subtle mutant: relative error (in float64 eps) of ``K[0, 0]`` from this step on.
LATE_ERROR, LATE_STEP = 100, 10

#: Layers of the mutation scenario (``singd_update_factors`` runs once per layer and step).
LAYERS = 2

#: The one-step comparison must exceed its bound at least this many times over on the
#: subtle mutant (its one-step bound is a few tens of eps, the error ``LATE_ERROR`` eps).
LATE_MARGIN = 10

_original_precondition = updates.singd_precondition
_original_momenta = updates.singd_factor_momenta
_original_update_factors = updates.singd_update_factors


def _precondition_k_for_kt(K, C, grad):
    """``C Cᵀ ∇W Kᵀ Kᵀ``: ``K`` where ``Kᵀ`` belongs."""
    left = C.matmul(C.t_matmul(grad.to(C.dtype)))
    right = K.matmul(K.matmul(left.T.to(K.dtype)))
    return right.T.to(grad.dtype)


def _momenta_without_half(state, H_K, H_C, **kwargs):
    """``m ← α1 m + bracket`` instead of ``α1 m + ½ bracket``."""
    new_m_K, new_m_C = _original_momenta(state, H_K, H_C, **kwargs)
    alpha1 = kwargs["alpha1"]
    return (
        new_m_K.mul_(2.0).add_(state.m_K, alpha=-alpha1),
        new_m_C.mul_(2.0).add_(state.m_C, alpha=-alpha1),
    )


def _momenta_dims_swapped(state, H_K, H_C, **kwargs):
    """Trace weights ``1/(2 d_i)`` for ``m_K`` and ``1/(2 d_o)`` for ``m_C`` (swapped)."""
    new_m_K, new_m_C = _original_momenta(state, H_K, H_C, **kwargs)
    d_i, d_o = state.K.dim, state.C.dim
    alpha1 = kwargs["alpha1"]
    new_m_K.add_(state.m_K, alpha=-alpha1).mul_(d_o / d_i).add_(state.m_K, alpha=alpha1)
    new_m_C.add_(state.m_C, alpha=-alpha1).mul_(d_i / d_o).add_(state.m_C, alpha=alpha1)
    return new_m_K, new_m_C


def _stale_factor_mutants() -> dict[str, Callable]:
    """Update + precondition pair that preconditions with the pre-update ``K``, ``C``."""
    stale: dict[int, tuple] = {}

    def update_and_remember(state, H_K, H_C, **kwargs):
        new_state = _original_update_factors(state, H_K, H_C, **kwargs)
        stale[id(new_state.K)] = (state.K, state.C)
        return new_state

    def precondition_stale(K, C, grad):
        old_K, old_C = stale.get(id(K), (K, C))
        return _original_precondition(old_K, old_C, grad)

    return {
        "singd_update_factors": update_and_remember,
        "singd_precondition": precondition_stale,
    }


def _late_error_mutant() -> dict[str, Callable]:
    """``K[0, 0] ← (1 + LATE_ERROR · eps) K[0, 0]`` on every factor update from ``LATE_STEP`` on."""
    calls = 0

    def update_and_perturb(state, H_K, H_C, **kwargs):
        nonlocal calls
        new_state = _original_update_factors(state, H_K, H_C, **kwargs)
        calls += 1
        if calls <= LAYERS * LATE_STEP:
            return new_state
        dense = new_state.K.to_dense()
        dense[0, 0] *= 1 + LATE_ERROR * EPS[torch.float64]
        return new_state._replace(K=type(new_state.K).from_dense(dense))

    return {"singd_update_factors": update_and_perturb}


MUTANTS: dict[str, Callable[[], dict[str, Callable]]] = {
    "K-for-Kt": lambda: {"singd_precondition": _precondition_k_for_kt},
    "half-dropped": lambda: {"singd_factor_momenta": _momenta_without_half},
    "pre-update-factors": _stale_factor_mutants,
    "dims-swapped": lambda: {"singd_factor_momenta": _momenta_dims_swapped},
}


def _patch_everywhere(monkeypatch: pytest.MonkeyPatch, name: str, mutant: Callable) -> int:
    """Replace ``updates.<name>`` in every loaded ``singd.optim`` module binding it."""
    original = getattr(updates, name)
    patched = 0
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("singd.optim") and getattr(module, name, None) is original:
            monkeypatch.setattr(module, name, mutant)
            patched += 1
    return patched


def _patch_mutant(monkeypatch: pytest.MonkeyPatch, mutant: Callable[[], dict]) -> None:
    """Install every replacement of ``mutant`` (each must patch at least one module)."""
    for name, function in mutant().items():
        assert _patch_everywhere(monkeypatch, name, function) >= 1, name


def _worst_ratios() -> tuple[float, float]:
    """Largest ``error / bound`` of a float64 SINGD run (sequence model): trajectory, one-step."""
    case = SCENARIOS["seq-expand"]
    run, oracle, hyper = run_and_replay(case, {})
    settings = (torch.float64, case.approx, case.loss_average)
    trajectory = compare_singd(run, oracle, hyper, *settings)
    local = compare_singd_local(run, hyper, *settings)
    return max(map(ratio, trajectory)), max(map(ratio, local))


def test_unmutated_optimizer_passes() -> None:
    """The reference point: the real optimizer stays within both bounds (ratio <= 1)."""
    trajectory, local = _worst_ratios()
    assert trajectory <= 1.0 and local <= 1.0


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_fails_by_wide_margin(monkeypatch: pytest.MonkeyPatch, mutant: str) -> None:
    """A wrong update rule exceeds both oracle bounds by at least ``WIDE_MARGIN``."""
    _patch_mutant(monkeypatch, MUTANTS[mutant])
    trajectory, local = _worst_ratios()
    assert trajectory >= WIDE_MARGIN and local >= WIDE_MARGIN


def test_late_error_fails_both_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A late error of ``LATE_ERROR`` eps in ``K[0, 0]`` fails both comparisons.

    With the old scalar bound, which compounded to 1e4–1e5 eps by step 20, it
    passed the trajectory check (0.68 of the bound); the entrywise bound of
    :mod:`verification.bounds` no longer compounds like that and catches it
    along the trajectory as well as per step, each at least ``LATE_MARGIN``
    times over.
    """
    _patch_mutant(monkeypatch, _late_error_mutant)
    trajectory, local = _worst_ratios()
    assert trajectory >= LATE_MARGIN
    assert local >= LATE_MARGIN
