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
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch

import singd.optim.updates as updates
from verification.comparison import compare_singd
from verification.scenarios import SCENARIOS, run_and_replay

#: A mutant must exceed its bound at least this many times over somewhere.
WIDE_MARGIN = 1e3

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


def _worst_ratio() -> float:
    """Largest ``error / bound`` of a float64 SINGD run (sequence model) against the oracle."""
    case = SCENARIOS["seq-expand"]
    run, oracle, hyper = run_and_replay(case, {})
    deviations = compare_singd(run, oracle, hyper, torch.float64, case.approx, case.loss_average)
    return max(d.error / d.bound for d in deviations)


def test_unmutated_optimizer_passes() -> None:
    """The reference point: the real optimizer stays within its bounds (ratio <= 1)."""
    assert _worst_ratio() <= 1.0


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_fails_by_wide_margin(monkeypatch: pytest.MonkeyPatch, mutant: str) -> None:
    """A wrong update rule exceeds the oracle bound by at least ``WIDE_MARGIN``."""
    for name, function in MUTANTS[mutant]().items():
        assert _patch_everywhere(monkeypatch, name, function) >= 1, name
    assert _worst_ratio() >= WIDE_MARGIN
