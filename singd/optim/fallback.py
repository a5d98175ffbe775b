"""The fallback optimizer of parameters outside Kronecker and elementwise layers.

``fallback="sgd"`` (the default) moves them like every other parameter
(SPEC §1.4: momentum SGD on the raw gradient, in the optimizer's commit);
``fallback="adamw"`` gives each its own AdamW step here, with
``torch.optim.AdamW`` semantics (:func:`singd.optim.updates.adamw_parameter_update`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from singd.optim.updates import adamw_parameter_update


def adamw_step(param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
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
