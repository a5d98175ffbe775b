"""Checkpoint format of the Kronecker optimizers: plain containers and tensors only.

``state_dict()[KEY]`` is::

    {"steps": int, "grad_scale_prev": float,
     "layers": {layer name: {"layout": {factor: structure name},
                             "factors": {factor: {storage key: Tensor}}}}}

which ``torch.load(..., weights_only=True)`` accepts.  Every function here
validates and raises ``ValueError``; none of them changes an optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor

KEY = "kronecker"
#: Stands in for a callable ``lr_cov`` (not loadable with ``weights_only``).
CALLABLE_MARKER = "<callable lr_cov: kept from the loading optimizer>"
#: Group entries that fix the factors' layout (and SINGD's guard state); a checkpoint must
#: agree on them.
LAYOUT_KEYS = ("structures", "preconditioner_dtype", "upcast_half", "factor_guard")


class Entry(NamedTuple):
    """The validated optimizer-specific part of a checkpoint."""

    steps: int
    grad_scale_prev: float
    layers: dict[str, dict[str, Any]]


class Loaded(NamedTuple):
    """A checkpoint validated in full, ready to be written into an optimizer."""

    entry: Entry
    groups: list[dict[str, Any]]
    layer_states: dict[str, Any]


def pack(
    *, steps: int, grad_scale_prev: float, layers: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The checkpoint entry (see module docstring)."""
    return {"steps": steps, "grad_scale_prev": grad_scale_prev, "layers": layers}


def plain_group(group: dict[str, Any]) -> dict[str, Any]:
    """A saved param group with a callable ``lr_cov`` replaced by :data:`CALLABLE_MARKER`."""
    group = dict(group)
    if callable(group.get("lr_cov")):
        group["lr_cov"] = CALLABLE_MARKER
    return group


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"load_state_dict: {message}")


def unpack(state_dict: Any, layer_names: list[str]) -> Entry:
    """Validate the entry: keys, types, exactly the layers ``layer_names``."""
    _require(isinstance(state_dict, dict), "state_dict must be a dict")
    _require(KEY in state_dict, f"missing entry {KEY!r} (not a checkpoint of this optimizer)")
    entry = state_dict[KEY]
    _require(
        isinstance(entry, dict) and set(entry) == {"steps", "grad_scale_prev", "layers"},
        f"{KEY!r} must hold exactly 'steps', 'grad_scale_prev' and 'layers'",
    )
    steps, scale, layers = entry["steps"], entry["grad_scale_prev"], entry["layers"]
    _require(
        isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0,
        f"steps must be a non-negative int, got {steps!r}",
    )
    _require(
        isinstance(scale, float) and math.isfinite(scale) and scale > 0,
        f"grad_scale_prev must be a positive finite float, got {scale!r}",
    )
    _require(isinstance(layers, dict), "layers must be a dict")
    missing = sorted(set(layer_names) - set(layers))
    extra = sorted(set(layers) - set(layer_names))
    _require(not missing and not extra, f"layer mismatch: missing {missing}, unexpected {extra}")
    for name, layer in layers.items():
        _require(
            isinstance(layer, dict) and set(layer) == {"layout", "factors"},
            f"layer {name!r} must hold 'layout' and 'factors'",
        )
        _require(
            isinstance(layer["layout"], dict)
            and all(isinstance(v, str) for v in layer["layout"].values()),
            f"layer {name!r}: layout must map factor names to structure names",
        )
        factors = layer["factors"]
        _require(
            isinstance(factors, dict)
            and all(
                isinstance(storage, dict) and all(isinstance(t, Tensor) for t in storage.values())
                for storage in factors.values()
            ),
            f"layer {name!r}: factors must be dicts of tensors",
        )
    return Entry(steps, scale, layers)


def check_factor_tensors(name: str, storage: dict[str, Tensor]) -> None:
    """Every stored factor entry is a finite floating tensor."""
    for key, tensor in storage.items():
        _require(tensor.is_floating_point(), f"{name}[{key!r}] must be floating point")
        _require(bool(tensor.isfinite().all()), f"{name}[{key!r}] holds non-finite entries")


def restore_layer_states(
    saved: dict[str, Any],
    current: dict[str, Any],
    *,
    layout: Callable[[Any], dict[str, str]],
    restore: Callable[[str, Any, dict[str, dict[str, Tensor]]], Any],
) -> dict[str, Any]:
    """Every layer's state from ``saved`` (``unpack``'s ``layers``), validated in full.

    Args:
        saved: layer name → ``{"layout", "factors"}`` (one entry per layer of ``current``).
        current: layer name → the optimizer's live state (shapes, dtypes, devices).
        layout: a state → factor name → structure name.
        restore: ``(name, current state, factor storages) → new state``; raises
            ``ValueError`` on a mismatch.

    Raises:
        ValueError: on a structure or factor-set mismatch, non-finite or non-tensor
            storage, or whatever ``restore`` rejects; nothing is changed then.
    """
    restored = {}
    for name, state in current.items():
        entry = saved[name]
        _require(
            entry["layout"] == layout(state),
            f"layer {name!r} has structures {entry['layout']}, expected {layout(state)}",
        )
        _require(
            set(entry["factors"]) == set(entry["layout"]),
            f"layer {name!r} factors {sorted(entry['factors'])} != {sorted(entry['layout'])}",
        )
        for factor, storage in entry["factors"].items():
            check_factor_tensors(f"{name}.{factor}", storage)
        restored[name] = restore(name, state, entry["factors"])
    return restored


def restore_groups(
    state_dict: dict[str, Any], current: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The saved groups, with markers replaced by the current callables.

    Raises ``ValueError`` if the group count or a layout entry (structures,
    factor dtypes) differs from the current groups.
    """
    saved = state_dict.get("param_groups")
    _require(
        isinstance(saved, list) and len(saved) == len(current),
        f"expected {len(current)} param groups, got "
        f"{len(saved) if isinstance(saved, list) else type(saved).__name__}",
    )
    groups = []
    for index, (old, new) in enumerate(zip(saved, current, strict=True)):
        _require(isinstance(old, dict), f"param group {index} must be a dict")
        missing = sorted(set(new) - set(old))
        _require(not missing, f"param group {index} misses the keys {missing}")
        group = dict(old)
        for key in LAYOUT_KEYS:
            if key in new:
                _require(
                    group.get(key) == new[key],
                    f"param group {index}: {key} {group.get(key)!r} != current {new[key]!r}",
                )
        if group.get("lr_cov") == CALLABLE_MARKER:
            current_lr_cov: Callable[[int], float] | float = new["lr_cov"]
            _require(
                callable(current_lr_cov),
                f"param group {index}: the checkpoint's lr_cov was a callable; the "
                "loading optimizer must have a callable lr_cov too",
            )
            group["lr_cov"] = current_lr_cov
        groups.append(group)
    return groups


#: The elementwise preconditioner's per-parameter state (singd.optim.elementwise).
ELEMENTWISE_KEYS = ("elementwise_k", "elementwise_m")


def check_param_state(state_dict: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    """Per-parameter state: momentum buffers (AdamW: moments and step; elementwise layers: ``k``,
    ``m``) shaped like their parameters.

    Torch's ``load_state_dict`` gives ``state[i]`` to the parameter at the
    position of ``i`` in the saved groups' ``params`` lists, so those lists
    must hold distinct ints, as many per group as ``groups`` has parameters.
    Expects the saved groups checked by :func:`restore_groups`.
    """
    state = state_dict.get("state")
    _require(isinstance(state, dict), "missing per-parameter 'state'")
    saved_ids: list[Any] = []
    for index, (saved, group) in enumerate(zip(state_dict["param_groups"], groups, strict=True)):
        ids = saved["params"]
        _require(
            isinstance(ids, list)
            and len(ids) == len(group["params"])
            and all(isinstance(i, int) and not isinstance(i, bool) for i in ids),
            f"param group {index}: params must be a list of {len(group['params'])} ints",
        )
        saved_ids.extend(ids)
    _require(len(set(saved_ids)) == len(saved_ids), "param groups repeat a parameter index")
    param_of = dict(zip(saved_ids, (p for group in groups for p in group["params"]), strict=True))
    for index, entry in state.items():
        _require(index in param_of, f"state key {index!r} is not a parameter index")
        _require(isinstance(entry, dict), f"state[{index}] must be a dict")
        keys = ("exp_avg", "exp_avg_sq") if "exp_avg" in entry else ("momentum_buffer",)
        keys += tuple(key for key in ELEMENTWISE_KEYS if key in entry)
        if keys[0] == "exp_avg":  # an AdamW fallback parameter
            step = entry.get("step")
            _require(
                isinstance(step, int) and not isinstance(step, bool) and step >= 1,
                f"state[{index}]['step'] must be a positive int",
            )
        for key in keys:
            buffer = entry.get(key)
            _require(
                isinstance(buffer, Tensor) and buffer.shape == param_of[index].shape,
                f"state[{index}][{key!r}] must be a tensor of shape {tuple(param_of[index].shape)}",
            )
            check_factor_tensors(f"state[{index}]", {key: buffer})


def validate(
    state_dict: Any,
    *,
    param_groups: list[dict[str, Any]],
    check_group: Callable[[dict[str, Any]], None],
    current: dict[str, Any],
    layout: Callable[[Any], dict[str, str]],
    restore: Callable[[str, Any, dict[str, dict[str, Tensor]]], Any],
) -> Loaded:
    """Everything ``load_state_dict`` writes, validated in full before anything changes.

    Args:
        state_dict: the checkpoint (``state_dict()``'s format).
        param_groups: the loading optimizer's groups.
        check_group: validates (and normalises) one restored group in place.
        current: layer name → the live layer state (see :func:`restore_layer_states`).
        layout, restore: as for :func:`restore_layer_states`.

    Raises:
        ValueError: on anything :func:`unpack`, :func:`restore_groups`,
            ``check_group``, :func:`check_param_state` or
            :func:`restore_layer_states` rejects; nothing is changed then.
    """
    entry = unpack(state_dict, list(current))
    groups = restore_groups(state_dict, param_groups)
    for group in groups:
        check_group(group)
    check_param_state(state_dict, param_groups)
    layer_states = restore_layer_states(entry.layers, current, layout=layout, restore=restore)
    return Loaded(entry, groups, layer_states)
