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
* ``track_launches_device_path``: the same with the finiteness checks a
  device runs (``finite_flags(..., fused=True)``: one ``_foreach_norm`` per
  dtype instead of the CPU's ``aminmax`` per tensor,
  :mod:`singd.optim.finiteness`), i.e. the operators a CUDA step launches.
* ``track_allocated_bytes``: the bytes the step's operators allocate
  (``profile_memory=True``; the sum of every allocation, freed or not).
* ``track_host_syncs``: the points where the step waits for the device, by
  construction: its reads of tensors into Python (``tolist``/``item``, counted
  on the tensor methods) plus the outermost operators whose output size or
  error check needs the device's values (:data:`SYNCING_OPS`: on CUDA
  ``masked_select``/``nonzero`` size their output from the mask, ``linalg_cholesky``
  checks ``info``).  Counted on the CPU, it is what a CUDA run would wait for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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

#: Operators that synchronise with a CUDA device (their result depends on device values).
SYNCING_OPS = frozenset(
    {
        "aten::masked_select",
        "aten::nonzero",
        "aten::linalg_cholesky",
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
    }
)
#: Tensor methods that read values into Python.
READS = ("tolist", "item")

STRUCTURES = ("diagonal", "dense", "block8diagonal", "hierarchical15_15", "triltoeplitz", "tril")


@contextmanager
def device_path_finiteness() -> Iterator[None]:
    """Run the step's finiteness checks as off the CPU (``fused=True``) on any device."""
    import singd.optim.checks as checks
    from singd.optim.finiteness import finite_flags

    def fused(tensors: Sequence[torch.Tensor], **_: object) -> list[torch.Tensor]:
        return finite_flags(tensors, fused=True)

    saved = checks.finite_flags
    checks.finite_flags = fused
    try:
        yield
    finally:
        checks.finite_flags = saved


def profiled_step(structure: str, layers: int, device_path: bool = False) -> torch.profiler.profile:
    """The profiler record of one statistics step of a ``layers``-deep stack.

    ``device_path``: with the finiteness checks of a device
    (:func:`device_path_finiteness`).
    """
    if device_path:
        with device_path_finiteness():
            return profiled_step(structure, layers)
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
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str):
        def read(self: torch.Tensor, *args: object) -> object:
            reads.append(name)
            return originals[name](self, *args)

        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            optimizer.step()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    prof.python_reads = len(reads)  # type: ignore[attr-defined]
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


def host_syncs(prof: torch.profiler.profile) -> int:
    """Python reads plus outermost syncing operators (see the module docstring)."""
    syncing = 0
    for event in prof.events():
        if event.name not in SYNCING_OPS:
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            nested = nested or parent.name in SYNCING_OPS
            parent = parent.cpu_parent
        syncing += not nested
    return prof.python_reads + syncing  # type: ignore[attr-defined]


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
        self.device_prof = profiled_step(structure, layers, device_path=True)

    def track_launches(self, structure: str, layers: int) -> int:
        return launches(self.prof)

    track_launches.unit = "operators"

    def track_launches_device_path(self, structure: str, layers: int) -> int:
        return launches(self.device_prof)

    track_launches_device_path.unit = "operators"

    def track_allocated_bytes(self, structure: str, layers: int) -> int:
        return allocated_bytes(self.prof)

    track_allocated_bytes.unit = "bytes"

    def track_host_syncs(self, structure: str, layers: int) -> int:
        return host_syncs(self.prof)

    track_host_syncs.unit = "syncs"
