"""``torch.distributed.checkpoint`` (DCP) of a Kronecker optimizer, for DDP and FSDP2 runs.

DCP saves a nested dict of tensors and plain values, each rank writing its
own shards (a ``DTensor`` momentum buffer of a ``fully_shard`` model) and
replicated tensors once (the factors, identical on every rank), and loads
*in place* into a dict of the same keys.  ``optimizer.state_dict()`` is such
a dict (its ``"kronecker"`` entry is plain containers and tensors,
:mod:`singd.optim.checkpoint`), but a fresh optimizer has no momentum
buffers yet, so its dict has no place for the saved ones.
:func:`dcp_state_dict` is the state dict with a zero momentum buffer for every
optimised parameter that has none: a fresh optimizer steps from a zero
buffer exactly as from none (``0·α2 + ĝ = ĝ``), so the dict means the same
and serves both to save and as the template to load into::

    dcp.save({"optim": dcp_state_dict(opt)}, checkpoint_id=path)

    state = {"optim": dcp_state_dict(new_opt)}
    dcp.load(state, checkpoint_id=path)
    new_opt.load_state_dict(state["optim"])   # validated in full

(``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``
re-keys torch's per-parameter state and does not know the ``"kronecker"``
entry; it is not needed here.)  The single-process format
(``torch.save``/``torch.load(weights_only=True)``) is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer


def dcp_state_dict(optimizer: Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with a zero ``momentum_buffer`` for every parameter lacking one.

    A new dict (the optimizer is not changed); the buffers are laid out like
    their parameters (a ``DTensor`` shard for a sharded parameter).
    """
    state_dict = optimizer.state_dict()
    per_param = dict(state_dict["state"])
    saved_groups = state_dict["param_groups"]
    for saved, group in zip(saved_groups, optimizer.param_groups, strict=True):
        for index, param in zip(saved["params"], group["params"], strict=True):
            if "momentum_buffer" not in per_param.get(index, {}):
                per_param[index] = {"momentum_buffer": torch.zeros_like(param.detach())}
    return {**state_dict, "state": per_param}
