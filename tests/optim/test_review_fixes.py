"""Fixes found by the review of the MHA kind, the compiled update and the tril index cache.

* An MHA inside non-reentrant activation checkpointing: reading its
  projections' saved inputs in the forward would rerun the checkpointed
  region (and keep its activations), so it raises, naming the layer;
  reentrant checkpointing works and gives the factors of a plain run.
* A compiled parameter update that fails to compile falls back to the eager
  one with a warning, so the step is still taken whole (SPEC §1.4a).
* The tril/triu position caches do not keep a tensor made under
  ``FakeTensorMode`` (a later real call would get a fake index).
* FSDP2 wrapping the MHA itself (its hook runs before the reshard).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from singd import SINGD
from singd.optim import compiled
from singd.structures.triangular import Tril


class _Block(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(6, 2)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def attend(h: torch.Tensor) -> torch.Tensor:
            return self.mha(h, h, h)[0]

        if self.reentrant is None:
            return attend(x)
        return checkpoint(attend, x, use_reentrant=self.reentrant)


def _factors(reentrant: bool | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = _Block(reentrant)
    opt = SINGD(model, lr=0.1, T=1)
    x = torch.randn(4, 3, 6, requires_grad=True)
    model(x).square().sum().backward()
    opt.step()
    return [opt.layer_state(name)["K"].to_dense() for name in opt.layer_names()]


def test_mha_in_non_reentrant_checkpoint_raises_naming_the_layer() -> None:
    with pytest.raises(RuntimeError, match=r"'mha\.(q|k|v|out_proj)'.*use_reentrant=False"):
        _factors(reentrant=False)


def test_mha_in_reentrant_checkpoint_equals_the_plain_run() -> None:
    plain, checkpointed = _factors(None), _factors(reentrant=True)
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.equal(a, b)  # rule: bitwise (the same forward, recomputed)


def test_failed_compilation_falls_back_to_eager_and_the_step_is_whole(monkeypatch) -> None:
    def broken_compile(function, **options):
        def fails(*args, **kwargs):
            raise RuntimeError("no C++ compiler")

        return fails

    torch.manual_seed(0)
    model, twin = nn.Linear(4, 3), nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    opt, reference = SINGD(model, lr=0.1, T=1), SINGD(twin, lr=0.1, T=1)
    monkeypatch.setattr(torch, "compile", broken_compile)
    compiled.compile_parameter_updates(opt)
    x = torch.randn(5, 4)
    for net in (model, twin):
        net(x).square().sum().backward()
    with pytest.warns(UserWarning, match="failed to compile"):
        opt.step()
    reference.step()
    assert opt.steps == reference.steps == 1
    assert torch.equal(model.weight, twin.weight)  # rule: bitwise (the eager update)
    assert torch.equal(
        opt.layer_state("")["K"].to_dense(), reference.layer_state("")["K"].to_dense()
    )


def test_tril_cache_keeps_no_fake_tensor() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        Tril.from_dense(mode.from_tensor(torch.randn(11, 11)))
    dense = torch.randn(11, 11)
    assert torch.equal(Tril.from_dense(dense).to_dense(), dense.tril())  # rule: exact copy


def test_fsdp2_wrapping_the_mha_itself() -> None:
    script = textwrap.dedent(
        """
        import os, warnings, torch, torch.distributed as dist
        from torch import nn
        from torch.distributed.fsdp import fully_shard
        from singd import SINGD
        warnings.simplefilter("ignore")
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin, self.mha = nn.Linear(6, 6), nn.MultiheadAttention(6, 2)

            def forward(self, x):
                h = self.lin(x)
                return self.mha(h, h, h)[0]

        torch.manual_seed(0)
        model = Model()
        fully_shard(model.mha)
        fully_shard(model)
        opt = SINGD(model, lr=0.1, T=1)
        model(torch.randn(4, 3, 6)).square().sum().backward()
        opt.step()
        print(sorted(opt.layer_names()))
        dist.destroy_process_group()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'mha.q'" in result.stdout and "'mha.out_proj'" in result.stdout
