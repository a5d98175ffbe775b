"""Opt-in ``torch.compile`` of the parameter update (SPEC §1.4; issue 9).

:func:`compile_parameter_updates` makes an optimizer run
:func:`~singd.optim.updates.momentum_parameter_updates` (``ĝ += γ W``;
``m ← α2 m + ĝ``; ``W ← W − β2 m``, every step) through ``torch.compile``
with the default inductor backend: one fused loop per parameter instead of
three or four ``torch._foreach_*`` passes over all of them.  The compiled
loop may contract a product and a sum into one rounding and keeps the
intermediate ``ĝ`` unrounded, so its results agree with the eager ones within
the bound of ``tests/optim/test_compiled.py``, not bitwise.

Specialisation: Dynamo compiles once per group signature (the parameters'
shapes and dtypes) and per value of ``lr``, ``momentum`` and ``weight_decay``
(``alpha`` arguments are constants of the graph).  An ``lr`` that changes every
step (a scheduler) recompiles every step until Dynamo's ``recompile_limit``,
after which the update runs eagerly (Dynamo warns): use it with a constant
``lr``.  Parameters that are not plain tensors (FSDP2's DTensor shards) always
take the eager update.

Not compiled, measured with torch 2.13.0 on CPU:

* the factor step ``K ← K − β1 K m`` (:func:`~singd.optim.updates.singd_factor_step`):
  inductor rewrites ``K.clone().add_(K @ m, alpha=−β1)`` into
  ``addmm(K, K, m)``, dropping ``alpha`` (a silently wrong factor, the same
  pattern family as pytorch/pytorch#167313);
* the momenta (:func:`~singd.optim.updates.singd_factor_momenta`): their weights
  ``c²``, ``κ²``, ``tr(H)`` are new host floats at every statistics step and
  enter as ``alpha``/``mul_`` arguments, which Dynamo specialises: one
  recompilation (1–4 s) per statistics step;
* the preconditioning (:func:`~singd.optim.updates.singd_precondition`): no
  consistent gain (slower for diagonal and triangular factors at d = 64).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from singd.optim import updates
from singd.optim.base import KroneckerOptimizer

#: ``momentum_parameter_updates``' signature: ``(params, directions, buffers, *, lr, momentum,
#: weight_decay) → None``, in place.
ParameterUpdates = Callable[..., None]

_PLAIN_TENSORS = (Tensor, nn.Parameter)


def compiled_parameter_updates() -> ParameterUpdates:
    """:func:`~singd.optim.updates.momentum_parameter_updates` under ``torch.compile``.

    ``dynamic=False`` (the shapes of a group do not change between steps);
    ``fullgraph=False`` so that past Dynamo's recompile limit it falls back to
    eager instead of raising.  Non-plain parameters take the eager function.
    """
    compiled = torch.compile(updates.momentum_parameter_updates, dynamic=False)
    eager_only = False

    def parameter_updates(
        params: Sequence[Tensor], *lists: Sequence[Tensor], **settings: float
    ) -> None:
        nonlocal eager_only
        if not eager_only and all(type(p) in _PLAIN_TENSORS for p in params):
            try:
                compiled(params, *lists, **settings)
                return
            except Exception as error:  # compilation fails before the kernel writes anything
                eager_only = True
                warnings.warn(
                    "singd: the compiled parameter update failed to compile "
                    f"({type(error).__name__}); the eager update is used from now on",
                    stacklevel=2,
                )
        updates.momentum_parameter_updates(params, *lists, **settings)

    return parameter_updates


def compile_parameter_updates(optimizer: KroneckerOptimizer, enabled: bool = True) -> None:
    """Run ``optimizer``'s SPEC §1.4 parameter update compiled (``enabled``) or eagerly again."""
    optimizer._compiled_parameter_updates = compiled_parameter_updates() if enabled else None
