"""Structure benchmarks (SPEC §2): ``Π̂(Kᵀ X Xᵀ K)`` time and storage bytes per structure.

``time_project_inner`` times :meth:`StructuredMatrix.project_inner` for
``d = 1024``, ``m = 256`` in float32 on one thread (the shared CI CPU gives
steadier numbers single-threaded); ``track_storage_bytes`` reports the bytes a
``1024 × 1024`` float32 factor stores.
"""

from __future__ import annotations

import torch

from singd.structures import STRUCTURE_NAMES, get_structure

DIM = 1024
COLS = 256
DTYPE = torch.float32


class ProjectInner:
    """``Π̂(Kᵀ X Xᵀ K)`` for a general member ``K`` and ``X`` of shape ``d × m``."""

    params = (list(STRUCTURE_NAMES),)
    param_names = ("structure",)
    timeout = 120.0

    def setup(self, name: str) -> None:
        torch.set_num_threads(1)
        cls = get_structure(name)
        generator = torch.Generator().manual_seed(0)
        self.factor = cls.from_dense(torch.randn(DIM, DIM, generator=generator, dtype=DTYPE))
        self.inputs = torch.randn(DIM, COLS, generator=generator, dtype=DTYPE)

    def time_project_inner(self, name: str) -> None:
        self.factor.project_inner(self.inputs)


class Storage:
    """Bytes stored by a ``d × d`` float32 factor (= free entries × 4)."""

    params = (list(STRUCTURE_NAMES),)
    param_names = ("structure",)

    def setup(self, name: str) -> None:
        self.cls = get_structure(name)

    def track_storage_bytes(self, name: str) -> int:
        return self.cls.eye(DIM, dtype=DTYPE).nbytes

    track_storage_bytes.unit = "bytes"
