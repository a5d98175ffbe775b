"""The KFAC baseline (SPEC §1.2) with the same hooks and statistics as SINGD."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from singd.optim.base import KroneckerOptimizer
from singd.optim.hooks import PendingStatistics
from singd.optim.kinds import LayerKind
from singd.optim.layers import Layer
from singd.optim.preconditioner import FactorStepInputs, Preconditioner
from singd.optim.sharded import Storage
from singd.optim.updates import kfac_factor_ema, kfac_precondition
from singd.optim.validation import check_kfac_group

FACTORS = ("S_K", "S_C")
HALF_DTYPES = (torch.float16, torch.bfloat16)


class KFAC(KroneckerOptimizer):
    r"""KFAC with exponential moving averages of the Kronecker factors (SPEC §1.2).

    For every layer of a registered kind (:mod:`singd.optim.kinds`; not one-hot kinds
    such as Embedding, whose dense input factor would be vocab × vocab) whose weight is
    optimised, with
    ``W~ = [W, b]`` (d_o × d_i~)::

        S_K = (1 − λ) I (d_i~ × d_i~),  S_C = (1 − λ) I (d_o × d_o)
            # so (S + λI)⁻¹ = I: SINGD's initial preconditioner K Kᵀ = I
        for each step (steps = completed steps, from 0):
            if steps % T == 0:                      # statistics were collected
                U  = Σ_passes AᵀA;  Gc = Σ_passes GᵀG
                S_K ← (1 − β1) S_K + β1 U;  S_C ← (1 − β1) S_C + β1 Gc
            ĝ = (S_C + λI)⁻¹ ∇W~ (S_K + λI)⁻¹      # two Cholesky solves
            ĝ += γ W~;  m_μ ← α2 m_μ + ĝ;  W~ ← W~ − β2 m_μ
        other parameters: the group's fallback (momentum SGD or AdamW), as in SINGD.

    Half precision: torch has no Cholesky in bfloat16/float16, and inverting
    a factor in such a narrow format is exactly what SINGD avoids.  A layer
    whose factor dtype (``preconditioner_dtype``, else the weight's dtype) is
    half therefore raises ``ValueError`` at construction, unless
    ``upcast_half=True``: then the factors are kept, and all their linear
    algebra done, in float32 (the update is cast back to the weight's dtype).

    Hooks, statistics, ``GradScaler`` support (including
    :meth:`attach_grad_scaler`), the non-finite skip, fallback parameters,
    the data-parallel reduction of ``U``, ``Gc`` and checkpoints work as for
    :class:`~singd.SINGD`; ``layer_state(name)``
    holds the dense tensors ``"S_K"``, ``"S_C"``.

    Args:
        model, params, lr, momentum, damping, weight_decay, T, loss_average,
        lr_cov, kfac_approx, warn_unsupported, fallback, fallback_betas,
        fallback_eps: as for :class:`~singd.SINGD`
            (``damping`` ≤ 1 so that ``(1 − λ) I`` is positive semi-definite).
        preconditioner_dtype: dtype of ``S_K`` and ``S_C`` (``None``: the weight's).
        upcast_half: do half-precision factors' linear algebra in float32.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        lr: float = 0.001,
        momentum: float = 0.9,
        damping: float = 0.001,
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: str | None = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        preconditioner_dtype: torch.dtype | None = None,
        upcast_half: bool = False,
        fallback: str = "sgd",
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "weight_decay": weight_decay,
            "T": T,
            "loss_average": loss_average,
            "lr_cov": lr_cov,
            "kfac_approx": kfac_approx,
            "preconditioner_dtype": preconditioner_dtype,
            "upcast_half": upcast_half,
            "fallback": fallback,
            "fallback_betas": fallback_betas,
            "fallback_eps": fallback_eps,
        }
        super().__init__(
            model,
            params,
            defaults,
            KfacPreconditioner(),
            warn_unsupported=warn_unsupported,
            init_grad_scale=1.0,
        )


#: KFAC's layer state: ``"S_K"``, ``"S_C"`` → dense factor.
KfacState = dict[str, Tensor]


class KfacPreconditioner(Preconditioner[KfacState]):
    """KFAC's per-layer maths (SPEC §1.2): EMA factors and two Cholesky solves."""

    statistic_names = (
        "U (curvature statistic of the layer inputs)",
        "Gc (curvature statistic of the output gradients)",
    )

    def declines(self, kind: LayerKind) -> str | None:
        if kind.input_structure is not None:
            return (
                f"KFAC keeps dense factors, and {kind.name}'s input factor would be a "
                f"d_i × d_i matrix where only its {kind.input_structure} part is defined"
            )
        return None

    def check_group(self, group: dict[str, Any]) -> None:
        check_kfac_group(group)

    def _factor_dtype(self, layer: Layer, group: dict[str, Any]) -> torch.dtype:
        """The factors' dtype (float32 for a half one with ``upcast_half``)."""
        dtype = group["preconditioner_dtype"] or layer.weight.dtype
        if dtype in HALF_DTYPES:
            if not group["upcast_half"]:
                raise ValueError(
                    f"KFAC: layer {layer.name!r} would keep its factors in {dtype}, where torch "
                    "has no Cholesky factorisation; pass upcast_half=True to do KFAC's linear "
                    "algebra in float32, or use SINGD, which needs no inverse"
                )
            return torch.float32
        return dtype

    def factor_dtypes(self, layer: Layer, group: dict[str, Any]) -> tuple[torch.dtype, torch.dtype]:
        dtype = self._factor_dtype(layer, group)
        return dtype, dtype

    def new_state(self, layer: Layer, group: dict[str, Any]) -> KfacState:
        dtype, device = self._factor_dtype(layer, group), layer.weight.device
        scale = 1.0 - group["damping"]
        return {
            "S_K": scale * torch.eye(layer.input_dim, dtype=dtype, device=device),
            "S_C": scale * torch.eye(layer.output_dim, dtype=dtype, device=device),
        }

    def summarise_input(self, state: KfacState, A: Tensor) -> Tensor:
        return A.T @ A

    def summarise_grad(self, state: KfacState, G: Tensor) -> Tensor:
        return G.T @ G

    def prepare_factor_step(
        self, layer: Layer, group: dict[str, Any], state: KfacState, pending: PendingStatistics
    ) -> FactorStepInputs:
        return FactorStepInputs(None, [])

    def updated_state(
        self,
        layer: Layer,
        group: dict[str, Any],
        state: KfacState,
        pending: PendingStatistics,
        prepared: FactorStepInputs,
        reads: list[float],
        *,
        correction: float,
        lr_cov: float,
        steps: int,
    ) -> KfacState:
        return {
            "S_K": kfac_factor_ema(state["S_K"], pending.input_summary, lr_cov),
            "S_C": kfac_factor_ema(state["S_C"], pending.grad_summary * correction, lr_cov),
        }

    def precondition(
        self, layer: Layer, group: dict[str, Any], state: KfacState, grad: Tensor
    ) -> Tensor:
        damping = group["damping"]
        S_K, S_C = state["S_K"], state["S_C"]
        return kfac_precondition(S_K, S_C, grad, damping, compute_dtype=S_K.dtype)

    def layout(self, state: KfacState) -> dict[str, str]:
        return {factor: "dense" for factor in FACTORS}

    def to_storage(self, state: KfacState) -> Storage:
        return {factor: {"matrix": state[factor]} for factor in FACTORS}

    def from_storage(
        self, layer: Layer, group: dict[str, Any], current: KfacState, storage: Storage
    ) -> KfacState:
        restored = {}
        for factor in FACTORS:
            like = current[factor]
            saved = storage[factor]
            if set(saved) != {"matrix"} or saved["matrix"].shape != like.shape:
                raise ValueError(
                    f"load_state_dict: {layer.name}.{factor} must be {{'matrix': tensor of "
                    f"shape {tuple(like.shape)}}}"
                )
            matrix = saved["matrix"].to(dtype=like.dtype, device=like.device, copy=True)
            # the step factorises S + λI: an indefinite S would fail there on every step
            # (λ of this optimizer's group; a checkpoint normally carries the same one)
            damping = group["damping"]
            eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
            if torch.linalg.cholesky_ex(matrix + damping * eye).info.item() != 0:
                raise ValueError(
                    f"load_state_dict: {layer.name}.{factor} + damping·I is not positive "
                    "definite (a KFAC factor is a symmetric positive semi-definite average)"
                )
            restored[factor] = matrix
        return restored
