"""Torch statistics ``A``, ``G`` (singd.optim.statistics, the hooks) vs the oracle (SPEC §1.1).

Cases are drawn in float64 and fed to both sides.  Tolerance rule: every
entry of ``A`` is a mean of ``r = groups·S`` inputs (reduce) or ``groups``
(expand) divided by ``sqrt(n)``; every entry of ``G`` a sum of ``S``
gradients times ``sqrt(N)``.  So the error is at most
``matmul_bound(float64, r) · max|entry magnitude|`` (Higham Thm. 3.5 with the
square-root scaling as one more rounding, covered by the ``+2``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from reference.statistics import conv2d_statistics, kfac_factors, linear_statistics
from singd import KFAC, SINGD
from singd.optim import statistics
from singd.optim.kinds import layer_grad_matrix
from singd.optim.kinds import layer_input_statistic as layer_input_matrix
from tests.tolerances import matmul_bound

DTYPE = torch.float64
APPROX = st.sampled_from(["expand", "reduce"])
LOSS_AVERAGE = st.sampled_from(["batch", "batch+sequence", None])


def _assert_close(actual: torch.Tensor, expected: np.ndarray, reduction: int, scale: float):
    """``|actual − expected| ≤ matmul_bound(float64, reduction) · scale`` entrywise."""
    assert tuple(actual.shape) == expected.shape
    error = float(np.abs(actual.numpy() - expected).max(initial=0.0))
    assert error <= matmul_bound(DTYPE, reduction) * scale  # rule: module docstring


@given(
    batch=st.integers(1, 3),
    shared=st.lists(st.integers(1, 3), max_size=2),
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 4),
    bias=st.booleans(),
    approx=APPROX,
    loss_average=LOSS_AVERAGE,
    seed=st.integers(0, 2**16),
)
@example(
    batch=2,
    shared=[3, 2],
    d_in=3,
    d_out=2,
    bias=True,
    approx="reduce",
    loss_average="batch+sequence",
    seed=0,
)
def test_linear_statistics_match_oracle(
    batch, shared, d_in, d_out, bias, approx, loss_average, seed
):
    """Linear with any number of weight-sharing dims, expand/reduce, every loss average."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, *shared, d_in, generator=gen, dtype=DTYPE)
    g = torch.randn(batch, *shared, d_out, generator=gen, dtype=DTYPE)
    layer = nn.Linear(d_in, d_out, bias=bias, dtype=DTYPE)
    A = layer_input_matrix(layer, a, approx=approx)
    G = layer_grad_matrix(layer, g, approx=approx, loss_average=loss_average)
    A_ref, G_ref = linear_statistics(
        a.numpy(), g.numpy(), bias=bias, approx=approx, loss_average=loss_average
    )
    positions = math.prod(shared)
    _assert_close(A, A_ref, positions, float(a.abs().max()) + 1.0)
    n_terms = batch * positions
    _assert_close(G, G_ref, positions, positions * float(g.abs().max()) * math.sqrt(n_terms))


@given(
    batch=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    channels_per_group=st.integers(1, 2),
    out_per_group=st.integers(1, 2),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 2)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.sampled_from([0, 1, (1, 0), "valid"]),
    bias=st.booleans(),
    approx=APPROX,
    loss_average=LOSS_AVERAGE,
    seed=st.integers(0, 2**16),
)
@example(
    batch=2,
    groups=2,
    channels_per_group=2,
    out_per_group=1,
    kernel=(3, 2),
    stride=(1, 1),
    dilation=(2, 1),
    padding="valid",
    bias=True,
    approx="reduce",
    loss_average="batch+sequence",
    seed=1,
)
def test_conv2d_statistics_match_oracle(
    batch,
    groups,
    channels_per_group,
    out_per_group,
    kernel,
    stride,
    dilation,
    padding,
    bias,
    approx,
    loss_average,
    seed,
):
    """Conv2d: stride, dilation, int/tuple/'valid' padding, groups, bias, expand/reduce."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(
        groups * channels_per_group,
        groups * out_per_group,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        dtype=DTYPE,
    )
    x = torch.randn(batch, groups * channels_per_group, 6, 5, generator=gen, dtype=DTYPE)
    out_shape = conv(x).shape
    g = torch.randn(out_shape, generator=gen, dtype=DTYPE)
    A = layer_input_matrix(conv, x, approx=approx)
    G = layer_grad_matrix(conv, g, approx=approx, loss_average=loss_average)
    A_ref, G_ref = conv2d_statistics(
        x.numpy(),
        g.numpy(),
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        approx=approx,
        loss_average=loss_average,
    )
    locations = out_shape[2] * out_shape[3]
    _assert_close(A, A_ref, groups * locations, float(x.abs().max()) + 1.0)
    _assert_close(
        G, G_ref, locations, locations * float(g.abs().max()) * math.sqrt(batch * locations)
    )


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kernel", [(3, 3), (2, 3), (4, 1)])
@pytest.mark.parametrize("dilation", [1, 2])
def test_conv2d_same_padding_matches_oracle(kernel, dilation):
    """``padding='same'`` pads asymmetrically for even kernels, exactly as torch."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation, dtype=DTYPE)
    x = torch.randn(2, 2, 5, 6, generator=gen, dtype=DTYPE)
    g = torch.randn(conv(x).shape, generator=gen, dtype=DTYPE)
    A = layer_input_matrix(conv, x, approx="expand")
    A_ref, _ = conv2d_statistics(
        x.numpy(),
        g.numpy(),
        kernel_size=kernel,
        padding="same",
        dilation=dilation,
        bias=True,
        approx="expand",
    )
    _assert_close(A, A_ref, 1, float(x.abs().max()) + 1.0)


class _Recorder:
    """Captures a layer's input and output gradient with the test's own hooks."""

    def __init__(self, layer: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        layer.register_forward_hook(self._forward)

    def _forward(self, module, args, output):
        self.inputs.append(args[0].detach().clone())
        output.register_hook(lambda grad: self.grads.append(grad.detach().clone()))


def test_hooks_feed_kfac_factors_through_inplace_relu():
    """With β1 = 1, KFAC's factors after one step are this pass's ``AᵀA``, ``GᵀG``.

    The conv is followed by ``ReLU(inplace=True)``: the hooks must still see
    the gradient w.r.t. the conv output (entries zeroed by the ReLU).
    """
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, dtype=DTYPE)
    model = nn.Sequential(
        conv, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 4 * 4, 2, dtype=DTYPE)
    )
    recorder = _Recorder(conv)
    opt = KFAC(model, lr=0.0, lr_cov=1.0, T=1)
    x = torch.randn(3, 2, 4, 4, dtype=DTYPE)
    model(x).square().mean().backward()
    opt.step()
    A_ref, G_ref = conv2d_statistics(
        recorder.inputs[0].numpy(), recorder.grads[0].numpy(), kernel_size=3, padding=1, bias=True
    )
    U_ref, Gc_ref = kfac_factors(A_ref, G_ref)
    state = opt.layer_state("0")
    rows = A_ref.shape[0]
    # rule: a Gram matrix of n rows is one product of reduction length n.
    assert np.abs(state["S_K"].numpy() - U_ref).max() <= (
        matmul_bound(DTYPE, rows) * float(np.abs(A_ref).max()) ** 2 * rows
    )
    assert np.abs(state["S_C"].numpy() - Gc_ref).max() <= (
        matmul_bound(DTYPE, rows) * float(np.abs(G_ref).max()) ** 2 * rows
    )
    assert (recorder.grads[0] == 0).any()  # the in-place ReLU really masked entries


@given(
    batch=st.integers(0, 4),
    shared=st.lists(st.integers(1, 3), max_size=2),
    d_in=st.integers(1, 4),
    bias=st.booleans(),
    approx=APPROX,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
@example(batch=3, shared=[3], d_in=2, bias=True, approx="reduce", dtype=torch.float32, seed=0)
@example(batch=0, shared=[], d_in=2, bias=True, approx="expand", dtype=torch.float32, seed=0)
def test_input_gram_diagonal_matches_the_oracles_a(batch, shared, d_in, bias, approx, dtype, seed):
    """``diag(AᵀA)`` without ``A`` (a diagonal ``K``'s statistic) against the oracle's ``A``.

    Rule: the torch side rounds a mean of ``S`` positions (reduce), a square, a
    sum of ``n_A`` rows and a division: ``matmul_bound(dtype, n_A + 2S + 2) ·
    max|x|²`` (``Σ_rows x̄² / n_A ≤ max|x|²``; the float64 oracle's own error is
    below float64's bound of the same size).  The bias entry is exactly 1, and
    an empty batch gives zeros (``AᵀA`` of no rows).
    """
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, *shared, d_in, generator=gen, dtype=DTYPE)
    A_ref, _ = linear_statistics(
        a.numpy(), np.zeros((*a.shape[:-1], 1)), bias=bias, approx=approx, loss_average=None
    )
    expected = (A_ref * A_ref).sum(axis=0)
    shared_a = statistics.linear_shared_format(a.to(dtype))
    actual = statistics.input_gram_diagonal(shared_a, approx=approx, bias=bias)
    positions = math.prod(shared)
    rows = A_ref.shape[0]
    scale = float(a.abs().max()) ** 2 if batch else 0.0
    error = np.abs(actual.double().numpy()[:d_in] - expected[:d_in]).max(initial=0.0)
    assert error <= matmul_bound(dtype, rows + 2 * positions + 2) * scale  # rule: docstring
    if bias:
        assert float(actual[-1]) == (1.0 if batch else 0.0)  # exact
    assert actual.shape == (d_in + int(bias),) and actual.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_diagonal_k_takes_the_gram_diagonal_in_four_byte_dtypes_only(
    dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook hands ``diag(AᵀA)`` for a diagonal ``K`` formed in float32 and ``A``
    itself in bfloat16 (whose rounding order the emulated oracle follows); the
    input summary is ``k² ⊙ diag(AᵀA)`` either way.

    Rule: against ``k² ⊙ rowsum((Aᵀ)²)`` from the torch ``A`` in float64,
    ``matmul_bound(dtype, n_A + 2)`` relative to ``k²·max|x|²`` (one sum of
    ``n_A`` squares and the ``k²`` product in ``dtype``; ``k = 1`` at the start).
    """
    gen = torch.Generator().manual_seed(5)
    layer = nn.Linear(3, 2)
    x = torch.randn(6, 3, generator=gen)
    diagonal = ("diagonal", "diagonal")
    opt = SINGD(layer, structures=diagonal, preconditioner_dtype=(dtype, dtype), T=1)
    calls = []
    original = statistics.input_gram_diagonal

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(statistics, "input_gram_diagonal", counted)
    layer(x).square().mean().backward()
    assert len(calls) == (1 if dtype == torch.float32 else 0)
    (pending,) = opt._collector._pending.values()
    (summary,) = pending.summary_tensors()[0]
    A = layer_input_matrix(layer, x.double(), approx="expand")
    expected = (A * A).sum(dim=0)
    error = float((summary.double() - expected).abs().max())
    scale = float(x.abs().max()) ** 2
    assert error <= matmul_bound(dtype, x.shape[0] + 2) * scale  # rule: docstring
