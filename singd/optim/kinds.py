"""Layer kinds: how a module becomes one canonical Kronecker layer (SPEC-layers).

A *kind* reduces a module to a weight matrix ``W~`` (``d_o × d_i``, bias
column last) and, per pass, to the input statistic and the output-gradient
rows of SPEC §1.1 such that ``∇W~ = Σ_{n,s} g_{n,s} [a_{n,s}; 1]ᵀ``.  The
built-in kinds:

* :class:`LinearKind`: ``nn.Linear`` and every subclass that keeps
  ``nn.Linear.forward`` (``NonDynamicallyQuantizableLinear``, the classes
  FSDP2's ``fully_shard`` makes from ``FSDPModule`` and ``nn.Linear``);
  ``[B, ..., d]`` → ``[B, S, d]``.
* :class:`ConvKind`: ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (and subclasses
  keeping their ``forward``) with one patch code for every spatial rank.
* :class:`EmbeddingKind`: ``nn.Embedding``, ``W~ = Wᵀ``, one-hot inputs; its
  input factor ``K`` is diagonal whatever structure the group names, and its
  statistic is the diagonal of ``AᵀA`` from token counts (never ``V × V``).

Kinds are tried newest-registered first (:func:`register_layer_kind`), so a
user kind can claim a module a built-in kind would take.

Example (a user layer whose ``forward`` is a linear map of its input)::

    class Scaled(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(2 * x, self.weight, self.bias)

    class ScaledKind(LinearKind):
        name = "Scaled"

        def matches(self, module):
            return type(module) is Scaled

        def input_shared(self, module, x):
            return super().input_shared(module, 2 * x)

    register_layer_kind(ScaledKind())
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from singd.optim import statistics
from singd.optim.statistics import Approx


class InputGramDiagonal(NamedTuple):
    """The input statistic of a one-hot kind: ``diag(AᵀA)`` (d_i), scaled as in SPEC §1.1.

    ``AᵀA`` is diagonal for one-hot rows (expand), so this is all of it; for
    reduce only its diagonal is kept (SPEC-layers, Embedding).
    """

    diagonal: Tensor


InputStatistic = Tensor | InputGramDiagonal


class LayerKind(ABC):
    """How one module type becomes a canonical layer (SPEC-layers).

    Attributes:
        name: how warnings and docs name the kind.
        approximations: the ``kfac_approx`` settings the kind's statistics are
            defined for; a layer of a group with another setting falls back.
        input_structure: the structure ``K`` must have whatever the group
            names (``None``: the group's).
    """

    name: ClassVar[str]
    approximations: ClassVar[frozenset[str]] = frozenset({"expand", "reduce"})
    input_structure: ClassVar[str | None] = None

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether this kind handles ``module`` (it may still be :meth:`unsupported_reason`)."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why a matched ``module`` is not of this form after all (it then falls back)."""
        return None

    def weight(self, module: nn.Module) -> Tensor:
        """The parameter holding ``W``."""
        return module.weight

    def bias(self, module: nn.Module) -> Tensor | None:
        """The parameter holding ``b`` (``None``: no bias column)."""
        return getattr(module, "bias", None)

    def weight_matrix(self, weight: Tensor) -> Tensor:
        """``W`` (or its gradient) as the ``d_o × d_i`` matrix (flattened from dim 1)."""
        return weight.reshape(weight.shape[0], -1)

    def weight_from_matrix(self, matrix: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`weight_matrix`: a ``d_o × d_i`` matrix in the weight's ``shape``."""
        return matrix.reshape(shape)

    def matrix_shape(self, shape: torch.Size) -> tuple[int, int]:
        """``(d_o, d_i)`` of :meth:`weight_matrix` from the weight's shape alone (no tensor
        op, so also for an FSDP2 ``DTensor`` shard, whose shape is the global one)."""
        return shape[0], math.prod(shape[1:])

    def layer_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The forward's input from the hook's ``args``/``kwargs`` (``input`` by keyword)."""
        return args[0] if args else kwargs["input"]

    @abstractmethod
    def input_statistic(
        self, module: nn.Module, x: Tensor, *, approx: Approx, bias: bool, dtype: torch.dtype
    ) -> InputStatistic:
        """``A`` (n_A × d_i~, SPEC §1.1 scaled) or, for one-hot kinds, ``diag(AᵀA)``."""

    @abstractmethod
    def grad_shared(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """The output gradient in ``[B, S, d_o]`` (a view or a copy, no arithmetic)."""


class SharedInputKind(LayerKind):
    """A kind whose inputs have a ``[B, S, d_i]`` form: ``A`` by SPEC §1.1 from it."""

    @abstractmethod
    def input_shared(self, module: nn.Module, x: Tensor) -> Tensor:
        """The input in ``[B, S, d_i]``."""

    def input_statistic(
        self, module: nn.Module, x: Tensor, *, approx: Approx, bias: bool, dtype: torch.dtype
    ) -> Tensor:
        shared = self.input_shared(module, x.to(dtype))
        return statistics.input_matrix(shared, approx=approx, bias=bias)


class LinearKind(SharedInputKind):
    """``nn.Linear`` and subclasses keeping ``nn.Linear.forward`` (SPEC §1.1)."""

    name = "nn.Linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward

    def input_shared(self, module: nn.Module, x: Tensor) -> Tensor:
        return statistics.linear_shared_format(x)

    def grad_shared(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        return statistics.linear_shared_format(grad_output)


_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ConvKind(SharedInputKind):
    """``nn.Conv1d``/``2d``/``3d``: input patches as rows (SPEC-layers, Conv)."""

    name = "nn.Conv1d/2d/3d"

    def matches(self, module: nn.Module) -> bool:
        return any(
            isinstance(module, base) and type(module).forward is base.forward
            for base in _CONV_TYPES
        )

    def input_shared(self, module: nn.Module, x: Tensor) -> Tensor:
        return statistics.conv_input_shared_format(
            x,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
        )

    def grad_shared(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        return statistics.conv_grad_shared_format(grad_output, len(module.kernel_size))


class EmbeddingKind(LayerKind):
    """``nn.Embedding(V, E)``: ``W~ = Wᵀ`` (E × V), one-hot inputs (SPEC-layers, Embedding)."""

    name = "nn.Embedding"
    input_structure = "diagonal"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm rewrites the weight in the forward"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True makes the gradient other than Σ g aᵀ"
        if module.sparse:
            return "sparse=True gives sparse gradients"
        return None

    def bias(self, module: nn.Module) -> Tensor | None:
        return None

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return weight.T

    def weight_from_matrix(self, matrix: Tensor, shape: torch.Size) -> Tensor:
        return matrix.T.reshape(shape)

    def matrix_shape(self, shape: torch.Size) -> tuple[int, int]:
        return shape[1], shape[0]

    def input_statistic(
        self, module: nn.Module, x: Tensor, *, approx: Approx, bias: bool, dtype: torch.dtype
    ) -> InputGramDiagonal:
        """``diag(AᵀA)`` from token counts: ``count_v / n_A`` (expand), SPEC-layers.

        ``x``: ``[B, ...]`` indices; ``[B]`` is ``B`` samples of one position
        (as a Linear input ``[B, d]``), a 0-dim index one sample.
        """
        indices = x.reshape(x.shape[0], -1) if x.ndim > 0 else x.reshape(1, 1)
        batch, positions = indices.shape
        vocab = module.num_embeddings
        kept = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
        if module.padding_idx is not None:
            kept = kept * (indices != module.padding_idx)  # a = 0 at padding positions
        wide = torch.promote_types(dtype, torch.float32)
        if approx == "expand":
            counts = torch.zeros(vocab, dtype=wide, device=indices.device)
            counts.index_add_(0, indices.reshape(-1), kept.reshape(-1).to(wide))
            return InputGramDiagonal((counts / (batch * positions)).to(dtype))
        # reduce: a_n = (counts of sample n) / S; diag(AᵀA)_v = Σ_n a_nv² / B
        per_sample = torch.zeros(batch, vocab, dtype=wide, device=indices.device)
        per_sample.scatter_add_(1, indices, kept.to(wide))
        diagonal = (per_sample / positions).square().sum(dim=0) / batch
        return InputGramDiagonal(diagonal.to(dtype))

    def grad_shared(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        return statistics.linear_shared_format(grad_output)


_KINDS: list[LayerKind] = [LinearKind(), ConvKind(), EmbeddingKind()]


def register_layer_kind(kind: LayerKind) -> None:
    """Let optimizers built from now on precondition the modules ``kind`` matches.

    The newest registered kind is tried first.

    Raises:
        ValueError: if ``kind`` is not a :class:`LayerKind`.
    """
    if not isinstance(kind, LayerKind):
        raise ValueError(f"kind must be a singd.LayerKind, got {type(kind).__name__}")
    _KINDS.insert(0, kind)


def unregister_layer_kind(kind: LayerKind) -> None:
    """Undo :func:`register_layer_kind` (``ValueError`` if ``kind`` is not registered)."""
    if not any(registered is kind for registered in _KINDS):
        raise ValueError(f"{kind!r} is not a registered layer kind")
    _KINDS[:] = [registered for registered in _KINDS if registered is not kind]


def kind_of(module: nn.Module) -> LayerKind | None:
    """The first registered kind that matches ``module``, or ``None``."""
    return next((kind for kind in _KINDS if kind.matches(module)), None)


# ------------------------------------------------------------ statistics of a kind
def layer_input_statistic(
    module: nn.Module,
    x: Tensor,
    *,
    approx: Approx,
    bias: bool | None = None,
    dtype: torch.dtype | None = None,
) -> InputStatistic:
    """The input statistic of ``module``'s input ``x`` (its kind's, SPEC §1.1).

    ``bias``: whether ``W~`` has the bias column (``None``: whether the module
    has a bias); ``dtype``: that of the statistic (``None``: the weight's).
    """
    kind = _required_kind(module)
    has_bias = kind.bias(module) is not None if bias is None else bias
    dtype = kind.weight(module).dtype if dtype is None else dtype
    return kind.input_statistic(module, x, approx=approx, bias=has_bias, dtype=dtype)


def layer_grad_matrix(
    module: nn.Module, grad_output: Tensor, *, approx: Approx, loss_average: Any
) -> Tensor:
    """``G`` (n_G × d_o) of ``module``'s output gradient (its kind's format + SPEC §1.1)."""
    shared = _required_kind(module).grad_shared(module, grad_output)
    return statistics.grad_matrix(shared, approx=approx, loss_average=loss_average)


def _required_kind(module: nn.Module) -> LayerKind:
    kind = kind_of(module)
    if kind is None:
        raise ValueError(f"no layer kind handles {type(module).__name__}")
    return kind


def input_dim(kind: LayerKind, module: nn.Module, bias: bool) -> int:
    """``d_i~`` of ``module`` under ``kind``: the columns of ``W~`` (bias column included)."""
    return kind.matrix_shape(kind.weight(module).shape)[1] + int(bias)


def output_dim(kind: LayerKind, module: nn.Module) -> int:
    """``d_o`` of ``module`` under ``kind``."""
    return kind.matrix_shape(kind.weight(module).shape)[0]
