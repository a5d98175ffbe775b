"""Layer kinds (singd.optim.kinds, SPEC-layers): statistics vs the oracle and vs autograd.

Two checks per kind and option:

* **Gradient identity** (SPEC-layers, "a kind is correct when"): in float64,
  with ``approx="expand"`` and a sum loss (``A = rows/sqrt(n)``, ``G = rows``),
  ``sqrt(n) · GᵀA`` must equal the ``∇W~`` autograd computed.  The oracle's
  ``A`` (its own patches / one-hot rows) enters, the implementation's ``G``.
  Rule: a product of reduction length ``n`` → ``matmul_bound(float64, n)``
  times ``Σ |g||a|`` (Higham Thm. 3.5; autograd's own product has the same
  bound, so twice that).
* **Statistics vs the oracle** in every dtype: the implementation's ``A``
  (or ``diag(AᵀA)``) and ``G`` from inputs rounded to the dtype, the
  oracle's from the same values in float64.  Rule: an entry of ``A`` is a
  mean of ``groups`` inputs (expand) or ``groups·S`` (reduce) divided by
  ``sqrt(n)``, an entry of ``G`` a sum of ``S`` gradients times ``sqrt(N)``;
  error ≤ ``matmul_bound(dtype, r) · magnitude`` with ``r`` that length.
  ``diag(AᵀA)`` of an embedding is a count (exact) divided by ``n`` (one
  rounding), or a sum over the batch of squared per-sample means (``r = B + 2``).

Each check is shown to catch a wrong variant (``test_*_catches_*``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn
from torch.distributed.fsdp import FSDPModule

from reference.statistics import conv_statistics, embedding_statistics, linear_statistics
from singd.optim.kinds import (
    ConvKind,
    EmbeddingKind,
    InputGramDiagonal,
    LinearKind,
    kind_of,
    layer_grad_matrix,
    layer_input_statistic,
)
from tests.tolerances import matmul_bound

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# ------------------------------------------------------------------ helpers
def _oracle_conv(conv: nn.Module, x: torch.Tensor, g: torch.Tensor, **settings):
    return conv_statistics(
        x.double().numpy(),
        g.double().numpy(),
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        **settings,
    )


def _oracle_embedding(embedding: nn.Embedding, idx: torch.Tensor, g: torch.Tensor, **settings):
    return embedding_statistics(
        idx.numpy(),
        g.double().numpy(),
        num_embeddings=embedding.num_embeddings,
        padding_idx=embedding.padding_idx,
        **settings,
    )


def _output_grad(module: nn.Module, inputs: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """A random output gradient, and ``∇W~`` autograd computes for the loss ``⟨out, g⟩``."""
    out = module(inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
    grads = torch.autograd.grad(out, params, g)
    kind = kind_of(module)
    matrix = kind.weight_matrix(grads[0])
    if len(grads) == 2:
        matrix = torch.cat([matrix, grads[1].reshape(-1, 1)], dim=1)
    return g, matrix


def identity_ratio(module: nn.Module, inputs: torch.Tensor, oracle, grad_rows=None) -> float:
    """``max |sqrt(n)·GᵀA − ∇W~| / bound`` (module docstring) in float64; ≤ 1 passes.

    ``oracle`` gives ``A``; ``G`` is the implementation's (``grad_rows(G)``
    may rearrange it: the mutants).
    """
    g, grad_matrix = _output_grad(module, inputs, seed=1)
    A, _ = oracle(module, inputs, g, approx="expand", loss_average=None)
    G = layer_grad_matrix(module, g, approx="expand", loss_average=None)
    G = (G if grad_rows is None else grad_rows(G)).numpy()
    n = A.shape[0]
    reconstructed = math.sqrt(n) * G.T @ A
    magnitude = math.sqrt(n) * np.abs(G).T @ np.abs(A)
    bound = 2 * matmul_bound(torch.float64, n) * magnitude
    error = np.abs(reconstructed - grad_matrix.numpy())
    return float(np.max(error / np.maximum(bound, np.finfo(np.float64).tiny)))


def _assert_within(actual: torch.Tensor, expected: np.ndarray, dtype, reduction, magnitude):
    """``|actual − expected| ≤ matmul_bound(dtype, reduction) · magnitude`` entrywise."""
    assert tuple(actual.shape) == expected.shape
    error = np.abs(actual.double().numpy() - expected)
    assert (error <= matmul_bound(dtype, reduction) * magnitude).all()  # rule: module docstring


# ------------------------------------------------------------ convolutions
CONV_SETTINGS = st.fixed_dictionaries(
    {
        "rank": st.sampled_from([1, 2, 3]),
        "groups": st.sampled_from([1, 2]),
        "kernel": st.integers(1, 3),
        "stride": st.integers(1, 2),
        "dilation": st.integers(1, 2),
        "padding": st.sampled_from([0, 1, "valid"]),
        "bias": st.booleans(),
    }
)


def _conv(rank, groups, kernel, stride, dilation, padding, bias, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return CONVS[rank](
        2 * groups,
        groups,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        dtype=dtype,
        **kw,
    )


def _conv_input(conv: nn.Module, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    rank = len(conv.kernel_size)
    size = {1: (7,), 2: (6, 5), 3: (5, 5, 5)}[rank]  # at least the dilated kernel, 5
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, conv.in_channels, *size, generator=gen).to(dtype)


@given(settings=CONV_SETTINGS)
@example(settings=dict(rank=3, groups=1, kernel=2, stride=2, dilation=1, padding=1, bias=True))
def test_conv_gradient_identity(settings):
    """Conv1d/2d/3d (groups = 1 so that patches are not averaged): sqrt(n)·GᵀA = ∇W~."""
    conv = _conv(**{**settings, "groups": 1})
    assert identity_ratio(conv, _conv_input(conv, torch.float64), _oracle_conv) <= 1


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
def test_conv_same_padding_and_padding_modes(rank, padding_mode):
    """``padding='same'`` with an even kernel (asymmetric) and every padding mode.

    The oracle pads with zeros, so for the other modes its ``A`` is taken on
    the input the module really convolves (padded by torch, then 'valid').
    """
    conv = _conv(rank, 1, 2, 1, 1, "same", True, padding_mode=padding_mode)
    x = _conv_input(conv, torch.float64)
    if padding_mode == "zeros":
        assert identity_ratio(conv, x, _oracle_conv) <= 1
        return
    padded = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=padding_mode)

    def oracle(module, inputs, g, **settings):
        return conv_statistics(
            padded.numpy(),
            g.numpy(),
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding="valid",
            dilation=module.dilation,
            bias=True,
            **settings,
        )

    assert identity_ratio(conv, x, oracle) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@given(settings=CONV_SETTINGS, approx=st.sampled_from(["expand", "reduce"]))
def test_conv_statistics_match_oracle(dtype, settings, approx):
    """Every rank, groups, stride, dilation, padding, bias, expand/reduce, in every dtype."""
    conv = _conv(**settings, dtype=dtype)
    x = _conv_input(conv, dtype)
    g = torch.randn(conv(x).shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    A = layer_input_statistic(conv, x, approx=approx)
    G = layer_grad_matrix(conv, g, approx=approx, loss_average="batch")
    A_ref, G_ref = _oracle_conv(conv, x, g, approx=approx, loss_average="batch")
    locations = math.prod(g.shape[2:])
    shared = locations if approx == "reduce" else 1
    scale_a = 1 / math.sqrt(A_ref.shape[0])
    _assert_within(A, A_ref, dtype, conv.groups * shared, (float(x.abs().max()) + 1) * scale_a)
    magnitude_g = shared * float(g.abs().max()) * math.sqrt(g.shape[0])
    _assert_within(G, G_ref, dtype, shared, magnitude_g)


class _ConvChannelsInner(ConvKind):
    """A wrong patch code: columns in ``(k_1, …, k_r, c)`` order instead of the weight's."""

    def input_shared(self, module, x):
        patches = super().input_shared(module, x)
        channels = module.in_channels // module.groups
        split = patches.reshape(*patches.shape[:2], channels, -1)
        return split.transpose(2, 3).reshape(patches.shape)


def test_conv_checks_catch_wrong_patches_and_rows():
    """The oracle comparison fails for a wrong column order; the identity for shuffled rows."""
    conv = _conv(3, 1, 2, 1, 1, 1, True)
    x = _conv_input(conv, torch.float64)
    g = torch.randn(conv(x).shape, dtype=torch.float64)
    wrong = _ConvChannelsInner().input_statistic(
        conv, x, approx="expand", bias=True, dtype=torch.float64
    )
    A_ref, _ = _oracle_conv(conv, x, g, approx="expand", loss_average="batch")
    with pytest.raises(AssertionError):
        _assert_within(wrong, A_ref, torch.float64, 1, float(x.abs().max()) + 1)
    assert identity_ratio(conv, x, _oracle_conv, grad_rows=lambda G: G.flip(0)) > 1


# ---------------------------------------------------------------- embeddings
EMBEDDING_CASES = st.fixed_dictionaries(
    {
        "vocab": st.integers(1, 6),
        "dim": st.integers(1, 3),
        "shape": st.sampled_from([(4,), (2, 3), (2, 2, 2)]),
        "padding_idx": st.sampled_from([None, 0, -1]),
        "seed": st.integers(0, 2**16),
    }
)


def _embedding(vocab, dim, padding_idx, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Embedding(vocab, dim, padding_idx=padding_idx, dtype=dtype)


def _indices(vocab, shape, seed):
    """Indices with repeats (more positions than tokens) and the padding index among them."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, shape, generator=gen)
    idx.view(-1)[0] = 0
    return idx


@given(case=EMBEDDING_CASES)
@example(case=dict(vocab=3, dim=2, shape=(2, 3), padding_idx=0, seed=0))
def test_embedding_gradient_identity(case):
    """``∇(Wᵀ) = Σ g e_idxᵀ`` with zero rows at ``padding_idx`` (torch gives it no gradient)."""
    embedding = _embedding(case["vocab"], case["dim"], case["padding_idx"])
    idx = _indices(case["vocab"], case["shape"], case["seed"])
    assert identity_ratio(embedding, idx, _oracle_embedding) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@given(case=EMBEDDING_CASES)
def test_embedding_statistics_match_oracle(dtype, approx, case):
    """``diag(AᵀA)`` from counts equals the oracle's one-hot ``AᵀA`` diagonal; no ``V × V``.

    Expand: the oracle's ``AᵀA`` is diagonal (checked exactly: one-hot rows).
    """
    embedding = _embedding(case["vocab"], case["dim"], case["padding_idx"], dtype)
    idx = _indices(case["vocab"], case["shape"], case["seed"])
    g = torch.randn(embedding(idx).shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    statistic = layer_input_statistic(embedding, idx, approx=approx)
    assert isinstance(statistic, InputGramDiagonal)
    assert statistic.diagonal.shape == (case["vocab"],) and statistic.diagonal.dtype == dtype
    A_ref, G_ref = _oracle_embedding(embedding, idx, g, approx=approx, loss_average="batch")
    gram = A_ref.T @ A_ref
    if approx == "expand":
        assert np.array_equal(gram, np.diag(np.diag(gram)))  # exact: one-hot rows
    batch = idx.shape[0]
    reduction = 1 if approx == "expand" else batch + 2
    _assert_within(statistic.diagonal, np.diag(gram), dtype, reduction, np.diag(gram).max())
    G = layer_grad_matrix(embedding, g, approx=approx, loss_average="batch")
    positions = idx[0].numel()
    shared = positions if approx == "reduce" else 1
    magnitude_g = shared * float(g.abs().max()) * math.sqrt(batch)
    _assert_within(G, G_ref, dtype, shared, magnitude_g)


class _EmbeddingCountingPadding(EmbeddingKind):
    """A wrong statistic: padding positions counted as tokens."""

    def input_statistic(self, module, x, **kwargs):
        class Unpadded:
            num_embeddings = module.num_embeddings
            padding_idx = None

        return super().input_statistic(Unpadded(), x, **kwargs)


def test_embedding_checks_catch_counted_padding():
    """Both checks fail when padding positions count as tokens (statistic or oracle rows)."""
    embedding = _embedding(4, 2, padding_idx=0)
    idx = torch.tensor([[0, 0, 1], [2, 0, 3]])
    g = torch.randn(2, 3, 2, dtype=torch.float64)
    A_ref, _ = _oracle_embedding(embedding, idx, g, approx="expand", loss_average="batch")
    wrong = _EmbeddingCountingPadding().input_statistic(
        embedding, idx, approx="expand", bias=False, dtype=torch.float64
    )
    with pytest.raises(AssertionError):
        _assert_within(wrong.diagonal, np.diag(A_ref.T @ A_ref), torch.float64, 1, 1.0)

    def unpadded_oracle(module, inputs, g, **settings):
        return embedding_statistics(
            inputs.numpy(), g.numpy(), num_embeddings=module.num_embeddings, **settings
        )

    assert identity_ratio(embedding, idx, unpadded_oracle) > 1


def test_embedding_options_that_change_the_form_fall_back():
    assert EmbeddingKind().unsupported_reason(nn.Embedding(3, 2, max_norm=1.0))
    assert EmbeddingKind().unsupported_reason(nn.Embedding(3, 2, scale_grad_by_freq=True))
    assert EmbeddingKind().unsupported_reason(nn.Embedding(3, 2, sparse=True))
    assert EmbeddingKind().unsupported_reason(nn.Embedding(3, 2)) is None


# -------------------------------------------------------------------- linear
def test_linear_subclasses_keep_the_linear_kind():
    """``NonDynamicallyQuantizableLinear`` (and any subclass keeping ``forward``) is Linear."""
    out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(3, 2, dtype=torch.float64)
    assert isinstance(kind_of(out_proj), LinearKind)
    x = torch.randn(2, 4, 3, dtype=torch.float64)

    def oracle(module, inputs, g, **settings):
        return linear_statistics(inputs.numpy(), g.numpy(), bias=True, **settings)

    assert identity_ratio(out_proj, x, oracle) <= 1

    class Overriding(nn.Linear):
        def forward(self, x):
            return super().forward(x).relu()

    fsdp_class = type("FSDPLinear", (FSDPModule, nn.Linear), {})  # as fully_shard makes it
    sharded = nn.Linear(3, 2)
    sharded.__class__ = fsdp_class
    assert isinstance(kind_of(sharded), LinearKind)
    assert kind_of(Overriding(3, 2)) is None
    assert kind_of(nn.Bilinear(2, 2, 2)) is None
    assert kind_of(nn.ConvTranspose2d(2, 2, 3)) is None
