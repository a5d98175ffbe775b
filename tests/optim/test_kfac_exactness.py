"""KFAC exactness: the torch ``KFAC`` factors give the exact GGN of deep linear networks.

For deep linear networks with MSE loss, KFAC-expand (weight sharing kept to
the output) and KFAC-reduce (shared dim averaged inside the network) are
exact (Eschenhagen et al. 2023; SPEC §1.1): the GGN block of every layer is
``U ⊗ Gc``.  The exact GGN ``Σ_t J_tᵀ (Λ_t / N) J_t`` comes from
``reference.fisher.exact_ggn`` (explicit backpropagation, float64).

Feeding the torch optimizer: KFAC's ``Gc`` for the exact GGN needs the
columns of ``R_t / N`` (``R_t R_tᵀ = Λ_t = 2I``) backpropagated, one backward
pass per output unit ``c``; the ``C = d_L`` passes are gradient accumulation,
so both ``U`` and ``Gc`` are sums over the passes (SPEC §1.1).  Every pass has
the same inputs, hence ``S_K = C · U`` while ``S_C = Σ_c Gc_c = Gc``: the
exact block is ``(S_K / C) ⊗ S_C``.  One KFAC step with ``β1 = 1`` (and
``T = 1``) sets ``S_K``, ``S_C`` to exactly these sums.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from reference.fisher import DeepLinearProblem, exact_ggn, ggn_backprop_vectors, layer_inputs
from reference.statistics import kfac_factors, linear_statistics
from singd import KFAC
from tests.tolerances import chain_bound
from verification.recording import to_numpy


class MeanOverPositions(nn.Module):
    """Average ``[B, S, d]`` over the shared dim ``S`` (the reduce setting's pooling)."""

    def forward(self, x: Tensor) -> Tensor:
        """``x.mean(dim=1)``."""
        return x.mean(dim=1)


def _problem(
    widths: tuple[int, ...],
    bias: tuple[bool, ...],
    shape: tuple[int, ...],
    loss_average: str | None,
    reduce_after: int | None,
    seed: int = 0,
) -> DeepLinearProblem:
    """A random float64 deep linear MSE problem with layer widths ``widths``."""
    rng = np.random.default_rng(seed)
    weights = [
        rng.standard_normal((d_out, d_in + has_bias)) / np.sqrt(d_in)
        for d_in, d_out, has_bias in zip(widths[:-1], widths[1:], bias, strict=True)
    ]
    x = rng.standard_normal((*shape, widths[0]))
    out_shape = (shape[0], widths[-1]) if reduce_after is not None else (*shape, widths[-1])
    return DeepLinearProblem(
        weights=weights,
        bias=bias,
        x=x,
        y=rng.standard_normal(out_shape),
        loss="mse",
        loss_average=loss_average,
        reduce_after=reduce_after,
    )


def _torch_model(problem: DeepLinearProblem) -> nn.Sequential:
    """The float64 torch network of ``problem`` (same weights, pooling after ``reduce_after``)."""
    layers: list[nn.Module] = []
    for index, (weight, has_bias) in enumerate(zip(problem.weights, problem.bias, strict=True)):
        d_out, d_in = weight.shape[0], weight.shape[1] - has_bias
        linear = nn.Linear(d_in, d_out, bias=has_bias, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight[:, :d_in]))
            if has_bias:
                linear.bias.copy_(torch.from_numpy(weight[:, d_in]))
        layers.append(linear)
        if index == problem.reduce_after:
            layers.append(MeanOverPositions())
    return nn.Sequential(*layers)


def _kfac_factors_after_exact_ggn_passes(
    problem: DeepLinearProblem, approx: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``(S_K, S_C)`` of every layer after one KFAC step fed one backward pass per output unit."""
    model = _torch_model(problem)
    optimizer = KFAC(
        model,
        lr=0.0,
        momentum=0.0,
        T=1,
        lr_cov=1.0,
        loss_average=problem.loss_average,
        kfac_approx=approx,
    )
    x = torch.from_numpy(problem.x)
    outputs_shape = model(x).shape
    units = outputs_shape[-1]
    optimizer.zero_grad()
    for unit in range(units):
        # Column c of R_t / N = sqrt(2) e_c / N from every output term at once.
        seed = torch.zeros(outputs_shape, dtype=torch.float64)
        seed[..., unit] = np.sqrt(2.0) / problem.loss_terms
        model(x).backward(seed)
    optimizer.step()
    return {
        name: (
            to_numpy(optimizer.layer_state(name)["S_K"]),
            to_numpy(optimizer.layer_state(name)["S_C"]),
        )
        for name in optimizer.layer_names()
    }


def _magnitudes(problem: DeepLinearProblem, approx: str) -> list[np.ndarray]:
    """``(|U| summed) ⊗ (|Gc|)`` of each layer: the same pipeline on ``|W|``, ``|x|`` (Higham)."""
    absolute = replace(problem, weights=[np.abs(w) for w in problem.weights], x=np.abs(problem.x))
    blocks = []
    for inputs, vectors, has_bias in zip(
        layer_inputs(absolute), ggn_backprop_vectors(absolute), absolute.bias, strict=True
    ):
        u_total, gc_total = 0.0, 0.0
        for pass_vectors in vectors:
            a, g = linear_statistics(
                inputs,
                pass_vectors,
                bias=has_bias,
                approx=approx,
                loss_average=absolute.loss_average,
            )
            u, gc = kfac_factors(a, g)
            u_total, gc_total = u_total + u, gc_total + gc
        blocks.append(np.kron(u_total / len(vectors), gc_total))
    return blocks


SETTINGS = {
    # name: (widths, bias, input shape, loss_average, reduce_after, approx)
    "no-sharing": ((4, 3, 3, 2), (True, False, True), (5,), "batch", None, "expand"),
    "expand-batch": ((3, 4, 2, 3), (False, True, True), (2, 3), "batch", None, "expand"),
    "expand-batch+sequence": ((3, 3, 2), (True, True), (2, 4), "batch+sequence", None, "expand"),
    "expand-sum": ((3, 2, 2), (True, False), (2, 3), None, None, "expand"),
    "reduce-last": ((3, 4, 2), (True, True), (3, 4), "batch", 1, "reduce"),
    "reduce-inside": ((3, 3, 2, 2), (False, True, True), (2, 3), "batch", 0, "reduce"),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_kfac_factors_equal_exact_ggn(setting: str) -> None:
    """``(S_K / C) ⊗ S_C`` equals the exact GGN block of every layer (float64)."""
    widths, bias, shape, loss_average, reduce_after, approx = SETTINGS[setting]
    problem = _problem(widths, bias, shape, loss_average, reduce_after)
    factors = _kfac_factors_after_exact_ggn_passes(problem, approx)
    exact = exact_ggn(problem)
    magnitudes = _magnitudes(problem, approx)
    units = widths[-1]
    rows = int(np.prod(shape))
    for (name, (s_k, s_c)), ggn, magnitude in zip(factors.items(), exact, magnitudes, strict=True):
        kfac_block = np.kron(s_k / units, s_c)
        # Both sides backpropagate through every layer (reduction ≤ max width each), average
        # or sum over the `rows` positions, form Gram products over `rows` rows and sum `units`
        # passes; bound relative to the same computation on |W|, |x|.
        lengths = [max(widths)] * (2 * len(widths)) + [rows] * 4 + [units] * 2
        bound = 2 * chain_bound(torch.float64, lengths) * magnitude
        assert np.all(np.abs(kfac_block - ggn) <= bound), name
        # The check is not vacuous: the block is far from zero relative to its bound.
        assert np.abs(ggn).max() > 1e6 * bound.max(), name


@pytest.mark.parametrize("setting", ["expand-batch", "reduce-inside"])
def test_wrong_approximation_is_caught(setting: str) -> None:
    """The check can fail: the other flavour (reduce ↔ expand) is far from the exact GGN."""
    widths, bias, shape, loss_average, reduce_after, approx = SETTINGS[setting]
    problem = _problem(widths, bias, shape, loss_average, reduce_after)
    other = "reduce" if approx == "expand" else "expand"
    factors = _kfac_factors_after_exact_ggn_passes(problem, other)
    (s_k, s_c), ggn = next(iter(factors.values())), exact_ggn(problem)[0]
    # An O(1) relative discrepancy, not a rounding effect.
    assert np.abs(np.kron(s_k / widths[-1], s_c) - ggn).max() > 1e-2 * np.abs(ggn).max()
