"""Adversarial review of the torch optimizer against SPEC.md, with hand computations.

Each test checks one behaviour that the oracle comparison cannot see (hook
plumbing: several backward passes over one graph, keyword calls, passes
without backward) or recomputes a SPEC formula by hand, independently of both
``singd/`` and ``reference/``, so that a misreading shared by the two is caught.

Tolerance rules (``tests/tolerances.py``): everything runs in float64.

* Pure plumbing tests compare two torch runs whose arithmetic differs only in
  the order of the summands of ``H_K``/``H_C`` (at most 3 passes, reduction
  length ``n`` of the Gram products): ``matmul_bound(float64, passes·n)``
  relative to the factors' magnitude (1 for ``K`` near ``I``).
* The conv patch check compares ``sqrt(n_A / N)·GᵀA`` with autograd's weight
  gradient: both are sums over the ``B·L`` (sample, location) rows, so
  ``matmul_bound(float64, B·L) · Σ|g||a|``, bounded by ``B·L·max|g|·max|a|``.
* The hand-computed SINGD trajectory chains per step the Gram product of the
  statistics (length ``n``), the ``K m`` product (length ``d``) and the
  preconditioning (4 products of length ``d``): ``chain_bound`` of those per
  step, times the number of steps, times the largest magnitude involved.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from singd import SINGD
from singd.optim import distributed
from singd.optim.kinds import layer_grad_matrix
from singd.optim.kinds import layer_input_statistic as layer_input_matrix
from tests.tolerances import chain_bound, matmul_bound

DTYPE = torch.float64


def _linear(seed: int = 0, d_in: int = 3, d_out: int = 2) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, dtype=DTYPE)


def _dense_factors(opt: SINGD, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    state = opt.layer_state(name)
    return state["K"].to_dense(), state["C"].to_dense()


def _max_diff(left: tuple[torch.Tensor, ...], right: tuple[torch.Tensor, ...]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(left, right, strict=True))


# ------------------------------------------------------------------ hook plumbing
def test_repeated_backward_over_one_graph_sums_like_separate_passes() -> None:
    """Three ``backward(retain_graph=True)`` of one forward = three forward/backward passes.

    SPEC §1.1: statistics of several backward passes before a step are summed.
    The forward hook's input summary is shared by every backward through that
    graph; it must not be the object the pending sum is accumulated into
    (before the fix the third pass counted ``H_K`` four times).
    """
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)

    def factors(retain: bool) -> tuple[torch.Tensor, torch.Tensor]:
        layer = _linear()
        opt = SINGD(layer, T=1, lr_cov=0.1, lr=0.0, momentum=0.0)
        if retain:
            out = layer(x)
            for _ in range(3):
                out.square().mean().backward(retain_graph=True)
        else:
            for _ in range(3):
                layer(x).square().mean().backward()
        opt.step()
        return _dense_factors(opt, "")

    error = _max_diff(factors(True), factors(False))
    assert error <= matmul_bound(DTYPE, 3 * 4)  # rule: module docstring (|K|, |C| ≈ 1)


def test_step_leaves_the_input_summary_a_retained_graph_still_holds() -> None:
    """After ``backward(retain_graph=True)``, ``step`` does not write into ``H_K``.

    A further backward through that graph reuses the forward's input summary
    (its gradient hook holds it), so the step may consume only the gradient
    summary (:func:`singd.optim.updates.singd_factor_momenta`).  Rule: exact,
    the held tensors are bitwise what they were before the step.
    """
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    layer = _linear()
    opt = SINGD(layer, T=1, lr_cov=0.1)
    layer(x).square().mean().backward(retain_graph=True)
    (held,) = [stats.summary_tensors()[0] for stats in opt._collector._pending.values()]
    before = [t.clone() for t in held]
    opt.step()
    assert all(torch.equal(t, b) for t, b in zip(held, before, strict=True))


def test_layer_called_with_keyword_input_collects_statistics() -> None:
    """``layer(input=x)`` is a legal call of ``nn.Linear``; the hook must not crash on it."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)

    def factors(keyword: bool) -> tuple[torch.Tensor, torch.Tensor]:
        layer = _linear()
        opt = SINGD(layer, T=1, lr_cov=0.1)
        out = layer(input=x) if keyword else layer(x)
        out.square().mean().backward()
        opt.step()
        return _dense_factors(opt, "")

    assert _max_diff(factors(True), factors(False)) == 0.0  # identical arithmetic


def test_forward_without_backward_does_not_change_the_next_step() -> None:
    """Extra forwards in training mode with grad enabled, never backpropagated,
    and no-grad / eval forwards between backward and ``step``, leave the step
    identical (SPEC §1.4a: statistics come only from backward passes)."""
    gen = torch.Generator().manual_seed(3)
    x, x_val = torch.randn(4, 3, generator=gen, dtype=DTYPE), torch.randn(5, 3, generator=gen)

    def factors(distract: bool) -> tuple[torch.Tensor, ...]:
        layer = _linear()
        opt = SINGD(layer, T=1, lr_cov=0.1, lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            if distract:
                layer(x_val.to(DTYPE)).sum()  # train mode, grad on, output dropped
            loss = layer(x).square().mean()
            if distract:
                layer(x_val.to(DTYPE))  # second unused forward after the real one
            loss.backward()
            if distract:
                with torch.no_grad():
                    layer(x_val.to(DTYPE))
                layer.eval()
                layer(x_val.to(DTYPE)).sum()
                layer.train()
            opt.step()
        return (*_dense_factors(opt, ""), layer.weight.detach().clone())

    assert _max_diff(factors(True), factors(False)) == 0.0  # identical arithmetic


def test_layer_called_twice_in_one_forward_sums_its_calls_like_accumulation() -> None:
    """Design (undocumented): a layer applied twice in one forward contributes one
    pass per call, ``H_K = Σ_calls Π̂(Kᵀ A_cᵀ A_c K)`` and ``H_C`` likewise, exactly as
    if the calls were separate backward passes (gradient accumulation) — not as
    one KFAC-expand pass with the calls as shared rows (which would halve ``U``).
    Also checks that a second backward over such a graph adds the same again."""
    gen = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(4, 3, generator=gen, dtype=DTYPE), torch.randn(4, 3, generator=gen)
    x2 = x2.to(DTYPE)
    layer_ref = _linear(d_in=3, d_out=3)
    target = layer_ref(x1).detach()

    def factors(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer = _linear(d_in=3, d_out=3)
        opt = SINGD(layer, T=1, lr_cov=0.1, lr=0.0, momentum=0.0)
        if mode == "shared":
            loss = (layer(x1) + layer(x2) - target).square().mean()
            loss.backward(retain_graph=True)
            loss.backward()
        else:
            with torch.no_grad():
                summed = layer(x1) + layer(x2) - target
            grad = 2.0 * summed / summed.numel()  # each call's output gradient in "shared"
            for _ in range(2):
                layer(x1).backward(grad)
                layer(x2).backward(grad)
        opt.step()
        return _dense_factors(opt, "")

    error = _max_diff(factors("shared"), factors("separate"))
    assert error <= matmul_bound(DTYPE, 4 * 4)  # rule: module docstring


# ------------------------------------------------------- conv patches vs autograd
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "padding_mode"),
    [
        ((2, 3), 1, "same", (2, 1), "zeros"),
        ((4, 2), 1, "same", 2, "reflect"),
        ((2, 2), 1, "same", 1, "circular"),
        ((3, 2), (2, 1), (1, 2), (1, 2), "replicate"),
        ((3, 3), 2, 1, 1, "zeros"),
    ],
)
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_expand_statistics_reproduce_autograd_weight_gradient(
    kernel: tuple[int, int],
    stride: int | tuple[int, int],
    padding: str | int | tuple[int, int],
    dilation: int | tuple[int, int],
    padding_mode: str,
    groups: int,
) -> None:
    """Independent of the oracle: with KFAC-expand, ``sqrt(n_A/N) · GᵀA`` is exactly
    the weight gradient ``Σ_rows g_row a_rowᵀ`` that autograd computes (SPEC §1.1).

    This pins the patch layout (padding ``'same'`` with even kernels and
    dilation, non-zero padding modes, stride) to torch's own convolution.  With
    ``groups > 1`` every output channel of a group gets the same gradient, so
    summing the gradient's rows over the groups gives ``groups · ĝᵀ·mean_groups(patch)``:
    the group average of SPEC §1.1.
    """
    gen = torch.Generator().manual_seed(5)
    batch, c_in_group = 2, 2
    conv = nn.Conv2d(
        groups * c_in_group,
        groups,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
        dtype=DTYPE,
    )
    x = torch.randn(batch, groups * c_in_group, 7, 6, generator=gen, dtype=DTYPE)
    out = conv(x)
    g_one = torch.randn(batch, 1, *out.shape[2:], generator=gen, dtype=DTYPE)
    g = g_one.expand_as(out).contiguous()  # every output channel gets the same gradient
    out.backward(g)
    A = layer_input_matrix(conv, x, approx="expand")
    G = layer_grad_matrix(conv, g, approx="expand", loss_average="batch")
    rows = A.shape[0]
    assert rows == batch * out.shape[2] * out.shape[3]
    from_statistics = math.sqrt(rows / batch) * (G[:, :1].T @ A)  # [1, d_i + 1]
    weight_grad = conv.weight.grad.reshape(groups, -1).sum(dim=0, keepdim=True) / groups
    bias_grad = conv.bias.grad[:1].reshape(1, 1)
    from_autograd = torch.cat([weight_grad, bias_grad], dim=1)
    scale = rows * float(g.abs().max()) * (float(x.abs().max()) + 1.0)
    error = float((from_statistics - from_autograd).abs().max())
    assert error <= matmul_bound(DTYPE, groups * rows) * scale  # rule: module docstring


# --------------------------------------------------- SINGD recomputed from SPEC text
def _hand_singd(
    inputs: list[np.ndarray],
    grads_out: list[np.ndarray],
    weight_grads: list[np.ndarray],
    w0: np.ndarray,
    *,
    lr: float,
    momentum: float,
    damping: float,
    alpha1: float,
    lr_cov: float,
    normalize: bool,
    kfac_like: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """SINGD with dense factors, T = 1, written line by line from SPEC §1.1–§1.4a.

    Returns ``K``, ``C``, ``W~`` and the largest ``‖m_new‖_∞`` seen.
    """
    d_o, d_i = w0.shape
    K, C = np.eye(d_i), np.eye(d_o)
    m_K, m_C = np.zeros((d_i, d_i)), np.zeros((d_o, d_o))
    W, m_W = w0.copy(), np.zeros_like(w0)
    largest = 0.0
    for x, g, grad in zip(inputs, grads_out, weight_grads, strict=True):
        B = x.shape[0]
        A = np.concatenate([x, np.ones((B, 1))], axis=1) / np.sqrt(B)  # §1.1 bias, 1/sqrt(n_A)
        G = g * np.sqrt(B)  # §1.1 loss_average="batch": N = B
        H_K = K.T @ A.T @ A @ K
        H_C = C.T @ G.T @ G @ C
        half = 0.5 * (1 - alpha1) if normalize else 0.5
        if kfac_like:
            new_m_K = half * (H_K + damping * K.T @ K - np.eye(d_i))
            new_m_C = half * (H_C + damping * C.T @ C - np.eye(d_o))
        else:
            c2, k2 = damping * np.trace(C.T @ C), damping * np.trace(K.T @ K)
            bracket_K = np.trace(H_C) * H_K + c2 * K.T @ K - d_o * np.eye(d_i)
            bracket_C = np.trace(H_K) * H_C + k2 * C.T @ C - d_i * np.eye(d_o)
            new_m_K = alpha1 * m_K + half * bracket_K / d_o
            new_m_C = alpha1 * m_C + half * bracket_C / d_i
        largest = max(largest, np.abs(new_m_K).max(), np.abs(new_m_C).max())
        beta_K = lr_cov / max(1.0, np.abs(new_m_K).max()) if normalize else lr_cov
        beta_C = lr_cov / max(1.0, np.abs(new_m_C).max()) if normalize else lr_cov
        K, C = K @ (np.eye(d_i) - beta_K * new_m_K), C @ (np.eye(d_o) - beta_C * new_m_C)
        m_K, m_C = new_m_K, new_m_C
        g_hat = C @ C.T @ grad @ K @ K.T
        m_W = momentum * m_W + g_hat
        W = W - lr * m_W
    return K, C, W, float(largest)


@pytest.mark.parametrize(
    ("alpha1", "normalize", "kfac_like"),
    [(0.5, True, False), (0.5, False, False), (0.0, True, True), (0.3, True, False)],
)
def test_singd_matches_a_hand_computation_from_the_spec(
    alpha1: float, normalize: bool, kfac_like: bool
) -> None:
    """Four steps of dense SINGD (T = 1) equal SPEC §1.1–§1.4a computed by hand.

    With ``normalize_lr_cov`` inputs are large (×4) so that ``‖m‖_∞ > 1`` and
    the normalised step size ``β1 / max(1, ‖m_new‖_∞)`` really divides;
    after the second step ``K`` and ``C`` are not symmetric, so ``K`` vs ``Kᵀ``
    is checked too.
    """
    steps, batch, d_in, d_out = 4, 5, 3, 2
    hyper = {"lr": 0.05, "momentum": 0.5, "damping": 0.1, "alpha1": alpha1, "lr_cov": 0.3}
    layer = _linear(seed=6, d_in=d_in, d_out=d_out)
    w0 = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach().numpy().copy()
    opt = SINGD(layer, T=1, normalize_lr_cov=normalize, kfac_like=kfac_like, **hyper)
    gen = torch.Generator().manual_seed(7)
    input_scale = 4.0 if normalize else 1.0  # unnormalised steps diverge on large inputs
    inputs, grads_out, weight_grads = [], [], []
    for _ in range(steps):
        x = input_scale * torch.randn(batch, d_in, generator=gen, dtype=DTYPE)
        target = torch.randn(batch, d_out, generator=gen, dtype=DTYPE)
        opt.zero_grad()
        out = layer(x)
        out.retain_grad()
        (out - target).square().sum(dim=1).mean().backward()
        inputs.append(x.numpy().copy())
        grads_out.append(out.grad.numpy().copy())
        weight_grads.append(
            torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).numpy().copy()
        )
        opt.step()
    K, C, W, largest = _hand_singd(
        inputs,
        grads_out,
        weight_grads,
        w0,
        normalize=normalize,
        kfac_like=kfac_like,
        **hyper,
    )
    K_t, C_t = _dense_factors(opt, "")
    assert float(np.abs(K - K.T).max()) > 1e-6  # the test can tell K from Kᵀ
    assert largest > 1.0 or not normalize  # the normalisation really divides
    d = d_in + 1
    per_step = chain_bound(DTYPE, [batch, d, d, d, d, d])
    magnitude = max(1.0, float(np.abs(K).max()), float(np.abs(C).max()), float(np.abs(W).max()))
    magnitude *= max(1.0, float(max(np.abs(x).max() for x in inputs))) ** 2
    bound = steps * per_step * magnitude  # rule: module docstring
    assert float(np.abs(K_t.numpy() - K).max()) <= bound
    assert float(np.abs(C_t.numpy() - C).max()) <= bound
    W_t = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach().numpy()
    assert float(np.abs(W_t - W).max()) <= bound


# ------------------------------------------------------- Π̂ from the SPEC §2 table
def _hand_projection(name: str, M: np.ndarray) -> np.ndarray:
    """Π̂(M) for symmetric ``M`` read directly off the SPEC §2 table (size ``d = 7``)."""
    d = M.shape[0]
    diag = np.diag(np.diag(M))
    lower, upper = np.tril(M, -1), np.triu(M, 1)
    if name == "dense":
        return M.copy()
    if name == "diagonal":
        return diag
    if name == "block3diagonal":  # blocks 3, 3, 1
        out = np.zeros_like(M)
        for start in range(0, d, 3):
            out[start : start + 3, start : start + 3] = M[start : start + 3, start : start + 3]
        return out
    if name == "tril":
        return diag + 2 * lower
    if name == "triu":
        return diag + 2 * upper
    if name in ("triltoeplitz", "triutoeplitz"):
        out = np.eye(d) * np.trace(M) / d
        for k in range(1, d):
            value = (np.trace(M, -k) + np.trace(M, k)) / (d - k)
            out += value * (np.eye(d, k=-k) if name == "triltoeplitz" else np.eye(d, k=k))
        return out
    if name == "hierarchical2_3":  # d = 7 > K1 + K2: (k1, m, k2) = (2, 2, 3)
        k1, m = 2, 2
        out = np.zeros_like(M)
        out[:k1, :k1] = M[:k1, :k1]
        out[:k1, k1:] = 2 * M[:k1, k1:]
        out[k1 : k1 + m, k1 : k1 + m] = np.diag(np.diag(M)[k1 : k1 + m])
        out[k1 + m :, k1 : k1 + m] = 2 * M[k1 + m :, k1 : k1 + m]
        out[k1 + m :, k1 + m :] = M[k1 + m :, k1 + m :]
        return out
    # recursive forms: a 1 × 1 "dense" corner, its coupling row/column M_ij + M_ji, diagonal
    out = diag.copy()
    if name == "trilbottomrightdiagonal":  # [[a, 0], [b, diag(c)]]
        out[1:, 0] = 2 * M[1:, 0]
    elif name == "triltopleftdiagonal":  # [[diag(a), 0], [bᵀ, c]]
        out[-1, :-1] = 2 * M[-1, :-1]
    elif name == "triubottomrightdiagonal":  # [[a, bᵀ], [0, diag(c)]]
        out[0, 1:] = 2 * M[0, 1:]
    elif name == "triutopleftdiagonal":  # [[diag(a), b], [0, c]]
        out[:-1, -1] = 2 * M[:-1, -1]
    else:
        raise AssertionError(name)
    return out


@pytest.mark.parametrize(
    "name",
    [
        "dense",
        "diagonal",
        "block3diagonal",
        "tril",
        "triu",
        "triltoeplitz",
        "triutoeplitz",
        "hierarchical2_3",
        "trilbottomrightdiagonal",
        "triltopleftdiagonal",
        "triubottomrightdiagonal",
        "triutopleftdiagonal",
    ],
)
def test_projection_matches_the_spec_table_in_torch_and_oracle(name: str) -> None:
    """``Π̂(X Xᵀ)`` of both implementations equals the SPEC §2 table computed by hand.

    Torch forms it as ``project_inner(X)`` with ``K = I``; the oracle as
    ``project(X Xᵀ)``.  Rule: each entry is a sum of at most ``2 d`` entries of
    ``X Xᵀ`` (Toeplitz), each a product of length ``n``: ``matmul_bound(float64,
    n + 2d)`` relative to ``max|X|² · n · 2``.
    """
    from reference.structures import get_structure as reference_structure
    from singd.structures import get_structure

    d, n = 7, 5
    X = torch.randn(d, n, generator=torch.Generator().manual_seed(8), dtype=DTYPE)
    M = (X @ X.T).numpy()
    expected = _hand_projection(name, M)
    torch_value = get_structure(name).eye(d, dtype=DTYPE).project_inner(X).to_dense().numpy()
    oracle_value = np.asarray(reference_structure(name).project(M), dtype=np.float64)
    bound = matmul_bound(DTYPE, n + 2 * d) * 2 * n * float(X.abs().max()) ** 2
    assert float(np.abs(torch_value - expected).max()) <= bound  # rule: docstring
    assert float(np.abs(oracle_value - expected).max()) <= bound


# --------------------------------------------------------------- GradScaler (§1.5)
def _scaler_vs_plain(with_scaler: bool) -> list[torch.Tensor]:
    """Run SINGD (T = 2) on 6 good batches; the scaler run has an inf batch in between."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = SINGD(model, lr=0.05, T=2, lr_cov=0.2, alpha1=0.5, normalize_lr_cov=True)
    # factors of 4 keep every scale an even power of two: sqrt and all rescaling exact
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**8, growth_factor=4.0, backoff_factor=0.25, growth_interval=2
    )
    schedule = [0, 1, "inf", 2, 3, "inf", 4, 5] if with_scaler else [0, 1, 2, 3, 4, 5]
    for item in schedule:
        opt.zero_grad()
        gen = torch.Generator().manual_seed(0 if item == "inf" else 100 + int(item))
        loss = model(torch.randn(6, 4, generator=gen)).square().mean()
        if item == "inf":
            loss = loss * float("inf")
        if with_scaler:
            scaler.scale(loss).backward()
            with (
                pytest.warns(UserWarning, match="step skipped")
                if item == "inf"
                else contextlib.nullcontext()
            ):
                scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    assert opt.steps == 6
    return [p.detach().clone() for p in model.parameters()]


def test_scaler_backoff_after_inf_step_and_growth_match_the_plain_run_bitwise() -> None:
    """SPEC §1.5: inf steps are skipped with their statistics; the scale changes by
    backoff (after an inf step) and growth, and ``s_{t−1}/s_t²`` removes it.

    With every scale an even power of two all rescaling is exact, so the run
    equals the unscaled run without the inf batches bitwise (rule: exact).
    """
    scaled, plain = _scaler_vs_plain(True), _scaler_vs_plain(False)
    for a, b in zip(scaled, plain, strict=True):
        assert torch.equal(a, b)


def test_resume_mid_period_after_an_inf_step_is_bitwise_identical() -> None:
    """Checkpoint after an inf-skipped step, in the middle of a ``T = 3`` period
    (``steps = 4``), then resume: identical to the uninterrupted run, including
    the saved ``s_{t−1}`` of the last successful step (SPEC §1.5)."""

    def make() -> tuple[nn.Module, SINGD, torch.amp.GradScaler]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        opt = SINGD(model, lr=0.05, T=3, lr_cov=0.2, structures=("tril", "triutoeplitz"))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        return model, opt, scaler

    def run(model: nn.Module, opt: SINGD, scaler: torch.amp.GradScaler, items: list) -> None:
        for item in items:
            opt.zero_grad()
            gen = torch.Generator().manual_seed(100 + item if item >= 0 else 0)
            loss = model(torch.randn(6, 4, generator=gen)).square().mean()
            if item < 0:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the inf step's skip warning
                scaler.step(opt)
            scaler.update()

    before, after = [0, 1, 2, -1, 3], [4, 5, 6, 7]
    model, opt, scaler = make()
    run(model, opt, scaler, before + after)
    model_a, opt_a, scaler_a = make()
    run(model_a, opt_a, scaler_a, before)
    assert opt_a.steps == 4
    saved = (model_a.state_dict(), opt_a.state_dict(), scaler_a.state_dict())
    model_b, opt_b, scaler_b = make()
    model_b.load_state_dict(saved[0])
    opt_b.load_state_dict(saved[1])
    scaler_b.load_state_dict(saved[2])
    run(model_b, opt_b, scaler_b, after)
    for a, b in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    for factor in ("K", "C"):
        assert torch.equal(
            opt.layer_state("0")[factor].to_dense(), opt_b.layer_state("0")[factor].to_dense()
        )


def test_rank_reduction_leaves_the_input_summary_a_retained_graph_still_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``R = 2`` ranks, weighting the statistics does not write into a held ``H_K``.

    ``reduce_step_`` weights each summary by its rank weight and sums it over
    ranks; the first pass's input summary is also held by its forward's grad
    hook (``backward(retain_graph=True)``), so it is weighted into a new
    tensor.  ``all_reduce`` is patched to the sum with a second rank that holds
    three times this rank's values (``4x``; the exponent's ``MIN`` leaves it),
    so one process stands for both.  Rule: exact, the held tensors are bitwise
    what they were, and the new summary is the held one times ``4 · 1/2``
    (powers of two: exact).
    """

    def with_a_second_rank(tensor: torch.Tensor, op: object = dist.ReduceOp.SUM) -> None:
        if op == dist.ReduceOp.SUM:
            tensor.mul_(4)

    monkeypatch.setattr(distributed.dist, "all_reduce", with_a_second_rank)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    layer = _linear()
    opt = SINGD(layer, T=1, lr_cov=0.1)
    layer(x).square().mean().backward(retain_graph=True)
    (stats,) = opt._collector._pending.values()
    held = stats.summary_tensors()[0]
    before = [t.clone() for t in held]
    grads = {id(p): p.grad for p in layer.parameters()}
    distributed.reduce_step_([(stats, "batch")], grads, 2, wrapper_averaged=False)
    assert all(torch.equal(t, b) for t, b in zip(held, before, strict=True))
    reduced = stats.summary_tensors()[0]
    assert all(torch.equal(r, 2 * b) for r, b in zip(reduced, before, strict=True))
