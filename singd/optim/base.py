"""Plumbing shared by SINGD and KFAC: param groups, hooks, the guarded step, checkpoints.

:class:`KroneckerOptimizer` owns everything that is not an update equation.
A subclass says how a layer's state is made, what a pass contributes
(``summarise_input``/``summarise_grad``), how the factors move at a
statistics step and how a gradient is preconditioned; the equations
themselves live in :mod:`singd.optim.updates`.

A step is computed in full before anything is written: new factors and every
parameter's update direction are checked to be finite, then committed.  A
step with inf/NaN gradients, statistics or results is skipped with a warning
that names the layers and tensors at fault, and leaves every piece of state
(parameters, buffers, factors, ``steps``) untouched; its pending statistics
are dropped.  The finiteness flags of the gradients and statistics, the
exponents of the hooks' power-of-two normalisation (SPEC §1.5, docs/SPEC.md)
and every scalar a factor step needs as a Python float (SINGD's traces) are
read in one host sync; the results' finiteness in a second (a skipped step
may read once more, to name the culprits).  Ranks' statistics are combined
first (:mod:`.distributed`).
"""

from __future__ import annotations

import itertools
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from singd.optim import checkpoint, distributed, drift, scaling, sharded
from singd.optim.elementwise import (
    K_KEY,
    M_KEY,
    elementwise_factor_step,
    elementwise_precondition,
)
from singd.optim.finiteness import finite_flags
from singd.optim.hooks import (
    CurvatureCollector,
    ElementwiseCollector,
    HookSettings,
    PendingStatistics,
)
from singd.optim.kinds import LayerKind
from singd.optim.layers import (
    ElementwiseLayer,
    Layer,
    fallback_params,
    find_elementwise_layers,
    find_layers,
    parameter_directions,
    parameter_labels,
    unwrap_model,
)
from singd.optim.updates import adamw_parameter_update, momentum_parameter_updates
from singd.optim.validation import check_bool, check_real, resolve_lr_cov

LayerState = dict[str, Any]

#: A skip warning names at most this many non-finite tensors.
MAX_NAMED = 5


class FactorStepInputs(NamedTuple):
    """A layer's work before its factor step.

    Attributes:
        tensors: whatever the subclass computes once and uses in the step.
        reads: 0-dim tensors the step needs as Python floats; the base reads
            those of every layer, and every finiteness flag, in one host sync.
    """

    tensors: Any
    reads: list[Tensor]


def _culprits(labels: list[str], flags: Iterable[float]) -> list[str]:
    """The labels whose finiteness flag (read to the host) is false, each named once."""
    culprits = [label for label, ok in zip(labels, flags, strict=True) if not ok]
    return list(dict.fromkeys(culprits))


def _host_values(scalars: list[Tensor]) -> list[float]:
    """The values of 0-dim tensors as Python floats, read with one host sync."""
    if not scalars:
        return []
    return torch.stack([scalar.to(torch.float64) for scalar in scalars]).tolist()


def _follow_param(param: Tensor, state: dict[str, Any]) -> None:
    """Move a parameter's buffers to its device and dtype (``model.to`` after construction)."""
    for key, value in state.items():
        if isinstance(value, Tensor) and (value.device, value.dtype) != (param.device, param.dtype):
            state[key] = value.to(device=param.device, dtype=param.dtype)


def _adamw_step(param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One AdamW step of a fallback parameter (``fallback="adamw"``); state made on first use."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    state["step"] += 1
    adamw_parameter_update(
        param,
        grad,
        state["exp_avg"],
        state["exp_avg_sq"],
        step=state["step"],
        lr=group["lr"],
        betas=group["fallback_betas"],
        eps=group["fallback_eps"],
        weight_decay=group["weight_decay"],
    )


class KroneckerOptimizer(Optimizer, ABC):
    """Base of :class:`~singd.SINGD` and :class:`~singd.KFAC` (plumbing only).

    Args:
        model: the model (``(Distributed)DataParallel`` wrappers are unwrapped).
        params: parameters or param groups; ``None`` → every parameter of
            ``model`` that requires grad.
        defaults: default hyper-parameters of a group.
        warn_unsupported: warn once, naming them, about fallback parameters.
        init_grad_scale: accepted (validated) for the public singd package's
            API; no effect, the statistics are scale-free (SPEC §1.5, docs/SPEC.md).
    """

    #: ``GradScaler`` calls ``step`` itself and passes ``grad_scale``/``found_inf``.
    _step_supports_amp_scaling = True

    #: How a skip warning names a pass's (input, gradient) statistics.
    _STATISTIC_NAMES: tuple[str, str] = ("input statistic", "gradient statistic")

    def __init__(
        self,
        model: nn.Module,
        params: Any,
        defaults: dict[str, Any],
        *,
        warn_unsupported: bool,
        init_grad_scale: float,
    ) -> None:
        self._wrapper_averages_grads = distributed.wrapper_averages_gradients(model)
        self._model = unwrap_model(model)
        self._shard_factor_work = False
        self._drift_check_every: int | None = None
        check_bool("warn_unsupported", warn_unsupported)
        # the backward scale of the last step taken: informational since the statistics
        # are scale-free (SPEC §1.5, docs/SPEC.md); kept in checkpoints for their format
        self._grad_scale_prev = check_real(
            "init_grad_scale", init_grad_scale, low=0.0, low_open=True
        )
        self._grad_scaler: Any = None
        self._declared_grad_scale: float | None = None
        self.steps = 0
        self._layers: dict[str, Layer] = {}
        self._layer_states: dict[str, LayerState] = {}
        #: ``(device, dtype)`` of each layer's weight when its state was made or last moved
        self._placements: dict[str, tuple[torch.device, torch.dtype]] = {}
        if params is None:
            params = [p for p in self._model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self._collector = CurvatureCollector(
            is_active=self._collects,
            settings=self._hook_settings,
            summarise_input=self._summarise_input,
            summarise_grad=self._summarise_grad,
            backward_scale=self._backward_scale,
        )
        self._elementwise: dict[str, ElementwiseLayer] = {}
        self._elementwise_collector = ElementwiseCollector(
            is_active=self._collects_elementwise,
            settings=self._elementwise_settings,
            backward_scale=self._backward_scale,
        )
        self._fallback: dict[int, str] = {}
        self._warn_unsupported = warn_unsupported
        try:
            self._refresh_layers(stacklevel=4)
        except BaseException:  # e.g. a rejected layer, or the warning raised as an error
            self._collector.remove()  # the model must not keep hooks of a dead optimizer
            self._elementwise_collector.remove()
            raise

    # ------------------------------------------------------------ subclass API
    #: Whether LayerNorm/RMSNorm parameters get the elementwise preconditioner
    #: (:mod:`singd.optim.elementwise`) instead of the fallback.
    _ELEMENTWISE = False

    def _declines(self, kind: LayerKind) -> str | None:
        """Why this optimizer does not precondition layers of ``kind`` (``None``: it does)."""
        return None

    #: State entries that hold rounding residues of the factors' dtype (SINGD's
    #: compensations): reset, not converted, when the factors change dtype.
    _DTYPE_SPECIFIC: tuple[str, ...] = ()

    @abstractmethod
    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate (and normalise) one param group's hyper-parameters in place."""

    @abstractmethod
    def _new_layer_state(self, layer: Layer, group: dict[str, Any]) -> LayerState:
        """The initial factors of ``layer``."""

    @abstractmethod
    def _factor_dtypes(self, layer: Layer) -> tuple[torch.dtype, torch.dtype]:
        """Dtypes in which ``A`` and ``G`` are formed (input factor, grad factor)."""

    @abstractmethod
    def _summarise_input(self, name: str, A: Tensor) -> Any:
        """A pass's input summary from ``A`` (n_A × d_i~)."""

    @abstractmethod
    def _summarise_grad(self, name: str, G: Tensor) -> Any:
        """A pass's gradient summary from ``G`` (n_G × d_o)."""

    @abstractmethod
    def _prepare_factor_step(self, layer: Layer, pending: PendingStatistics) -> FactorStepInputs:
        """What a statistics step needs besides the statistics, without a host sync."""

    @abstractmethod
    def _updated_layer_state(
        self,
        layer: Layer,
        group: dict[str, Any],
        pending: PendingStatistics,
        prepared: FactorStepInputs,
        reads: list[float],
        correction: float,
        lr_cov: float,
    ) -> LayerState:
        """The factors after a statistics step (a new object; the old one is untouched).

        ``reads`` holds the values of ``prepared.reads``, read for all layers at once.
        """

    @abstractmethod
    def _precondition(self, layer: Layer, state: LayerState, grad: Tensor) -> Tensor:
        """The preconditioned ``∇W~`` (d_o × d_i~) with the factors in ``state``."""

    @abstractmethod
    def _state_to_storage(self, state: LayerState) -> dict[str, dict[str, Tensor]]:
        """Plain tensors of a layer state: factor name → storage dict."""

    @abstractmethod
    def _layout(self, state: LayerState) -> dict[str, str]:
        """Factor name → structure name (what a checkpoint must agree on)."""

    @abstractmethod
    def _state_from_storage(
        self, layer: Layer, current: LayerState, storage: dict[str, dict[str, Tensor]]
    ) -> LayerState:
        """The inverse of :meth:`_state_to_storage`, shaped and placed like ``current``.

        ``storage`` holds exactly the factors of :meth:`_layout` (checked by
        the caller); raises ``ValueError`` on any other mismatch.
        """

    # --------------------------------------------------------------- public API
    def layer_names(self) -> list[str]:
        """Qualified names of the Kronecker-preconditioned layers, in module order."""
        return list(self._layers)

    def layer_state(self, name: str) -> LayerState:
        """The live factors of layer ``name`` (see the subclass for the keys)."""
        if name not in self._layer_states:
            raise ValueError(f"no Kronecker-preconditioned layer named {name!r}")
        return self._layer_states[name]

    def attach_grad_scaler(self, scaler: Any) -> None:
        """Let the hooks read ``scaler``'s scale at backward time (SPEC §1.5).

        Needed when gradients are unscaled before ``step`` (``scaler.unscale_``
        e.g. for clipping); harmless otherwise (the plain recipe
        ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``
        needs nothing: the statistics are scale-free and the step learns the
        scale from the scaler).  Reading the scale costs one host sync per
        layer on statistics passes.
        """
        if not callable(getattr(scaler, "get_scale", None)):
            raise ValueError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self._grad_scaler = scaler

    def set_current_grad_scale(self, grad_scale: float) -> None:
        """Declare the scale of the gradients of the backward passes before the next ``step``.

        The public singd package's call for a loss scaled by hand,
        ``(s * loss).backward()``: the next ``step`` divides the gradients by
        ``s`` and corrects the statistics for it (SPEC §1.5), as if a
        ``GradScaler`` had passed ``grad_scale=s``.  When a scaler calls that
        ``step``, it states the gradients' scale itself (``s`` must agree, or
        ``unscale_`` was called and ``s`` only fixes the statistics).  Applies
        to one step.

        Raises:
            ValueError: unless ``grad_scale`` is a positive finite number.
        """
        self._declared_grad_scale = check_real("grad_scale", grad_scale, low=0.0, low_open=True)

    def configure_distributed(
        self, *, shard_factor_work: bool = False, drift_check_every: int | None = None
    ) -> None:
        """Opt-in data-parallel features (no effect on a world of one rank; not in checkpoints).

        Args:
            shard_factor_work: each rank computes the factor steps of the layers
                it owns (balanced by :meth:`_factor_step_cost`) and broadcasts
                the new factors (:mod:`singd.optim.sharded`).
            drift_check_every: every this many steps, compare checksums of every
                layer's factors and parameters across ranks and raise
                ``RuntimeError`` naming the first that differs
                (:mod:`singd.optim.drift`); ``None`` never checks.

        Raises:
            ValueError: on a non-bool ``shard_factor_work`` or a
                ``drift_check_every`` that is not ``None`` or a positive int.
        """
        check_bool("shard_factor_work", shard_factor_work)
        drift.check_interval(drift_check_every)
        self._shard_factor_work = shard_factor_work
        self._drift_check_every = drift_check_every

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated first; its supported layers get factors)."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
            if hasattr(self, "_collector"):
                self._refresh_layers(stacklevel=3)
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ layers
    def _refresh_layers(self, stacklevel: int) -> None:
        """Give factors and hooks to newly optimised layers; warn about new fallbacks.

        Every new layer's factors are made before any is registered, so a
        layer that is rejected (``ValueError``) leaves no state or hook behind.
        """
        layers, declined = find_layers(self._model, self.param_groups, self._declines)
        new_states = {
            layer.name: self._new_layer_state(layer, self.param_groups[layer.group_index])
            for layer in layers
            if layer.name not in self._layers
        }
        elementwise = []
        if self._ELEMENTWISE:
            elementwise = find_elementwise_layers(self._model, self.param_groups)
            taken = {id(p) for layer in layers for p in layer.params()}
            elementwise = [e for e in elementwise if not taken & {id(p) for p in e.params}]
        for layer in layers:
            if layer.name in new_states:
                self._layer_states[layer.name] = new_states[layer.name]
                self._placements[layer.name] = (layer.weight.device, layer.weight.dtype)
                self._layers[layer.name] = layer
                self._collector.add_layer(layer.name, layer.module, layer.kind)
        for layer in elementwise:
            if layer.name not in self._elementwise:
                self._elementwise[layer.name] = layer
                self._elementwise_collector.add_layer(
                    layer.name, layer.module, len(layer.params) == 2
                )
        new_fallback = fallback_params(self._model, self.param_groups, layers, elementwise)
        unseen = [name for key, name in new_fallback.items() if key not in self._fallback]
        self._fallback = new_fallback
        if unseen and self._warn_unsupported:
            why = "".join(f"; {name!r} falls back: {reason}" for name, reason in declined.items())
            warnings.warn(
                f"{type(self).__name__}: parameters outside Kronecker layers (singd.optim.kinds) "
                "get their group's fallback on their raw gradient (momentum SGD, or AdamW with "
                f"fallback='adamw'): {', '.join(unseen)}{why}",
                stacklevel=stacklevel,
            )

    def _collects(self, name: str) -> bool:
        group = self.param_groups[self._layers[name].group_index]
        if self.steps % group["T"] != 0:
            return False
        self._follow_weight(name)  # the hook's summaries use the factors
        return True

    def _collects_elementwise(self, name: str) -> bool:
        return self.steps % self.param_groups[self._elementwise[name].group_index]["T"] == 0

    def _elementwise_settings(self, name: str) -> tuple[str, str | None]:
        group = self.param_groups[self._elementwise[name].group_index]
        return group["kfac_approx"], group["loss_average"]

    def _elementwise_directions(
        self,
        grads: dict[int, Tensor],
        pending: dict[str, tuple[list[Tensor], bool]],
        amp: scaling.AmpStepInfo,
    ) -> tuple[dict[int, Tensor], dict[int, tuple[Tensor, Tensor]]]:
        """``ĝ = k² ∇θ`` of the elementwise parameters and their new ``(k, m)`` (SPEC-layers).

        With statistics pending, ``k`` moves first (``elementwise_factor_step``)
        and ``ĝ`` uses the new one; ``h`` still carrying the backward's ``s²``
        is divided by it here.
        """
        directions, new = {}, {}
        for name, layer in self._elementwise.items():
            group = self.param_groups[layer.group_index]
            hs, scale_removed = pending.get(name, (None, True))
            for index, param in enumerate(layer.params):
                state = self.state[param]
                k = state.get(K_KEY, torch.ones_like(param)).to(param)
                m = state.get(M_KEY, torch.zeros_like(param)).to(param)
                if hs is not None:
                    h = hs[index].to(param.device)
                    if not scale_removed and amp.backward_scale is not None:
                        h = h / amp.backward_scale**2
                    k, m = elementwise_factor_step(
                        k,
                        m,
                        h,
                        lr_cov=resolve_lr_cov(group["lr_cov"], self.steps),
                        damping=group["damping"],
                        alpha1=group["alpha1"],
                    )
                    new[id(param)] = (k, m)
                if id(param) in grads:
                    directions[id(param)] = elementwise_precondition(k, grads[id(param)])
        return directions, new

    def _follow_weight(self, name: str) -> None:
        """Move layer ``name``'s state to its weight's device and dtype if ``model.to`` moved it.

        The state is rebuilt as the layer's fresh state (so dtypes follow the
        same rules as at construction, e.g. ``preconditioner_dtype=None`` → the
        weight's) filled with the old factors' values; entries of
        :data:`_DTYPE_SPECIFIC` start afresh when the dtype changes.
        """
        layer = self._layers[name]
        placement = (layer.weight.device, layer.weight.dtype)
        if self._placements[name] == placement:
            return
        fresh = self._new_layer_state(layer, self.param_groups[layer.group_index])
        old = self._state_to_storage(self._layer_states[name])
        dtype_changed = self._placements[name][1] != placement[1]
        storage = {
            factor: new
            if factor not in old or (dtype_changed and factor in self._DTYPE_SPECIFIC)
            else old[factor]
            for factor, new in self._state_to_storage(fresh).items()
        }
        self._layer_states[name] = self._state_from_storage(layer, fresh, storage)
        self._placements[name] = placement

    def _hook_settings(self, name: str) -> HookSettings:
        layer = self._layers[name]
        group = self.param_groups[layer.group_index]
        input_dtype, grad_dtype = self._factor_dtypes(layer)
        return HookSettings(
            group["kfac_approx"], group["loss_average"], input_dtype, grad_dtype, layer.has_bias
        )

    def _backward_scale(self) -> float | None:
        """The scale of the running backward, if an attached scaler tells (SPEC §1.5)."""
        if self._grad_scaler is not None:
            return float(self._grad_scaler.get_scale())
        return None

    # -------------------------------------------------------------------- step
    def _skip(self, reason: str, culprits: list[str] | None = None) -> None:
        """Warn that the step is skipped; ``culprits`` name the non-finite tensors."""
        detail = ""
        if culprits:
            shown = "; ".join(f"{label} non-finite" for label in culprits[:MAX_NAMED])
            more = len(culprits) - MAX_NAMED
            detail = f": {shown}" + (f"; and {more} more" if more > 0 else "")
        warnings.warn(
            f"{type(self).__name__}: step skipped ({reason}{detail}); no state was changed",
            stacklevel=3,
        )

    def _param_labels(self) -> dict[int, str]:
        """``id(param)`` → how a skip warning names it (layer and weight/bias, or fallback)."""
        labels = {key: f"parameter {name!r}" for key, name in self._fallback.items()}
        for name, layer in self._elementwise.items():
            for param, role in zip(layer.params, ("weight", "bias"), strict=False):
                labels[id(param)] = f"elementwise layer {name!r}: {role}"
        labels.update(parameter_labels(self._layers.values()))
        return labels

    def _statistic_flags(
        self, pending: dict[str, PendingStatistics]
    ) -> tuple[list[str], list[Tensor]]:
        """Labels and finiteness flags of the tensors of every layer's two pending statistics.

        A statistic stored in several tensors has one flag (and its label) per tensor.
        """
        labels, tensors = [], []
        for name, stats in pending.items():
            for statistic, parts in zip(
                self._STATISTIC_NAMES, stats.summary_tensors(), strict=True
            ):
                labels += [f"layer {name!r}: {statistic}"] * len(parts)
                tensors += parts
        return labels, finite_flags(tensors)

    def _skip_for_inf_gradients(self) -> None:
        """The scaler found inf/NaN gradients: skip, naming them (one extra host sync)."""
        labels = self._param_labels()
        grads = [
            (labels.get(id(p), "a parameter"), p.grad)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        flags = _host_values(finite_flags([grad for _, grad in grads]))
        culprits = _culprits([f"{label} gradient" for label, _ in grads], flags)
        self._skip("the GradScaler found inf/NaN gradients", culprits)

    def _check_dense_grads(self) -> None:
        """Raise ``ValueError`` (before any state changes) if a gradient is sparse."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and param.grad.layout != torch.strided:
                    name = self._fallback.get(id(param), "a Kronecker layer's parameter")
                    scaling.clear_amp_attributes(self)  # GradScaler skips this when step raises
                    raise ValueError(
                        f"{type(self).__name__}: {param.grad.layout} (sparse) gradient of "
                        f"{name!r} is not supported; use dense gradients (e.g. "
                        "nn.Embedding(..., sparse=False))"
                    )

    def _unscaled_grads(self, grad_scale: float | None) -> dict[int, Tensor]:
        grads = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    grad = param.grad
                    grads[id(param)] = grad if grad_scale is None else grad * (1.0 / grad_scale)
        return grads

    def _reduce_across_ranks(
        self, pending: dict[str, PendingStatistics], grads: dict[int, Tensor]
    ) -> dict[int, Tensor]:
        """Full-batch statistics (in place) and gradients on every rank (:mod:`.distributed`)."""
        layers = [
            (pending[name], self.param_groups[layer.group_index]["loss_average"])
            for name, layer in self._layers.items()
            if name in pending
        ]
        return distributed.reduce_step_(
            layers, grads, distributed.world_size(), wrapper_averaged=self._wrapper_averages_grads
        )

    def _device(self) -> torch.device:
        """The device of the first optimised parameter (where flags are reduced)."""
        return self.param_groups[0]["params"][0].device

    def _factor_step_cost(self, layer: Layer) -> float:
        """Relative cost of ``layer``'s factor step, to balance sharded factor work.

        Dense ``d × d`` factors: ``d_i³ + d_o³`` (products, factorisations).
        """
        return float(layer.input_dim**3 + layer.output_dim**3)

    def _owners(self) -> dict[str, int] | None:
        """Layer → the rank computing its factor steps, or ``None`` (every rank computes all)."""
        world = distributed.world_size()
        if not (self._shard_factor_work and world > 1):
            return None
        costs = {name: self._factor_step_cost(layer) for name, layer in self._layers.items()}
        return sharded.assign_owners(costs, world)

    def _owned_layers(self, pending: dict[str, PendingStatistics]) -> list[str]:
        """The layers of ``pending`` whose factor step this rank computes."""
        owners = self._owners()
        if owners is None:
            return list(pending)
        return [name for name in pending if owners[name] == distributed.rank()]

    def _share_layer_states(
        self, pending: dict[str, PendingStatistics], computed: dict[str, LayerState]
    ) -> dict[str, LayerState]:
        """Every rank's new states of ``pending``'s layers from their owners' ``computed``."""
        owners = self._owners()
        if owners is None:
            return computed
        storages = sharded.broadcast_storages(
            {name: owners[name] for name in pending},
            {name: self._state_to_storage(state) for name, state in computed.items()},
            {name: self._state_to_storage(self._layer_states[name]) for name in pending},
        )
        return {
            name: computed[name]
            if name in computed
            else self._state_from_storage(self._layers[name], self._layer_states[name], storage)
            for name, storage in storages.items()
        }

    def _replicated_tensors(self) -> dict[str, list[Tensor]]:
        """Label → the tensors every rank must hold bitwise equal (drift check).

        Sharded (``DTensor``) parameters are each rank's own and not compared.
        """
        entries: dict[str, list[Tensor]] = {}
        for name, layer in self._layers.items():
            storage = self._state_to_storage(self._layer_states[name])
            factors = [t for factor in storage.values() for t in factor.values()]
            entries[f"layer {name!r}: factors"] = factors
            entries[f"layer {name!r}: parameters"] = drift.replicated(layer.params())
        params = {id(p): p for group in self.param_groups for p in group["params"]}
        for key, label in self._fallback.items():
            entries[f"parameter {label!r}"] = drift.replicated([params[key]])
        return entries

    def _reduce_elementwise_across_ranks(
        self, pending: dict[str, tuple[list[Tensor], bool]]
    ) -> None:
        """Full-batch ``h`` on every rank: weighted like gradient statistics, then summed.

        ``h`` is a gradient-side statistic (``N Σ r²`` with ``g`` carrying ``1/N_r``):
        averaged over ranks for a mean loss, summed for a sum loss
        (:func:`singd.optim.distributed.rank_weights`).  One ``all_reduce`` per layer,
        in module order (every rank collects the same layers in the same steps).
        """
        world = distributed.world_size()
        if world == 1:
            return
        for name, (hs, _) in pending.items():
            group = self.param_groups[self._elementwise[name].group_index]
            _, weight = distributed.rank_weights(group["loss_average"], world)
            flat = torch.cat([h.reshape(-1) for h in hs]) * weight
            torch.distributed.all_reduce(flat)
            for h, chunk in zip(hs, flat.split([h.numel() for h in hs]), strict=True):
                h.copy_(chunk.view_as(h))

    def _new_layer_states(
        self,
        pending: dict[str, PendingStatistics],
        prepared: dict[str, FactorStepInputs],
        reads: Iterator[float],
        amp: scaling.AmpStepInfo,
    ) -> dict[str, LayerState]:
        """The factors after this statistics step (SPEC §1.3/§1.2), one new state per layer.

        ``reads`` yields, per layer of ``pending`` in order, the exponent of
        the hook's normalisation, then the values of ``prepared[name].reads``.
        The gradient statistic's correction ``2^(−log2_factor) / s²`` is exact
        in float64 (SPEC §1.5, docs/SPEC.md).
        """
        new_states = {}
        for name, stats in pending.items():
            layer = self._layers[name]
            group = self.param_groups[layer.group_index]
            log2_factor = int(next(reads))
            correction = math.ldexp(
                scaling.statistics_correction(stats.grad_scale, amp, name), -log2_factor
            )
            lr_cov = resolve_lr_cov(group["lr_cov"], self.steps)
            values = list(itertools.islice(reads, len(prepared[name].reads)))
            new_states[name] = self._updated_layer_state(
                layer, group, stats, prepared[name], values, correction, lr_cov
            )
        return new_states

    def _layer_directions(
        self, layer: Layer, state: LayerState, weight_grad: Tensor, bias_grad: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """``ĝ`` of ``W`` and ``b``: ``∇W~ = [∇W, ∇b]`` preconditioned, split back (SPEC §1.4)."""
        matrix = layer.gradient_matrix(weight_grad, bias_grad)
        return layer.split(self._precondition(layer, state, matrix))

    def _directions(
        self, grads: dict[int, Tensor], states: dict[str, LayerState]
    ) -> dict[int, Tensor]:
        """Every parameter's update direction ``ĝ`` (before weight decay, SPEC §1.4).

        Only parameters with a gradient get one: if just one of ``W``, ``b``
        has a gradient, the other enters ``∇W~`` as zeros but is not moved.
        """
        directions = {key: grad for key, grad in grads.items() if key in self._fallback}
        directions.update(
            parameter_directions(
                self._layers.values(),
                grads,
                lambda layer, weight, bias: self._layer_directions(
                    layer, states[layer.name], weight, bias
                ),
            )
        )
        return directions

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step (SPEC §1.4a order); see the class docstring."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_dense_grads()
        for name in self._layers:
            self._follow_weight(name)
        amp = scaling.read_amp_attributes(self, self._declared_grad_scale)
        if amp.via_scaler:  # each rank's scaler saw its own (or its shard's) gradients
            try:
                distributed.agreed_found_inf(amp.found_inf, self._device())
            except RuntimeError:
                scaling.clear_amp_attributes(self)
                raise
        self._declared_grad_scale = None  # applies to this step only
        pending = self._collector.pop_all()
        pending_elementwise = self._elementwise_collector.pop_all()
        if amp.found_inf:
            self._skip_for_inf_gradients()
            return loss
        grads = self._reduce_across_ranks(pending, self._unscaled_grads(amp.grad_scale))
        self._reduce_elementwise_across_ranks(pending_elementwise)
        prepared = {
            name: self._prepare_factor_step(self._layers[name], pending[name])
            for name in self._owned_layers(pending)
        }
        param_labels = self._param_labels()
        grad_labels = [f"{param_labels.get(key, 'a parameter')} gradient" for key in grads]
        grad_flags = finite_flags(list(grads.values()))
        stats_labels, stats_flags = self._statistic_flags(pending)
        values = iter(
            _host_values(
                [
                    *grad_flags,
                    *stats_flags,
                    *(
                        r
                        for name, inputs in prepared.items()
                        for r in (pending[name].grad_scale.log2_factor, *inputs.reads)
                    ),
                ]
            )
        )
        grad_ok = list(itertools.islice(values, len(grad_flags)))
        if not all(grad_ok):
            self._skip("non-finite gradients", _culprits(grad_labels, grad_ok))
            return loss
        stats_ok = list(itertools.islice(values, len(stats_flags)))
        if not all(stats_ok):
            self._skip("non-finite curvature statistics", _culprits(stats_labels, stats_ok))
            return loss
        try:
            owned = {name: pending[name] for name in prepared}
            new_states = self._new_layer_states(owned, prepared, values, amp)
        except ValueError:
            scaling.clear_amp_attributes(self)
            raise
        new_states = self._share_layer_states(pending, new_states)
        states = {**self._layer_states, **new_states}
        directions = self._directions(grads, states)
        elementwise_directions, new_elementwise = self._elementwise_directions(
            grads, pending_elementwise, amp
        )
        directions.update(elementwise_directions)
        result_labels, results = [], []
        for key, (k, _) in new_elementwise.items():
            result_labels.append(f"{param_labels.get(key, 'a parameter')} k after the factor step")
            results.append(k)
        for name, state in new_states.items():
            for factor, storage in self._state_to_storage(state).items():
                result_labels += [f"layer {name!r}: {factor} after the factor step"] * len(storage)
                results += storage.values()
        result_labels += [f"{param_labels.get(key, 'a parameter')} update" for key in directions]
        results += directions.values()
        result_ok = _host_values(finite_flags(results))
        if not all(result_ok):
            self._skip(
                "non-finite factors or update after the factor step",
                _culprits(result_labels, result_ok),
            )
            return loss
        self._layer_states.update(new_states)
        for group in self.param_groups:
            params = []
            for param in group["params"]:
                if id(param) not in directions:
                    continue
                state = self.state[param]
                _follow_param(param, state)
                if id(param) in new_elementwise:
                    state[K_KEY], state[M_KEY] = new_elementwise[id(param)]
                if id(param) in self._fallback and group["fallback"] == "adamw":
                    _adamw_step(param, directions[id(param)], state, group)
                    continue
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                params.append(param)
            # one foreach call per tensor type: DTensor shards (FSDP2) and plain tensors
            for kind in dict.fromkeys(type(p) for p in params):
                same = [p for p in params if type(p) is kind]
                momentum_parameter_updates(
                    same,
                    [distributed.like_param(directions[id(p)], p) for p in same],
                    [self.state[p]["momentum_buffer"] for p in same],
                    lr=group["lr"],
                    momentum=group["momentum"],
                    weight_decay=group["weight_decay"],
                )
        if amp.backward_scale is not None:
            self._grad_scale_prev = amp.backward_scale
        self.steps += 1
        if drift.due(self._drift_check_every, self.steps):
            drift.check_replicas(self._replicated_tensors())
        return loss

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state plus an entry of plain tensors for the factors.

        Loadable with ``torch.load(..., weights_only=True)``: a callable
        ``lr_cov`` is saved as a marker and kept from the loading optimizer.
        Statistics pending between a backward and ``step`` are not saved.
        """
        state = super().state_dict()
        state["param_groups"] = [checkpoint.plain_group(group) for group in state["param_groups"]]
        state[checkpoint.KEY] = checkpoint.pack(
            steps=self.steps,
            grad_scale_prev=self._grad_scale_prev,
            layers={
                name: {"layout": self._layout(s), "factors": self._state_to_storage(s)}
                for name, s in self._layer_states.items()
            },
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; validated in full before anything changes.

        Tensors move to the parameters' devices.  Raises ``ValueError`` on
        missing/extra layers, shape, structure or type mismatches and
        corrupted entries, leaving the optimizer unchanged.
        """
        for name in self._layers:
            self._follow_weight(name)  # restore into factors placed like the weights now
        entry = checkpoint.unpack(state_dict, self.layer_names())
        groups = checkpoint.restore_groups(state_dict, self.param_groups)
        for group in groups:
            self._check_group(group)
        checkpoint.check_param_state(state_dict, self.param_groups)
        new_states = checkpoint.restore_layer_states(
            entry.layers,
            self._layer_states,
            layout=self._layout,
            restore=lambda name, current, factors: self._state_from_storage(
                self._layers[name], current, factors
            ),
        )
        torch_state = {k: v for k, v in state_dict.items() if k != checkpoint.KEY}
        super().load_state_dict({**torch_state, "param_groups": groups})
        self._layer_states.update(new_states)
        self.steps = entry.steps
        self._grad_scale_prev = entry.grad_scale_prev
        self._collector.pop_all()
        self._elementwise_collector.pop_all()
