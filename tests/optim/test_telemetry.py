"""Opt-in telemetry of SINGD's factors (``SINGD(..., telemetry=True)``, ``opt.telemetry()``).

Each check states its tolerance rule next to the assertion and is shown to
reject a wrong variant of the quantity it checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from singd import SINGD
from singd.optim import singd as singd_module
from singd.optim import telemetry
from singd.structures import get_structure
from tests.optim.test_factor_guard import CASE2
from verification.experiments.digits import BATCH_SIZE, load_data, make_model
from verification.fixed_point import ikfac_hyper, stationary_stream
from verification.tolerances import EPS

STEPS = 12


def _case2_run(dtype: torch.dtype, steps: int) -> tuple[SINGD, dict, dict]:
    """Case 2 (bf16 swamping, diagonal, no guard): ``K`` before the last step, and after it."""
    data = load_data(dtype)
    model = make_model(dtype)
    opt = SINGD(
        model, structures=("diagonal", "diagonal"), factor_guard=None, telemetry=True, **CASE2
    )
    generator = torch.Generator().manual_seed(0)
    before = {}
    for step in range(steps):
        if step == steps - 1:
            before = {n: {f: opt.layer_state(n)[f] for f in ("K", "C")} for n in opt.layer_names()}
        batch = torch.randint(len(data.y_train), (BATCH_SIZE,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
        opt.step()
    after = {n: dict(opt.layer_state(n)) for n in opt.layer_names()}
    return opt, before, after


def _predicted_share(k: torch.Tensor, m: torch.Tensor, beta1: float, u: float) -> tuple:
    """Bounds on the share of diagonal entries ``fl(k − β1·fl(k m))`` leaves at ``k``.

    Round to nearest keeps ``k`` iff the increment is below half an ulp of ``k``;
    the computed ``β1·fl(k m)`` is within a factor ``1 ± 2u`` of the exact one (the
    product's rounding and ``β1``'s conversion), so entries with
    ``|β1 k m| < ½ulp(k)(1 − 2u)`` surely stay and ``> ½ulp(k)(1 + 2u)`` surely move.
    """
    increment = (beta1 * k.double() * m.double()).abs()
    half_ulp = (torch.nextafter(k, torch.full_like(k, math.inf)) - k).double().abs() / 2
    surely = (increment < half_ulp * (1 - 2 * u)).double().mean()
    maybe = (increment <= half_ulp * (1 + 2 * u)).double().mean()
    return float(surely), float(maybe)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rounded_to_nothing_is_the_swamped_share(dtype: torch.dtype) -> None:
    """Case 2: in bf16 every entry of the diagonal factors is swamped; in float32 none is."""
    opt, before, after = _case2_run(dtype, STEPS)
    report = opt.telemetry()
    u = EPS[dtype] / 2
    for name in opt.layer_names():
        for factor in ("K", "C"):
            k = before[name][factor].storage["diag"]
            m = after[name][f"m_{factor}"].storage["diag"]
            surely, maybe = _predicted_share(k, m, CASE2["lr_cov"], u)
            measured = getattr(report[name], f"rounded_to_nothing_{factor}")
            # rule: the measured share lies between the surely- and maybe-swamped shares
            assert surely <= measured <= maybe, (name, factor, surely, measured, maybe)
            # the wrong variant (the share of entries that moved) falls outside
            assert not surely <= 1.0 - measured <= maybe
    if dtype == torch.bfloat16:
        assert all(r.rounded_to_nothing_K == 1.0 for r in report.values())  # the case 2


def test_rounded_to_nothing_describes_taken_steps_only() -> None:
    """Off: ``None`` and never computed; a skipped step does not replace the last taken one."""
    model = nn.Linear(4, 3)
    opt = SINGD(model, T=1)
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    assert opt.telemetry()[""].rounded_to_nothing_K is None
    opt = SINGD(model, T=1, telemetry=True)
    assert opt.telemetry()[""].rounded_to_nothing_K is None  # no factor step yet
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    taken = opt.telemetry()[""].rounded_to_nothing_K
    assert taken is not None and 0.0 <= taken <= 1.0
    opt.zero_grad()
    (model(torch.full((8, 4), 1e30)).square().mean() * 1e30).backward()
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()
    assert opt.telemetry()[""].rounded_to_nothing_K == taken


def test_telemetry_off_does_no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Zero cost when off: the per-step record is never formed."""
    calls = []
    monkeypatch.setattr(telemetry, "rounded_to_nothing", lambda *a: calls.append(a))
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = SINGD(model, T=1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    assert calls == []


def _factor(singular_values: np.ndarray, seed: int) -> np.ndarray:
    """``K = Q diag(s) Rᵀ`` with seeded orthogonal ``Q``, ``R`` (not symmetric)."""
    rng = np.random.default_rng(seed)
    dim = len(singular_values)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    r, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q @ np.diag(singular_values) @ r.T


def _power_bound(k: np.ndarray, inverse: bool, iterations: int) -> tuple[float, float]:
    """The exact extreme eigenvalue and the power method's error bound for it.

    Golub & Van Loan Thm. 8.2.1 from the implementation's start ``v_0``:
    ``(λ_1 − λ_d) tan²θ_0 (λ_2/λ_1)^{2k}``, plus the rounding of the float64
    products (or LU solves): ``4 d u κ(K)² λ_1`` (``γ_{2d}`` of two products,
    amplified by ``κ(KKᵀ)`` for the solves: backward stability).
    """
    gram = k @ k.T
    if inverse:
        gram = np.linalg.inv(gram)
    values, vectors = np.linalg.eigh(gram)
    dim = len(values)
    start = 1.0 + np.arange(dim) / dim
    cos = abs(vectors[:, -1] @ start) / np.linalg.norm(start)
    tan_sq = (1 - cos**2) / cos**2
    convergence = (values[-1] - values[0]) * tan_sq * (values[-2] / values[-1]) ** (2 * iterations)
    cond = values[-1] / values[0]
    rounding = 4 * dim * EPS[torch.float64] / 2 * (cond if inverse else 1.0) * values[-1]
    return float(values[-1]), float(convergence + rounding)


def test_condition_estimate_of_kkt_within_the_power_method_bound() -> None:
    """``λ_max``, ``1/λ_min`` of ``KKᵀ`` within the power method's bound; one step misses it."""
    k = _factor(np.logspace(0, -3, 8), seed=0)
    member = get_structure("dense").from_dense(torch.from_numpy(k))
    estimate = telemetry.gram_extremes(member)
    for inverse, value in ((False, estimate.largest), (True, 1.0 / estimate.smallest)):
        exact, bound = _power_bound(k, inverse, telemetry.POWER_ITERATIONS)
        assert abs(value - exact) <= bound  # rule: _power_bound's docstring
        one = telemetry.gram_extremes(member, iterations=1)
        crude = one.largest if not inverse else 1.0 / one.smallest
        assert abs(crude - exact) > _power_bound(k, inverse, telemetry.POWER_ITERATIONS)[1]
    exact_cond = np.linalg.cond(k) ** 2
    # the wrong variant cond(K) = √cond(KKᵀ) is far outside
    assert abs(math.sqrt(estimate.condition) - exact_cond) > 0.5 * exact_cond


def test_condition_of_singular_factor_is_infinite() -> None:
    """A singular ``K`` (one zero diagonal entry) reports ``λ_min = 0``, condition ``inf``."""
    member = get_structure("diagonal").from_dense(torch.diag(torch.tensor([1.0, 0.0, 2.0])))
    assert telemetry.gram_extremes(member).condition == math.inf


def test_ikfac_residual_at_the_float64_fixed_point() -> None:
    """Float64 IKFAC on stationary statistics: ``‖Kᵀ(U + λI)K − I‖₂`` at rounding level.

    Rule: growth to ``k* = μ_min^{-1/2} ≈ 10`` takes ``log(k*)/log(1 + β1/2) ≤ 48``
    steps, then ``(1 − β1)^{352} < 1e-16``; what remains is the rounding of
    ``KᵀMK`` (``γ_{2d}·‖|K|ᵀ|M||K|‖ ≤ 2du·dκ``) and of the iteration's own fixed
    point (at most as much again): ``4 d² u κ``.
    """
    damping, stream = 1e-3, stationary_stream(8, 1e2, seed=0)
    hyper = ikfac_hyper(0.1, damping)
    model = nn.Linear(stream.dim, 1, bias=False).double()
    opt = SINGD(
        model,
        lr=0.0,
        momentum=0.0,
        damping=damping,
        alpha1=0.0,
        T=1,
        lr_cov=hyper.lr_cov,
        kfac_like=True,
        loss_average=None,
        telemetry=True,
    )
    inputs = torch.from_numpy(stream.inputs)
    weights = torch.full((stream.rows, 1), stream.rows**-0.5, dtype=torch.float64)
    for _ in range(400):
        opt.zero_grad()
        (model(inputs) * weights).sum().backward()
        opt.step()
    u_matrix = inputs.T @ inputs / stream.rows
    report = opt.telemetry({"": (u_matrix, None)})[""]
    mu = np.linalg.eigvalsh(u_matrix.numpy() + damping * np.eye(stream.dim))
    bound = 4 * stream.dim**2 * EPS[torch.float64] / 2 * mu[-1] / mu[0]
    assert report.ikfac_residual_K <= bound
    assert report.ikfac_residual_C is None
    # the wrong variant without λ (‖KᵀUK − I‖ = ‖λKᵀK‖ ≈ λ/μ_min) is far above the bound
    k = opt.layer_state("")["K"]
    assert telemetry.ikfac_residual(k, u_matrix, 0.0) > 1e6 * bound


def test_bad_input_gives_clear_errors() -> None:
    """Non-bool ``telemetry``, an unknown layer, a statistic of the wrong shape."""
    model = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="telemetry must be True or False"):
        SINGD(model, telemetry=1)
    opt = SINGD(model, telemetry=True)
    with pytest.raises(ValueError, match="no layer named"):
        opt.telemetry({"fc": (torch.eye(5), None)})
    with pytest.raises(ValueError, match="must be 5 × 5"):
        opt.telemetry({"": (torch.eye(4), None)})


def test_checkpoint_load_drops_old_telemetry() -> None:
    """After ``load_state_dict`` the records described other factors: gone."""
    model = nn.Linear(4, 3)
    opt = SINGD(model, T=1, telemetry=True)
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.telemetry()[""].rounded_to_nothing_K is None


def test_layer_telemetry_is_exported() -> None:
    """The result type is importable where the optimizer lives."""
    assert singd_module.LayerTelemetry.__dataclass_fields__.keys() >= {
        "rounded_to_nothing_K",
        "gram_K",
        "ikfac_residual_K",
    }
