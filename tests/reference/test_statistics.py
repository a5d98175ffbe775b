"""The oracle's curvature statistics (SPEC §1.1) against torch, autograd and mpmath.

Torch is used here only to cross-check the oracle: ``F.unfold`` and
``nn.Conv2d`` for the patches and padding semantics, ``nn.Linear`` /
``nn.Conv2d`` autograd for the gradient identity ``∇W~ = sqrt(n/N)·GᵀA`` of
KFAC-expand, which pins down the row layout and both scalings at once.

Tolerance rule used throughout: two float64 computations of a sum of ``n``
products differ by at most ``matmul_bound(float64, n) · magnitude``, where
``magnitude`` is the same sum over absolute values (each is within
``γ_n ≈ n·eps/2`` of the exact value, Higham Thm. 3.5).  A square root or a
division by an integer adds one rounding (``eps``) each; those are counted in
the ``+ 2`` of :func:`tests.tolerances.matmul_bound` unless stated.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference.numbers import mpmath_numbers
from reference.patches import conv2d_forward, extract_patches, resolve_padding
from reference.statistics import (
    conv2d_statistics,
    kfac_factors,
    linear_statistics,
    loss_terms,
)
from tests.reference.strategies import ENTRIES
from tests.tolerances import EPS, matmul_bound

F64 = torch.float64
EPS64 = EPS[F64]


def arrays(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """float64 arrays of ``shape``, every entry drawn from ENTRIES (no constant fill)."""
    return hnp.arrays(np.float64, shape, elements=ENTRIES, fill=st.nothing())


@st.composite
def conv_cases(draw: st.DrawFn, paddings: tuple[str, ...] = ("int", "tuple", "same", "valid")):
    """A small Conv2d configuration with input ``x`` that yields at least one output.

    The input size is drawn *above* the dilated kernel's extent minus the
    padding, so every draw is valid (no filtering).
    """
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(paddings))
    stride = (1, 1) if kind == "same" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding: int | tuple[int, int] | str
    if kind == "int":
        padding = draw(st.integers(0, 2))
    elif kind == "tuple":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    else:
        padding = kind
    (top, bottom), (left, right) = resolve_padding(padding, kernel, stride, dilation)
    height = max(1, dilation[0] * (kernel[0] - 1) + 1 - top - bottom) + draw(st.integers(0, 3))
    width = max(1, dilation[1] * (kernel[1] - 1) + 1 - left - right) + draw(st.integers(0, 3))
    batch = draw(st.integers(1, 3))
    x = draw(arrays((batch, c_in, height, width)))
    return {
        "x": x,
        "c_out": c_out,
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
    }


def torch_conv(case: dict, bias: bool) -> torch.nn.Conv2d:
    """``nn.Conv2d`` in float64 with the case's hyper-parameters and seeded weights."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(
        case["x"].shape[1],
        case["c_out"],
        case["kernel_size"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        bias=bias,
        dtype=F64,
    )


def torch_patches(case: dict) -> torch.Tensor:
    """Torch's patches: pad as ``nn.Conv2d`` records it, then ``F.unfold``; ``[B, L, C·kh·kw]``."""
    conv = torch_conv(case, bias=False)
    x = F.pad(torch.tensor(case["x"]), conv._reversed_padding_repeated_twice)
    unfolded = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return unfolded.transpose(1, 2)


# ---------------------------------------------------------------------------
# patches and the reference convolution


@given(case=conv_cases(paddings=("int", "tuple")))
def test_extract_patches_equals_unfold(case: dict) -> None:
    """Patches equal ``F.unfold`` exactly (both only copy entries)."""
    ours = extract_patches(
        case["x"], case["kernel_size"], case["stride"], case["padding"], case["dilation"]
    )
    theirs = F.unfold(
        torch.tensor(case["x"]),
        case["kernel_size"],
        dilation=case["dilation"],
        padding=case["padding"],
        stride=case["stride"],
    ).transpose(1, 2)
    np.testing.assert_array_equal(ours, theirs.numpy())  # copies only: bound 0


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@given(case=conv_cases(), bias=st.booleans())
@example(  # torch's asymmetric 'same': even kernel, the extra zero goes bottom/right
    case={
        "x": np.arange(30.0).reshape(1, 2, 3, 5) / 30,
        "c_out": 2,
        "kernel_size": (2, 3),
        "stride": (1, 1),
        "padding": "same",
        "dilation": (1, 1),
        "groups": 2,
    },
    bias=True,
)
def test_conv2d_forward_equals_torch_conv2d(case: dict, bias: bool) -> None:
    """The patch-based convolution equals ``nn.Conv2d`` for every padding kind, incl. 'same'."""
    conv = torch_conv(case, bias)
    w = conv.weight.detach().numpy()
    b = conv.bias.detach().numpy() if bias else None
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    ours = conv2d_forward(case["x"], w, b, *args)
    theirs = conv(torch.tensor(case["x"])).detach().numpy()
    magnitude = conv2d_forward(
        np.abs(case["x"]), np.abs(w), None if b is None else np.abs(b), *args
    )
    n = w[0].size + bias  # reduction length: one patch times one filter, plus the bias
    assert ours.shape == theirs.shape
    # rule: two float64 sums of n products differ by <= (n + 2)·eps·Σ|terms|
    assert np.all(np.abs(ours - theirs) <= matmul_bound(F64, n) * magnitude)


# ---------------------------------------------------------------------------
# statistics against torch


def torch_statistics(
    patches: torch.Tensor, g: torch.Tensor, groups: int, bias: bool, approx: str, n_loss: int
) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §1.1 written with torch ops on ``patches [B, L, C_in·k]`` and ``g [B, L, C_out]``."""
    batch, locations, _ = patches.shape
    a = patches.reshape(batch, locations, groups, -1).mean(dim=2)
    if approx == "expand":
        a, g = a.flatten(0, 1), g.flatten(0, 1)
    else:
        a, g = a.mean(dim=1), g.sum(dim=1)
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    return (a / math.sqrt(a.shape[0])).numpy(), (g * math.sqrt(n_loss)).numpy()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@given(
    case=conv_cases(),
    bias=st.booleans(),
    approx=st.sampled_from(["expand", "reduce"]),
    loss_average=st.sampled_from(["batch", "batch+sequence", None]),
    data=st.data(),
)
def test_conv2d_statistics_equal_torch(
    case: dict, bias: bool, approx: str, loss_average: str | None, data: st.DataObject
) -> None:
    """``A``, ``G`` of a Conv2d equal the same recipe written with ``F.pad`` + ``F.unfold``."""
    conv = torch_conv(case, bias)
    out_shape = conv(torch.tensor(case["x"])).shape
    g = data.draw(arrays(tuple(out_shape)))
    kwargs = {k: case[k] for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
    a_ours, g_ours = conv2d_statistics(
        case["x"], g, **kwargs, bias=bias, approx=approx, loss_average=loss_average
    )
    batch, locations = g.shape[0], g.shape[2] * g.shape[3]
    g_rows = torch.tensor(g).flatten(2).transpose(1, 2)
    n_loss = loss_terms(batch, locations, loss_average)
    a_torch, g_torch = torch_statistics(
        torch_patches(case), g_rows, case["groups"], bias, approx, n_loss
    )
    a_mag, g_mag = conv2d_statistics(
        np.abs(case["x"]), np.abs(g), **kwargs, bias=bias, approx=approx, loss_average=loss_average
    )
    # rule: A is a mean over `groups` (and over `locations` in reduce) then a 1/sqrt(n) —
    # a sum of groups·locations terms, two roundings for the divisions
    assert np.all(np.abs(a_ours - a_torch) <= matmul_bound(F64, case["groups"] * locations) * a_mag)
    # rule: G is a sum over `locations` (reduce) times sqrt(N): two roundings beyond the sum
    assert np.all(np.abs(g_ours - g_torch) <= matmul_bound(F64, locations) * g_mag)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@given(
    case=conv_cases(),
    bias=st.booleans(),
    loss_average=st.sampled_from(["batch", "batch+sequence", None]),
    data=st.data(),
)
def test_conv2d_expand_statistics_give_autograd_gradient(
    case: dict, bias: bool, loss_average: str | None, data: st.DataObject
) -> None:
    """KFAC-expand with one group: ``sqrt(n/N)·GᵀA = [∇W, ∇b]`` from ``nn.Conv2d`` autograd."""
    case = {**case, "groups": 1}
    conv = torch_conv(case, bias)
    x = torch.tensor(case["x"])
    out = conv(x)
    g = data.draw(arrays(tuple(out.shape)))
    out.backward(torch.tensor(g))
    grad = conv.weight.grad.flatten(1)
    if bias:
        grad = torch.cat([grad, conv.bias.grad[:, None]], dim=1)
    kwargs = {k: case[k] for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
    a, g_stat = conv2d_statistics(case["x"], g, **kwargs, bias=bias, loss_average=loss_average)
    batch, locations = g.shape[0], g.shape[2] * g.shape[3]
    factor = math.sqrt(a.shape[0] / loss_terms(batch, locations, loss_average))
    ours = factor * (g_stat.T @ a)
    a_mag, g_mag = conv2d_statistics(
        np.abs(case["x"]), np.abs(g), **kwargs, bias=bias, loss_average=loss_average
    )
    magnitude = factor * (g_mag.T @ a_mag)
    # rule: a sum of n = B·L products; plus 4 roundings of the sqrt scalings and `factor`
    bound = (matmul_bound(F64, a.shape[0]) + 4 * EPS64) * magnitude
    assert np.all(np.abs(ours - grad.numpy()) <= bound)


@st.composite
def linear_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """``a [B, ..., d_in]``, ``g [B, ..., d_out]`` with 0–2 shared dims."""
    batch = draw(st.integers(1, 3))
    shared = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    d_in, d_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return draw(arrays((batch, *shared, d_in))), draw(arrays((batch, *shared, d_out)))


@given(
    case=linear_cases(),
    bias=st.booleans(),
    approx=st.sampled_from(["expand", "reduce"]),
    loss_average=st.sampled_from(["batch", "batch+sequence", None]),
)
def test_linear_statistics_equal_torch(
    case: tuple[np.ndarray, np.ndarray], bias: bool, approx: str, loss_average: str | None
) -> None:
    """``A``, ``G`` of a Linear layer equal the recipe written with torch ops."""
    a, g = case
    batch, locations = a.shape[0], math.prod(a.shape[1:-1])
    a_rows = torch.tensor(a).reshape(batch, locations, -1)
    g_rows = torch.tensor(g).reshape(batch, locations, -1)
    n_loss = loss_terms(batch, locations, loss_average)
    a_torch, g_torch = torch_statistics(a_rows, g_rows, 1, bias, approx, n_loss)
    a_ours, g_ours = linear_statistics(a, g, bias=bias, approx=approx, loss_average=loss_average)
    a_mag, g_mag = linear_statistics(
        np.abs(a), np.abs(g), bias=bias, approx=approx, loss_average=loss_average
    )
    # rule: sums of `locations` terms (reduce) and two roundings of the scalings
    assert np.all(np.abs(a_ours - a_torch) <= matmul_bound(F64, locations) * a_mag)
    assert np.all(np.abs(g_ours - g_torch) <= matmul_bound(F64, locations) * g_mag)


@given(
    case=linear_cases(),
    bias=st.booleans(),
    loss_average=st.sampled_from(["batch", "batch+sequence", None]),
)
def test_linear_expand_statistics_give_autograd_gradient(
    case: tuple[np.ndarray, np.ndarray], bias: bool, loss_average: str | None
) -> None:
    """KFAC-expand: ``sqrt(n/N)·GᵀA = [∇W, ∇b]`` from ``nn.Linear`` autograd."""
    a, g = case
    layer = torch.nn.Linear(a.shape[-1], g.shape[-1], bias=bias, dtype=F64)
    layer(torch.tensor(a)).backward(torch.tensor(g))
    grad = layer.weight.grad
    if bias:
        grad = torch.cat([grad, layer.bias.grad[:, None]], dim=1)
    a_stat, g_stat = linear_statistics(a, g, bias=bias, loss_average=loss_average)
    batch, locations = a.shape[0], math.prod(a.shape[1:-1])
    factor = math.sqrt(a_stat.shape[0] / loss_terms(batch, locations, loss_average))
    a_mag, g_mag = linear_statistics(np.abs(a), np.abs(g), bias=bias, loss_average=loss_average)
    # rule: a sum of n = B·S products; plus 4 roundings of the sqrt scalings and `factor`
    bound = (matmul_bound(F64, a_stat.shape[0]) + 4 * EPS64) * factor * (g_mag.T @ a_mag)
    assert np.all(np.abs(factor * (g_stat.T @ a_stat) - grad.numpy()) <= bound)


@given(
    a=arrays((3, 4)),
    g=arrays((3, 2)),
    bias=st.booleans(),
    loss_average=st.sampled_from(["batch", "batch+sequence", None]),
)
def test_expand_equals_reduce_without_shared_dims(
    a: np.ndarray, g: np.ndarray, bias: bool, loss_average: str | None
) -> None:
    """With ``a`` of shape ``[B, d_in]`` (``S = 1``) expand and reduce give the same rows."""
    expand = linear_statistics(a, g, bias=bias, approx="expand", loss_average=loss_average)
    reduce = linear_statistics(a, g, bias=bias, approx="reduce", loss_average=loss_average)
    for ours, theirs in zip(expand, reduce, strict=True):
        np.testing.assert_array_equal(ours, theirs)  # a mean/sum over one term is exact: bound 0


def test_kfac_factors_are_gram_matrices() -> None:
    """``U = AᵀA`` and ``Gc = GᵀG`` on a hand-checked case (integers: exact)."""
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    g = np.array([[1.0], [-1.0]])
    u, gc = kfac_factors(a, g)
    np.testing.assert_array_equal(u, [[10.0, 14.0], [14.0, 20.0]])  # exact small integers
    np.testing.assert_array_equal(gc, [[2.0]])


# ---------------------------------------------------------------------------
# float64 against mpmath


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@given(case=conv_cases(), bias=st.booleans(), approx=st.sampled_from(["expand", "reduce"]))
def test_conv2d_statistics_float64_agree_with_mpmath(case: dict, bias: bool, approx: str) -> None:
    """The same code on ``mpf`` arrays (50 digits) agrees with float64 to the float64 bound."""
    numbers = mpmath_numbers(50)
    x = case["x"]
    out_shape = tuple(torch_conv(case, bias=False)(torch.tensor(x)).shape)
    g = np.random.default_rng(0).standard_normal(out_shape)
    kwargs = {k: case[k] for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
    a64, g64 = conv2d_statistics(x, g, **kwargs, bias=bias, approx=approx)
    with numbers.context():
        a_mp, g_mp = conv2d_statistics(
            numbers.asarray(x), numbers.asarray(g), **kwargs, bias=bias, approx=approx
        )
        u_mp, gc_mp = kfac_factors(a_mp, g_mp)
    assert a_mp.dtype == object and isinstance(a_mp.flat[0], mpmath.mpf)
    a_mag, g_mag = conv2d_statistics(np.abs(x), np.abs(g), **kwargs, bias=bias, approx=approx)
    locations = out_shape[2] * out_shape[3]
    # rule: float64's error alone (mpmath's is 1e-50): sums of groups·locations terms + 2 roundings
    assert np.all(
        np.abs(a64 - numbers.to_float64(a_mp))
        <= matmul_bound(F64, case["groups"] * locations) * a_mag
    )
    assert np.all(np.abs(g64 - numbers.to_float64(g_mp)) <= matmul_bound(F64, locations) * g_mag)
    u64, gc64 = kfac_factors(a64, g64)
    # rule: one more product of reduction length n on top of the rows' error (chain, first order)
    n = a64.shape[0]
    u_bound = (matmul_bound(F64, n) + 2 * matmul_bound(F64, case["groups"] * locations)) * (
        a_mag.T @ a_mag
    )
    gc_bound = (matmul_bound(F64, n) + 2 * matmul_bound(F64, locations)) * (g_mag.T @ g_mag)
    assert np.all(np.abs(u64 - numbers.to_float64(u_mp)) <= u_bound)
    assert np.all(np.abs(gc64 - numbers.to_float64(gc_mp)) <= gc_bound)


# ---------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: linear_statistics(np.ones((2, 3, 4)), np.ones((2, 2, 5)), bias=False), "shared"),
        (lambda: linear_statistics(np.ones((2, 4)), np.ones((3, 5)), bias=False), "batch"),
        (lambda: linear_statistics(np.ones(4), np.ones(5), bias=False), "shape"),
        (
            lambda: linear_statistics(np.ones((2, 4)), np.ones((2, 5)), bias=False, approx="x"),
            "approx",
        ),
        (
            lambda: linear_statistics(
                np.ones((2, 4)), np.ones((2, 5)), bias=False, loss_average="mean"
            ),
            "loss_average",
        ),
        (
            lambda: conv2d_statistics(
                np.ones((2, 3, 4, 4)), np.ones((2, 4, 4, 4)), kernel_size=1, groups=2, bias=False
            ),
            "C_in=3 is not divisible by groups=2",
        ),
        (
            lambda: conv2d_statistics(
                np.ones((2, 4, 4, 4)), np.ones((2, 3, 4, 4)), kernel_size=1, groups=2, bias=False
            ),
            "C_out=3 is not divisible by groups=2",
        ),
        (
            lambda: conv2d_statistics(
                np.ones((2, 4, 4, 4)), np.ones((2, 4, 4, 4)), kernel_size=3, bias=False
            ),
            "output size",
        ),
        (
            lambda: conv2d_statistics(
                np.ones((2, 4, 4, 4)), np.ones((3, 4, 4, 4)), kernel_size=1, bias=False
            ),
            "batch sizes",
        ),
        (
            lambda: conv2d_statistics(
                np.ones((2, 4, 4, 4)),
                np.ones((2, 4, 2, 2)),
                kernel_size=1,
                stride=2,
                padding="same",
                bias=False,
            ),
            "stride 1",
        ),
        (
            lambda: conv2d_statistics(
                np.ones((2, 4, 4, 4)),
                np.ones((2, 4, 4, 4)),
                kernel_size=1,
                padding="full",
                bias=False,
            ),
            "padding string",
        ),
        (
            lambda: conv2d_statistics(
                np.ones((2, 4, 4)), np.ones((2, 4, 4)), kernel_size=1, bias=False
            ),
            "shapes",
        ),
        (lambda: extract_patches(np.ones((1, 1, 2, 2)), 3), "smaller than the dilated kernel"),
        (lambda: extract_patches(np.ones((1, 1, 2, 2)), 0), "kernel_size must be positive"),
        (lambda: resolve_padding(-1, 3), "non-negative"),
        (lambda: resolve_padding((1, 2, 3), 3), "padding must be an int or a pair"),
        (
            lambda: conv2d_forward(np.ones((1, 4, 3, 3)), np.ones((2, 3, 1, 1)), groups=2),
            "weight has 3 input channels",
        ),
    ],
)
def test_bad_input_raises_value_error(call, message: str) -> None:
    """Bad shapes and options raise a ``ValueError`` that names the problem."""
    with pytest.raises(ValueError, match=message):
        call()
