"""``momentum_parameter_updates`` (foreach) equals the per-tensor SPEC §1.4 update bitwise."""

from __future__ import annotations

import pytest
import torch

from singd.optim.updates import momentum_parameter_updates

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtypes", [[d] * 4 for d in DTYPES] + [DTYPES, DTYPES[::-1]])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_foreach_update_is_the_per_tensor_update(
    dtypes: list[torch.dtype], weight_decay: float
) -> None:
    """One group may mix dtypes; 40-entry tensors reach the vectorised CPU kernels."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (2, 3, 3), (40,)]

    def draw() -> list[torch.Tensor]:
        return [
            torch.randn(s, generator=generator).to(d) for s, d in zip(shapes, dtypes, strict=True)
        ]

    params, directions, buffers = draw(), draw(), draw()
    expected_params, expected_buffers = [p.clone() for p in params], [b.clone() for b in buffers]
    for p, d, m in zip(expected_params, directions, expected_buffers, strict=True):
        d = d.add(p, alpha=weight_decay) if weight_decay else d  # ĝ += γ W
        m.mul_(0.9).add_(d)  # m ← α2 m + ĝ
        p.add_(m, alpha=-0.1)  # W ← W − β2 m
    momentum_parameter_updates(
        params, directions, buffers, lr=0.1, momentum=0.9, weight_decay=weight_decay
    )
    for got, want in zip([*params, *buffers], [*expected_params, *expected_buffers], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # same operations: same bits
