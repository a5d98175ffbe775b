"""An ``nn.MultiheadAttention``'s projections in the autograd graph (SPEC §1.6, MHA).

``F.multi_head_attention_forward`` calls its four projections as ``F.linear``
on 2-D inputs ``[L·B, d_i]`` (rows in position-major, batch-minor order),
never as modules, and checks ``has_torch_function`` first (so a
``TorchFunctionMode`` sees only that call, not the linears inside).  The
projections are found instead in the graph of the module's output: an
``addmm`` (with bias) or ``mm`` node whose weight operand leads, through a
transpose, possibly a split (the packed ``in_proj_weight``) and a cast
(autocast), to the parameter's ``AccumulateGrad``.  The node's saved input is
the projection's input; a pre-hook on the node sees its output gradient.
Nothing is added to the model's computation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

#: Linear nodes → the attribute holding their (2-D) input.
_LINEAR_INPUT = {"AddmmBackward0": "_saved_mat1", "MmBackward0": "_saved_self"}
#: Nodes on a weight's way to its ``AccumulateGrad`` that keep its rows in place.
_PASS_THROUGH = {"TBackward0", "ToCopyBackward0"}


class Projection(NamedTuple):
    """One projection's linear in the graph.

    Attributes:
        node: its autograd node (``addmm`` or ``mm``).
        inputs: its input, ``[L·B, d_i]``.
        start: the row of the parameter that output column 0 is (``in_proj_weight``
            split into ``q`` and ``kv`` blocks: the ``kv`` node starts at ``E``).
    """

    node: Any
    inputs: Tensor
    start: int


def batch_size(module: nn.MultiheadAttention, query: Tensor) -> int:
    """``B`` of an MHA call: ``1`` for an unbatched ``[L, E]`` query (one sample)."""
    if query.ndim == 2:
        return 1
    return query.shape[0] if module.batch_first else query.shape[1]


def find_projection(output: Tensor, weight: Tensor, row: int, stop: set[Any]) -> Projection:
    """The linear of ``output``'s graph whose weight operand holds row ``row`` of ``weight``.

    Args:
        output: the MHA's output tensor.
        weight: the projection's parameter.
        row: the first row of the projection's block of ``weight`` (the packed
            ``q``/``kv`` split makes two linears of ``in_proj_weight``).
        stop: the graph nodes of the call's inputs (the search stays inside the call).

    Raises:
        RuntimeError: if no such node is found (a graph torch builds otherwise:
            ``torch.compile`` with an AOT backend, e.g. the default ``inductor``;
            ``backend="eager"`` keeps the eager graph).
    """
    todo, seen = [output.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        label = type(node).__name__
        if label == "AccumulateGrad":
            continue
        if label in _LINEAR_INPUT:
            start = _weight_start(node.next_functions[-1], weight)
            width = node._saved_mat2_sym_sizes[1]  # mat2 = the weight operand, d_i × rows
            if start is not None and start <= row < start + width:
                return Projection(node, getattr(node, _LINEAR_INPUT[label]), start)
        todo.extend(next_node for next_node, _ in node.next_functions)
    raise RuntimeError(
        "singd: could not find a projection of nn.MultiheadAttention in its autograd graph "
        "(the graph is not the eager one of F.multi_head_attention_forward: torch.compile "
        "with an AOT backend such as the default 'inductor' (backend='eager' keeps it), a "
        "parametrized weight, or FSDP2 resharding it before the optimizer's hook); "
        "leave its parameters out of the optimizer's params to train it otherwise"
    )


def inside_non_reentrant_checkpoint() -> bool:
    """Whether the forward runs under ``checkpoint(..., use_reentrant=False)``.

    There the linears' saved inputs are placeholders: reading one in the
    forward reruns the checkpointed region and keeps its activations (and
    counts its BatchNorm statistics again), so the MHA capture refuses it.
    """
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and getattr(hooks[0], "__qualname__", "").startswith(
        "_checkpoint_hook."
    )


def _weight_start(edge: tuple[Any, int], weight: Tensor) -> int | None:
    """The first row of ``weight`` that the weight operand ``edge`` of a linear reads, or
    ``None`` if it is not ``weight``'s (a transpose, a split along dim 0, casts)."""
    start = 0
    node, output_nr = edge
    while node is not None:
        label = type(node).__name__
        if label == "AccumulateGrad":
            return start if node.variable is weight else None
        if label == "SplitBackward0" and node._saved_dim == 0:
            start += output_nr * node._saved_split_size
        elif label == "SplitWithSizesBackward0" and node._saved_dim == 0:
            start += sum(node._saved_split_sizes[:output_nr])
        elif label not in _PASS_THROUGH:
            return None
        node, output_nr = node.next_functions[0]
    return None
