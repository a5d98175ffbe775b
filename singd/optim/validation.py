"""Argument checks shared by :class:`~singd.SINGD` and :class:`~singd.KFAC`.

Every check raises ``ValueError`` whose message starts with the argument's
name, so a wrong value is reported where it was passed (constructor or
``add_param_group``) and never half-way through a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from singd.structures import get_structure

LOSS_AVERAGES = ("batch", "batch+sequence", None)
KFAC_APPROXIMATIONS = ("expand", "reduce")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: SINGD's swamping guards for half-precision factors (``None``: off).
FACTOR_GUARDS = ("compensated", "stochastic", "master", None)


def _is_real(value: Any) -> bool:
    """A Python int/float (not bool) that converts to a float (no 10**400)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def check_real(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """``value`` as a float if it is a finite real number in the given interval."""
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {left}{low}, {high}{right}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_T(value: Any) -> int:
    """``T``, the factor-update interval: a positive ``int``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"T must be a positive int, got {value!r}")
    return value


def check_lr_cov(value: Any) -> float | Callable[[int], float]:
    """``lr_cov`` (β1): a number in [0, 1] or a callable of the step count."""
    if callable(value):
        return value
    return check_real("lr_cov", value, low=0.0, high=1.0, high_open=False)


def resolve_lr_cov(value: float | Callable[[int], float], steps: int) -> float:
    """β1 for the step after ``steps`` completed ones; checks a schedule's output."""
    if not callable(value):
        return value
    return check_real("lr_cov (schedule output)", value(steps), low=0.0, high=1.0, high_open=False)


def check_loss_average(value: Any) -> str | None:
    """``loss_average`` ∈ {"batch", "batch+sequence", None} (SPEC §1.1)."""
    if not (value is None or isinstance(value, str)) or value not in LOSS_AVERAGES:
        raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {value!r}")
    return value


def check_kfac_approx(value: Any) -> str:
    """``kfac_approx`` ∈ {"expand", "reduce"} (SPEC §1.1)."""
    if not isinstance(value, str) or value not in KFAC_APPROXIMATIONS:
        raise ValueError(f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {value!r}")
    return value


def check_dtype(name: str, value: Any) -> torch.dtype | None:
    """A floating dtype or ``None`` (= the parameter's dtype)."""
    if value is not None and (not isinstance(value, torch.dtype) or value not in FLOAT_DTYPES):
        raise ValueError(f"{name} must be None or one of {FLOAT_DTYPES}, got {value!r}")
    return value


def check_dtype_pair(value: Any) -> tuple[torch.dtype | None, torch.dtype | None]:
    """``preconditioner_dtype`` of SINGD: a pair (for K, for C) of dtypes or ``None``."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            f"preconditioner_dtype must be a pair (dtype for K, dtype for C), got {value!r}"
        )
    return (
        check_dtype("preconditioner_dtype[0]", value[0]),
        check_dtype("preconditioner_dtype[1]", value[1]),
    )


def check_factor_guard(value: Any) -> str | None:
    """``factor_guard`` of SINGD: one of :data:`FACTOR_GUARDS`."""
    if not (value is None or isinstance(value, str)) or value not in FACTOR_GUARDS:
        raise ValueError(f"factor_guard must be one of {FACTOR_GUARDS}, got {value!r}")
    return value


def check_structures(value: Any) -> tuple[str, str]:
    """``structures``: a pair of registry names (for K, for C), SPEC §2."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"structures must be a pair (structure of K, of C), got {value!r}")
    for index, name in enumerate(value):
        try:
            get_structure(name)
        except ValueError as error:
            raise ValueError(f"structures[{index}]: {error}") from None
    return (value[0], value[1])


def check_common(group: dict[str, Any]) -> None:
    """Checks of the hyper-parameters SINGD and KFAC share, in place on a group."""
    group["lr"] = check_real("lr", group["lr"], low=0.0)
    group["momentum"] = check_real("momentum", group["momentum"], low=0.0, high=1.0)
    group["damping"] = check_real("damping", group["damping"], low=0.0)
    group["weight_decay"] = check_real("weight_decay", group["weight_decay"], low=0.0)
    group["T"] = check_T(group["T"])
    group["lr_cov"] = check_lr_cov(group["lr_cov"])
    group["loss_average"] = check_loss_average(group["loss_average"])
    group["kfac_approx"] = check_kfac_approx(group["kfac_approx"])
    check_fallback(group)


#: The optimizers of parameters outside Kronecker layers (``fallback``).
FALLBACKS = ("sgd", "adamw")


def check_fallback(group: dict[str, Any]) -> None:
    """``fallback`` ∈ :data:`FALLBACKS`, ``fallback_betas`` in ``[0, 1)²``, ``fallback_eps > 0``."""
    if group["fallback"] not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {group['fallback']!r}")
    betas = group["fallback_betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"fallback_betas must be a pair of numbers, got {betas!r}")
    group["fallback_betas"] = tuple(
        check_real(f"fallback_betas[{i}]", beta, low=0.0, high=1.0) for i, beta in enumerate(betas)
    )
    group["fallback_eps"] = check_real(
        "fallback_eps", group["fallback_eps"], low=0.0, low_open=True
    )


def check_singd_group(group: dict[str, Any]) -> None:
    """All SINGD hyper-parameters of one param group (SPEC §1), in place."""
    check_common(group)
    group["alpha1"] = check_real("alpha1", group["alpha1"], low=0.0, high=1.0)
    group["kfac_like"] = check_bool("kfac_like", group["kfac_like"])
    if group["kfac_like"] and group["alpha1"] != 0.0:
        raise ValueError(
            f"alpha1 must be 0 with kfac_like=True (IKFAC has no Riemannian momentum), "
            f"got {group['alpha1']!r}"
        )
    group["normalize_lr_cov"] = check_bool("normalize_lr_cov", group["normalize_lr_cov"])
    group["structures"] = check_structures(group["structures"])
    group["preconditioner_dtype"] = check_dtype_pair(group["preconditioner_dtype"])
    group["factor_guard"] = check_factor_guard(group["factor_guard"])


def check_kfac_group(group: dict[str, Any]) -> None:
    """All KFAC hyper-parameters of one param group (SPEC §1.2), in place."""
    check_common(group)
    if group["damping"] > 1.0:
        raise ValueError(
            f"damping must be at most 1 for KFAC (factors start at (1 − damping)·I), "
            f"got {group['damping']!r}"
        )
    group["preconditioner_dtype"] = check_dtype(
        "preconditioner_dtype", group["preconditioner_dtype"]
    )
    group["upcast_half"] = check_bool("upcast_half", group["upcast_half"])
