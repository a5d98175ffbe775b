"""The batched diagonal factor step and directions are bitwise the per-layer ones.

:mod:`singd.optim.batched` stacks same-shaped diagonal layers and steps them
together.  Its claim is exact: every entry sees the operations of the
per-layer path (:func:`~singd.optim.updates.singd_update_factors`,
:func:`~singd.optim.updates.diagonal_precondition`) in the same order and
dtypes.  So the check is equality of bits, in every dtype and mode, against
the same run with batching switched off; the tolerance is zero because the
analysis says the two computations are the same floating-point operations.
A wrong variant (rows of a batch mixed up) is caught in float32 and bfloat16
below, and the batch's own launch count is checked exactly.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from singd import SINGD
from singd.optim import batched
from singd.optim.preconditioner import Preconditioner
from singd.optim.singd import SingdPreconditioner
from tests.optim.nested import same_state, state_snapshot

#: (model dtype, factor dtype, factor_guard).
PRECISIONS = (
    (torch.float32, torch.float32, "compensated"),
    (torch.float64, torch.float64, "compensated"),
    (torch.float32, torch.bfloat16, "compensated"),
    (torch.float32, torch.float16, "compensated"),
    (torch.float32, torch.bfloat16, None),
    (torch.bfloat16, torch.bfloat16, "compensated"),
)
#: Optimizer modes: (alpha1, kfac_like, normalize_lr_cov, damping).
MODES = (
    (0.5, False, False, 1e-3),
    (0.0, False, False, 1e-3),
    (0.0, True, False, 1e-3),
    (0.5, False, True, 1e-3),
    (0.3, False, False, 1e-7),  # p < 1: the scaled self-inner products
    (0.0, True, True, 1e-7),
)


class _Net(nn.Module):
    """Three 5 → 5 Linear (two with bias: one batch, one single), a conv and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.c = nn.Linear(5, 5, bias=False)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))
        x = torch.tanh(self.conv(x.unsqueeze(1))).flatten(1)
        return self.head(x)


def _run(
    precision: tuple[torch.dtype, torch.dtype, str | None],
    mode: tuple[float, bool, bool, float],
    seed: int,
    T: int,
    telemetry: bool = False,
    steps: int = 4,
) -> tuple[SINGD, nn.Module]:
    dtype, factor_dtype, guard = precision
    alpha1, kfac_like, normalize, damping = mode
    torch.manual_seed(seed)
    model = _Net().to(dtype)
    opt = SINGD(
        model,
        lr=0.05,
        lr_cov=0.3,
        T=T,
        alpha1=alpha1,
        kfac_like=kfac_like,
        normalize_lr_cov=normalize,
        damping=damping,
        weight_decay=1e-3,
        structures=("diagonal", "diagonal"),
        preconditioner_dtype=(factor_dtype, factor_dtype),
        factor_guard=guard,
        telemetry=telemetry,
        warn_unsupported=False,
    )
    inputs = torch.randn(steps, 7, 5, dtype=dtype)
    for step in range(steps):
        opt.zero_grad()
        (model(inputs[step]).square().mean() * (1.0 + step)).backward()
        opt.step()
    return opt, model


def _unbatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer takes the per-layer factor step and direction."""
    monkeypatch.setattr(batched, "batch_key", lambda *args: None)
    monkeypatch.setattr(SingdPreconditioner, "many_directions", Preconditioner.many_directions)


def _same_run(first: tuple[SINGD, nn.Module], second: tuple[SINGD, nn.Module]) -> None:
    """Optimizer state and parameters bitwise equal (the runs are NaN-free)."""
    assert same_state(state_snapshot(*first), state_snapshot(*second))


@given(
    precision=st.sampled_from(PRECISIONS),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
    T=st.sampled_from([1, 2]),
)
@example(precision=PRECISIONS[0], mode=MODES[0], seed=0, T=1)
@example(precision=PRECISIONS[2], mode=MODES[3], seed=1, T=1)  # bf16 Kahan, normalised β1
@example(precision=PRECISIONS[5], mode=MODES[4], seed=2, T=2)  # bf16 model, p < 1
def test_batched_is_bitwise_the_per_layer_step(precision, mode, seed, T) -> None:
    batched_run = _run(precision, mode, seed, T)
    with pytest.MonkeyPatch.context() as patch:
        _unbatched(patch)
        per_layer = _run(precision, mode, seed, T)
    _same_run(batched_run, per_layer)


def test_telemetry_of_a_batch_is_the_per_layer_telemetry(monkeypatch) -> None:
    precision, mode = PRECISIONS[2], MODES[0]
    ours = _run(precision, mode, 3, 1, telemetry=True)[0].telemetry()
    _unbatched(monkeypatch)
    theirs = _run(precision, mode, 3, 1, telemetry=True)[0].telemetry()
    assert ours == theirs


def test_layers_are_batched_by_shape_and_bias(monkeypatch) -> None:
    """a and b share a batch; c (no bias), conv and head are batches of one."""
    sizes = []
    original = batched.stack

    def spy(names, *args):
        sizes.append(tuple(names))
        return original(names, *args)

    monkeypatch.setattr(batched, "stack", spy)
    _run(PRECISIONS[0], MODES[0], 0, 1, steps=1)
    assert {frozenset(names) for names in sizes} == {
        frozenset(names) for names in (("a", "b"), ("c",), ("conv",), ("head",))
    }


def _rows_swapped(step):
    """A wrong batch: the momenta of rows 0 and 1 exchanged before the factor step."""

    def swapped(batch, *args, **kwargs):
        new = step(batch, *args, **kwargs)
        if new.m_K.shape[0] < 2:
            return new
        order = torch.arange(new.m_K.shape[0])
        order[:2] = torch.tensor([1, 0])
        k = batched.factor_step(batch.k, new.m_K[order], kwargs["lr_cov"])
        return batched.NewFactors(k, new.c, new.m_K, new.m_C)

    return swapped


@pytest.mark.parametrize("precision", PRECISIONS[:2], ids=["fp32", "fp64"])
def test_a_batch_with_rows_mixed_up_is_caught(monkeypatch, precision) -> None:
    """The bitwise check fails for two layers' momenta swapped within a batch (fp32, fp64)."""
    right = _run(precision, MODES[0], 0, 1)
    monkeypatch.setattr(batched, "step", _rows_swapped(batched.step))
    wrong = _run(precision, MODES[0], 0, 1)
    with pytest.raises(AssertionError):
        _same_run(right, wrong)


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "asv_benches"))
from benchmarks.costs import launches, profiled_step  # noqa: E402


def test_diagonal_launches_grow_by_the_per_tensor_finiteness_checks_only() -> None:
    """Operators of a diagonal step on 1, 2, 4 equal layers (CPU): ``n₁ + 2 (L − 1)``.

    Per layer only the finiteness reductions of its two directions remain
    (``aminmax`` per tensor, the CPU's fastest check,
    :mod:`singd.optim.finiteness`; the gradients are checked through them,
    ``plan_step``); the factor step, the traces, the statistics' and results'
    checks and the directions are per batch.
    """
    counts = [launches(profiled_step("diagonal", layers)) for layers in (1, 2, 4)]
    assert counts[1] - counts[0] == 2
    assert counts[2] - counts[1] == 4


def test_the_device_path_launches_do_not_grow_with_the_layers() -> None:
    """With the fused finiteness check (``_foreach_norm``, what runs off the CPU) the count is
    the same for 1, 2 and 4 equal diagonal layers."""
    counts = {launches(profiled_step("diagonal", n, device_path=True)) for n in (1, 2, 4)}
    assert len(counts) == 1, counts


def test_batches_share_no_storage_with_the_old_state() -> None:
    """A step's new factors are new tensors: the previous state is untouched (all or nothing)."""
    opt, model = _run(PRECISIONS[0], MODES[0], 0, 1, steps=1)
    old = {name: dict(opt.layer_state(name)) for name in opt.layer_names()}
    kept = {
        name: {key: m.storage["diag"].clone() for key, m in state.items()}
        for name, state in old.items()
    }
    opt.zero_grad()
    model(torch.randn(7, 5)).square().mean().backward()
    opt.step()
    for name, state in old.items():
        for key, matrix in state.items():
            assert torch.equal(matrix.storage["diag"], kept[name][key]), (name, key)
        assert opt.layer_state(name)["K"] is not state["K"]


def test_a_checkpoint_of_batched_rows_loads_and_steps_alike() -> None:
    """Factors that are rows of one stacked tensor save (``torch.save``), load with
    ``weights_only=True`` as separate tensors, and the next step is the same bits."""
    first = _run(PRECISIONS[0], MODES[0], 0, 1, steps=2)
    second = _run(PRECISIONS[0], MODES[0], 0, 1, steps=2)
    buffer = io.BytesIO()
    torch.save(first[0].state_dict(), buffer)
    buffer.seek(0)
    second[0].load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(7, 5)
    for opt, model in (first, second):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    _same_run(first, second)


class _Wide(nn.Module):
    """Two ``Linear(8, 40000)``: one batch whose ``C`` has 40000 entries."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 40000), nn.Linear(8, 40000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x)) * torch.tanh(self.b(x))


def _wide_run() -> tuple[SINGD, nn.Module]:
    torch.manual_seed(0)
    model = _Wide()
    opt = SINGD(model, lr=0.05, lr_cov=0.3, T=1, structures=("diagonal",) * 2)
    inputs = torch.randn(2, 16, 8)
    for step in range(2):
        opt.zero_grad()
        (1e6 * model(inputs[step]).square().mean()).backward()
        opt.step()
    return opt, model


def test_wide_rows_are_summed_row_by_row(monkeypatch) -> None:
    """On two threads the traces of rows longer than 32768 entries are bitwise the per-layer
    ones; a stacked sum of such rows (``STACKED_SUM_MAX`` raised) is caught rounding
    differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batched_run = _wide_run()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(batched, "STACKED_SUM_MAX", 10**9)
            stacked_sums = _wide_run()
        _unbatched(monkeypatch)
        per_layer = _wide_run()
    finally:
        torch.set_num_threads(threads)
    _same_run(batched_run, per_layer)
    with pytest.raises(AssertionError):
        _same_run(stacked_sums, per_layer)
