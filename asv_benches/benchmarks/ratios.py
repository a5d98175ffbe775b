"""Training-step time of SINGD relative to AdamW, measured in one process (issue 9's table).

One step is ``zero_grad``, forward, backward and ``step`` of

* ``mlp``: a 6 × 512 ReLU MLP (512 → 512 five times, then 512 → 10), batch 128;
* ``cnn``: two 3 × 3 convolutions (3 → 32 → 64 channels, 16 × 16 images) and a
  linear head, batch 64;
* ``transformer``: one pre-norm block on ``[B, S, d] = [16, 64, 256]`` written
  with ``nn.Linear`` only (q/k/v, output projection, a 4d MLP), so every weight
  is a Kronecker layer in this package and in the public one;
* ``transformer-linear``: the same block with every optimizer given only the
  ``nn.Linear`` parameters.  The public package trains nothing else (its
  LayerNorms stay as initialised), while this one also preconditions the two
  LayerNorms on ``transformer``: here both SINGDs do the same work.

The two optimizers take turns window by window on two copies of the same
model, the order rotating (SINGD then AdamW, then AdamW then SINGD, ...), after
``2 T`` warm-up steps each, so machine load affects both alike; the ratio is
median(SINGD window) / median(AdamW window), a window being ``T`` steps (with
``T = 10`` it holds one statistics step).  With a ``rival`` (another package's
``SINGD`` class, loaded in this process by ``scripts/step_ratio.py``) three
copies take turns the same way, and the rival's ratio and ours / rival come
from the same windows.

Only torch and ``singd.optim.optimizer.SINGD`` are imported, an import path and
constructor the public singd package shares, so ``scripts/step_ratio.py`` runs
this code against either package.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from singd.optim.optimizer import SINGD

STRUCTURES = ("diagonal", "block30diagonal", "dense", "hierarchical15_15", "triltoeplitz")


class _Block(nn.Module):
    """A pre-norm transformer block of ``nn.Linear`` layers on ``[B, S, d]``."""

    def __init__(self, d: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + self.out(a.transpose(1, 2).reshape(b, s, d))
        x = x + self.down(torch.relu(self.up(self.norm2(x))))
        return self.head(x.mean(1))


def _model_and_batch(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The seeded model and one fixed batch of ``kind``."""
    torch.manual_seed(0)
    if kind == "mlp":
        layers: list[nn.Module] = []
        for _ in range(5):
            layers += [nn.Linear(512, 512), nn.ReLU()]
        model: nn.Module = nn.Sequential(*layers, nn.Linear(512, 10))
        inputs = torch.randn(128, 512)
    elif kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, 10),
        )
        inputs = torch.randn(64, 3, 16, 16)
    elif kind in ("transformer", "transformer-linear"):
        model = _Block()
        inputs = torch.randn(16, 64, 256)
    else:
        raise ValueError(f"unknown model {kind!r}")
    return model, inputs, torch.randint(10, (inputs.shape[0],))


def _trained(kind: str, model: nn.Module) -> list[nn.Parameter] | None:
    """The parameters every optimizer of ``kind`` trains (``None``: all of the model's)."""
    if kind != "transformer-linear":
        return None
    return [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()]


def _stepper(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor
) -> Callable[[], None]:
    loss_function = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad()
        loss_function(model(inputs), targets).backward()
        optimizer.step()

    return step


def _timed(step: Callable[[], None], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) / count


def ratio(
    kind: str,
    structure: str,
    T: int,
    steps: int,
    compile_updates: bool = False,
    rival: type[torch.optim.Optimizer] | None = None,
) -> dict[str, float]:
    """Median SINGD and AdamW step seconds for one configuration, and their ratio.

    ``compile_updates`` (this project's package only) runs SINGD's parameter update
    through ``torch.compile`` (:mod:`singd.optim.compiled`; compiled in the warm-up).
    ``rival``: a second SINGD class (same constructor) timed in the same windows;
    adds ``rival_s``, ``rival_ratio`` (rival / AdamW) and ``vs_rival`` (ours / rival).

    Subnormal numbers are flushed to zero while it runs (``torch.set_flush_denormal``):
    on the fixed batch the gradients shrink over the 300 steps of ``T = 10``,
    AdamW's ``exp_avg_sq`` (squares of gradients) turns subnormal, and the
    CPU's slow path for subnormals then made AdamW's step 3× slower than at
    ``T = 1`` (measured: 30 ms against 11 ms), which flatters every ratio.
    """
    flushed = torch.set_flush_denormal(True)
    try:
        return _ratio(kind, structure, T, steps, compile_updates, rival)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _ratio(
    kind: str,
    structure: str,
    T: int,
    steps: int,
    compile_updates: bool,
    rival: type[torch.optim.Optimizer] | None,
) -> dict[str, float]:
    model, inputs, targets = _model_and_batch(kind)
    twin, other = copy.deepcopy(model), copy.deepcopy(model)
    options = {"lr": 1e-3, "T": T, "structures": (structure, structure)}
    singd = SINGD(model, _trained(kind, model), warn_unsupported=False, **options)
    if compile_updates:  # imported only then: the public package has no such module
        from singd.optim.compiled import compile_parameter_updates

        compile_parameter_updates(singd)
    adamw = torch.optim.AdamW(_trained(kind, twin) or twin.parameters(), lr=1e-3)
    steppers = {
        "singd": _stepper(model, singd, inputs, targets),
        "adamw": _stepper(twin, adamw, inputs, targets),
    }
    if rival is not None:
        opponent = rival(other, _trained(kind, other), warn_unsupported=False, **options)
        steppers["rival"] = _stepper(other, opponent, inputs, targets)
    for step in steppers.values():
        _timed(step, 2 * T)
    names = list(steppers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for window in range(steps):
        for name in names[window % len(names) :] + names[: window % len(names)]:
            times[name].append(_timed(steppers[name], T))
    median = {name: statistics.median(values) for name, values in times.items()}
    s, a = median["singd"], median["adamw"]
    result = {"singd_s": s, "adamw_s": a, "ratio": s / a}
    if rival is not None:
        r = median["rival"]
        result.update({"rival_s": r, "rival_ratio": r / a, "vs_rival": s / r})
    return result


class RatioToAdamW:
    """``track_ratio``: median SINGD step / median AdamW step, same model, one process."""

    params = (list(STRUCTURES), [1, 10])
    param_names = ("structure", "T")
    timeout = 300.0
    number = 1
    repeat = 1

    def setup(self, structure: str, T: int) -> None:
        torch.set_num_threads(2)

    def track_ratio(self, structure: str, T: int) -> float:
        """The 6 × 512 MLP, batch 128, 15 windows."""
        return ratio("mlp", structure, T, steps=15)["ratio"]

    track_ratio.unit = "x AdamW"
