"""The hooks' power-of-two normalisation of ``G`` (SPEC §1.5, docs/SPEC.md deviation).

Claims checked: the largest diagonal entry of ``(2^k G)ᵀ(2^k G)`` lies in
``[1/4, 1)`` at any gradient scale (up to the rounding of the float32 Gram
product: ``matmul_bound(float32, n)`` relative); ``k`` shifts by exactly ``−j``
when the gradient is scaled by ``2^j``, and the normalised ``G`` keeps its bits;
it equals ``2^k`` times ``G`` formed the usual way, bitwise; passes with
different exponents are summed at the smaller one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singd import KFAC
from singd.optim import statistics
from singd.optim.kinds import kind_of, layer_grad_matrix
from tests.tolerances import EPS, matmul_bound

LAYERS = {
    "linear": (nn.Linear(5, 4), (6, 4)),
    "linear-sequence": (nn.Linear(5, 4), (3, 7, 4)),
    "conv": (nn.Conv2d(2, 3, 3), (2, 3, 4, 4)),
}


def _grad(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("log2_scale", [-100, -20, 0, 16, 100])
def test_largest_gram_diagonal_is_in_a_quarter_to_one(layer, approx, log2_scale):
    module, shape = LAYERS[layer]
    g = _grad(shape) * 2.0**log2_scale
    G, log2_factor = statistics.normalised_grad_matrix(
        kind_of(module).grad_shared(module, g),
        approx=approx,
        loss_average="batch",
        dtype=torch.float32,
    )
    largest = float(G.square().sum(dim=0).max())
    slack = matmul_bound(torch.float32, G.shape[0])  # rounding of the Gram diagonal
    assert 0.25 * (1 - slack) <= largest < 1 + slack
    assert int(log2_factor) % 2 == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_scale_free_and_equal_to_the_usual_G_times_a_power_of_two(layer, dtype):
    module, shape = LAYERS[layer]
    g = _grad(shape, seed=1)
    G, log2_factor = statistics.normalised_grad_matrix(
        kind_of(module).grad_shared(module, g), approx="expand", loss_average="batch", dtype=dtype
    )
    for j in (-12, 5, 16):  # scaled gradients: same bits, exponent shifted by exactly −2j
        G_scaled, log2_scaled = statistics.normalised_grad_matrix(
            kind_of(module).grad_shared(module, g * 2.0**j),
            approx="expand",
            loss_average="batch",
            dtype=dtype,
        )
        assert torch.equal(G, G_scaled) and int(log2_scaled) == int(log2_factor) - 2 * j
    usual = layer_grad_matrix(module, g.to(dtype), approx="expand", loss_average="batch")
    k = int(log2_factor) // 2  # exact: no entry of this G is subnormal or overflows in ``dtype``
    assert torch.equal(G, usual * 2.0**k)


def test_empty_batch_gives_exponent_zero():
    G, log2_factor = statistics.normalised_grad_matrix(
        torch.zeros(0, 1, 2),
        approx="expand",
        loss_average="batch",
        dtype=torch.float32,
    )
    assert G.shape == (0, 2) and int(log2_factor) == 0


def test_accumulated_passes_of_very_different_scales():
    """Two backward passes whose gradients differ by 2^4 (a sum loss scaled by hand): KFAC
    with ``lr_cov = 1`` keeps ``S_C = Gc = G1ᵀG1 + G2ᵀG2`` exactly as formed."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    opt = KFAC(model, T=1, lr_cov=1.0, loss_average=None)
    grads = []

    def record(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(lambda g: grads.append(g.double()))

    model.register_forward_hook(record)
    for seed, weight in ((0, 1.0), (1, 2.0**4)):
        model(_grad((8, 3), seed)).square().sum().mul(weight).backward()
    opt.step()
    expected = sum(g.T @ g for g in grads)
    magnitude = sum(g.abs().T @ g.abs() for g in grads)
    # each Gram product: matmul_bound(float32, 8) of |G|ᵀ|G|; the sum and the cast: 2 eps
    bound = (matmul_bound(torch.float32, 8) + 2 * EPS[torch.float32]) * magnitude
    error = (opt.layer_state("")["S_C"].double() - expected).abs()
    assert (error <= bound).all()
