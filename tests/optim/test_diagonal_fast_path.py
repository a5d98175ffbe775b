"""``batched.diagonal_directions`` is bitwise :func:`singd_precondition` with diagonal factors."""

from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from singd import SINGD
from singd.optim.batched import diagonal_directions
from singd.optim.preconditioner import Preconditioner
from singd.optim.singd import SingdPreconditioner
from singd.optim.updates import singd_precondition
from singd.structures.diagonal import Diagonal

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@given(
    dtypes=st.tuples(*[st.sampled_from(DTYPES)] * 3),
    d_o=st.integers(1, 9),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(
    dtypes=(torch.float32, torch.bfloat16, torch.float16), d_o=3, shape=[2, 3, 3], bias=True, seed=0
)
def test_fast_path_is_the_generic_path(dtypes, d_o, shape, bias, seed) -> None:
    """Grad, ``K``, ``C`` dtypes drawn independently (mixed precision); conv-shaped weights."""
    grad_dtype, k_dtype, c_dtype = dtypes
    generator = torch.Generator().manual_seed(seed)
    weight_grad = torch.randn([d_o, *shape], generator=generator).to(grad_dtype)
    bias_grad = torch.randn(d_o, generator=generator).to(grad_dtype) if bias else None
    d_i = weight_grad[0].numel() + bias
    k = (1 + torch.randn(d_i, generator=generator) / 3).to(k_dtype)
    c = (1 + torch.randn(d_o, generator=generator) / 3).to(c_dtype)
    matrix = weight_grad.reshape(d_o, -1)  # ∇W~ = [∇W, ∇b] (SPEC §1)
    if bias:
        matrix = torch.cat([matrix, bias_grad.reshape(-1, 1)], dim=1)
    generic = singd_precondition(Diagonal(d_i, {"diag": k}), Diagonal(d_o, {"diag": c}), matrix)
    want_w = (generic[:, :-1] if bias else generic).reshape(weight_grad.shape)
    want_b = generic[:, -1] if bias else None
    [(got_w, got_b)] = diagonal_directions([k], [c], [weight_grad], [bias_grad] if bias else None)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=0)  # same operations: same bits
    if bias:
        torch.testing.assert_close(got_b, want_b, rtol=0, atol=0)
    else:
        assert got_b is None


def test_training_is_bitwise_the_generic_path(monkeypatch) -> None:
    """Five bf16 steps of a conv + linear model, with and without the fast path."""

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4)).bfloat16()
        opt = SINGD(model, T=1, structures=("diagonal", "diagonal"), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(5, 2, 4, 4).bfloat16()).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    fast = run()
    monkeypatch.setattr(SingdPreconditioner, "many_directions", Preconditioner.many_directions)
    for got, want in zip(fast, run(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
