"""The per-layer contract of a Kronecker optimizer: what SINGD and KFAC each implement.

:class:`~singd.optim.base.KroneckerOptimizer` owns the hooks, the step's
plan and commit, the fallback and checkpoints; it holds one
:class:`Preconditioner`, which says for one layer ``W~`` (d_o × d_i~, SPEC §1)
how its state is made (:meth:`~Preconditioner.new_state`), what a pass
contributes (:meth:`~Preconditioner.summarise_input`/
:meth:`~Preconditioner.summarise_grad`, SPEC §1.1), how the factors move at a
statistics step (:meth:`~Preconditioner.prepare_factor_step`,
:meth:`~Preconditioner.updated_state`: SPEC §1.2 KFAC, §1.3 SINGD), how a
gradient is preconditioned (:meth:`~Preconditioner.precondition`, SPEC §1.4)
and how a state is stored (:meth:`~Preconditioner.to_storage`,
:meth:`~Preconditioner.from_storage`, :meth:`~Preconditioner.layout`).

A layer's state maps factor names to factors (``layer_state(name)``); a
statistics step returns a new one and never mutates the old.  Methods get the
layer's param group and state as arguments; a preconditioner keeps only
caches of its own (SINGD: the kept ``K Kᵀ``, the telemetry records).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, NamedTuple, TypeVar

import torch
from torch import Tensor

from singd.optim.hooks import GradGramDiagonal, PendingStatistics, Summable
from singd.optim.kinds import InputStatistic, LayerKind
from singd.optim.layers import Layer
from singd.optim.sharded import Storage

#: A layer's state: factor name → factor (SINGD: structured matrices; KFAC: tensors).
State = TypeVar("State", bound=dict[str, Any])


class FactorStepInputs(NamedTuple):
    """A layer's work before its factor step.

    Attributes:
        tensors: whatever the preconditioner computes once and uses in the step.
        reads: 0-dim tensors the step needs as Python floats; the optimizer reads
            those of every layer, and every finiteness flag, in one host sync.
        statistics: the tensors whose finiteness stands for the layer's (input,
            gradient) statistics, if not their own storage (a batch's stacked
            copies, :mod:`singd.optim.batched`).
    """

    tensors: Any
    reads: list[Tensor]
    statistics: tuple[list[Tensor], list[Tensor]] | None = None


class LayerStep(NamedTuple):
    """One layer with statistics in a step: what its factor step starts from."""

    layer: Layer
    group: dict[str, Any]
    state: Any
    pending: PendingStatistics


class StepScalars(NamedTuple):
    """One layer's host-read numbers of a factor step.

    Attributes:
        reads: the values of its ``FactorStepInputs.reads``.
        correction: the factor of the gradient statistic (SPEC §1.5).
        lr_cov: ``β1`` of this step.
    """

    reads: list[float]
    correction: float
    lr_cov: float


class Preconditioner(ABC, Generic[State]):
    """One optimizer's per-layer maths (see the module docstring)."""

    #: How a skip warning names a pass's (input, gradient) statistics.
    statistic_names: tuple[str, str] = ("input statistic", "gradient statistic")
    #: State entries that hold rounding residues of the factors' dtype (SINGD's
    #: compensations): reset, not converted, when the factors change dtype.
    dtype_specific: tuple[str, ...] = ()
    #: Whether LayerNorm/RMSNorm parameters get the elementwise preconditioner
    #: (:mod:`singd.optim.elementwise`) instead of the fallback.
    elementwise: bool = False

    def declines(self, kind: LayerKind) -> str | None:
        """Why this optimizer does not precondition layers of ``kind`` (``None``: it does)."""
        return None

    @abstractmethod
    def check_group(self, group: dict[str, Any]) -> None:
        """Validate (and normalise) one param group's hyper-parameters in place."""

    @abstractmethod
    def factor_dtypes(self, layer: Layer, group: dict[str, Any]) -> tuple[torch.dtype, torch.dtype]:
        """Dtypes in which ``A`` and ``G`` are formed (input factor, grad factor)."""

    @abstractmethod
    def new_state(self, layer: Layer, group: dict[str, Any]) -> State:
        """The initial factors of ``layer``."""

    @abstractmethod
    def summarise_input(self, state: State, A: InputStatistic) -> Summable:
        """A pass's input summary from ``A`` (n_A × d_i~) and the layer's current ``state``."""

    @abstractmethod
    def summarise_grad(self, state: State, G: Tensor | GradGramDiagonal) -> Summable:
        """A pass's gradient summary from ``G`` (n_G × d_o) and the layer's current ``state``
        (``diag(GᵀG)`` instead where :meth:`grad_gram_diagonal` says that suffices)."""

    def grad_gram_diagonal(self, state: State) -> bool:
        """Whether the gradient summary of a layer with ``state`` needs only ``diag(GᵀG)``."""
        return False

    def input_gram_diagonal(self, state: State) -> bool:
        """Whether the input summary of a layer with ``state`` needs only ``diag(AᵀA)``."""
        return False

    @abstractmethod
    def prepare_factor_step(
        self, layer: Layer, group: dict[str, Any], state: State, pending: PendingStatistics
    ) -> FactorStepInputs:
        """What a statistics step needs besides the statistics, without a host sync."""

    def prepare_factor_steps(self, layers: list[LayerStep]) -> dict[str, FactorStepInputs]:
        """:meth:`prepare_factor_step` of every layer (a preconditioner may batch them)."""
        return {step.layer.name: self.prepare_factor_step(*step) for step in layers}

    def updated_states(
        self,
        layers: list[LayerStep],
        prepared: dict[str, FactorStepInputs],
        scalars: dict[str, StepScalars],
        steps: int,
    ) -> dict[str, State]:
        """:meth:`updated_state` of every layer (a preconditioner may batch them)."""
        return {
            step.layer.name: self.updated_state(
                *step,
                prepared[step.layer.name],
                scalars[step.layer.name].reads,
                correction=scalars[step.layer.name].correction,
                lr_cov=scalars[step.layer.name].lr_cov,
                steps=steps,
            )
            for step in layers
        }

    @abstractmethod
    def updated_state(
        self,
        layer: Layer,
        group: dict[str, Any],
        state: State,
        pending: PendingStatistics,
        prepared: FactorStepInputs,
        reads: list[float],
        *,
        correction: float,
        lr_cov: float,
        steps: int,
    ) -> State:
        """The factors after a statistics step (a new object; ``state`` is untouched).

        ``reads`` holds the values of ``prepared.reads``, read for all layers at
        once; ``correction`` multiplies the gradient statistic (SPEC §1.5);
        ``steps`` counts the completed steps.
        """

    @abstractmethod
    def precondition(
        self, layer: Layer, group: dict[str, Any], state: State, grad: Tensor
    ) -> Tensor:
        """The preconditioned ``∇W~`` (d_o × d_i~) with the factors in ``state``."""

    def directions(
        self,
        layer: Layer,
        group: dict[str, Any],
        state: State,
        weight_grad: Tensor,
        bias_grad: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``ĝ`` of ``W`` and ``b``: ``∇W~ = [∇W, ∇b]`` preconditioned, split back (SPEC §1.4)."""
        matrix = layer.gradient_matrix(weight_grad, bias_grad)
        return layer.split(self.precondition(layer, group, state, matrix))

    def many_directions(
        self, requests: list[tuple[Layer, dict[str, Any], State, Tensor, Tensor | None]]
    ) -> list[tuple[Tensor, Tensor | None]]:
        """:meth:`directions` of ``(layer, group, state, ∇W, ∇b)`` each (one may batch them)."""
        return [self.directions(*request) for request in requests]

    def factor_step_cost(self, layer: Layer, state: State) -> float:
        """Relative cost of ``layer``'s factor step, to balance sharded factor work.

        Dense ``d × d`` factors: ``d_i³ + d_o³`` (products, factorisations).
        """
        return float(layer.input_dim**3 + layer.output_dim**3)

    @abstractmethod
    def to_storage(self, state: State) -> Storage:
        """Plain tensors of a layer state: factor name → storage dict."""

    @abstractmethod
    def layout(self, state: State) -> dict[str, str]:
        """Factor name → structure name (what a checkpoint must agree on)."""

    @abstractmethod
    def from_storage(
        self, layer: Layer, group: dict[str, Any], current: State, storage: Storage
    ) -> State:
        """The inverse of :meth:`to_storage`, shaped and placed like ``current``.

        ``storage`` holds exactly the factors of :meth:`layout` (checked by
        the caller); raises ``ValueError`` on any other mismatch.
        """
