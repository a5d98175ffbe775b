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
* :class:`MultiheadAttentionKind`: ``nn.MultiheadAttention`` as four
  :class:`AttentionProjectionKind` layers (``q``, ``k``, ``v``, ``out_proj``;
  :meth:`LayerKind.parts`), the first three row blocks of the packed
  parameters.

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

    def parts(self, module: nn.Module) -> list[tuple[str, LayerKind]]:
        """The canonical layers ``module`` is: ``(name suffix, kind)`` each (most: one)."""
        return [("", self)]

    def absorbed(self, module: nn.Module) -> list[nn.Module]:
        """Submodules whose parameters :meth:`parts` take (never layers of their own)."""
        return []

    def weight_rows(self, module: nn.Module) -> tuple[int, int] | None:
        """The rows ``r0:r1`` of :meth:`weight` that are this layer's ``W`` (``None``: all)."""
        return None

    def bias_rows(self, module: nn.Module) -> tuple[int, int] | None:
        """The rows ``r0:r1`` of :meth:`bias` that are this layer's ``b`` (``None``: all)."""
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

    def input_gram_diagonal(
        self, module: nn.Module, x: Tensor, *, approx: Approx, bias: bool, dtype: torch.dtype
    ) -> InputStatistic:
        """What a diagonal ``K``'s summary ``k² ⊙ diag(AᵀA)`` is formed from: by default
        :meth:`input_statistic` (either of its forms serves); a kind that can form
        ``diag(AᵀA)`` without ``A`` overrides it."""
        return self.input_statistic(module, x, approx=approx, bias=bias, dtype=dtype)

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

    def input_gram_diagonal(
        self, module: nn.Module, x: Tensor, *, approx: Approx, bias: bool, dtype: torch.dtype
    ) -> InputGramDiagonal:
        """``diag(AᵀA)`` of :meth:`input_statistic`'s ``A``, ``A`` never formed."""
        shared = self.input_shared(module, x.to(dtype))
        return InputGramDiagonal(statistics.input_gram_diagonal(shared, approx=approx, bias=bias))


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


#: The canonical layers of an ``nn.MultiheadAttention`` (SPEC §1.6, docs/SPEC.md).
ATTENTION_ROLES = ("q", "k", "v", "out_proj")


class AttentionProjectionKind(SharedInputKind):
    """One projection of an ``nn.MultiheadAttention``: ``q``, ``k``, ``v`` or ``out_proj``.

    A Linear map (SPEC §1.1) that ``F.multi_head_attention_forward`` calls as
    ``F.linear``: its input and output gradient are read from that linear's
    autograd node (:mod:`singd.optim.attention`), in the function's internal
    ``[positions, batch, features]`` layout; ``W_q, W_k, W_v`` are row blocks
    of ``in_proj_weight`` (or the separate ``{q,k,v}_proj_weight``), their
    biases row blocks of ``in_proj_bias`` (SPEC §1.6, MultiheadAttention).
    Made by :class:`MultiheadAttentionKind`, never registered itself.
    """

    name = "nn.MultiheadAttention projection"

    def __init__(self, role: str) -> None:
        if role not in ATTENTION_ROLES:
            raise ValueError(f"role must be one of {ATTENTION_ROLES}, got {role!r}")
        self.role = role

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if type(module).forward is not nn.MultiheadAttention.forward:
            return "its class overrides nn.MultiheadAttention.forward"
        return None

    def weight(self, module: nn.Module) -> Tensor:
        if self.role == "out_proj":
            return module.out_proj.weight
        if module._qkv_same_embed_dim:
            return module.in_proj_weight
        return getattr(module, f"{self.role}_proj_weight")

    def bias(self, module: nn.Module) -> Tensor | None:
        return module.out_proj.bias if self.role == "out_proj" else module.in_proj_bias

    def _block(self, module: nn.Module) -> tuple[int, int]:
        index = ATTENTION_ROLES.index(self.role)
        return index * module.embed_dim, (index + 1) * module.embed_dim

    def weight_rows(self, module: nn.Module) -> tuple[int, int] | None:
        packed = self.role != "out_proj" and module._qkv_same_embed_dim
        return self._block(module) if packed else None

    def bias_rows(self, module: nn.Module) -> tuple[int, int] | None:
        return None if self.role == "out_proj" else self._block(module)

    def input_shared(self, module: nn.Module, x: Tensor) -> Tensor:
        """``[L, B, d]`` (the internal layout) → ``[B, L, d]``."""
        return x.transpose(0, 1)

    def grad_shared(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """``[L, B, d_o]`` → ``[B, L, d_o]``."""
        return grad_output.transpose(0, 1)


class MultiheadAttentionKind(LayerKind):
    """``nn.MultiheadAttention``: four canonical layers (SPEC §1.6, MultiheadAttention).

    ``q``, ``k``, ``v`` (three factor pairs for the in-projection, whether
    the call is self- or cross-attention) and ``out_proj``.  ``bias_k`` and
    ``bias_v`` (``add_bias_kv``) are no projection's and fall back.
    """

    name = "nn.MultiheadAttention"

    def matches(self, module: nn.Module) -> bool:
        """Every ``nn.MultiheadAttention`` (its ``out_proj`` is never a layer of its own); a
        subclass overriding ``forward`` falls back (its parts' ``unsupported_reason``)."""
        return isinstance(module, nn.MultiheadAttention)

    def parts(self, module: nn.Module) -> list[tuple[str, LayerKind]]:
        return [(f".{role}", AttentionProjectionKind(role)) for role in ATTENTION_ROLES]

    def absorbed(self, module: nn.Module) -> list[nn.Module]:
        """``out_proj``: its weight is read, not called, by the MHA forward."""
        return [module.out_proj]

    def weight(self, module: nn.Module) -> Tensor:
        raise ValueError(_FOUR_LAYERS)

    def bias(self, module: nn.Module) -> Tensor | None:
        raise ValueError(_FOUR_LAYERS)

    def input_statistic(
        self, module: nn.Module, x: Tensor, *, approx: Approx, bias: bool, dtype: torch.dtype
    ) -> InputStatistic:
        raise ValueError(_FOUR_LAYERS)

    def grad_shared(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        raise ValueError(_FOUR_LAYERS)


_FOUR_LAYERS = (
    "an nn.MultiheadAttention is four canonical layers (q, k, v, out_proj): use the "
    "statistics of one of MultiheadAttentionKind().parts(module)"
)

_KINDS: list[LayerKind] = [
    LinearKind(),
    ConvKind(),
    EmbeddingKind(),
    MultiheadAttentionKind(),
]


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
    """``d_o`` of ``module`` under ``kind`` (the rows of its block of the weight, if one)."""
    rows = kind.weight_rows(module)
    if rows is not None:
        return rows[1] - rows[0]
    return kind.matrix_shape(kind.weight(module).shape)[0]
