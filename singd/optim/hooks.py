"""Collection of curvature statistics through hooks (SPEC §1.1, §1.5).

Per Kronecker layer a forward hook turns the layer input into its kind's
input statistic (``A``, or ``diag(AᵀA)`` for one-hot inputs;
:mod:`singd.optim.kinds`) and hands it to the optimizer's ``summarise_input``
(SINGD: ``H_K = Π̂((KᵀAᵀ)(KᵀAᵀ)ᵀ)``; KFAC: ``AᵀA``), so the input itself is
not kept.  It then registers a hook on the layer's *output tensor*; that hook
sees the output gradient even when an in-place activation
(``nn.ReLU(inplace=True)``) rewrites the output afterwards, which module
full-backward hooks do not survive.  The gradient, in the kind's
``[B, S, d_o]`` format, becomes ``G``, scaled by a power of two ``2^k`` chosen
from the gradient itself so that its Gram product cannot overflow
(:func:`~singd.optim.statistics.normalised_grad_matrix`; SPEC §1.5 as amended
in docs/SPEC.md), is handed to ``summarise_grad``, and the pair of summaries
is added to the layer's pending sums together with the exponent ``2k`` that
the step removes.  A pass whose backward never runs therefore adds nothing.
No hook reads the host (an attached ``GradScaler``'s scale aside).
An ``nn.MultiheadAttention``'s projections (SPEC §1.6) take their input from the
autograd node of their linear inside the MHA's graph and their output gradient
from a pre-hook on that node (:mod:`singd.optim.attention`); from there the same
path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from singd.optim import attention, elementwise, statistics
from singd.optim.kinds import AttentionProjectionKind, InputStatistic, LayerKind, output_dim


class Summable(Protocol):
    """What a statistic summary supports: in-place sums and scaling (Tensor, StructuredMatrix)."""

    def add_(self, other: Any) -> Any: ...

    def mul_(self, scalar: float) -> Any: ...

    def mul(self, scalar: float) -> Any: ...

    def clone(self) -> Any: ...


class HookSettings(NamedTuple):
    """What the hooks need to know about a layer's param group and factors.

    ``bias_column``: whether ``A`` gets the column of ones (the layer's bias
    is optimised as part of ``W~``; a frozen bias is not).
    ``grad_gram_diagonal``: whether the gradient summary needs only
    ``diag(GᵀG)`` (a diagonal ``C``): where ``G`` is formed in the gradient's
    own wide dtype, the hook then hands :class:`GradGramDiagonal` instead of ``G``.
    ``input_gram_diagonal``: likewise for a diagonal ``K`` whose ``A`` is formed
    in a dtype of 4 bytes or more (in float16/bfloat16 ``A`` keeps its rounding
    order, which the emulated oracle follows): the hook takes the kind's
    :meth:`~singd.optim.kinds.LayerKind.input_gram_diagonal` instead of ``A``.
    """

    approx: statistics.Approx
    loss_average: statistics.LossAverage
    input_dtype: torch.dtype
    grad_dtype: torch.dtype
    bias_column: bool
    grad_gram_diagonal: bool = False
    input_gram_diagonal: bool = False


class GradGramDiagonal(NamedTuple):
    """``diag(GᵀG)`` (d_o) of the normalised ``G`` (``normalised_grad_gram_diagonal``)."""

    diagonal: Tensor


class GradScaleInfo(NamedTuple):
    """The factor a gradient summary carries relative to the unscaled statistic (SPEC §1.5).

    A summary equals ``2^log2_factor · s² ·`` (the statistic of the unscaled
    gradients), ``s`` the scale of the backward pass.

    Attributes:
        scale: ``s``, if known at backward time (an attached ``GradScaler``);
            ``None`` if only ``step`` can tell.
        log2_factor: 0-dim int32 tensor, the hook's normalisation ``2k`` (read
            by ``step`` with its other host values, never in the hook).
    """

    scale: float | None
    log2_factor: Tensor


@dataclass
class PendingStatistics:
    """Sums over the passes since the last step of one layer's summaries.

    ``grad_summary`` carries the factor ``2^log2_factor · s²`` of
    ``grad_scale`` (SPEC §1.5), which the step removes once ``s`` is known.
    """

    input_summary: Summable
    grad_summary: Summable
    passes: int
    grad_scale: GradScaleInfo

    @property
    def input_summary_is_held(self) -> bool:
        """Whether ``input_summary`` may be the first pass's own, which its forward's
        grad hook still holds: the hook fires again on every further backward through that
        graph (``retain_graph=True``), so the summary must not be changed in place."""
        return self.passes == 1

    def summary_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """The plain tensors of the input summary and of the gradient summary."""
        return _storage(self.input_summary), _storage(self.grad_summary)

    def tensors(self) -> list[Tensor]:
        """The plain tensors holding both summaries (a structure's storage)."""
        inputs, grads = self.summary_tensors()
        return [*inputs, *grads]


def rescaled_summary(summary: Summable, log2_factor: Tensor, target: Tensor) -> Summable:
    """``summary`` (carrying ``2^log2_factor``) rescaled in place to carry ``2^target``.

    ``target ≤ log2_factor`` (the smaller factor is the common one, so no sum
    can overflow); the multiplier is a power of two, exact unless an entry
    becomes subnormal, i.e. falls below the dtype's range relative to the
    other pass's entries, where it is negligible in the sum (SPEC §1.5,
    docs/SPEC.md).  No host sync.
    """
    multiplier = torch.ldexp(
        torch.ones((), dtype=torch.float32, device=log2_factor.device), target - log2_factor
    )
    return summary.mul_(multiplier)


def _storage(summary: Summable) -> list[Tensor]:
    """The plain tensors of a summary (a Tensor, or a structure's storage)."""
    return [summary] if isinstance(summary, Tensor) else list(summary.storage.values())


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``device_type``'s autocast is off: the statistics keep their
    own dtypes.  Where autocast is off already, none is entered: building and
    entering a disabled ``torch.autocast`` costs more than some of the small
    operators it would wrap (about 5 µs of Python per hook on the CPU)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _records(module: nn.Module, output: Any) -> bool:
    """Whether a forward pass can feed statistics: training, grad enabled, and an
    output tensor that backward will reach (so its gradient hook fires)."""
    return (
        module.training
        and torch.is_grad_enabled()
        and isinstance(output, Tensor)
        and output.requires_grad
    )


class CurvatureCollector:
    """Registers the hooks on the supported layers and keeps the pending sums.

    Layers are added with :meth:`add_layer`.

    Args:
        is_active: whether statistics are wanted now for the named layer
            (called in the forward hook; training mode and grad mode are
            checked here).
        settings: the named layer's :class:`HookSettings`.
        summarise_input: ``(name, A) → summary`` with ``A`` (n_A × d_i~) or an
            :class:`~singd.optim.kinds.InputGramDiagonal`.
        summarise_grad: ``(name, G) → summary`` with ``G`` (n_G × d_o).
        backward_scale: the scale the current backward's gradients carry if
            known now (an attached ``GradScaler``), else ``None``.
    """

    def __init__(
        self,
        *,
        is_active: Callable[[str], bool],
        settings: Callable[[str], HookSettings],
        summarise_input: Callable[[str, InputStatistic], Summable],
        summarise_grad: Callable[[str, Tensor | GradGramDiagonal], Summable],
        backward_scale: Callable[[], float | None],
    ) -> None:
        self._is_active = is_active
        self._settings = settings
        self._summarise_input = summarise_input
        self._summarise_grad = summarise_grad
        self._backward_scale = backward_scale
        self._pending: dict[str, PendingStatistics] = {}
        self._lock = threading.Lock()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add_layer(self, name: str, module: nn.Module, kind: LayerKind) -> None:
        """Collect statistics of ``module`` (of ``kind``) under ``name`` from now on."""
        forward = (
            self._attention_forward_hook
            if isinstance(kind, AttentionProjectionKind)
            else self._forward_hook
        )
        # an MHA's hook runs before others of its forward (FSDP2's reshard among them): the
        # graph's AccumulateGrad nodes hold the parameters as the forward computed with them
        self._handles.append(
            module.register_forward_hook(
                partial(forward, name, kind),
                with_kwargs=True,
                prepend=isinstance(kind, AttentionProjectionKind),
            )
        )

    # -------------------------------------------------------------------- hooks
    def _forward_hook(
        self,
        name: str,
        kind: LayerKind,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Tensor,
    ) -> None:
        if not _records(module, output) or not self._is_active(name):
            return
        settings = self._settings(name)
        with torch.no_grad(), _autocast_off(output.device.type):
            x = kind.layer_input(args, kwargs).detach()
            statistic = (
                kind.input_gram_diagonal if settings.input_gram_diagonal else kind.input_statistic
            )
            A = statistic(
                module,
                x,
                approx=settings.approx,
                bias=settings.bias_column,
                dtype=settings.input_dtype,
            )
            input_summary = self._summarise_input(name, A)
        output.register_hook(partial(self._output_grad_hook, name, kind, module, input_summary))

    def _attention_forward_hook(
        self,
        name: str,
        kind: AttentionProjectionKind,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: tuple[Tensor, Tensor | None],
    ) -> None:
        """An MHA projection (SPEC §1.6): input and output gradient of its linear's graph
        node (:mod:`singd.optim.attention`), as ``[L, B, d]``; then as for other kinds."""
        if not _records(module, output[0]) or not self._is_active(name):
            return
        if attention.inside_non_reentrant_checkpoint():
            raise RuntimeError(
                f"singd: layer {name!r} (nn.MultiheadAttention) runs inside "
                "torch.utils.checkpoint(..., use_reentrant=False): reading its projections' "
                "inputs there would rerun the checkpointed region; use use_reentrant=True, "
                "or leave the MHA's parameters out of the optimizer's params"
            )
        settings = self._settings(name)
        query = args[0] if args else kwargs["query"]
        batch = attention.batch_size(module, query)
        stop = {
            value.grad_fn
            for value in (*args, *kwargs.values())
            if isinstance(value, Tensor) and value.grad_fn is not None
        }
        rows = kind.weight_rows(module)
        row = 0 if rows is None else rows[0]
        projection = attention.find_projection(output[0], kind.weight(module), row, stop)
        first = row - projection.start
        columns = slice(first, first + output_dim(kind, module))
        with torch.no_grad(), _autocast_off(output[0].device.type):
            x = projection.inputs.detach()
            A = kind.input_statistic(
                module,
                x.reshape(-1, batch, x.shape[-1]),
                approx=settings.approx,
                bias=settings.bias_column,
                dtype=settings.input_dtype,
            )
            input_summary = self._summarise_input(name, A)
        hook = partial(self._attention_grad_hook, name, kind, module, input_summary, batch, columns)
        projection.node.register_prehook(hook)

    def _attention_grad_hook(
        self,
        name: str,
        kind: AttentionProjectionKind,
        module: nn.Module,
        input_summary: Summable,
        batch: int,
        columns: slice,
        grad_outputs: tuple[Tensor | None, ...],
    ) -> None:
        grad = grad_outputs[0]
        if grad is None:  # the projection's output reached no loss
            return
        block = grad[:, columns]
        self._output_grad_hook(
            name, kind, module, input_summary, block.reshape(-1, batch, block.shape[-1])
        )

    def _output_grad_hook(
        self,
        name: str,
        kind: LayerKind,
        module: nn.Module,
        input_summary: Summable,
        grad_output: Tensor,
    ) -> None:
        settings = self._settings(name)
        scale = self._backward_scale()
        wide = torch.promote_types(grad_output.dtype, torch.float32)
        with torch.no_grad(), _autocast_off(grad_output.device.type):
            shared = kind.grad_shared(module, grad_output)
            options = {"approx": settings.approx, "loss_average": settings.loss_average}
            G: Tensor | GradGramDiagonal
            if settings.grad_gram_diagonal and settings.grad_dtype == wide:
                diagonal, log2_factor = statistics.normalised_grad_gram_diagonal(shared, **options)
                G = GradGramDiagonal(diagonal)
            else:
                G, log2_factor = statistics.normalised_grad_matrix(
                    shared, dtype=settings.grad_dtype, **options
                )
            grad_summary = self._summarise_grad(name, G)
        self._accumulate(name, input_summary, grad_summary, GradScaleInfo(scale, log2_factor))

    def _accumulate(
        self, name: str, input_summary: Summable, grad_summary: Summable, info: GradScaleInfo
    ) -> None:
        with self._lock:
            pending = self._pending.get(name)
            if pending is None:
                self._pending[name] = PendingStatistics(input_summary, grad_summary, 1, info)
                return
            if pending.grad_scale.scale != info.scale:
                raise ValueError(
                    f"gradient scale changed between accumulated backward passes of layer "
                    f"{name!r} ({pending.grad_scale.scale} then {info.scale}); call "
                    "optimizer.step() before GradScaler.update()"
                )
            if pending.input_summary_is_held:  # summing into it would count it twice
                pending.input_summary = pending.input_summary.clone()
            pending.input_summary.add_(input_summary)
            common = torch.minimum(pending.grad_scale.log2_factor, info.log2_factor)
            pending.grad_summary = rescaled_summary(
                pending.grad_summary, pending.grad_scale.log2_factor, common
            )
            pending.grad_summary.add_(rescaled_summary(grad_summary, info.log2_factor, common))
            pending.grad_scale = GradScaleInfo(info.scale, common)
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


class ElementwiseCollector:
    """Hooks of the elementwise layers (:mod:`singd.optim.elementwise`) and their pending ``h``.

    The forward hook recomputes ``x̂`` from the input and hooks the output
    tensor; the output-gradient hook forms ``h`` of each parameter and adds it
    to the layer's pending sum.  ``h`` carries ``s²`` of the backward's
    gradient scale ``s`` unless the scale was known then (an attached
    ``GradScaler``: divided out at once).

    Args:
        is_active: whether statistics are wanted now for the named layer.
        settings: the named layer's ``(kfac_approx, loss_average)``.
        backward_scale: the scale of the running backward if known now, else ``None``.
    """

    def __init__(
        self,
        *,
        is_active: Callable[[str], bool],
        settings: Callable[[str], tuple[statistics.Approx, statistics.LossAverage]],
        backward_scale: Callable[[], float | None],
    ) -> None:
        self._is_active = is_active
        self._settings = settings
        self._backward_scale = backward_scale
        self._pending: dict[str, tuple[list[Tensor], bool]] = {}
        self._lock = threading.Lock()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add_layer(self, name: str, module: nn.Module, has_bias: bool) -> None:
        """Collect ``h`` of ``module``'s weight (and bias if ``has_bias``) under ``name``."""
        hook = partial(self._forward_hook, name, has_bias)
        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _forward_hook(
        self,
        name: str,
        has_bias: bool,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Tensor,
    ) -> None:
        if not _records(module, output) or not self._is_active(name):
            return
        with torch.no_grad(), _autocast_off(output.device.type):
            x_hat = elementwise.normalised_input(module, args[0] if args else kwargs["input"])
        hook = partial(self._output_grad_hook, name, has_bias, len(module.normalized_shape), x_hat)
        output.register_hook(hook)

    def _output_grad_hook(
        self, name: str, has_bias: bool, feature_dims: int, x_hat: Tensor, grad_output: Tensor
    ) -> None:
        approx, loss_average = self._settings(name)
        scale = self._backward_scale()
        with torch.no_grad(), _autocast_off(grad_output.device.type):
            hs = elementwise.elementwise_statistics(
                x_hat,
                grad_output,
                feature_dims=feature_dims,
                has_bias=has_bias,
                approx=approx,
                loss_average=loss_average,
            )
            if scale is not None:
                hs = [h / scale**2 for h in hs]
        with self._lock:
            pending = self._pending.get(name)
            if pending is None:
                self._pending[name] = (hs, scale is not None)
            else:
                self._pending[name] = (
                    [a + b for a, b in zip(pending[0], hs, strict=True)],
                    pending[1],
                )

    def pop_all(self) -> dict[str, tuple[list[Tensor], bool]]:
        """Take every layer's pending ``([h_γ, (h_β)], scale_removed)`` (dropped here)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
