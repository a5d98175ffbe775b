"""Deterministic cost tracks of one ``SINGD.step``: operator launches and bytes allocated.

Time on a shared CPU is noise at the few-percent level; these counts are
exact and repeatable, so they are the gating tracks of the history (README,
"Speed and memory").  Each is measured on a stack of ``layers`` identical
``nn.Linear(64, 64)`` layers, batch 32, T = 1, over one ``step()`` (statistics
already collected by the hooks during the backward pass):

* ``track_launches``: the torch operators the step calls that do work, read
  from ``torch.profiler`` (CPU activity): outermost ``aten::`` events, not
  counting those that only make views or read metadata (:data:`METADATA_OPS`)
  or an ``aten::to`` that returns its input.  On a GPU each is at least one
  kernel launch.
* ``track_allocated_bytes``: the bytes the step's operators allocate
  (``profile_memory=True``; the sum of every allocation, freed or not).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from singd import SINGD

#: Operators that create views or read metadata and launch no kernel.
METADATA_OPS = frozenset(
    {
        "aten::to",
        "aten::view",
        "aten::reshape",
        "aten::t",
        "aten::numpy_T",
        "aten::transpose",
        "aten::permute",
        "aten::unsqueeze",
        "aten::squeeze",
        "aten::expand",
        "aten::as_strided",
        "aten::select",
        "aten::slice",
        "aten::unbind",
        "aten::split",
        "aten::split_with_sizes",
        "aten::narrow",
        "aten::diagonal",
        "aten::alias",
        "aten::detach",
        "aten::view_as_real",
        "aten::resolve_conj",
        "aten::resolve_neg",
        "aten::result_type",
        "aten::promote_types",
        "aten::lift_fresh",
        "aten::empty",
        "aten::empty_strided",
    }
)

STRUCTURES = ("diagonal", "dense", "block8diagonal", "hierarchical15_15", "triltoeplitz")


def profiled_step(structure: str, layers: int) -> torch.profiler.profile:
    """The profiler record of one statistics step of a ``layers``-deep stack."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(layers)])
    optimizer = SINGD(model, lr=1e-3, T=1, structures=(structure, structure))
    inputs = torch.randn(32, 64)
    for _ in range(3):  # warm up: momentum buffers exist, every lazy path taken
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()
    optimizer.zero_grad()
    model(inputs).square().mean().backward()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer.step()
    return prof


def _outermost(event: object) -> bool:
    """Whether no ancestor of the profiler ``event`` is an ``aten::`` operator."""
    parent = event.cpu_parent  # type: ignore[attr-defined]
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def launches(prof: torch.profiler.profile) -> int:
    """Outermost operators that do work (see the module docstring).

    An ``aten::to`` counts only when it copies (it then calls ``_to_copy``).
    """
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::") or not _outermost(event):
            continue
        if event.name == "aten::to":
            count += bool(event.cpu_children)
        elif event.name not in METADATA_OPS:
            count += 1
    return count


def allocated_bytes(prof: torch.profiler.profile) -> int:
    """Bytes allocated by the step's operators (self allocations, summed)."""
    return sum(max(event.cpu_memory_usage, 0) for event in prof.events() if not event.cpu_children)


class StepCosts:
    """Operator launches and allocated bytes of one step, by structure and layer count."""

    params = (list(STRUCTURES), [1, 2, 4])
    param_names = ("structure", "layers")

    def setup(self, structure: str, layers: int) -> None:
        torch.set_num_threads(1)
        self.prof = profiled_step(structure, layers)

    def track_launches(self, structure: str, layers: int) -> int:
        return launches(self.prof)

    track_launches.unit = "operators"

    def track_allocated_bytes(self, structure: str, layers: int) -> int:
        return allocated_bytes(self.prof)

    track_allocated_bytes.unit = "bytes"
