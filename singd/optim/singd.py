"""The SINGD optimizer (SPEC §1.3–§1.5): state and plumbing around :mod:`.updates`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from singd.optim import batched, updates
from singd.optim import telemetry as telemetry_math
from singd.optim.base import KroneckerOptimizer
from singd.optim.compat import FactorView, ModuleNameView
from singd.optim.hooks import GradGramDiagonal, PendingStatistics
from singd.optim.kinds import InputGramDiagonal, InputStatistic, LayerKind
from singd.optim.layers import Layer
from singd.optim.preconditioner import FactorStepInputs, LayerStep, Preconditioner, StepScalars
from singd.optim.sharded import Storage
from singd.optim.updates import (
    HALF_DTYPES,
    FactorState,
    FactorStep,
    Traces,
    compensated_factor_step,
    keeps_outer,
    master_factor_step,
    outer_pays_for_one_product,
    singd_precondition,
    singd_self_inners,
    singd_trace_terms,
    singd_update_factors,
    stochastic_factor_step,
)
from singd.optim.validation import check_singd_group
from singd.structures import get_structure
from singd.structures.base import StructuredMatrix
from singd.structures.diagonal import Diagonal

FACTORS = ("K", "C", "m_K", "m_C")
#: The Kahan compensation term of each factor (``factor_guard="compensated"``).
COMPENSATIONS = {"K": "c_K", "C": "c_C"}
#: ``factor_guard``'s default: the guard acts only on bfloat16/float16 factors.
DEFAULT_FACTOR_GUARD = "compensated"


class SINGD(KroneckerOptimizer):
    r"""Structured inverse-free natural gradient descent (Lin et al., ICML 2024).

    For every layer of a registered kind (:mod:`singd.optim.kinds`: Linear, Conv1d/2d/3d,
    Embedding; user kinds) whose weight is optimised, with
    ``W~ = [W, b]`` (d_o × d_i~) and structured factors ``K`` (d_i~ × d_i~),
    ``C`` (d_o × d_o) initialised to ``I``, momenta ``m_K = m_C = 0``::

        β2 = lr, α2 = momentum, λ = damping, γ = weight_decay, β1 = lr_cov(steps)
        for each step (steps = completed steps, from 0):
            if steps % T == 0:                      # statistics were collected
                H_K = Σ_passes Π̂((KᵀAᵀ)(KᵀAᵀ)ᵀ)     # forward hook, current K
                H_C = Σ_passes Π̂((CᵀGᵀ)(CᵀGᵀ)ᵀ)     # output-tensor hook, current C
                c² = λ tr(CᵀC); κ² = λ tr(KᵀK)
                m_K ← α1 m_K + ½/d_o (tr(H_C) H_K + c² Π̂(KᵀK) − d_o I)
                m_C ← α1 m_C + ½/d_i (tr(H_K) H_C + κ² Π̂(CᵀC) − d_i I)
                    # kfac_like (IKFAC, α1 = 0): m = ½(H + λ Π̂(·ᵀ·) − I)
                    # normalize_lr_cov: ½(1 − α1) and β1 / max(1, ‖m‖_∞)
                K ← K − β1 K m_K;  C ← C − β1 C m_C
                    # bf16/fp16 factors: guarded (factor_guard), e.g. Kahan:
                    # y = c − β1 K m; K' = K + y; c ← y − (K' − K)
            ĝ = C Cᵀ ∇W~ K Kᵀ                        # the just-updated factors
            ĝ += γ W~;  m_μ ← α2 m_μ + ĝ;  W~ ← W~ − β2 m_μ
        LayerNorm / RMSNorm weight and bias θ (SPEC-layers; singd.optim.elementwise):
            if steps % T == 0:  h = N Σ_rows r² (r = g ⊙ x̂ for γ, g for β)
                m ← α1 m + ½ (k² h + λ k² − 1);  k ← k (1 − β1 m)      # k = 1, m = 0 at first
            ĝ = k² ∇θ, then weight decay, momentum and lr as above
        other parameters (fallback, warned about once), fallback="sgd" (default):
            ĝ = ∇p + γ p;  m_μ ← α2 m_μ + ĝ;  p ← p − β2 m_μ
        fallback="adamw": torch.optim.AdamW(lr=β2, betas=fallback_betas,
            eps=fallback_eps, weight_decay=γ) on ∇p

    ``A``/``G`` are formed per SPEC §1.1 (``kfac_approx``, ``loss_average``)
    in the factors' dtypes (``preconditioner_dtype``: one per factor, ``None``
    → the weight's dtype), only in training mode with grad enabled, and
    summed over the backward passes before a step.  When ``α1 = 0`` the
    momenta are never read, so ``m_K``/``m_C`` stay zero matrices.

    Mixed precision (SPEC §1.5).  ``GradScaler.step(opt)`` calls ``step``
    itself (``_step_supports_amp_scaling``) with ``found_inf`` and
    ``grad_scale``: inf steps are skipped (with a warning; no state changes),
    scaled gradients are unscaled here, and the statistics are corrected by
    ``2^(−2k) / s_t²`` in float64.  ``2^k`` is the power of two by which the
    hook normalised ``G`` (the largest squared column norm of ``2^k G`` is in
    ``[1/4, 1)``), so ``H_C`` is formed scale-free and cannot overflow a
    float16 factor whatever the loss scale (docs/SPEC.md, §1.5 deviation);
    a step is skipped only for genuinely non-finite values, never because of
    the scale, so the scaler cannot deadlock.  If the gradients were already
    unscaled (``scaler.unscale_(opt)``, e.g. for
    clipping), torch passes ``grad_scale=None`` and the scale of the backward
    is lost; :meth:`attach_grad_scaler` lets the hooks read it at backward
    time instead.  Without it, such a statistics step raises ``ValueError``
    rather than use wrongly scaled statistics.

    ``layer_state(name)`` maps ``"K"``, ``"C"``, ``"m_K"``, ``"m_C"`` to the
    live ``StructuredMatrix`` objects of a layer (replaced, not mutated, by a
    step); ``state[p]["momentum_buffer"]`` is ``m_μ``.  The public singd
    package's ``Ks``, ``Cs``, ``m_Ks``, ``m_Cs`` and ``module_names`` are live
    read-only views of the same state (:mod:`singd.optim.compat`).

    Robustness: a step with non-finite gradients, statistics or results is
    skipped with a warning that names the layers and tensors (e.g. ``layer
    '0': H_C (curvature statistic of the output gradients) non-finite``),
    drops its statistics and changes no state.

    Data parallel: with ``torch.distributed`` initialised and a world size
    ``R > 1``, the statistics of each step are combined across ranks before
    the factor step — ``H_K`` averaged, ``H_C`` averaged for a mean loss and
    summed for ``loss_average=None`` — and the gradients of an unwrapped
    model averaged (a ``DistributedDataParallel`` or ``fully_shard`` model's
    are already), so that with equal per-rank batches every rank takes the
    full-batch step (derivation: :mod:`singd.optim.distributed`; opt-in
    sharded factor work and drift check: :meth:`configure_distributed`).

    Host syncs per step: one read of the statistics' finiteness flags and
    traces, one finiteness check of the results, which covers the gradients
    through their directions (plus one read of the gradients after a failed
    check, to name them; plus ``‖m‖_∞`` per factor, or per batch
    of diagonal layers, with ``normalize_lr_cov``, and the ``GradScaler``'s
    attributes).

    Same-shaped layers with diagonal float32/float64 ``K`` and ``C`` in one
    group take one stacked factor step (:mod:`singd.optim.batched`, the same
    bits as layer by layer).

    Args:
        model: the model (``DistributedDataParallel``/``DataParallel`` are
            unwrapped; hooks go on the wrapped module).
        params: parameters or param groups (``None``: all of ``model`` that
            require grad).  Every hyper-parameter below except ``model``,
            ``warn_unsupported`` and ``init_grad_scale`` may be set per group;
            a layer's weight and bias must share a group.
        lr: β2.
        momentum: α2 ∈ [0, 1).
        damping: λ ≥ 0.
        alpha1: Riemannian momentum α1 ∈ [0, 1) (0 with ``kfac_like``).
        weight_decay: γ ≥ 0.
        T: update the factors every ``T`` steps.
        loss_average: ``"batch"``, ``"batch+sequence"`` or ``None`` (sum).
        lr_cov: β1 ∈ [0, 1] or a callable of ``steps``.
        structures: structure names of (``K``, ``C``), SPEC §2.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        warn_unsupported: warn about fallback parameters.
        kfac_like: IKFAC mode.
        preconditioner_dtype: dtypes of (``K``, ``C``) or ``None``.
        init_grad_scale: accepted (a positive finite number) for the public
            singd package's API; no effect (the statistics are scale-free).
        normalize_lr_cov: normalised covariance step (SPEC §1.3).
        factor_guard: swamping guard of bfloat16/float16 factors (inactive for
            float32/float64 ones): ``"compensated"`` (default; Kahan term
            ``c_K``, ``c_C`` per factor), ``"stochastic"`` (stochastic
            rounding of the float32 update), ``"master"`` (float32 ``K``,
            ``C``; products with a half copy) or ``None`` (plain update).  See
            ``docs/optimizer.md``, "Swamping guard".
        telemetry: record, at every factor step, the share of each factor's
            entries that the step left unchanged (:meth:`telemetry`); off: no
            work at all.  One extra ``K m`` product per factor and step, no
            host sync.
        fallback: optimizer of the parameters outside Kronecker layers:
            ``"sgd"`` (default: momentum SGD with the group's ``lr``,
            ``momentum``, ``weight_decay``, as the public singd package and
            as the Kronecker layers' own update, so one ``lr`` serves both) or
            ``"adamw"`` (``torch.optim.AdamW`` semantics; its ``lr`` usually
            wants another scale: give those parameters their own group).
        fallback_betas, fallback_eps: AdamW's ``betas`` and ``eps``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> opt = SINGD(model, lr=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    _preconditioner: SingdPreconditioner

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        lr: float = 0.001,
        momentum: float = 0.9,
        damping: float = 0.001,
        alpha1: float = 0.5,
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: str | None = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        structures: tuple[str, str] = ("dense", "dense"),
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        kfac_like: bool = False,
        preconditioner_dtype: tuple[torch.dtype | None, torch.dtype | None] = (None, None),
        init_grad_scale: float = 1.0,
        normalize_lr_cov: bool = False,
        factor_guard: str | None = DEFAULT_FACTOR_GUARD,
        telemetry: bool = False,
        fallback: str = "sgd",
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
    ) -> None:
        if not isinstance(telemetry, bool):
            raise TypeError(f"telemetry must be True or False, got {telemetry!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "alpha1": alpha1,
            "weight_decay": weight_decay,
            "T": T,
            "loss_average": loss_average,
            "lr_cov": lr_cov,
            "structures": structures,
            "kfac_approx": kfac_approx,
            "kfac_like": kfac_like,
            "preconditioner_dtype": preconditioner_dtype,
            "normalize_lr_cov": normalize_lr_cov,
            "factor_guard": factor_guard,
            "fallback": fallback,
            "fallback_betas": fallback_betas,
            "fallback_eps": fallback_eps,
        }
        super().__init__(
            model,
            params,
            defaults,
            SingdPreconditioner(telemetry=telemetry),
            warn_unsupported=warn_unsupported,
            init_grad_scale=init_grad_scale,
        )

    # ------------------------------------- the public singd package's attributes
    @property
    def Ks(self) -> FactorView:
        """Layer name → ``K``: a live read-only view (:mod:`singd.optim.compat`)."""
        return FactorView("SINGD.Ks", self._table.states, "K", _every_layer)

    @property
    def Cs(self) -> FactorView:
        """Layer name → ``C``: a live read-only view (:mod:`singd.optim.compat`)."""
        return FactorView("SINGD.Cs", self._table.states, "C", _every_layer)

    @property
    def m_Ks(self) -> FactorView:
        """Layer name → ``m_K`` for the layers of groups with ``alpha1 != 0`` (live, read-only)."""
        return FactorView("SINGD.m_Ks", self._table.states, "m_K", self._has_momenta)

    @property
    def m_Cs(self) -> FactorView:
        """Layer name → ``m_C`` for the layers of groups with ``alpha1 != 0`` (live, read-only)."""
        return FactorView("SINGD.m_Cs", self._table.states, "m_C", self._has_momenta)

    @property
    def module_names(self) -> ModuleNameView:
        """Kronecker-preconditioned module → its name in ``Ks`` (live, read-only)."""
        return ModuleNameView("SINGD.module_names", self._table.layers)

    def _has_momenta(self, name: str) -> bool:
        """Whether layer ``name`` keeps ``m_K``/``m_C`` (its group's ``alpha1 != 0``)."""
        return self._group(self._table.layers[name])["alpha1"] != 0.0

    # ------------------------------------------------------------------ telemetry
    def telemetry(
        self, statistics: dict[str, tuple[Tensor | None, Tensor | None]] | None = None
    ) -> dict[str, LayerTelemetry]:
        """Per layer: swamped entries, condition estimates, IKFAC residuals (host syncs).

        Args:
            statistics: optional ``{layer: (U, Gc)}`` (dense, ``d_i~ × d_i~`` and
                ``d_o × d_o``; either may be ``None``) for the IKFAC residuals
                ``‖Kᵀ(U + λI)K − I‖₂`` and ``‖Cᵀ(Gc + λI)C − I‖₂``.

        Returns:
            Layer name → :class:`LayerTelemetry`.  ``rounded_to_nothing_*`` are
            ``None`` without ``telemetry=True`` or before a factor step is taken.

        Raises:
            ValueError: ``statistics`` names a layer the optimizer does not have.
        """
        statistics = statistics or {}
        unknown = sorted(set(statistics) - set(self._table.layers))
        if unknown:
            raise ValueError(f"telemetry: no layer named {unknown} (layers: {self.layer_names()})")
        report = {}
        for name in self.layer_names():
            state = self._table.states[name]
            record = self._preconditioner.taken_record(name, state)
            stuck = (None, None) if record is None else tuple(float(x) for x in record.stuck)
            damping = self._group(self._table.layers[name])["damping"]
            u, gc = statistics.get(name, (None, None))
            report[name] = LayerTelemetry(
                rounded_to_nothing_K=stuck[0],
                rounded_to_nothing_C=stuck[1],
                gram_K=telemetry_math.gram_extremes(state["K"]),
                gram_C=telemetry_math.gram_extremes(state["C"]),
                ikfac_residual_K=(
                    None if u is None else telemetry_math.ikfac_residual(state["K"], u, damping)
                ),
                ikfac_residual_C=(
                    None if gc is None else telemetry_math.ikfac_residual(state["C"], gc, damping)
                ),
            )
        return report

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :class:`KroneckerOptimizer`'s; the telemetry of the old factors is dropped."""
        super().load_state_dict(state_dict)
        self._preconditioner.clear_telemetry()


#: SINGD's layer state: ``"K"``, ``"C"``, ``"m_K"``, ``"m_C"`` (and the compensations
#: ``"c_K"``, ``"c_C"`` of ``factor_guard="compensated"``) → structured factor.
SingdState = dict[str, StructuredMatrix]


class SingdPreconditioner(Preconditioner[SingdState]):
    """SINGD's per-layer maths (SPEC §1.3, §1.4): inverse-free factor steps, ``C Cᵀ ∇W~ K Kᵀ``.

    Args:
        telemetry: record each factor step's swamped share (:meth:`SINGD.telemetry`).
    """

    dtype_specific = tuple(COMPENSATIONS.values())
    elementwise = True
    statistic_names = (
        "H_K (curvature statistic of the layer inputs)",
        "H_C (curvature statistic of the output gradients)",
    )

    def __init__(self, *, telemetry: bool) -> None:
        self.telemetry = telemetry
        #: Layer name → the last factor step's record, and the last one known to be taken.
        self._telemetry_pending: dict[str, _TelemetryRecord] = {}
        self._telemetry_taken: dict[str, _TelemetryRecord] = {}
        #: layer name → (K, C, K Kᵀ, C Cᵀ): see :meth:`outers`.
        self._outer_cache: dict[str, tuple[Any, ...]] = {}

    def taken_record(self, name: str, state: SingdState) -> _TelemetryRecord | None:
        """The telemetry of the last factor step taken by layer ``name`` (live ``state``)."""
        record = self._telemetry_pending.get(name)
        if record is None or state["K"] is not record.K:
            record = self._telemetry_taken.get(name)
        return record

    def clear_telemetry(self) -> None:
        """Drop every record (the factors they describe were replaced)."""
        self._telemetry_pending.clear()
        self._telemetry_taken.clear()

    def check_group(self, group: dict[str, Any]) -> None:
        check_singd_group(group)

    def factor_dtypes(self, layer: Layer, group: dict[str, Any]) -> tuple[torch.dtype, torch.dtype]:
        dtype_K, dtype_C = group["preconditioner_dtype"]
        return (dtype_K or layer.weight.dtype, dtype_C or layer.weight.dtype)

    def new_state(self, layer: Layer, group: dict[str, Any]) -> SingdState:
        name_K, name_C = group["structures"]
        structure_K = get_structure(layer.kind.input_structure or name_K)
        structure_C = get_structure(name_C)
        dtype_K, dtype_C = self.factor_dtypes(layer, group)
        guard = group["factor_guard"]
        device = layer.weight.device
        d_i, d_o = layer.input_dim, layer.output_dim
        state: SingdState = {
            "K": structure_K.eye(d_i, dtype=_stored_dtype(guard, dtype_K), device=device),
            "C": structure_C.eye(d_o, dtype=_stored_dtype(guard, dtype_C), device=device),
            "m_K": structure_K.zeros(d_i, dtype=dtype_K, device=device),
            "m_C": structure_C.zeros(d_o, dtype=dtype_C, device=device),
        }
        if guard == "compensated":
            if dtype_K in HALF_DTYPES:
                state["c_K"] = structure_K.zeros(d_i, dtype=dtype_K, device=device)
            if dtype_C in HALF_DTYPES:
                state["c_C"] = structure_C.zeros(d_o, dtype=dtype_C, device=device)
        return state

    def compute_state(self, layer: Layer, group: dict[str, Any], state: SingdState) -> FactorState:
        """The factors as the products use them: in their ``preconditioner_dtype``.

        Only ``factor_guard="master"`` stores ``K``/``C`` in another dtype
        (float32); elsewhere this is the state itself (no copy).
        """
        dtype_K, dtype_C = self.factor_dtypes(layer, group)
        K, C = state["K"], state["C"]  # compute_copy looked up at call time (scripts patch it)
        return FactorState(
            compute_copy(K, dtype_K),
            compute_copy(C, dtype_C),
            state["m_K"],
            state["m_C"],
        )

    def _factor_steps(
        self,
        layer: Layer,
        group: dict[str, Any],
        state: SingdState,
        new: dict[str, Any],
        steps: int,
    ) -> tuple[FactorStep, FactorStep] | None:
        """The guarded ``K ← K − β1·K·m`` of each factor, or ``None`` (no guard active).

        ``new`` receives the guard's new state entries (the compensations);
        ``steps`` seeds the stochastic rounding.
        """
        guard = group["factor_guard"]
        dtypes = dict(zip(("K", "C"), self.factor_dtypes(layer, group), strict=True))
        if guard is None or not any(dtype in HALF_DTYPES for dtype in dtypes.values()):
            return None

        def step(factor_name: str) -> FactorStep:
            dtype = dtypes[factor_name]
            if dtype not in HALF_DTYPES:  # looked up at call time (verification patches it)
                return lambda factor, momentum, lr_cov: updates.singd_factor_step(
                    factor, momentum, lr_cov
                )
            if guard == "compensated":
                key = COMPENSATIONS[factor_name]

                def compensated(factor: Any, momentum: Any, lr_cov: float) -> Any:
                    result, new[key] = compensated_factor_step(factor, momentum, lr_cov, state[key])
                    return result

                return compensated
            if guard == "stochastic":
                generator = _rounding_generator(layer.name, factor_name, steps, state)
                return lambda factor, momentum, lr_cov: stochastic_factor_step(
                    factor, momentum, lr_cov, generator
                )
            return lambda factor, momentum, lr_cov: master_factor_step(
                factor, momentum, lr_cov, compute_copy(factor, dtype)
            )

        return step("K"), step("C")

    def summarise_input(self, state: SingdState, A: InputStatistic) -> StructuredMatrix:
        if isinstance(A, InputGramDiagonal):  # K is diagonal: Π̂(KᵀUK) = diag(k² ⊙ diag U)
            K = compute_copy(state["K"], A.diagonal.dtype)
            return type(K).from_storage(K.dim, {"diag": K.storage["diag"].square() * A.diagonal})
        return compute_copy(state["K"], A.dtype).project_inner(A.T)

    def summarise_grad(self, state: SingdState, G: Tensor | GradGramDiagonal) -> StructuredMatrix:
        if isinstance(G, GradGramDiagonal):  # C is diagonal: Π̂(CᵀGᵀGC) = diag(c² ⊙ diag GᵀG)
            C = compute_copy(state["C"], G.diagonal.dtype)
            c = C.storage["diag"]
            return type(C).from_storage(C.dim, {"diag": (c * c) * G.diagonal})
        return compute_copy(state["C"], G.dtype).project_inner(G.T)

    def grad_gram_diagonal(self, state: SingdState) -> bool:
        """A diagonal ``C``: its statistic is ``c² ⊙ diag(GᵀG)``."""
        return isinstance(state["C"], Diagonal)

    def input_gram_diagonal(self, state: SingdState) -> bool:
        """A diagonal ``K``: its statistic is ``k² ⊙ diag(AᵀA)``."""
        return isinstance(state["K"], Diagonal)

    def prepare_factor_step(
        self, layer: Layer, group: dict[str, Any], state: SingdState, pending: PendingStatistics
    ) -> FactorStepInputs:
        inners = singd_self_inners(self.compute_state(layer, group, state), group["damping"])
        reads = singd_trace_terms(pending.input_summary, pending.grad_summary, inners)
        return FactorStepInputs(inners, reads)

    def prepare_factor_steps(self, layers: list[LayerStep]) -> dict[str, FactorStepInputs]:
        """Per layer, or one stacked batch per :func:`~singd.optim.batched.batch_key`.

        A batched layer's inputs hold its :class:`~singd.optim.batched.Row`, its
        traces (rows of the batch's four sums) and its statistics' stacked copies
        (checked for finiteness in their place).
        """
        prepared: dict[str, FactorStepInputs] = {}
        batches: dict[Any, list[LayerStep]] = {}
        for step in layers:
            summaries = (step.pending.input_summary, step.pending.grad_summary)
            key = batched.batch_key(step.state, summaries, step.layer.group_index)
            if key is None:
                prepared[step.layer.name] = self.prepare_factor_step(*step)
            else:
                batches.setdefault(key, []).append(step)
        for members in batches.values():
            batch = batched.stack(
                [m.layer.name for m in members],
                [m.state for m in members],
                [(m.pending.input_summary, m.pending.grad_summary) for m in members],
                members[0].group["damping"],
            )
            for index, (member, reads) in enumerate(zip(members, batch.traces(), strict=True)):
                statistics = ([batch.h_K[index]], [batch.h_C[index]])
                prepared[member.layer.name] = FactorStepInputs(
                    batched.Row(batch, index), reads, statistics
                )
        return prepared

    def updated_states(
        self,
        layers: list[LayerStep],
        prepared: dict[str, FactorStepInputs],
        scalars: dict[str, StepScalars],
        steps: int,
    ) -> dict[str, SingdState]:
        """Per layer, or one :func:`batched.step <singd.optim.batched.step>` per batch."""
        singles: list[LayerStep] = []
        batches: dict[int, tuple[batched.DiagonalBatch, list[LayerStep]]] = {}
        for step in layers:
            row = prepared[step.layer.name].tensors
            if not isinstance(row, batched.Row):
                singles.append(step)
                continue
            members = batches.setdefault(id(row.batch), (row.batch, [step] * len(row.batch.names)))
            members[1][row.index] = step  # row order (every row's layer is in ``layers``)
        result = super().updated_states(singles, prepared, scalars, steps)
        for batch, members in batches.values():
            result.update(self._batch_states(batch, members, scalars))
        return {step.layer.name: result[step.layer.name] for step in layers}

    def _batch_states(
        self,
        batch: batched.DiagonalBatch,
        members: list[LayerStep],
        scalars: dict[str, StepScalars],
    ) -> dict[str, SingdState]:
        """The new states of one batch's layers (``members`` in row order)."""
        group = members[0].group
        own = [scalars[m.layer.name] for m in members]
        new = batched.step(
            batch,
            [Traces(*s.reads) for s in own],
            [s.correction for s in own],
            lr_cov=own[0].lr_cov,
            damping=group["damping"],
            alpha1=group["alpha1"],
            kfac_like=group["kfac_like"],
            normalize_lr_cov=group["normalize_lr_cov"],
        )
        keep_momenta = group["alpha1"] != 0.0
        fields = {"K": new.k, "C": new.c, "m_K": new.m_K, "m_C": new.m_C}
        rows = {key: t.unbind() for key, t in fields.items()}
        states = {}
        for index, member in enumerate(members):
            state = member.state
            made = {
                key: type(state[key])(state[key].dim, {"diag": row[index]})
                for key, row in rows.items()
            }
            if self.telemetry:
                stepped = FactorState(made["K"], made["C"], made["m_K"], made["m_C"])
                self._record_telemetry(member.layer, group, state, stepped)
            if not keep_momenta:
                made["m_K"], made["m_C"] = state["m_K"], state["m_C"]
            states[member.layer.name] = {**state, **made}
        return states

    def updated_state(
        self,
        layer: Layer,
        group: dict[str, Any],
        state: SingdState,
        pending: PendingStatistics,
        prepared: FactorStepInputs,
        reads: list[float],
        *,
        correction: float,
        lr_cov: float,
        steps: int,
    ) -> SingdState:
        guard_entries: dict[str, StructuredMatrix] = {}
        new = singd_update_factors(
            _factor_state(state),
            pending.input_summary,
            pending.grad_summary,
            inners=prepared.tensors,
            traces=Traces(*reads),
            lr_cov=lr_cov,
            damping=group["damping"],
            alpha1=group["alpha1"],
            kfac_like=group["kfac_like"],
            normalize_lr_cov=group["normalize_lr_cov"],
            grad_scale_correction=correction,
            factor_steps=self._factor_steps(layer, group, state, guard_entries, steps),
        )
        if self.telemetry:
            self._record_telemetry(layer, group, state, new)
        keep_momenta = group["alpha1"] != 0.0
        return {
            **state,
            "K": new.K,
            "C": new.C,
            "m_K": new.m_K if keep_momenta else state["m_K"],
            "m_C": new.m_C if keep_momenta else state["m_C"],
            **guard_entries,
        }

    def factor_step_cost(self, layer: Layer, state: SingdState) -> float:
        """``s_K²/d_i + s_C²/d_o``, ``s`` a factor's stored entries: its structured products.

        ``d³`` dense, ``d`` diagonal, ``d·b²`` block-diagonal (block size ``b``).
        """
        return sum(
            type(state[factor]).storage_numel(dim) ** 2 / dim
            for factor, dim in (("K", layer.input_dim), ("C", layer.output_dim))
        )

    def _record_telemetry(
        self, layer: Layer, group: dict[str, Any], state: SingdState, new: FactorState
    ) -> None:
        """Keep the share of entries this factor step rounded away (0-dim tensors, no sync).

        A step may still be skipped after this (non-finite results): a record
        counts as taken once the live factors (``state``) are the ones it describes.
        """
        name = layer.name
        previous = self._telemetry_pending.get(name)
        if previous is not None and state["K"] is previous.K:
            self._telemetry_taken[name] = previous
        compute = self.compute_state(layer, group, state)
        stuck = tuple(
            telemetry_math.rounded_to_nothing(state[factor], after, computed @ momentum)
            for factor, after, computed, momentum in (
                ("K", new.K, compute.K, new.m_K),
                ("C", new.C, compute.C, new.m_C),
            )
        )
        self._telemetry_pending[name] = _TelemetryRecord(new.K, new.C, stuck)

    def precondition(
        self, layer: Layer, group: dict[str, Any], state: SingdState, grad: Tensor
    ) -> Tensor:
        K, C, _, _ = self.compute_state(layer, group, state)
        return singd_precondition(K, C, grad, self.outers(layer, group, state, K, C))

    def many_directions(
        self, requests: list[tuple[Layer, dict[str, Any], SingdState, Tensor, Tensor | None]]
    ) -> list[tuple[Tensor, Tensor | None]]:
        """:meth:`directions` of many layers; diagonal ones of equal shapes in one batch.

        Where ``K`` and ``C`` are diagonal and ``W~`` is ``W`` flattened from dim 1
        (not an embedding's ``Wᵀ``): :func:`~singd.optim.batched.diagonal_directions`,
        the generic path's bits without concatenating ``[∇W, ∇b]``.
        """
        results: list[tuple[Tensor, Tensor | None] | None] = [None] * len(requests)
        groups: dict[Any, list[tuple[int, Tensor, Tensor]]] = {}
        for index, (layer, group, state, weight_grad, bias_grad) in enumerate(requests):
            flattened = type(layer.kind).weight_matrix is LayerKind.weight_matrix
            if flattened and isinstance(state["K"], Diagonal) and isinstance(state["C"], Diagonal):
                K, C, _, _ = self.compute_state(layer, group, state)
                k, c = K.storage["diag"], C.storage["diag"]
                key = (
                    k.shape,
                    c.shape,
                    k.dtype,
                    c.dtype,
                    k.device,
                    weight_grad.shape,
                    weight_grad.dtype,
                    None if bias_grad is None else bias_grad.dtype,
                )
                groups.setdefault(key, []).append((index, k, c))
            else:
                results[index] = self.directions(layer, group, state, weight_grad, bias_grad)
        for members in groups.values():
            indices = [index for index, _, _ in members]
            has_bias = requests[indices[0]][4] is not None
            batch = batched.diagonal_directions(
                [k for _, k, _ in members],
                [c for _, _, c in members],
                [requests[i][3] for i in indices],
                [requests[i][4] for i in indices] if has_bias else None,  # type: ignore[misc]
            )
            for index, direction in zip(indices, batch, strict=True):
                results[index] = direction
        return results  # type: ignore[return-value]

    def outers(
        self,
        layer: Layer,
        group: dict[str, Any],
        state: SingdState,
        K: StructuredMatrix,
        C: StructuredMatrix,
    ) -> updates.Outers:
        """``(K Kᵀ, C Cᵀ)`` of the layer's current factors, kept while they are current.

        For structures closed under ``K Kᵀ`` (:meth:`StructuredMatrix.self_outer`:
        dense, block-diagonal), so that each side is one product ``P X`` instead
        of two; the diagonal needs none (``k² ⊙ X`` is already one pass).  With
        ``T > 1`` (a factor step every ``T`` steps) they are kept: the cache is
        keyed by the identity of the stored ``K``, ``C`` (a factor step, a
        skipped step's discarded factors or ``load_state_dict`` replace them),
        is not part of ``state_dict()`` and costs ``n_K + n_C`` more entries
        per layer (docs/optimizer.md, "State bytes").  With ``T = 1`` the
        factors change every step: a side's ``P`` is formed for this step only,
        where it costs at most half the product it saves
        (:func:`~singd.optim.updates.outer_pays_for_one_product`: a block-diagonal
        factor, or a dense one at most half as wide as the other side), and
        nothing is kept.
        """
        if group["T"] == 1:
            return (
                K.self_outer() if outer_pays_for_one_product(type(K), K.dim, C.dim) else None,
                C.self_outer() if outer_pays_for_one_product(type(C), C.dim, K.dim) else None,
            )
        cached = self._outer_cache.get(layer.name)
        if cached is not None and cached[0] is state["K"] and cached[1] is state["C"]:
            return cached[2], cached[3]
        outers = tuple(f.self_outer() if keeps_outer(type(f)) else None for f in (K, C))
        self._outer_cache[layer.name] = (state["K"], state["C"], *outers)
        return outers  # type: ignore[return-value]

    def layout(self, state: SingdState) -> dict[str, str]:
        return {factor: matrix.name for factor, matrix in state.items()}

    def to_storage(self, state: SingdState) -> Storage:
        return {factor: dict(matrix.storage) for factor, matrix in state.items()}

    def from_storage(
        self, layer: Layer, group: dict[str, Any], current: SingdState, storage: Storage
    ) -> SingdState:
        restored: SingdState = {}
        for factor in current:
            like = current[factor]
            placed = {
                key: tensor.to(dtype=like.dtype, device=like.device, copy=True)
                for key, tensor in storage[factor].items()
            }
            try:
                restored[factor] = type(like).from_storage(like.dim, placed)
            except ValueError as error:
                raise ValueError(f"load_state_dict: {layer.name}.{factor}: {error}") from None
        for factor, key in COMPENSATIONS.items():
            if key in restored:
                _check_compensation(f"{layer.name}.{key}", restored[key], restored[factor])
        return restored


class _TelemetryRecord(NamedTuple):
    """The factors one factor step produced and the shares of entries it left unchanged."""

    K: StructuredMatrix
    C: StructuredMatrix
    stuck: tuple[Tensor, Tensor]


@dataclass(frozen=True)
class LayerTelemetry:
    """One layer's :meth:`SINGD.telemetry`.

    Attributes:
        rounded_to_nothing_K: share of ``K``'s stored entries the last taken factor
            step left unchanged although ``K m_K`` is nonzero there (swamping).
        rounded_to_nothing_C: the same for ``C``.
        gram_K: power-iteration ``λ_max``, ``λ_min`` (``.condition``) of ``KKᵀ``.
        gram_C: the same for ``CCᵀ``.
        ikfac_residual_K: ``‖Kᵀ(U + λI)K − I‖₂`` when ``U`` was given.
        ikfac_residual_C: ``‖Cᵀ(Gc + λI)C − I‖₂`` when ``Gc`` was given.
    """

    rounded_to_nothing_K: float | None
    rounded_to_nothing_C: float | None
    gram_K: telemetry_math.GramExtremes
    gram_C: telemetry_math.GramExtremes
    ikfac_residual_K: float | None
    ikfac_residual_C: float | None


def _every_layer(name: str) -> bool:
    """``Ks`` and ``Cs`` hold every Kronecker-preconditioned layer."""
    return True


def _factor_state(state: SingdState) -> FactorState:
    return FactorState(state["K"], state["C"], state["m_K"], state["m_C"])


def _stored_dtype(guard: str | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``K``/``C`` are kept in: float32 for a half dtype under ``"master"``."""
    return torch.float32 if guard == "master" and dtype in HALF_DTYPES else dtype


def compute_copy(factor: StructuredMatrix, dtype: torch.dtype) -> StructuredMatrix:
    """``factor`` in ``dtype`` for the products (a rounded copy of a float32 master)."""
    return factor if factor.dtype == dtype else factor.to(dtype=dtype)


def _rounding_generator(layer: str, factor: str, steps: int, state: SingdState) -> torch.Generator:
    """The generator of one stochastic rounding, seeded by layer, factor and step.

    The seed is a hash of ``(layer, factor, steps)``: reproducible, independent
    across layers, factors and steps, and restored by a checkpoint (which holds
    ``steps``) without saving a generator state; a skipped step draws again.
    """
    key = f"{layer}/{factor}/{steps}".encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    generator = torch.Generator(device=state[factor].device)
    generator.manual_seed(seed)
    return generator


def _check_compensation(
    name: str, compensation: StructuredMatrix, factor: StructuredMatrix
) -> None:
    """Raise ``ValueError`` unless every ``|c|`` is at most two spacings of ``K`` there.

    ``c' = y − fl(K' − K)`` with ``K' = fl(K + y)``: with Fast2Sum exact
    (``|y| ≤ |K|`` or ``K = 0``) it is the rounding error of ``K'``, at most
    half a spacing ``sp(K')`` (the larger gap to a neighbour of ``K'``);
    otherwise ``|y| < 2|K|`` with opposite signs is exact (Sterbenz), and
    else ``|c'| ≤ ½ sp(K') + ½ ulp(K' − K) ≤ 1.5 sp(K')``.  A larger entry is not
    a compensation term of this ``K`` (e.g. a checkpoint with ``c`` and ``K``
    mixed up).
    """
    for key, c in compensation.storage.items():
        k = factor.storage[key]
        up = (torch.nextafter(k, torch.full_like(k, torch.inf)) - k).abs()
        down = (k - torch.nextafter(k, torch.full_like(k, -torch.inf))).abs()
        if not bool((c.abs() <= 2 * torch.maximum(up, down)).all()):
            raise ValueError(
                f"load_state_dict: {name}[{key!r}] exceeds two ulps of the factor: not its "
                "compensation term"
            )
