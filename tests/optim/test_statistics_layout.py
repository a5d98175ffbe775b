"""One-pass statistics (issue 9): the same bits as the direct formulas, in either layout.

``input_matrix`` and ``grad_matrix`` write their result in one pass in the
layout of the input's features (row-major for a Linear, feature-major for a
Conv's patches and output gradients), and ``normalised_grad_matrix`` reuses
its measuring pass.  Each is compared *bitwise* with the direct formula it
replaces (``cat`` with ones, then ``/ sqrt(n)``; ``G · sqrt(N)`` of a
row-major copy; ``G`` of ``2^k g`` formed the usual way): every entry is the
same single elementwise operation on the same operands (``2^k`` a power of
two, exact away from subnormals, which the data here avoid).

The diagonal ``project_inner`` (``k² ⊙ rowsum(X²)`` in float32/float64) is
compared with the dense ``Π̂(Kᵀ X Xᵀ K)`` in float64 with a derived bound:
both sides compute a sum of ``m`` nonnegative terms with at most ``m + 3``
roundings per entry, so each is within ``γ_{m+3}`` (relative) of the exact
value and they differ by at most ``2 γ_{m+3}`` of it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from singd.optim import statistics
from singd.structures import get_structure


def _direct_input_matrix(shared: torch.Tensor, approx: str, bias: bool) -> torch.Tensor:
    rows = shared.reshape(-1, shared.shape[-1]) if approx == "expand" else shared.mean(dim=1)
    if bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows / math.sqrt(rows.shape[0])


def _direct_grad_matrix(shared: torch.Tensor, approx: str, loss_average) -> torch.Tensor:
    batch, positions, _ = shared.shape
    rows = shared.reshape(-1, shared.shape[-1]) if approx == "expand" else shared.sum(dim=1)
    return rows * math.sqrt(statistics.loss_terms(batch, positions, loss_average))


def _shared(batch: int, positions: int, features: int, feature_major: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if feature_major:  # a Conv's layout: a [features, B, S] tensor seen as [B, S, features]
        return torch.randn(features, batch, positions, generator=generator).permute(1, 2, 0)
    return torch.randn(batch, positions, features, generator=generator)


SHAPES = dict(
    batch=st.integers(1, 5),
    positions=st.integers(1, 6),
    features=st.integers(1, 7),
    feature_major=st.booleans(),
    approx=st.sampled_from(["expand", "reduce"]),
    seed=st.integers(0, 2**16),
)


@given(bias=st.booleans(), **SHAPES)
@example(bias=True, batch=2, positions=3, features=4, feature_major=True, approx="expand", seed=0)
def test_input_matrix_is_the_direct_formula(
    bias, batch, positions, features, feature_major, approx, seed
):
    shared = _shared(batch, positions, features, feature_major, seed)
    A = statistics.input_matrix(shared, approx=approx, bias=bias)
    assert torch.equal(A, _direct_input_matrix(shared, approx, bias))
    if approx == "expand" and feature_major and features > 1:
        assert A.T.is_contiguous()  # written in the features' layout


@given(loss_average=st.sampled_from(["batch", "batch+sequence", None]), **SHAPES)
@example(
    loss_average="batch",
    batch=2,
    positions=3,
    features=4,
    feature_major=True,
    approx="expand",
    seed=0,
)
def test_grad_matrix_is_the_direct_formula(
    loss_average, batch, positions, features, feature_major, approx, seed
):
    shared = _shared(batch, positions, features, feature_major, seed)
    G = statistics.grad_matrix(shared, approx=approx, loss_average=loss_average)
    assert torch.equal(G, _direct_grad_matrix(shared, approx, loss_average))


@given(
    loss_average=st.sampled_from(["batch", "batch+sequence", None]),
    magnitude=st.integers(-60, 60),
    **SHAPES,
)
@example(
    loss_average="batch",
    magnitude=40,
    batch=3,
    positions=2,
    features=5,
    feature_major=True,
    approx="expand",
    seed=1,
)
def test_normalised_grad_matrix_is_g_of_the_scaled_gradient(
    loss_average, magnitude, batch, positions, features, feature_major, approx, seed
):
    """``2^k G`` reused from the measuring pass is ``G`` of ``2^k g`` formed directly, and
    its largest squared column norm lies in ``[1/4, 1)`` (``k`` from the direct ``G``)."""
    shared = _shared(batch, positions, features, feature_major, seed) * 2.0**magnitude
    G, log2_factor = statistics.normalised_grad_matrix(
        shared, approx=approx, loss_average=loss_average, dtype=torch.float32
    )
    k = int(log2_factor) // 2
    assert torch.equal(G, _direct_grad_matrix(shared * 2.0**k, approx, loss_average))
    assert 0.25 <= float(G.square().sum(dim=0).max()) < 1


@given(
    wide=st.sampled_from([torch.float32, torch.float64]),
    dtype=st.sampled_from([None, torch.bfloat16, torch.float16]),
    magnitude=st.sampled_from([-140, -60, -10, 0, 10, 60, 120]),
    loss_average=st.sampled_from([None, "batch", "batch+sequence"]),
    empty=st.booleans(),
    special=st.sampled_from([None, float("inf"), float("nan")]),
    **SHAPES,
)
@example(  # float32 gradients near the bottom of the range: j and k clamped
    wide=torch.float32,
    dtype=None,
    magnitude=-140,
    loss_average="batch",
    empty=False,
    special=None,
    batch=2,
    positions=3,
    features=4,
    feature_major=False,
    approx="expand",
    seed=0,
)
@example(  # float64 far above float32's range: 2^j beyond float32's exponents
    wide=torch.float64,
    dtype=torch.bfloat16,
    magnitude=120,
    loss_average=None,
    empty=False,
    special=None,
    batch=3,
    positions=2,
    features=5,
    feature_major=True,
    approx="reduce",
    seed=2,
)
def test_host_and_device_exponents_agree(
    wide, dtype, magnitude, loss_average, empty, special,
    batch, positions, features, feature_major, approx, seed,
):  # fmt: skip
    """The CPU's host arithmetic for ``j``, ``k`` (Python ints) and the device's 0-dim
    tensors give the same ``G`` and ``2k``.

    Rule: bitwise (``G`` with NaNs in the same places) and exact exponents, for
    float32/float64 gradients of magnitudes ``2^-140 … 2^120`` (clamped ``j``, ``k``,
    subnormal float32 entries), an empty batch and inf/NaN entries.
    """
    shared = _shared(0 if empty else batch, positions, features, feature_major, seed)
    shared = (shared.double() * 2.0**magnitude).to(wide)
    if special is not None and shared.numel():
        shared[0, 0, 0] = special
    target = wide if dtype is None else dtype
    results = [
        statistics.normalised_grad_matrix(
            shared, approx=approx, loss_average=loss_average, dtype=target, on_host=on_host
        )
        for on_host in (True, False)
    ]
    (host_G, host_log2), (device_G, device_log2) = results
    assert host_log2.dtype == device_log2.dtype == torch.int32
    assert int(host_log2) == int(device_log2)
    assert torch.equal(host_G.isnan(), device_G.isnan())
    assert torch.equal(host_G.nan_to_num(0.0), device_G.nan_to_num(0.0))


def test_a_wrong_scale_is_caught() -> None:
    """The bitwise comparison sees one rounding placed differently: ``rows · (1/sqrt(n))``
    for ``rows / sqrt(n)`` (n = 3)."""
    shared = _shared(3, 1, 6, True, 0)
    rows = torch.cat([shared.reshape(-1, 6), torch.ones(3, 1)], dim=1)
    A = statistics.input_matrix(shared, approx="expand", bias=True)
    assert torch.equal(A, rows / math.sqrt(3))
    assert not torch.equal(A, rows * (1 / math.sqrt(3)))


def _gamma(n: int, dtype: torch.dtype) -> float:
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("transposed", (False, True))
def test_diagonal_project_inner_is_the_projection(dtype, transposed) -> None:
    """``k² ⊙ rowsum(X²)`` against ``diag(Kᵀ X Xᵀ K)`` in float64 within ``2 γ_{m+3}`` (module
    docstring); ``k`` for ``k²`` is caught."""
    generator = torch.Generator().manual_seed(0)
    d, m = 9, 50
    k = torch.rand(d, generator=generator, dtype=torch.float64) + 0.5
    x = (
        torch.randn(m, d, generator=generator, dtype=torch.float64).T
        if transposed
        else (torch.randn(d, m, generator=generator, dtype=torch.float64))
    )
    K = get_structure("diagonal").from_dense(torch.diag(k).to(dtype))
    result = K.project_inner(x.to(dtype)).to_dense().diagonal().double()
    kd, xd = K.to_dense().double(), x.to(dtype).double()
    exact = (kd.T @ xd @ xd.T @ kd).diagonal()
    bound = 2 * _gamma(m + 3, dtype) * exact
    assert bool(((result - exact).abs() <= bound).all())
    wrong = (kd.diagonal() * (xd * xd).sum(dim=1)).to(dtype).double()
    assert not bool(((wrong - exact).abs() <= bound).all())


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_diagonal_project_inner_keeps_the_emulated_order_in_half(dtype) -> None:
    """In half precision the order is ``rowsum(fl(k ⊙ X)²)``, bitwise ``project_gram(Kᵀ X)``
    (the order the emulated oracle rounds in; verification/emulated.py)."""
    generator = torch.Generator().manual_seed(0)
    K = get_structure("diagonal").from_dense(torch.diag(torch.rand(9, generator=generator) + 0.5))
    K = K.to(dtype)
    x = torch.randn(9, 40, generator=generator).to(dtype)
    expected = type(K).project_gram(K.t_matmul(x))
    assert torch.equal(K.project_inner(x).storage["diag"], expected.storage["diag"])


@given(
    wide=st.sampled_from([torch.float32, torch.float64]),
    magnitude=st.sampled_from([-60, -10, 0, 10, 60]),
    loss_average=st.sampled_from([None, "batch", "batch+sequence"]),
    on_host=st.booleans(),
    **SHAPES,
)
@example(
    wide=torch.float32, magnitude=0, loss_average="batch", on_host=True,
    batch=3, positions=4, features=5, feature_major=True, approx="expand", seed=3,
)  # fmt: skip
def test_grad_gram_diagonal_is_the_diagonal_summary_of_G(
    wide, magnitude, loss_average, on_host, batch, positions, features, feature_major, approx,
    seed,
):  # fmt: skip
    """A diagonal ``C``'s summary from ``diag(GᵀG)`` (the measuring pass's column squares
    times ``2^(2(k − j))``) is the one ``project_inner`` forms from the normalised ``G``.

    Rule: bitwise, and the same ``2k``: the same reduction over the same layout, and a
    power of two moves exactly through squares and sums (no subnormals in this data).
    """
    shared = (_shared(batch, positions, features, feature_major, seed) * 2.0**magnitude).to(wide)
    options = {"approx": approx, "loss_average": loss_average, "on_host": on_host}
    G, log2_factor = statistics.normalised_grad_matrix(shared, dtype=wide, **options)
    diagonal, log2_gram = statistics.normalised_grad_gram_diagonal(shared, **options)
    assert int(log2_gram) == int(log2_factor)
    c = torch.randn(features, generator=torch.Generator().manual_seed(seed), dtype=wide)
    C = get_structure("diagonal").from_storage(features, {"diag": c})
    from_G = C.project_inner(G.T).storage["diag"]
    assert torch.equal((c * c) * diagonal, from_G)


def test_a_diagonal_C_run_is_the_same_with_the_gram_path(monkeypatch) -> None:
    """End to end: SINGD with diagonal factors takes the same steps, bitwise, with the hook's
    ``diag(GᵀG)`` path as with ``G`` itself (``grad_gram_diagonal`` forced off)."""
    from torch import nn

    from singd import SINGD
    from singd.optim.singd import SingdPreconditioner

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        opt = SINGD(model, T=1, structures=("diagonal", "diagonal"), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 3)).backward()
            opt.step()
        factors = [c.to_dense() for c in opt.Cs.values()]
        return [p.detach().clone() for p in model.parameters()] + factors

    fast = run()
    monkeypatch.setattr(SingdPreconditioner, "grad_gram_diagonal", lambda self, state: False)
    slow = run()
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_a_feature_major_gradient_is_measured_without_a_copy() -> None:
    """The measuring pass reduces a Conv's permuted output gradient through its memory
    order (``aminmax`` copies strided input first).

    Rule: exact: no ``clone``/``copy_`` of the full ``[4, 30, 6]`` gradient runs (profiler).
    """
    shared = _shared(4, 30, 6, True, 0)
    assert not shared.is_contiguous()
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, record_shapes=True) as profiler:
        statistics.normalised_grad_matrix(
            shared, approx="expand", loss_average="batch", dtype=torch.float32
        )
    full_size = [
        event.name
        for event in profiler.events()
        if any(sorted(shape) == [4, 6, 30] for shape in event.input_shapes or [])
    ]
    assert "aten::aminmax" in full_size
    assert not set(full_size) & {"aten::clone", "aten::contiguous", "aten::copy_"}
