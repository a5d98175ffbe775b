"""LayerNorm/RMSNorm scale and shift: the elementwise preconditioner (SPEC-layers) vs the oracle.

Tolerance rules (derivation):

* ``h`` (:func:`singd.optim.elementwise.elementwise_statistics`) is formed in
  ``w`` = float32 (float64 for float64 inputs) from ``x`` and ``g`` rounded to
  the model dtype (the oracle gets the same values, exactly in float64).
  ``x̂`` in ``w``: a mean, a variance and a reciprocal square root over ``d``
  entries.  RMSNorm divides by the root mean square: relative error ≤
  ``(2d + 4)·eps_w``.  LayerNorm subtracts the mean first: the mean's error
  ``γ_d·μ_|x|`` (``μ_|x|`` the mean of ``|x|`` over the features) is
  absolute, not relative to ``|x − μ|`` (an entry near the mean cancels), and
  through the variance it moves ``σ`` by ``γ_d·μ_|x|`` too (Cauchy–Schwarz:
  ``Σ|x − μ| ≤ dσ``).  So the error of ``x̂`` is at most ``(2d + 4)·eps_w·u``
  with ``u = |x̂| + (1 + |x̂|)·μ_|x|/σ`` (``u = |x̂|`` for RMSNorm); ``r = g x̂``
  one more rounding; ``r²`` doubles the relative error; the sum of ``n`` rows
  adds ``n·eps_w`` (Higham Thm. 3.5) relative to the sum of absolute values,
  and the factor ``N`` one rounding.  Bound: ``(4d + 12 + n) · eps_w ·
  h(u, |g|)``, the oracle's ``h`` of the magnitudes (for reduce, the
  positions' sum ``Σ_s r`` may cancel: the bound is relative to
  ``(Σ_s |r|)²``, not to ``h``).
* One factor step in ``w`` from the same ``k``, ``m``, ``h``: ``k² h``,
  ``λk²``, the bracket and ``k(1 − β1 m)``: at most 8 roundings of ``w`` relative
  to ``|k|(1 + β1 (|m| + k²h + λk² + 1))``, then the cast of ``k`` to the
  parameter's dtype: ``eps_dtype / 2 · |k|``.
* A trajectory of ``s`` steps in every dtype (``β1 = 0.05``: each step
  maps ``k ↦ k(1 − β1 m)`` with derivative ``1 − β1(m + k²(h + λ)) ≤ 1``
  here, contractive to first order): the one-step bounds of ``k`` add; the
  error of ``ĝ = k²∇θ`` is ``2|k|δk|∇θ|`` plus two roundings, and it
  propagates through ``m_μ ← α2 m_μ + ĝ`` and ``θ ← θ − β2 m_μ`` (one rounding
  each), bounds carried step by step in the test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import singd.optim.plan as plan
from reference.elementwise import elementwise_h, elementwise_step, layer_norm_hat, rms_norm_hat
from singd import KFAC, SINGD
from singd.optim.elementwise import (
    K_KEY,
    M_KEY,
    elementwise_factor_step,
    elementwise_statistics,
    normalised_input,
)
from tests.tolerances import EPS

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _norm(kind: str, features: tuple[int, ...], bias: bool, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if kind == "layernorm":
        return nn.LayerNorm(features, bias=bias, dtype=dtype)
    return nn.RMSNorm(features, eps=1e-6, dtype=dtype)


def _oracle_hat(module: nn.Module, x: np.ndarray) -> np.ndarray:
    dims = len(module.normalized_shape)
    if isinstance(module, nn.LayerNorm):
        return layer_norm_hat(x, dims, module.eps)
    return rms_norm_hat(x, dims, module.eps)


def _hat_magnitude(module: nn.Module, x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    """``u`` of the module docstring: what the error of ``x̂`` is relative to."""
    if not isinstance(module, nn.LayerNorm):
        return np.abs(x_hat)
    axes = tuple(range(-len(module.normalized_shape), 0))
    sigma = np.sqrt(x.var(axis=axes, keepdims=True) + module.eps)
    return np.abs(x_hat) + (1 + np.abs(x_hat)) * np.abs(x).mean(axis=axes, keepdims=True) / sigma


CASES = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["layernorm", "rmsnorm"]),
        "features": st.sampled_from([(3,), (4,), (2, 3)]),
        "leading": st.sampled_from([(2,), (3, 2), (1, 4)]),
        "bias": st.booleans(),
        "approx": st.sampled_from(["expand", "reduce"]),
        "loss_average": st.sampled_from(["batch", "batch+sequence", None]),
        "seed": st.integers(0, 2**16),
    }
)


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=CASES)
@example(  # an entry near its row's mean: x̂'s error is relative to μ_|x|/σ, not to |x̂|
    case={
        "kind": "layernorm",
        "features": (3,),
        "leading": (2,),
        "bias": False,
        "approx": "expand",
        "loss_average": "batch",
        "seed": 68,
    }
)
def test_h_matches_oracle(dtype, case):
    """LayerNorm (bias on/off) and RMSNorm, expand/reduce, every loss average, every dtype."""
    module = _norm(case["kind"], case["features"], case["bias"], dtype)
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (*case["leading"], *case["features"])
    x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    has_bias = getattr(module, "bias", None) is not None
    settings = {"approx": case["approx"], "loss_average": case["loss_average"]}
    hs = elementwise_statistics(
        normalised_input(module, x),
        g,
        feature_dims=len(case["features"]),
        has_bias=has_bias,
        **settings,
    )
    x_hat = _oracle_hat(module, x.double().numpy())
    expected = elementwise_h(
        x_hat, g.double().numpy(), feature_dims=len(case["features"]), bias=has_bias, **settings
    )
    assert len(hs) == len(expected) == 1 + has_bias
    magnitudes = elementwise_h(
        _hat_magnitude(module, x.double().numpy(), x_hat),
        np.abs(g.double().numpy()),
        feature_dims=len(case["features"]),
        bias=has_bias,
        **settings,
    )
    d, n = math.prod(case["features"]), math.prod(case["leading"])
    for h, h_ref, magnitude in zip(hs, expected, magnitudes, strict=True):
        assert h.dtype == _wide(dtype)
        bound = (4 * d + 12 + n) * EPS[_wide(dtype)] * magnitude  # rule: module docstring
        assert (np.abs(h.double().numpy() - h_ref) <= bound).all()


def test_h_check_catches_a_wrong_statistic():
    """``r = g`` for γ (x̂ forgotten) fails the comparison by far."""
    module = _norm("layernorm", (4,), True, torch.float32)
    x, g = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    wrong = elementwise_statistics(
        torch.ones_like(x), g, feature_dims=1, has_bias=False, approx="expand", loss_average=None
    )[0]
    x_hat = _oracle_hat(module, x.double().numpy())
    h_ref = elementwise_h(x_hat, g.double().numpy(), feature_dims=1, bias=False, loss_average=None)
    magnitude = elementwise_h(
        _hat_magnitude(module, x.double().numpy(), x_hat),
        np.abs(g.double().numpy()),
        feature_dims=1,
        bias=False,
        loss_average=None,
    )
    bound = (4 * 4 + 12 + 6) * EPS[torch.float32] * magnitude[0]  # the check's rule
    assert not (np.abs(wrong.double().numpy() - h_ref[0]) <= bound).all()


def test_h_is_the_empirical_fisher_diagonal():
    """SPEC-layers' checks: B = 1 → h = (∂ℓ/∂θ)²; a mean over B → h = (1/B) Σ_n (∂ℓ_n/∂θ)²."""
    module = _norm("layernorm", (3,), True, torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    targets = torch.randn(5, 3, dtype=torch.float64)
    per_sample = []
    for n in range(5):
        loss = 0.5 * (module(x[n : n + 1]) - targets[n : n + 1]).square().sum()
        per_sample.append(torch.autograd.grad(loss, [module.weight, module.bias]))
    out = module(x)
    g = torch.autograd.grad((0.5 * (out - targets).square().sum()) / 5, out)[0]
    hs = elementwise_statistics(
        normalised_input(module, x),
        g,
        feature_dims=1,
        has_bias=True,
        approx="expand",
        loss_average="batch",
    )
    for index, h in enumerate(hs):
        fisher = sum(grads[index].square() for grads in per_sample) / 5
        # rule: module docstring with w = float64, d = 3, n = 5
        assert torch.allclose(h, fisher, rtol=(4 * 3 + 12 + 5) * EPS[torch.float64], atol=0)
        first = per_sample[0][index].square()
        h_one = elementwise_statistics(
            normalised_input(module, x[:1]),
            5 * g[:1],
            feature_dims=1,
            has_bias=True,
            approx="expand",
            loss_average="batch",
        )[index]
        assert torch.allclose(h_one, first, rtol=(4 * 3 + 12 + 1) * EPS[torch.float64], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_factor_step_matches_oracle(dtype):
    gen = torch.Generator().manual_seed(0)
    k = (1 + 0.1 * torch.randn(6, generator=gen)).to(dtype)
    m = (0.1 * torch.randn(6, generator=gen)).to(dtype)
    h = torch.rand(6, generator=gen, dtype=_wide(dtype)) * 3
    settings = {"lr_cov": 0.05, "damping": 1e-3, "alpha1": 0.5}
    k_new, m_new = elementwise_factor_step(k, m, h, **settings)
    assert k_new.dtype == m_new.dtype == dtype
    k_ref, _ = elementwise_step(
        k.double().numpy(), m.double().numpy(), h.double().numpy(), **settings
    )
    kk = k.double().numpy()
    scale = np.abs(kk) * (1 + 0.05 * (np.abs(m.double().numpy()) + kk**2 * h.double().numpy() + 2))
    bound = 8 * EPS[_wide(dtype)] * scale + EPS[dtype] / 2 * np.abs(k_ref)  # rule: docstring
    assert (np.abs(k_new.double().numpy() - k_ref) <= bound).all()


# ------------------------------------------------------------------ in SINGD
def _model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_trajectory_matches_oracle(dtype):
    """Five steps (T = 1): k and γ, β against the oracle fed the recorded x, g, ∇θ."""
    _check_trajectory(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_trajectory_check_catches_a_dropped_half(dtype, monkeypatch):
    """``m ← α1 m + (k²h + λk² − 1)`` (the ½ dropped) fails the trajectory check."""

    def wrong(k, m, h, *, lr_cov, damping, alpha1):
        square = k.to(h.dtype).square()
        m_new = alpha1 * m.to(h.dtype) + (square * h + damping * square - 1.0)
        return (k.to(h.dtype) * (1.0 - lr_cov * m_new)).to(k.dtype), m_new.to(m.dtype)

    monkeypatch.setattr(plan, "elementwise_factor_step", wrong)
    with pytest.raises(AssertionError):
        _check_trajectory(dtype)


def _check_trajectory(dtype: torch.dtype) -> None:
    model = _model(dtype)
    norm = model[1]
    settings = {"lr_cov": 0.05, "damping": 1e-3, "alpha1": 0.5}
    lr, momentum = 0.1, 0.5
    opt = SINGD(model, lr=lr, momentum=momentum, T=1, **settings)
    recorded: list[list[torch.Tensor]] = []

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        recorded.append([args[0].detach()])
        out.register_hook(lambda g: recorded[-1].append(g.detach()))

    norm.register_forward_hook(record)
    theta = [p.detach().double().numpy().copy() for p in (norm.weight, norm.bias)]
    k = [np.ones(4), np.ones(4)]
    m = [np.zeros(4), np.zeros(4)]
    buffers = [np.zeros(4), np.zeros(4)]
    # error bounds, propagated step by step (module docstring): δk, δm_μ, δθ
    bound_k, bound_buffer, bound_theta = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    eps, eps_w = EPS[dtype], EPS[_wide(dtype)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        opt.zero_grad()
        x = torch.randn(6, 3, generator=gen).to(dtype)
        model(x).square().mean().backward()
        grads = [p.grad.double().numpy() for p in (norm.weight, norm.bias)]
        opt.step()
        inputs, g = recorded[-1]
        x_hat = layer_norm_hat(inputs.double().numpy(), 1, norm.eps)
        hs = elementwise_h(x_hat, g.double().numpy(), feature_dims=1, bias=True)
        for i, param in enumerate((norm.weight, norm.bias)):
            k[i], m[i] = elementwise_step(k[i], m[i], hs[i], **settings)
            direction = k[i] ** 2 * grads[i]
            buffers[i] = momentum * buffers[i] + direction
            theta[i] = theta[i] - lr * buffers[i]
            # k: the contractive map adds one step's bound (16 eps_w + eps/2)·|k| (|k| ≤ 2 here,
            # h's own error is below eps_w·n relative and enters through k²h)
            bound_k[i] += (16 * eps_w + eps / 2) * np.abs(k[i])
            error_direction = 2 * np.abs(k[i]) * bound_k[i] * np.abs(grads[i]) + 2 * eps * np.abs(
                direction
            )
            bound_buffer[i] = (
                momentum * bound_buffer[i] + error_direction + eps * np.abs(buffers[i])
            )
            bound_theta[i] = (
                bound_theta[i]
                + lr * bound_buffer[i]
                + eps * (np.abs(theta[i]) + lr * np.abs(buffers[i]))
            )
            state = opt.state[param]
            # rule: module docstring (bounds propagated above)
            assert (np.abs(state[K_KEY].double().numpy() - k[i]) <= bound_k[i]).all()
            assert (np.abs(param.double().detach().numpy() - theta[i]) <= bound_theta[i]).all()


def test_elementwise_state_survives_checkpoints_and_model_to():
    model = _model(torch.float32)
    opt = SINGD(model, T=1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    clone_model = _model(torch.float32)
    clone = SINGD(clone_model, T=1)
    clone.load_state_dict(opt.state_dict())
    assert torch.equal(clone.state[clone_model[1].weight][K_KEY], opt.state[model[1].weight][K_KEY])
    model.to(torch.float64)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    assert opt.state[model[1].weight][K_KEY].dtype == torch.float64
    assert M_KEY in opt.state[model[1].bias]


def test_kfac_leaves_norms_to_the_fallback_and_singd_names_them():
    with pytest.warns(UserWarning, match=r"1\.weight, 1\.bias"):
        KFAC(_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SINGD preconditions every parameter here
        SINGD(_model())
