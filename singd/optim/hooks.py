"""Collection of curvature statistics through hooks (SPEC §1.1, §1.5).

Per supported layer a forward hook turns the layer input into ``A``
(:mod:`singd.optim.statistics`) and hands it to the optimizer's
``summarise_input`` (SINGD: ``H_K = Π̂((KᵀAᵀ)(KᵀAᵀ)ᵀ)``; KFAC: ``AᵀA``), so the
input itself is not kept.  It then registers a hook on the layer's *output
tensor*; that hook sees the output gradient even when an in-place activation
(``nn.ReLU(inplace=True)``) rewrites the output afterwards, which module
full-backward hooks do not survive.  The gradient becomes ``G``, scaled by
``1/sqrt(s_div)`` (SPEC §1.5), is handed to ``summarise_grad``, and the pair of
summaries is added to the layer's pending sums.  A pass whose backward never
runs therefore adds nothing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from singd.optim import statistics


class Summable(Protocol):
    """What a statistic summary supports: in-place sums and scaling (Tensor, StructuredMatrix)."""

    def add_(self, other: Any) -> Any: ...

    def mul_(self, scalar: float) -> Any: ...

    def clone(self) -> Any: ...


class HookSettings(NamedTuple):
    """What the hooks need to know about a layer's param group and factors.

    ``bias_column``: whether ``A`` gets the column of ones (the layer's bias
    is optimised as part of ``W~``; a frozen bias is not).
    """

    approx: statistics.Approx
    loss_average: statistics.LossAverage
    input_dtype: torch.dtype
    grad_dtype: torch.dtype
    bias_column: bool


class GradScaleInfo(NamedTuple):
    """Gradient-scale facts at backward time (SPEC §1.5).

    Attributes:
        divisor: ``s_div``; ``G`` is divided by ``sqrt(s_div)``.
        scale: the scale ``s`` the backward gradients carry, if known then
            (an attached ``GradScaler``); ``None`` if only ``step`` can tell.
    """

    divisor: float
    scale: float | None


@dataclass
class PendingStatistics:
    """Sums over the passes since the last step of one layer's summaries.

    ``grad_summary`` carries the factor ``scale² / divisor`` (SPEC §1.5) that
    the step removes once the scale is known.
    """

    input_summary: Summable
    grad_summary: Summable
    passes: int
    grad_scale: GradScaleInfo

    def tensors(self) -> list[Tensor]:
        """The plain tensors holding both summaries (a structure's storage)."""
        return [
            tensor
            for summary in (self.input_summary, self.grad_summary)
            for tensor in ([summary] if isinstance(summary, Tensor) else summary.storage.values())
        ]


class CurvatureCollector:
    """Registers the hooks on the supported layers and keeps the pending sums.

    Layers are added with :meth:`add_layer`.

    Args:
        is_active: whether statistics are wanted now for the named layer
            (called in the forward hook; training mode and grad mode are
            checked here).
        settings: the named layer's :class:`HookSettings`.
        summarise_input: ``(name, A) → summary`` with ``A`` (n_A × d_i~).
        summarise_grad: ``(name, G) → summary`` with ``G`` (n_G × d_o).
        grad_scale_info: the current :class:`GradScaleInfo`.
    """

    def __init__(
        self,
        *,
        is_active: Callable[[str], bool],
        settings: Callable[[str], HookSettings],
        summarise_input: Callable[[str, Tensor], Summable],
        summarise_grad: Callable[[str, Tensor], Summable],
        grad_scale_info: Callable[[], GradScaleInfo],
    ) -> None:
        self._is_active = is_active
        self._settings = settings
        self._summarise_input = summarise_input
        self._summarise_grad = summarise_grad
        self._grad_scale_info = grad_scale_info
        self._pending: dict[str, PendingStatistics] = {}
        self._lock = threading.Lock()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add_layer(self, name: str, module: nn.Module) -> None:
        """Collect statistics of ``module`` under ``name`` from now on."""
        self._handles.append(
            module.register_forward_hook(partial(self._forward_hook, name), with_kwargs=True)
        )

    # -------------------------------------------------------------------- hooks
    def _forward_hook(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Tensor,
    ) -> None:
        if not (module.training and torch.is_grad_enabled() and self._is_active(name)):
            return
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        settings = self._settings(name)
        with torch.no_grad(), torch.autocast(output.device.type, enabled=False):
            # nn.Linear / nn.Conv2d take one argument, ``input``, maybe by keyword
            x = (args[0] if args else kwargs["input"]).detach().to(settings.input_dtype)
            A = statistics.layer_input_matrix(
                module, x, approx=settings.approx, bias=settings.bias_column
            )
            input_summary = self._summarise_input(name, A)
        output.register_hook(partial(self._output_grad_hook, name, module, input_summary))

    def _output_grad_hook(
        self, name: str, module: nn.Module, input_summary: Summable, grad_output: Tensor
    ) -> None:
        settings = self._settings(name)
        info = self._grad_scale_info()
        with torch.no_grad(), torch.autocast(grad_output.device.type, enabled=False):
            g = grad_output.detach().to(settings.grad_dtype)
            G = statistics.layer_grad_matrix(
                module, g, approx=settings.approx, loss_average=settings.loss_average
            )
            if info.divisor != 1.0:
                G.div_(math.sqrt(info.divisor))  # G is a fresh tensor: no copy needed
            grad_summary = self._summarise_grad(name, G)
        self._accumulate(name, input_summary, grad_summary, info)

    def _accumulate(
        self, name: str, input_summary: Summable, grad_summary: Summable, info: GradScaleInfo
    ) -> None:
        with self._lock:
            pending = self._pending.get(name)
            if pending is None:
                self._pending[name] = PendingStatistics(input_summary, grad_summary, 1, info)
                return
            if pending.grad_scale != info:
                raise ValueError(
                    f"gradient scale changed between accumulated backward passes of layer "
                    f"{name!r} ({pending.grad_scale} then {info}); call optimizer.step() "
                    "before GradScaler.update()"
                )
            if pending.passes == 1:
                # The first input summary is still held by its forward's grad hook,
                # which fires again on every further backward through that graph
                # (retain_graph=True); summing into it in place would count it twice.
                pending.input_summary = pending.input_summary.clone()
            pending.input_summary.add_(input_summary)
            pending.grad_summary.add_(grad_summary)
            pending.passes += 1

    # ---------------------------------------------------------------- pending sums
    def pop_all(self) -> dict[str, PendingStatistics]:
        """Take the pending sums of every layer (they are dropped here)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def remove(self) -> None:
        """Remove every hook (the collector collects nothing afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
