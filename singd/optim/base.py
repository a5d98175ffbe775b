"""The optimizer shared by SINGD and KFAC: param groups, hooks, the step, checkpoints.

:class:`KroneckerOptimizer` holds the state and is the one place that writes
it.  The rest lives beside it: the per-layer maths in a
:class:`~singd.optim.preconditioner.Preconditioner` (SINGD's, KFAC's; the
equations in :mod:`singd.optim.updates`), the layers, their states and the
fallback parameters in a :class:`~singd.optim.table.LayerTable`, the planning
of a step in :mod:`singd.optim.plan` and its checks in
:mod:`singd.optim.checks`, the AdamW fallback in :mod:`singd.optim.fallback`,
checkpoint validation in :mod:`singd.optim.checkpoint`, the ranks in
:mod:`.distributed`, :mod:`.sharded` and :mod:`.drift`.

A step (SPEC §1.4a) gathers its inputs (pops the statistics, combines them
and the gradients across ranks, unscales the gradients), plans
(:func:`~singd.optim.plan.plan_step`: new factors and every parameter's
update direction, checked to be finite) and commits the plan.  A step with
inf/NaN gradients, statistics or results is skipped with a warning that
names the layers and tensors at fault, and leaves every piece of state
(parameters, buffers, factors, ``steps``) untouched; its pending statistics
are dropped.  The finiteness flags of the statistics, the exponents of the
hooks' power-of-two normalisation (SPEC §1.5, docs/SPEC.md) and every scalar
a factor step needs as a Python float (SINGD's traces) are read in one host
sync; the results' finiteness in a second.  The gradients are checked
through their update directions (a non-finite gradient entry makes its
direction non-finite) and read only after a failed check, to name them (a
step the ``GradScaler`` skips reads once, to name the culprits).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from singd.optim import checkpoint, checks, distributed, drift, fallback, plan, scaling
from singd.optim.checks import Skip
from singd.optim.elementwise import K_KEY, M_KEY
from singd.optim.hooks import (
    CurvatureCollector,
    ElementwiseCollector,
    HookSettings,
    PendingStatistics,
)
from singd.optim.layers import ElementwiseLayer, Layer, unwrap_model
from singd.optim.plan import Gathered, StepContext, StepPlan
from singd.optim.preconditioner import Preconditioner
from singd.optim.table import LayerTable
from singd.optim.updates import momentum_parameter_updates
from singd.optim.validation import check_bool, check_real

LayerState = dict[str, Any]


def _follow_param(param: Tensor, state: dict[str, Any]) -> None:
    """Move a parameter's buffers to its device and dtype (``model.to`` after construction)."""
    for key, value in state.items():
        if isinstance(value, Tensor) and (value.device, value.dtype) != (param.device, param.dtype):
            state[key] = value.to(device=param.device, dtype=param.dtype)


class KroneckerOptimizer(Optimizer):
    """Base of :class:`~singd.SINGD` and :class:`~singd.KFAC` (plumbing only).

    Args:
        model: the model (``(Distributed)DataParallel`` wrappers are unwrapped).
        params: parameters or param groups; ``None`` → every parameter of
            ``model`` that requires grad.
        defaults: default hyper-parameters of a group.
        preconditioner: the per-layer maths (:mod:`singd.optim.preconditioner`).
        warn_unsupported: warn once, naming them, about fallback parameters.
        init_grad_scale: accepted (validated) for the public singd package's
            API; no effect, the statistics are scale-free (SPEC §1.5, docs/SPEC.md).
    """

    #: ``GradScaler`` calls ``step`` itself and passes ``grad_scale``/``found_inf``.
    _step_supports_amp_scaling = True

    #: Set by :func:`singd.optim.compiled.compile_parameter_updates`; ``None``: eager.
    _compiled_parameter_updates: Callable[..., None] | None = None

    def __init__(
        self,
        model: nn.Module,
        params: Any,
        defaults: dict[str, Any],
        preconditioner: Preconditioner[Any],
        *,
        warn_unsupported: bool,
        init_grad_scale: float,
    ) -> None:
        self._preconditioner = preconditioner
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
        self._table = LayerTable()
        if params is None:
            params = [p for p in self._model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self._collector = CurvatureCollector(
            is_active=self._collects,
            settings=self._hook_settings,
            summarise_input=lambda name, A: self._preconditioner.summarise_input(
                self._table.states[name], A
            ),
            summarise_grad=lambda name, G: self._preconditioner.summarise_grad(
                self._table.states[name], G
            ),
            backward_scale=self._backward_scale,
        )
        self._elementwise_collector = ElementwiseCollector(
            is_active=self._collects_elementwise,
            settings=self._elementwise_settings,
            backward_scale=self._backward_scale,
        )
        self._warn_unsupported = warn_unsupported
        try:
            self._refresh_layers(stacklevel=4)
        except BaseException:  # e.g. a rejected layer, or the warning raised as an error
            self._collector.remove()  # the model must not keep hooks of a dead optimizer
            self._elementwise_collector.remove()
            raise

    # --------------------------------------------------------------- public API
    def layer_names(self) -> list[str]:
        """Qualified names of the Kronecker-preconditioned layers, in module order."""
        return list(self._table.layers)

    def layer_state(self, name: str) -> LayerState:
        """The live factors of layer ``name`` (see the subclass for the keys)."""
        if name not in self._table.states:
            raise ValueError(f"no Kronecker-preconditioned layer named {name!r}")
        return self._table.states[name]

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
                it owns (balanced by ``Preconditioner.factor_step_cost``) and broadcasts
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
            self._preconditioner.check_group(self.param_groups[-1])
            if hasattr(self, "_collector"):
                self._refresh_layers(stacklevel=3)
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ layers
    def _refresh_layers(self, stacklevel: int) -> None:
        """Give factors and hooks to newly optimised layers; warn about new fallbacks."""
        added = self._table.refresh(self._model, self.param_groups, self._preconditioner)
        for layer in added.layers:
            self._collector.add_layer(layer.name, layer.module, layer.kind)
        for layer in added.elementwise:
            self._elementwise_collector.add_layer(layer.name, layer.module, len(layer.params) == 2)
        if added.unseen and self._warn_unsupported:
            why = "".join(
                f"; {name!r} falls back: {reason}" for name, reason in added.declined.items()
            )
            warnings.warn(
                f"{type(self).__name__}: parameters outside Kronecker layers (singd.optim.kinds) "
                "get their group's fallback on their raw gradient (momentum SGD, or AdamW with "
                f"fallback='adamw'): {', '.join(added.unseen)}{why}",
                stacklevel=stacklevel,
            )

    def _collects(self, name: str) -> bool:
        group = self._group(self._table.layers[name])
        if self.steps % group["T"] != 0:
            return False
        self._follow_weight(name)  # the hook's summaries use the factors
        return True

    def _collects_elementwise(self, name: str) -> bool:
        return self.steps % self._group(self._table.elementwise[name])["T"] == 0

    def _elementwise_settings(self, name: str) -> tuple[str, str | None]:
        group = self._group(self._table.elementwise[name])
        return group["kfac_approx"], group["loss_average"]

    def _follow_weight(self, name: str) -> None:
        """Move layer ``name``'s state with its weight (:meth:`LayerTable.follow_weight`)."""
        self._table.follow_weight(name, self._group(self._table.layers[name]), self._preconditioner)

    def _hook_settings(self, name: str) -> HookSettings:
        layer = self._table.layers[name]
        group = self._group(layer)
        input_dtype, grad_dtype = self._preconditioner.factor_dtypes(layer, group)
        return HookSettings(
            group["kfac_approx"],
            group["loss_average"],
            input_dtype,
            grad_dtype,
            layer.has_bias,
            self._preconditioner.grad_gram_diagonal(self._table.states[name]),
            self._preconditioner.input_gram_diagonal(self._table.states[name])
            and input_dtype.itemsize >= 4,
        )

    def _backward_scale(self) -> float | None:
        """The scale of the running backward, if an attached scaler tells (SPEC §1.5)."""
        if self._grad_scaler is not None:
            return float(self._grad_scaler.get_scale())
        return None

    # -------------------------------------------------------------------- step
    def _skip(self, skip: Skip) -> None:
        """Warn (at ``step``'s caller) that the step is skipped, naming the non-finite tensors."""
        warnings.warn(checks.skip_message(type(self).__name__, skip), stacklevel=3)

    def _check_dense_grads(self) -> None:
        """Raise ``ValueError`` (before any state changes) if a gradient is sparse."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and param.grad.layout != torch.strided:
                    name = self._table.fallback.get(id(param), "a Kronecker layer's parameter")
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
            (pending[name], self._group(layer)["loss_average"])
            for name, layer in self._table.layers.items()
            if name in pending
        ]
        return distributed.reduce_step_(
            layers, grads, distributed.world_size(), wrapper_averaged=self._wrapper_averages_grads
        )

    def _device(self) -> torch.device:
        """The device of the first optimised parameter (where flags are reduced)."""
        return self.param_groups[0]["params"][0].device

    def _group(self, layer: Layer | ElementwiseLayer) -> dict[str, Any]:
        """The param group holding ``layer``'s parameters."""
        return self.param_groups[layer.group_index]

    def _replicated(self) -> dict[str, list[Tensor]]:
        """The drift check's entries (:func:`singd.optim.drift.entries`)."""
        params = {id(p): p for group in self.param_groups for p in group["params"]}
        layers = {
            name: (
                [
                    t
                    for f in self._preconditioner.to_storage(self._table.states[name]).values()
                    for t in f.values()
                ],
                layer.params(),
            )
            for name, layer in self._table.layers.items()
        }
        return drift.entries(
            layers, {label: params[key] for key, label in self._table.fallback.items()}
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step (SPEC §1.4a order): gather, plan, then commit or skip."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = self._gather()
        planned = gathered if isinstance(gathered, Skip) else self._plan(gathered)
        if isinstance(planned, Skip):
            self._skip(planned)
            return loss
        self._commit(planned)
        return loss

    def _gather(self) -> Gathered | Skip:
        """This step's inputs: statistics popped and reduced across ranks, gradients unscaled.

        A skip when the ``GradScaler`` found inf/NaN gradients; the pending
        statistics are dropped either way.
        """
        self._check_dense_grads()
        for name in self._table.layers:
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
            params = [p for group in self.param_groups for p in group["params"]]
            return checks.inf_gradients_skip(self._table.param_labels(), params)
        grads = self._reduce_across_ranks(pending, self._unscaled_grads(amp.grad_scale))
        distributed.reduce_elementwise_(
            pending_elementwise,
            {
                name: self._group(layer)["loss_average"]
                for name, layer in self._table.elementwise.items()
                if name in pending_elementwise
            },
        )
        return Gathered(amp, pending, pending_elementwise, grads)

    def _context(self) -> StepContext:
        """This optimizer's state as a step is planned from it."""
        return StepContext(
            self._table,
            self.param_groups,
            self._preconditioner,
            self.state,
            self.steps,
            self._shard_factor_work,
        )

    def _plan(self, gathered: Gathered) -> Skip | StepPlan:
        """:func:`singd.optim.plan.plan_step` of this optimizer's state."""
        try:
            return plan.plan_step(self._context(), gathered)
        except ValueError:
            scaling.clear_amp_attributes(self)  # GradScaler skips this when step raises
            raise

    def _commit(self, planned: StepPlan) -> None:
        """Write a planned step: factors, elementwise ``(k, m)``, parameters (SPEC §1.4), ``steps``.

        Per group, the momentum-SGD parameters share one foreach update per
        tensor type; ``fallback="adamw"`` parameters take their own step.
        """
        directions = planned.directions
        self._table.states.update(planned.layer_states)
        for group in self.param_groups:
            params = []
            for param in group["params"]:
                if id(param) not in directions:
                    continue
                state = self.state[param]
                _follow_param(param, state)
                if id(param) in planned.elementwise:
                    state[K_KEY], state[M_KEY] = planned.elementwise[id(param)]
                if id(param) in self._table.fallback and group["fallback"] == "adamw":
                    fallback.adamw_step(param, directions[id(param)], state, group)
                    continue
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                params.append(param)
            # one foreach call per tensor type: DTensor shards (FSDP2) and plain tensors
            for kind in dict.fromkeys(type(p) for p in params):
                same = [p for p in params if type(p) is kind]
                (self._compiled_parameter_updates or momentum_parameter_updates)(
                    same,
                    [distributed.like_param(directions[id(p)], p) for p in same],
                    [self.state[p]["momentum_buffer"] for p in same],
                    lr=group["lr"],
                    momentum=group["momentum"],
                    weight_decay=group["weight_decay"],
                )
        if planned.backward_scale is not None:
            self._grad_scale_prev = planned.backward_scale
        self.steps += 1
        if drift.due(self._drift_check_every, self.steps):
            drift.check_replicas(self._replicated())

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
                name: {
                    "layout": self._preconditioner.layout(s),
                    "factors": self._preconditioner.to_storage(s),
                }
                for name, s in self._table.states.items()
            },
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; validated in full before anything changes.

        Tensors move to the parameters' devices.  Raises ``ValueError`` on
        missing/extra layers, shape, structure or type mismatches and
        corrupted entries, leaving the optimizer unchanged.
        """
        for name in self._table.layers:
            self._follow_weight(name)  # restore into factors placed like the weights now
        loaded = checkpoint.validate(
            state_dict,
            param_groups=self.param_groups,
            check_group=self._preconditioner.check_group,
            current=self._table.states,
            layout=self._preconditioner.layout,
            restore=self._context().restore,
        )
        torch_state = {k: v for k, v in state_dict.items() if k != checkpoint.KEY}
        super().load_state_dict({**torch_state, "param_groups": loaded.groups})
        self._table.states.update(loaded.layer_states)
        self.steps = loaded.entry.steps
        self._grad_scale_prev = loaded.entry.grad_scale_prev
        self._collector.pop_all()
        self._elementwise_collector.pop_all()
