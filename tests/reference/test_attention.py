"""The oracle's MHA backward (:mod:`reference.attention`) against its own forward, numpy only.

The gradient of ``L = Σ out ⊙ Γ`` along a random direction ``D`` of each
projection weight, ``⟨Σ g aᵀ, D⟩`` from the oracle's rows, must equal the
central difference ``(L(W + hD) − L(W − hD)) / 2h`` of the oracle's forward.
Rule (a-posteriori, Richardson): the central difference's error is
``c h² + d h⁴ + …``, so at ``h/2`` it is ``|D(h) − D(h/2)| / 3`` times
``1 + O(h² d/c)`` (factor 2 allows ``|d/c| h² ≤ 1/2``, at ``h = 10⁻³``),
plus the rounding of the two forward evaluations, ``2 · γ · Σ|out ⊙ Γ| / h``
with ``γ = 64 eps`` (a forward's chain of products of length below 64,
relative to its magnitude).  A wrong backward is caught (``test_*_catch_*``).
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import attention
from reference.attention import AttentionParameters, additive_mask, attention_output

EPS = 2.0**-52
E, HEADS, B, L, S = 4, 2, 2, 3, 5


def _setup(seed: int = 0) -> tuple[AttentionParameters, tuple[np.ndarray, ...], np.ndarray]:
    rng = np.random.default_rng(seed)
    params = AttentionParameters(
        *(rng.standard_normal((E, d)) for d in (E, 3, 5, E)),
        *(rng.standard_normal(E) for _ in range(4)),
        HEADS,
        rng.standard_normal(E),
        rng.standard_normal(E),
        True,
    )
    inputs = (rng.standard_normal((B, L, E)), rng.standard_normal((B, S, 3)))
    inputs += (rng.standard_normal((B, S, 5)),)
    padding = np.zeros((B, S), dtype=bool)
    padding[0, -2:] = True
    mask = additive_mask(B, L, S, key_padding_mask=padding)
    return params, inputs, mask


def _ratios() -> dict[str, float]:
    """``|directional derivative − central difference| / bound`` per projection weight."""
    params, (query, key, value), mask = _setup()
    gamma = np.random.default_rng(1).standard_normal((B, L, E))
    rows = attention.projection_rows(params, query, key, value, gamma, mask)
    direction_rng = np.random.default_rng(2)
    ratios = {}
    for role, field in (("q", "w_q"), ("k", "w_k"), ("v", "w_v"), ("out_proj", "w_o")):
        weight = getattr(params, field)
        D = direction_rng.standard_normal(weight.shape)
        r = rows[role]
        analytic = float(np.einsum("bsi,bsj,ij->", r.grads, r.inputs, D))

        def loss(step: float, weight=weight, D=D, field=field) -> tuple[float, float]:
            moved = params._replace(**{field: weight + step * D})
            out = attention_output(moved, query, key, value, mask)
            return float((out * gamma).sum()), float(np.abs(out * gamma).sum())

        def central(h: float) -> tuple[float, float]:
            (up, mag_up), (down, mag_down) = loss(h), loss(-h)
            return (up - down) / (2 * h), max(mag_up, mag_down)

        h = 1e-3
        coarse, _ = central(h)
        fine, magnitude = central(h / 2)
        bound = abs(coarse - fine) / 3 * 2 + 2 * 64 * EPS * magnitude / (h / 2)
        ratios[role] = abs(analytic - fine) / bound
    return ratios


def test_backward_matches_central_differences() -> None:
    ratios = _ratios()
    assert max(ratios.values()) <= 1, ratios  # rule: module docstring


def test_central_differences_catch_a_wrong_softmax_backward(monkeypatch: pytest.MonkeyPatch):
    """Rows whose ``g`` of every projection but ``v`` is scaled by 1.01 (a slip in the
    softmax backward would scale them differently): caught for ``q`` and ``k``."""
    original = attention.projection_rows

    def slipped(*args, **kwargs):
        rows = original(*args, **kwargs)
        return {
            role: r._replace(grads=r.grads * 1.01) if role in ("q", "k") else r
            for role, r in rows.items()
        }

    monkeypatch.setattr(attention, "projection_rows", slipped)
    ratios = _ratios()
    assert ratios["q"] > 1 and ratios["k"] > 1
    assert ratios["v"] <= 1 and ratios["out_proj"] <= 1
