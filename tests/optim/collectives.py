"""Counting the collectives (and their payload bytes) that code issues, for tests and scripts.

:func:`count_collectives` patches the ``torch.distributed`` collectives that
this project and FSDP2 call from Python, and ``DTensor.full_tensor`` (whose
all-gather runs as a functional collective), recording each call's name and
payload: the bytes of the tensor handed to the collective (the full result
for a gather).  Payload, not wire bytes: a ring all-reduce of ``P`` bytes
sends ``2(R − 1)/R · P`` per rank.  DDP's reducer calls the process group from
C++ and is not seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

#: name → index of the argument whose bytes are the payload.
PATCHED = {"all_reduce": 0, "broadcast": 0, "all_gather_into_tensor": 0, "reduce_scatter_tensor": 1}


class Collective(NamedTuple):
    """One recorded collective call."""

    name: str
    nbytes: int


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@contextlib.contextmanager
def count_collectives() -> Iterator[list[Collective]]:
    """Record every collective issued inside the ``with`` block (a list, appended to)."""
    calls: list[Collective] = []
    originals: dict[str, Callable[..., Any]] = {name: getattr(dist, name) for name in PATCHED}

    def wrap(name: str, position: int) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            calls.append(Collective(name, _nbytes(args[position])))
            return originals[name](*args, **kwargs)

        return recorded

    def all_gather(tensors: list[Tensor], tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(Collective("all_gather", sum(_nbytes(t) for t in tensors)))
        return original_all_gather(tensors, tensor, *args, **kwargs)

    def full_tensor(self: DTensor, *args: Any, **kwargs: Any) -> Tensor:
        result = original_full_tensor(self, *args, **kwargs)
        calls.append(Collective("DTensor.full_tensor", _nbytes(result)))
        return result

    original_all_gather = dist.all_gather
    original_full_tensor = DTensor.full_tensor
    try:
        for name, position in PATCHED.items():
            setattr(dist, name, wrap(name, position))
        dist.all_gather = all_gather
        DTensor.full_tensor = full_tensor
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        dist.all_gather = original_all_gather
        DTensor.full_tensor = original_full_tensor
