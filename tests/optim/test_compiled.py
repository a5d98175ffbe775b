"""The opt-in compiled parameter update (:mod:`singd.optim.compiled`) agrees with the eager one.

Rule (Higham, *Accuracy and Stability*, Lemma 3.1/3.3): an expression that is a
sum of products, evaluated with at most ``k`` roundings on the path of every
term, equals the exact value up to ``γ_k · S``, ``γ_k = k u / (1 − k u)``,
``u = eps / 2`` of the result's dtype, ``S`` the sum of the absolute terms.
Eager and compiled both satisfy it (inductor may contract a product and a sum
into one rounding and keeps intermediates in float32 or wider, which only
removes roundings; the update is elementwise, so nothing is reassociated
across entries), so they differ by at most ``2 γ_k S``.  Per entry, with
``α2 = momentum`` rounded to float32 (one more relative ``u`` on that term):

* ``m' = α2 m + ĝ + γ W``: ``k = 4`` (``γ W``, ``+ ĝ``, ``+ α2 m``, ``α2``'s rounding),
  ``S_m = |α2 m| + |ĝ| + |γ W|``;
* ``W' = W − β2 m'``: ``k = 6`` (``m'``'s four, ``β2 ×``, ``−``),
  ``S_W = |W| + β2 S_m``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singd import SINGD
from singd.optim.compiled import compile_parameter_updates, compiled_parameter_updates
from singd.optim.updates import momentum_parameter_updates
from tests.tolerances import EPS

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LR, MOMENTUM = 0.1, 0.9


@pytest.fixture(scope="module", autouse=True)
def _inductor_works() -> None:
    """Skip the module where inductor cannot build a CPU kernel (it needs a C++ compiler)."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(3))
    except Exception as error:  # any failure to build a kernel means: no inductor here
        pytest.skip(f"torch.compile's inductor backend does not work here: {error!r}")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    """Each test compiles afresh (past Dynamo's recompile limit of 8 it would run eagerly)."""
    torch._dynamo.reset()


def _compiled_frames() -> int:
    """Frames Dynamo has compiled so far (a test whose call ran eagerly would check nothing)."""
    return torch._dynamo.utils.counters["frames"]["ok"]


def _gamma(k: int, dtype: torch.dtype) -> float:
    """``γ_k = k u / (1 − k u)`` with ``u = eps(dtype) / 2``."""
    u = EPS[dtype] / 2
    return k * u / (1 - k * u)


def _assert_within(got: torch.Tensor, want: torch.Tensor, k: int, magnitude: torch.Tensor) -> None:
    """``|got − want| ≤ 2 γ_k · magnitude`` entrywise (module docstring)."""
    bound = 2 * _gamma(k, got.dtype) * magnitude
    excess = (got.double() - want.double()).abs() - bound
    assert excess.max() <= 0, f"exceeds 2γ_{k}·S by {excess.max().item():.3g} ({got.dtype})"


@pytest.mark.parametrize("dtypes", [[d] * 4 for d in DTYPES] + [DTYPES])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_compiled_update_agrees_with_eager(dtypes: list[torch.dtype], weight_decay: float) -> None:
    """One mixed-dtype group and one per dtype; 40 and 333 entries reach the vectorised loops."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (40,), (2, 3, 3), (333,)]

    def draw() -> list[torch.Tensor]:
        return [
            torch.randn(s, generator=generator).to(d) for s, d in zip(shapes, dtypes, strict=True)
        ]

    params, directions, buffers = draw(), draw(), draw()
    s_m = [
        MOMENTUM * m.double().abs() + g.double().abs() + weight_decay * w.double().abs()
        for w, g, m in zip(params, directions, buffers, strict=True)
    ]
    s_w = [w.double().abs() + LR * s for w, s in zip(params, s_m, strict=True)]
    eager_w, eager_m = [p.clone() for p in params], [m.clone() for m in buffers]
    kwargs = {"lr": LR, "momentum": MOMENTUM, "weight_decay": weight_decay}
    momentum_parameter_updates(eager_w, directions, eager_m, **kwargs)
    frames = _compiled_frames()
    compiled_parameter_updates()(params, directions, buffers, **kwargs)
    assert _compiled_frames() > frames
    for got, want, magnitude in zip(buffers, eager_m, s_m, strict=True):
        _assert_within(got, want, 4, magnitude)
    for got, want, magnitude in zip(params, eager_w, s_w, strict=True):
        _assert_within(got, want, 6, magnitude)


def test_an_optimizer_opted_in_runs_the_compiled_update():
    """First step (``m = 0``, ``γ = 0``): ``m' = ĝ``, so the eager twin's ``m'`` gives ``S``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    twin = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    inputs = torch.randn(8, 6)
    optimizers = [SINGD(m, lr=LR, momentum=MOMENTUM, T=1) for m in (model, twin)]
    compile_parameter_updates(optimizers[0])
    before = [p.detach().clone() for p in twin.parameters()]
    frames = _compiled_frames()
    for m, opt in zip((model, twin), optimizers, strict=True):
        m(inputs).square().mean().backward()
        opt.step()
    assert _compiled_frames() > frames
    for p, q, w in zip(model.parameters(), twin.parameters(), before, strict=True):
        m_c, m_e = (
            optimizers[0].state[p]["momentum_buffer"],
            optimizers[1].state[q]["momentum_buffer"],
        )
        _assert_within(m_c, m_e, 4, m_e.double().abs())
        _assert_within(p.detach(), q.detach(), 6, w.double().abs() + LR * m_e.double().abs())
    compile_parameter_updates(optimizers[0], enabled=False)
    assert optimizers[0]._compiled_parameter_updates is None
