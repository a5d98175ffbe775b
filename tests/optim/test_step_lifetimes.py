"""What a statistics step keeps alive while it forms the directions (the heap it needs).

The step is all or nothing, so old and new factors coexist until the commit;
the statistics and the factor steps' inputs (``Π̂(KᵀK)``) need not: they are
released before the directions are formed, whose products then reuse that
memory instead of growing the heap (which glibc trims after every step, so
that the next step page-faults it back: measured 2 700 faults, about 11 ms,
per step of the dense 6 × 512 MLP before).  The factor step writes
``K − β1·K·m`` into the product's storage (no third ``d × d`` buffer), and
the new ``m_C`` is formed in the gradient summary's storage.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import singd.optim.plan as plan
from singd import SINGD


@pytest.mark.parametrize(
    ("structure", "batched"), [("dense", False), ("diagonal", True), ("block3diagonal", False)]
)
def test_statistics_are_released_before_the_directions(
    structure: str, batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule: exact: when ``directions`` starts, no statistic tensor of the step is alive
    except the gradient summaries, each now the storage of its layer's new ``m_C``
    (none for diagonal layers, which step stacked: :mod:`singd.optim.batched`)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = SINGD(model, T=1, structures=(structure, structure))
    nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 3)).backward()
    pending = opt._collector._pending
    assert len(pending) == 2
    alive = [
        weakref.ref(t)
        for stats in pending.values()
        for side in stats.summary_tensors()
        for t in side
    ]
    grad_tensors = sum(len(stats.summary_tensors()[1]) for stats in pending.values())
    del pending
    seen: list[int] = []
    reused: list[int] = []
    original = plan.directions

    def checking(context, grads, states):  # type: ignore[no-untyped-def]
        gc.collect()
        momenta = {id(t) for state in states.values() for t in state["m_C"].storage.values()}
        seen.append(sum(ref() is not None and id(ref()) not in momenta for ref in alive))
        reused.append(sum(ref() is not None and id(ref()) in momenta for ref in alive))
        return original(context, grads, states)

    monkeypatch.setattr(plan, "directions", checking)
    opt.step()
    assert seen == [0]
    assert reused == [0 if batched else grad_tensors]


def test_factor_step_writes_into_the_product() -> None:
    """``singd_factor_step`` is bitwise ``K.add(K m, −β1)``, with one ``d × d`` result only.

    Rule: exact: the operators that make a new ``d × d`` tensor are the product alone
    (the sum goes into its storage, ``add.out``), and the result equals the reference.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from singd.optim.updates import singd_factor_step
    from singd.structures import get_structure

    dense = get_structure("dense")
    generator = torch.Generator().manual_seed(1)
    K = dense.from_dense(torch.randn(9, 9, generator=generator))
    m = dense.from_dense(torch.randn(9, 9, generator=generator))
    reference = K.add(K @ m, alpha=-0.3)
    made: list[str] = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if "out" not in (kwargs or {}) and isinstance(out, torch.Tensor) and out.numel() == 81:
                made.append(str(func))
            return out

    with Allocations():
        new = singd_factor_step(K, m, 0.3)
    assert torch.equal(new.to_dense(), reference.to_dense())
    assert made == ["aten.mm.default"]
