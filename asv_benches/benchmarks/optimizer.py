"""Optimizer benchmarks: step time and state memory of SINGD vs AdamW on a small MLP.

``time_step`` times one full training iteration (``zero_grad``, forward,
backward, ``step``) because SINGD's hooks do part of their work during the
forward and backward passes.  ``track_state_bytes`` reports the bytes of every
tensor in the optimizer's ``state_dict()`` (per-parameter momenta and, for
SINGD, the Kronecker factors and their momenta, structured factors stored by
their free entries only).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from singd import SINGD

#: Layer widths of the benchmark MLP (input, hidden, hidden, output).
WIDTHS = (128, 256, 256, 10)
#: Mini-batch size.
BATCH_SIZE = 128

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "singd_dense": lambda model: SINGD(model, lr=1e-3, T=1, structures=("dense", "dense")),
    "singd_diagonal": lambda model: SINGD(model, lr=1e-3, T=1, structures=("diagonal", "diagonal")),
    "singd_block32": lambda model: SINGD(
        model, lr=1e-3, T=1, structures=("block32diagonal", "block32diagonal")
    ),
    # T = 10 (the default): statistics and factor updates on every tenth step only,
    # so asv's mean over repeated calls is the amortised cost of a training step.
    "singd_dense_T10": lambda model: SINGD(model, lr=1e-3, T=10, structures=("dense", "dense")),
    "singd_diagonal_T10": lambda model: SINGD(
        model, lr=1e-3, T=10, structures=("diagonal", "diagonal")
    ),
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
}


def _make_mlp() -> nn.Sequential:
    """A ReLU MLP with the layer widths :data:`WIDTHS`, seeded."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(WIDTHS):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _tensor_bytes(value: object) -> int:
    """Bytes of all tensors nested in ``value`` (dicts, lists, tuples, tensors)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


class OptimizerStep:
    """One training iteration of a small MLP per optimizer configuration."""

    params = (sorted(OPTIMIZERS),)
    param_names = ("optimizer",)

    def setup(self, name: str) -> None:
        """Build model, data and optimizer, and take two warm-up steps."""
        torch.set_num_threads(1)
        self.model = _make_mlp()
        generator = torch.Generator().manual_seed(1)
        self.inputs = torch.randn(BATCH_SIZE, WIDTHS[0], generator=generator)
        self.targets = torch.randint(WIDTHS[-1], (BATCH_SIZE,), generator=generator)
        self.loss_function = nn.CrossEntropyLoss()
        self.optimizer = OPTIMIZERS[name](self.model)
        for _ in range(2):
            self.time_step(name)

    def time_step(self, name: str) -> None:
        """``zero_grad``, forward, backward and ``step``."""
        self.optimizer.zero_grad()
        self.loss_function(self.model(self.inputs), self.targets).backward()
        self.optimizer.step()

    def track_state_bytes(self, name: str) -> int:
        """Bytes of the optimizer state (all tensors of ``state_dict()``)."""
        return _tensor_bytes(self.optimizer.state_dict())

    track_state_bytes.unit = "bytes"
