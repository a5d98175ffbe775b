"""Mutation testing as a first-class check: a catalogue of wrong optimizers and their fate.

A :class:`Mutant` is one classic slip (SPEC §1.1–§1.5, §2) installed by patching
one or more functions of ``singd`` (every ``singd.*`` module that binds the
target name, or a class attribute), restored afterwards.  For a mutant and a
*precision* (model dtype, factor dtype; :data:`PRECISIONS`):

* **visibility**: the correct and the mutated optimizer run in that precision
  on the same data (same seed); after every step the largest
  ``|mutated − correct| / (eps · max|correct entry|)`` over layers and state
  entries (``K``, ``C``, ``m_K``, ``m_C`` in the factor dtype's ``eps``;
  ``W~``, ``m_W~`` in the model dtype's), maximised over the steps: how far the
  slip moves the run, in ulps of the entry's scale.  A change the dtype cannot
  represent has visibility 0 and does not count against the verifier.
* **killed**: the verifier flags the mutated run.  For the oracle harness
  (every mutant but the grad-scale ones) that is ``not run_case(case).passed``
  (:func:`verification.grid.run_case`, trajectory and one-step bounds).  The
  recorder (:mod:`verification.recording`) calls ``optimizer.step()`` itself
  and feeds the oracle the recorded gradients as unscaled ones, so it cannot
  drive a ``GradScaler``; the grad-scale mutants use :func:`grad_scale_states`
  instead: a run stepped through a ``GradScaler`` whose scale is always a power
  of four must equal the same run without scaler *bitwise* (tolerance 0:
  scaling by a power of two is exact in binary floating point away from
  overflow and underflow, and ``sqrt`` of a power of four is a power of two,
  so the scaled statistics, the correction ``2^(−2k)/s_t²`` and the unscaled
  gradients are all exact).

The check: every mutant with visibility ``>= VISIBLE_ULPS`` in a precision must
be killed in that precision (tests/optim/test_mutation.py).  The verifier's
*resolution* per precision (:func:`resolution`) is the smallest relative
perturbation ``δ`` of a one-parameter family (preconditioned gradient
``× (1 + δ)``, ``H_K × (1 + δ)``) that it kills, found by bisection on a log
scale, with the visibility at that ``δ``.

``python -m verification.mutants`` prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import pkgutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

import singd
import singd.optim.base as base
import singd.optim.batched as batched
import singd.optim.hooks as hooks
import singd.optim.kinds as kinds
import singd.optim.scaling as scaling
import singd.optim.singd as singd_module
import singd.optim.statistics as statistics
import singd.optim.updates as updates
import singd.structures.toeplitz as toeplitz
import singd.structures.triangular as triangular
from reference.updates import SINGDHyperparameters
from singd.optim.layers import Layer
from singd.structures.base import StructuredMatrix
from verification.comparison import COMPENSATION_KEYS
from verification.grid import run_case
from verification.recording import RecordedRun, record_run
from verification.scenarios import (
    BASE_HYPER,
    DTYPES,
    SCENARIOS,
    VARIANTS,
    Case,
    loss_function,
    make_singd,
    record,
)
from verification.tolerances import EPS

#: A mutant visible by at least this many ulps of an entry's scale must be killed.
VISIBLE_ULPS = 16.0

#: Optimizer steps of every mutation run (``K`` is non-symmetric from the second on).
STEPS = 10

#: Precision name → (model dtype, factor dtype or ``None`` for the model's); names as
#: :attr:`verification.scenarios.Case.precision`.
PRECISIONS: dict[str, tuple[str, str | None]] = {
    "float64": ("float64", None),
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "float16": ("float16", None),
    "float32+bfloat16 factors": ("float32", "bfloat16"),
}

#: Factor-side state entries (stored in the factor dtype); the rest are in the model dtype.
FACTOR_KEYS = frozenset({"K", "C", "m_K", "m_C"})

#: ``GradScaler`` of the grad-scale harness: scales 4^2, 4^3, … (powers of four, so
#: ``sqrt(s)`` is exact), growing every second step so that ``s_{t−1} ≠ s_t`` half the time.
GRAD_SCALER = {"init_scale": 4.0**2, "growth_factor": 4.0, "growth_interval": 2}

#: Replacements of one installation: target ``"module:qualname"`` → new object.
Replacements = dict[str, object]

#: Dense float64 state after every step: ``states[t][layer][key]``.
States = list[dict[str, dict[str, np.ndarray]]]


# --------------------------------------------------------------------- patching
def _import_all_singd() -> None:
    """Import every ``singd`` submodule, so that each binding of a target can be patched."""
    for info in pkgutil.walk_packages(singd.__path__, "singd."):
        importlib.import_module(info.name)


def _singd_modules() -> list[object]:
    """The loaded ``singd`` modules."""
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name == "singd" or name.startswith("singd."))
    ]


@contextmanager
def patched(replacements: Replacements) -> Iterator[int]:
    """Install ``replacements`` for the duration of the block; yields the number of bindings.

    A target ``"pkg.module:name"`` replaces ``name`` in every loaded ``singd``
    module that binds the same object as ``pkg.module.name`` (a ``from … import``
    copies the binding); ``"pkg.module:Class.attr"`` replaces a class attribute
    (subclasses that inherit it see the replacement).  Everything is restored on
    exit, also after an exception.

    Raises:
        ValueError: if a target binds nothing.
    """
    _import_all_singd()
    undo: list[tuple[object, str, object]] = []
    try:
        for target, replacement in replacements.items():
            module_name, qualname = target.split(":")
            module = importlib.import_module(module_name)
            if "." in qualname:
                class_name, attribute = qualname.split(".")
                owner = getattr(module, class_name)
                undo.append((owner, attribute, owner.__dict__[attribute]))
                setattr(owner, attribute, replacement)
                continue
            original = getattr(module, qualname)
            bound = [m for m in _singd_modules() if getattr(m, qualname, None) is original]
            if not bound:
                raise ValueError(f"{target} binds nothing")
            for binder in bound:
                undo.append((binder, qualname, original))
                setattr(binder, qualname, replacement)
        yield len(undo)
    finally:
        for owner, attribute, original in reversed(undo):
            setattr(owner, attribute, original)


# ----------------------------------------------------------------------- mutants
@dataclass(frozen=True)
class RunConfig:
    """Where a mutant is run: scenario, variant, structures, steps and harness.

    Attributes:
        scenario: Key of :data:`verification.scenarios.SCENARIOS`.
        variant: Key of :data:`verification.scenarios.VARIANTS`.
        structures: ``(K, C)`` structure names.
        steps: Optimizer steps.
        harness: ``"oracle"`` (:func:`verification.grid.run_case`) or ``"grad-scale"``
            (:func:`grad_scale_states`, the scaled run against the unscaled one).
    """

    scenario: str = "mlp"
    variant: str = "singd"
    structures: tuple[str, str] = ("dense", "dense")
    steps: int = STEPS
    harness: Literal["oracle", "grad-scale"] = "oracle"

    def case(self, precision: str) -> Case:
        """The grid case of this configuration in ``precision``."""
        dtype, factor_dtype = PRECISIONS[precision]
        return Case(self.scenario, self.variant, self.structures, dtype, factor_dtype, self.steps)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return {
            "scenario": self.scenario,
            "variant": self.variant,
            "structures": list(self.structures),
            "steps": self.steps,
            "harness": self.harness,
        }


@dataclass(frozen=True)
class Mutant:
    """One deliberate slip in the optimizer.

    Attributes:
        name: Identifier (key of :data:`MUTANTS`).
        description: The slip, in one line.
        targets: What is patched, ``"module:qualname"`` each.
        make: Builds fresh replacements (stateful mutants start afresh per installation).
        config: Where the slip can show.
    """

    name: str
    description: str
    targets: tuple[str, ...]
    make: Callable[[], Replacements] = field(compare=False)
    config: RunConfig = RunConfig()

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The optimizer with this slip, for the duration of the block."""
        replacements = self.make()
        if set(replacements) != set(self.targets):
            raise ValueError(f"{self.name}: replaces {sorted(replacements)}, not {self.targets}")
        with patched(replacements):
            yield

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields (without the patch itself)."""
        return {
            "name": self.name,
            "description": self.description,
            "targets": list(self.targets),
            **self.config.as_dict(),
        }


# Originals, captured at import (before any patch): the mutants call these.
_precondition = updates.singd_precondition
_batched_step = batched.step
_factor_momenta = updates.singd_factor_momenta
_update_factors = updates.singd_update_factors
_factor_step = updates.singd_factor_step
_compensated_step = updates.compensated_factor_step
_parameter_updates = updates.momentum_parameter_updates
_input_matrix = statistics.input_matrix
_accumulate = hooks.CurvatureCollector._accumulate
_pop_all = hooks.CurvatureCollector.pop_all
_unscaled_grads = base.KroneckerOptimizer._unscaled_grads
_summarise_input = singd_module.SingdPreconditioner.summarise_input
_conv_input_shared = kinds.ConvKind.input_shared
_embedding_input_statistic = kinds.EmbeddingKind.input_statistic


def _scaled_tensor(tensor: Tensor, factor: float) -> Tensor:
    """``tensor × factor`` computed in float64 and rounded once to ``tensor``'s dtype."""
    return (tensor.to(torch.float64) * factor).to(tensor.dtype)


def _scaled_structured(matrix: StructuredMatrix, factor: float) -> StructuredMatrix:
    """``matrix × factor``, each stored number computed in float64 and rounded once."""
    storage = {key: _scaled_tensor(value, factor) for key, value in matrix.storage.items()}
    return type(matrix).from_storage(matrix.dim, storage)


def _coef(kwargs: dict[str, Any]) -> float:
    """The bracket coefficient ``½`` or ``½(1 − α1)`` (SPEC §1.3)."""
    return 0.5 * (1.0 - kwargs["alpha1"]) if kwargs["normalize_lr_cov"] else 0.5


# --- updates (SPEC §1.3, §1.4a)
def _precondition_k_for_kt(
    K: StructuredMatrix, C: StructuredMatrix, grad: Tensor, outers: updates.Outers = (None, None)
) -> Tensor:
    """``C Cᵀ ∇W Kᵀ Kᵀ``: ``K`` where ``Kᵀ`` belongs (kept ``K Kᵀ`` ignored)."""
    left = C.matmul(C.t_matmul(grad.to(C.dtype)))
    right = K.matmul(K.matmul(left.T.to(K.dtype)))
    return right.T.to(grad.dtype)


def _momenta_without_half(
    state: updates.FactorState, H_K: StructuredMatrix, H_C: StructuredMatrix, **kwargs: Any
) -> tuple[StructuredMatrix, StructuredMatrix]:
    """``m ← α1 m + bracket`` instead of ``α1 m + ½ bracket``."""
    new_m_K, new_m_C = _factor_momenta(state, H_K, H_C, **kwargs)
    alpha1 = kwargs["alpha1"]
    return (
        new_m_K.mul_(2.0).add_(state.m_K, alpha=-alpha1),
        new_m_C.mul_(2.0).add_(state.m_C, alpha=-alpha1),
    )


def _momenta_dims_swapped(
    state: updates.FactorState, H_K: StructuredMatrix, H_C: StructuredMatrix, **kwargs: Any
) -> tuple[StructuredMatrix, StructuredMatrix]:
    """Trace weights ``1/(2 d_i)`` for ``m_K`` and ``1/(2 d_o)`` for ``m_C`` (swapped)."""
    new_m_K, new_m_C = _factor_momenta(state, H_K, H_C, **kwargs)
    d_i, d_o = state.K.dim, state.C.dim
    alpha1 = kwargs["alpha1"]
    new_m_K.add_(state.m_K, alpha=-alpha1).mul_(d_o / d_i).add_(state.m_K, alpha=alpha1)
    new_m_C.add_(state.m_C, alpha=-alpha1).mul_(d_i / d_o).add_(state.m_C, alpha=alpha1)
    return new_m_K, new_m_C


def _momenta_without_damping(
    state: updates.FactorState, H_K: StructuredMatrix, H_C: StructuredMatrix, **kwargs: Any
) -> tuple[StructuredMatrix, StructuredMatrix]:
    """``λ = 0`` in the bracket: the damping terms ``c² Π̂(KᵀK)``, ``κ² Π̂(CᵀC)`` dropped."""
    return _factor_momenta(state, H_K, H_C, **{**kwargs, "damping": 0.0})


def _momenta_alpha1_on_bracket(
    state: updates.FactorState, H_K: StructuredMatrix, H_C: StructuredMatrix, **kwargs: Any
) -> tuple[StructuredMatrix, StructuredMatrix]:
    """``m ← m + α1 · ½ bracket``: ``α1`` weights the new bracket instead of the old momentum."""
    new_m_K, new_m_C = _factor_momenta(state, H_K, H_C, **kwargs)
    alpha1 = kwargs["alpha1"]
    new_m_K.add_(state.m_K, alpha=-alpha1).mul_(alpha1).add_(state.m_K)
    new_m_C.add_(state.m_C, alpha=-alpha1).mul_(alpha1).add_(state.m_C)
    return new_m_K, new_m_C


def _momenta_identity_sign(
    state: updates.FactorState, H_K: StructuredMatrix, H_C: StructuredMatrix, **kwargs: Any
) -> tuple[StructuredMatrix, StructuredMatrix]:
    """``+ d_o I`` (``+ I`` for IKFAC) in the bracket instead of ``− d_o I``."""
    new_m_K, new_m_C = _factor_momenta(state, H_K, H_C, **kwargs)
    # the bracket's identity term contributes −coef·I to the new momentum; flip it
    return new_m_K.add_diag_(2 * _coef(kwargs)), new_m_C.add_diag_(2 * _coef(kwargs))


def _batch_traces_reversed(
    batch: batched.DiagonalBatch,
    traces: Sequence[updates.Traces],
    corrections: Sequence[float],
    **kwargs: Any,
) -> batched.NewFactors:
    """A batch's per-layer traces and corrections in reverse row order (layers mixed up)."""
    return _batched_step(batch, list(reversed(traces)), list(reversed(corrections)), **kwargs)


def _factor_step_twice(
    factor: StructuredMatrix, momentum: StructuredMatrix, lr_cov: float
) -> StructuredMatrix:
    """``K ← K (I − β1 m)²``: the covariance step applied twice."""
    return _factor_step(_factor_step(factor, momentum, lr_cov), momentum, lr_cov)


def _compensated_step_twice(
    factor: StructuredMatrix,
    momentum: StructuredMatrix,
    lr_cov: float,
    compensation: StructuredMatrix,
) -> tuple[StructuredMatrix, StructuredMatrix]:
    """The compensated (bf16/fp16 default) factor step applied twice, like ``lr-cov-twice``."""
    once, carried = _compensated_step(factor, momentum, lr_cov, compensation)
    return _compensated_step(once, momentum, lr_cov, carried)


def _lr_cov_not_normalised(lr_cov: float, momentum: StructuredMatrix, normalize: bool) -> float:
    """``β1`` even with ``normalize_lr_cov`` (no ``/ max(1, ‖m‖_∞)``)."""
    return lr_cov


def _stale_factor_mutants() -> Replacements:
    """Update + precondition pair that preconditions with the pre-update ``K``, ``C``."""
    stale: dict[int, tuple[StructuredMatrix, StructuredMatrix]] = {}

    def update_and_remember(
        state: updates.FactorState, H_K: StructuredMatrix, H_C: StructuredMatrix, **kwargs: Any
    ) -> updates.FactorState:
        new_state = _update_factors(state, H_K, H_C, **kwargs)
        stale[id(new_state.K)] = (state.K, state.C)
        return new_state

    def precondition_stale(
        K: StructuredMatrix,
        C: StructuredMatrix,
        grad: Tensor,
        outers: updates.Outers = (None, None),
    ) -> Tensor:
        old_K, old_C = stale.get(id(K), (K, C))
        return _precondition(old_K, old_C, grad)  # kept K Kᵀ (of the new K) ignored

    return {
        "singd.optim.updates:singd_update_factors": update_and_remember,
        "singd.optim.updates:singd_precondition": precondition_stale,
    }


_outers = singd_module.SingdPreconditioner.outers


def _outers_never_refreshed(
    self: singd_module.SingdPreconditioner,
    layer: Layer,
    group: dict[str, Any],
    state: dict[str, StructuredMatrix],
    K: StructuredMatrix,
    C: StructuredMatrix,
) -> updates.Outers:
    """The kept ``K Kᵀ``, ``C Cᵀ`` of the first step, reused after later factor steps."""
    cached = self._outer_cache.get(layer.name)
    if cached is not None:
        return cached[2], cached[3]
    return _outers(self, layer, group, state, K, C)


# --- statistics (SPEC §1.1)
def _input_matrix_unscaled(shared: Tensor, *, approx: str, bias: bool) -> Tensor:
    """``A`` without the ``1 / sqrt(n_A)`` scaling."""
    return _input_matrix(shared, approx=approx, bias=bias) * math.sqrt(
        shared.shape[0] * (shared.shape[1] if approx == "expand" else 1)
    )


def _grad_matrix_times_n(
    shared: Tensor, *, approx: str, loss_average: str | None, scale: Tensor | None = None
) -> Tensor:
    """``G ← G · N`` instead of ``G · sqrt(N)``."""
    batch, positions, _ = shared.shape
    rows = shared.reshape(-1, shared.shape[-1]) if approx == "expand" else shared.sum(dim=1)
    rows = rows if scale is None else rows * scale
    return rows * statistics.loss_terms(batch, positions, loss_average)


def _input_matrix_zero_bias(shared: Tensor, *, approx: str, bias: bool) -> Tensor:
    """The bias column of ``A`` holds zeros instead of ones."""
    rows = shared.reshape(-1, shared.shape[-1]) if approx == "expand" else shared.mean(dim=1)
    if bias:
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], 1)], dim=1)
    return rows / math.sqrt(rows.shape[0])


def _input_matrix_reduce_sums(shared: Tensor, *, approx: str, bias: bool) -> Tensor:
    """KFAC-reduce *sums* the inputs over the shared positions instead of averaging."""
    if approx == "reduce":
        return _input_matrix(shared * shared.shape[1], approx=approx, bias=bias)
    return _input_matrix(shared, approx=approx, bias=bias)


# --- hooks (SPEC §1.1 accumulation, §1.4a order)
def _conv_patches_channels_inner(kind: kinds.ConvKind, module: nn.Module, x: Tensor) -> Tensor:
    """Conv patches with columns in ``(k_1, …, k_r, c)`` order, not the weight's ``(c, k…)``."""
    patches = _conv_input_shared(kind, module, x)
    channels = module.in_channels // module.groups
    split = patches.reshape(*patches.shape[:2], channels, -1)
    return split.transpose(2, 3).reshape(patches.shape)


class _Unpadded:
    """An embedding seen without its ``padding_idx``."""

    def __init__(self, module: nn.Embedding) -> None:
        self.num_embeddings = module.num_embeddings
        self.padding_idx = None


def _embedding_padding_counted(
    kind: kinds.EmbeddingKind, module: nn.Module, x: Tensor, **settings: Any
) -> kinds.InputGramDiagonal:
    """Token counts that include the padding positions (torch gives them no gradient)."""
    return _embedding_input_statistic(kind, _Unpadded(module), x, **settings)


def _accumulate_twice(
    self: hooks.CurvatureCollector,
    name: str,
    input_summary: Any,
    grad_summary: Any,
    info: hooks.GradScaleInfo,
) -> None:
    """Every pass's summaries are added to the pending sums twice."""
    _accumulate(self, name, input_summary, grad_summary, info)
    _accumulate(self, name, input_summary.clone(), grad_summary.clone(), info)


def _stale_statistics() -> Replacements:
    """``pop_all`` hands out the previous step's statistics (the first step: its own)."""
    previous: dict[str, hooks.PendingStatistics] = {}

    def pop_previous(self: hooks.CurvatureCollector) -> dict[str, hooks.PendingStatistics]:
        nonlocal previous
        current = _pop_all(self)
        stale = previous or current
        previous = dict(current)  # its own copy: the step empties the dict it is handed
        return stale

    return {"singd.optim.hooks:CurvatureCollector.pop_all": pop_previous}


# --- structure kernels (SPEC §2)
def _tril_project_single_coupling(cls: type[triangular.Tril], sym: Tensor) -> triangular.Tril:
    """``tril`` Π̂ with ``M_ij`` below the diagonal instead of ``M_ij + M_ji`` (no factor 2)."""
    dim = sym.shape[0]
    entries = sym.masked_select(torch.ones(dim, dim, dtype=torch.bool, device=sym.device).tril())
    return cls(dim, {"entries": entries})


def _toeplitz_means_off_by_one(left: Tensor, right: Tensor) -> Tensor:
    """Toeplitz Π̂ dividing diagonal ``k``'s sum by ``d − k + 1`` instead of ``d − k``."""
    dim, dtype = left.shape[0], left.dtype
    work = toeplitz.compute_dtype(dtype)
    left32 = left.to(work)
    right32 = left32 if right is left else right.to(work)
    use_fft = dim >= toeplitz.FFT_MIN_DIM and left.shape[1] > 0
    lag_products = toeplitz.lag_products_fft if use_fft else toeplitz.lag_products_direct
    sums = lag_products(left32, right32)
    two_sided = torch.cat([sums[:1], 2 * sums[1:]])
    counts = torch.arange(dim + 1, 1, -1, dtype=work, device=left.device)
    return (two_sided / counts).to(dtype)


def _convolve_fft_no_conjugate(first_column: Tensor, columns: Tensor, transpose: bool) -> Tensor:
    """FFT path: the kernel's spectrum is not conjugated for ``Lᵀ X`` (computes ``L X``)."""
    dim = columns.shape[0]
    length = toeplitz.fft_length(dim)
    kernel = torch.fft.rfft(first_column, length)
    spectrum = torch.fft.rfft(columns, length, dim=0) * kernel[:, None]
    return torch.fft.irfft(spectrum, length, dim=0)[:dim].contiguous()


def _lag_products_fft_aliased(left: Tensor, right: Tensor) -> Tensor:
    """FFT path: lag products with FFT length ``2d − 2`` (lag ``d − 1`` aliases with ``1 − d``)."""
    dim = left.shape[0]
    length = 2 * dim - 2
    left_spectrum = torch.fft.rfft(left, length, dim=0)
    right_spectrum = torch.fft.rfft(right, length, dim=0)
    cross = torch.linalg.vecdot(left_spectrum, right_spectrum, dim=1)
    return torch.fft.irfft(cross, length)[:dim]


# --- grad-scale handling (SPEC §1.5)
def _correction_inverted(info: hooks.GradScaleInfo, amp: scaling.AmpStepInfo, layer: str) -> float:
    """``s_t²`` instead of ``1 / s_t²`` (SPEC §1.5, docs/SPEC.md)."""
    return 1.0 / _original_correction(info, amp, layer)


def _correction_dropped(info: hooks.GradScaleInfo, amp: scaling.AmpStepInfo, layer: str) -> float:
    """No loss-scale correction: ``H_C`` keeps the factor ``s_t²``."""
    return 1.0


_original_correction = scaling.statistics_correction


# --- momentum and parameter update (SPEC §1.4)
def _update_without_momentum(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """``m ← ĝ``: the momentum ``α2`` is not applied."""
    _parameter_updates(
        params, directions, momentum_buffers, lr=lr, momentum=0.0, weight_decay=weight_decay
    )


def _decay_before_preconditioning() -> Replacements:
    """``ĝ = C Cᵀ (∇W~ + γ W~) K Kᵀ``: weight decay added before preconditioning."""

    def grads_with_decay(
        self: base.KroneckerOptimizer, grad_scale: float | None
    ) -> dict[int, Tensor]:
        grads = _unscaled_grads(self, grad_scale)
        for group in self.param_groups:
            for param in group["params"]:
                if id(param) in grads:
                    grads[id(param)] = grads[id(param)].add(param, alpha=group["weight_decay"])
        return grads

    def update_without_decay(
        params: Sequence[Tensor],
        directions: Sequence[Tensor],
        momentum_buffers: Sequence[Tensor],
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
    ) -> None:
        _parameter_updates(
            params, directions, momentum_buffers, lr=lr, momentum=momentum, weight_decay=0.0
        )

    return {
        "singd.optim.base:KroneckerOptimizer._unscaled_grads": grads_with_decay,
        "singd.optim.updates:momentum_parameter_updates": update_without_decay,
    }


# --- one-parameter families (the resolution)
def scaled_precondition(delta: float, config: RunConfig | None = None) -> Mutant:
    """The preconditioned gradient ``ĝ × (1 + δ)`` (rounded once to the gradient's dtype)."""

    def precondition(
        K: StructuredMatrix,
        C: StructuredMatrix,
        grad: Tensor,
        outers: updates.Outers = (None, None),
    ) -> Tensor:
        return _scaled_tensor(_precondition(K, C, grad, outers), 1.0 + delta)

    return Mutant(
        f"precondition-x(1+{delta:.3g})",
        f"preconditioned gradient × (1 + {delta:.3g})",
        ("singd.optim.updates:singd_precondition",),
        lambda: {"singd.optim.updates:singd_precondition": precondition},
        config or RunConfig(),
    )


def scaled_input_statistics(delta: float, config: RunConfig | None = None) -> Mutant:
    """``H_K × (1 + δ)`` (each stored number rounded once to the factor dtype)."""

    def summarise(
        self: singd_module.SingdPreconditioner, state: dict[str, StructuredMatrix], A: Tensor
    ) -> StructuredMatrix:
        return _scaled_structured(_summarise_input(self, state, A), 1.0 + delta)

    return Mutant(
        f"H_K-x(1+{delta:.3g})",
        f"H_K × (1 + {delta:.3g})",
        ("singd.optim.singd:SingdPreconditioner.summarise_input",),
        lambda: {"singd.optim.singd:SingdPreconditioner.summarise_input": summarise},
        config or RunConfig(),
    )


#: The one-parameter families :func:`resolution` bisects over.
FAMILIES: dict[str, Callable[[float], Mutant]] = {
    "precondition": scaled_precondition,
    "H_K": scaled_input_statistics,
}


def _single(target: str, replacement: object) -> Callable[[], Replacements]:
    """A factory of the one replacement ``target → replacement``."""
    return lambda: {target: replacement}


_U = "singd.optim.updates"
_MOMENTA = f"{_U}:singd_factor_momenta"
_STATS = "singd.optim.statistics"
_TOEPLITZ = ("triltoeplitz", "triutoeplitz")
#: The FFT-path configuration: fewer steps, each costs ~10× an MLP step in the oracle.
_WIDE = RunConfig(scenario="wide", structures=_TOEPLITZ, steps=6)


def _catalogue() -> dict[str, Mutant]:
    """The mutants of :data:`MUTANTS`."""
    entries = [
        # layer kinds (SPEC-layers)
        Mutant(
            "conv-patch-order",
            "Conv patches with columns (k_1, …, k_r, c) instead of the weight's (c, k_1, …, k_r)",
            ("singd.optim.kinds:ConvKind.input_shared",),
            _single("singd.optim.kinds:ConvKind.input_shared", _conv_patches_channels_inner),
            RunConfig(scenario="conv3d", steps=8),
        ),
        Mutant(
            "embedding-padding-counted",
            "Embedding token counts include the padding_idx positions (a ≠ 0 there)",
            ("singd.optim.kinds:EmbeddingKind.input_statistic",),
            _single("singd.optim.kinds:EmbeddingKind.input_statistic", _embedding_padding_counted),
            RunConfig(scenario="embedding", structures=("diagonal", "dense"), steps=8),
        ),
        # updates
        Mutant(
            "K-for-Kt",
            "ĝ = C Cᵀ ∇W Kᵀ Kᵀ: K where Kᵀ belongs in the preconditioning",
            (f"{_U}:singd_precondition",),
            _single(f"{_U}:singd_precondition", _precondition_k_for_kt),
        ),
        Mutant(
            "half-dropped",
            "m ← α1 m + bracket: the ½ of the factor-momentum bracket dropped",
            (_MOMENTA,),
            _single(_MOMENTA, _momenta_without_half),
        ),
        Mutant(
            "pre-update-factors",
            "the gradient is preconditioned with K, C from before the factor update",
            (f"{_U}:singd_update_factors", f"{_U}:singd_precondition"),
            _stale_factor_mutants,
        ),
        Mutant(
            "kept-outer-stale",
            "T > 1: the kept K Kᵀ, C Cᵀ are not refreshed after a factor step",
            ("singd.optim.singd:SingdPreconditioner.outers",),
            _single("singd.optim.singd:SingdPreconditioner.outers", _outers_never_refreshed),
            RunConfig(variant="T3", steps=8),
        ),
        Mutant(
            "dims-swapped",
            "trace weights 1/(2 d_i) for m_K and 1/(2 d_o) for m_C (d_i, d_o swapped)",
            (_MOMENTA,),
            _single(_MOMENTA, _momenta_dims_swapped),
        ),
        Mutant(
            "damping-dropped",
            "λ = 0 in the bracket: c² Π̂(KᵀK) and κ² Π̂(CᵀC) missing",
            (_MOMENTA,),
            _single(_MOMENTA, _momenta_without_damping),
        ),
        Mutant(
            "alpha1-on-bracket",
            "m ← m + α1·½ bracket: α1 on the new bracket instead of the old momentum",
            (_MOMENTA,),
            _single(_MOMENTA, _momenta_alpha1_on_bracket),
        ),
        Mutant(
            "identity-sign",
            "+ d_o I instead of − d_o I in the bracket",
            (_MOMENTA,),
            _single(_MOMENTA, _momenta_identity_sign),
        ),
        Mutant(
            "batch-traces-reversed",
            "batched diagonal step: each layer weighted with another layer's traces",
            ("singd.optim.batched:step",),
            _single("singd.optim.batched:step", _batch_traces_reversed),
            RunConfig(scenario="twin", structures=("diagonal", "diagonal")),
        ),
        Mutant(
            "lr-cov-twice",
            "K ← K (I − β1 m)²: the covariance step applied twice (plain and compensated)",
            (f"{_U}:singd_factor_step", f"{_U}:compensated_factor_step"),
            lambda: {
                f"{_U}:singd_factor_step": _factor_step_twice,
                f"{_U}:compensated_factor_step": _compensated_step_twice,
            },
        ),
        Mutant(
            "lr-cov-not-normalised",
            "normalize_lr_cov without β1 / max(1, ‖m‖_∞)",
            (f"{_U}:normalized_lr_cov",),
            _single(f"{_U}:normalized_lr_cov", _lr_cov_not_normalised),
            RunConfig(variant="ikfac-normalized"),
        ),
        # statistics
        Mutant(
            "A-unscaled",
            "A without the 1/sqrt(n_A) scaling",
            (f"{_STATS}:input_matrix",),
            _single(f"{_STATS}:input_matrix", _input_matrix_unscaled),
        ),
        Mutant(
            "G-times-N",
            "G ← G · N instead of G · sqrt(N)",
            (f"{_STATS}:grad_matrix",),
            _single(f"{_STATS}:grad_matrix", _grad_matrix_times_n),
        ),
        Mutant(
            "bias-column-zero",
            "the bias column of A holds zeros instead of ones",
            (f"{_STATS}:input_matrix",),
            _single(f"{_STATS}:input_matrix", _input_matrix_zero_bias),
        ),
        Mutant(
            "reduce-sums-inputs",
            "KFAC-reduce sums a over the shared positions instead of averaging",
            (f"{_STATS}:input_matrix",),
            _single(f"{_STATS}:input_matrix", _input_matrix_reduce_sums),
            RunConfig(scenario="seq-reduce"),
        ),
        # hooks
        Mutant(
            "H-summed-twice",
            "every pass's H_K, H_C added to the pending sums twice",
            ("singd.optim.hooks:CurvatureCollector._accumulate",),
            _single("singd.optim.hooks:CurvatureCollector._accumulate", _accumulate_twice),
        ),
        Mutant(
            "stale-statistics",
            "each step uses the statistics of the previous step",
            ("singd.optim.hooks:CurvatureCollector.pop_all",),
            _stale_statistics,
        ),
        # structure kernels
        Mutant(
            "tril-coupling-not-doubled",
            "tril/triu Π̂ keeps M_ij instead of M_ij + M_ji off the diagonal",
            ("singd.structures.triangular:Tril.project",),
            _single(
                "singd.structures.triangular:Tril.project",
                classmethod(_tril_project_single_coupling),
            ),
            RunConfig(structures=("tril", "triu")),
        ),
        Mutant(
            "toeplitz-mean-off-by-one",
            "Toeplitz Π̂ divides diagonal k's sum by d − k + 1 instead of d − k",
            ("singd.structures.toeplitz:_diagonal_means",),
            _single("singd.structures.toeplitz:_diagonal_means", _toeplitz_means_off_by_one),
            RunConfig(structures=_TOEPLITZ),
        ),
        Mutant(
            "toeplitz-fft-transpose",
            "FFT path (d >= 48): Lᵀ X computed without conjugating the kernel spectrum",
            ("singd.structures.toeplitz:convolve_fft",),
            _single("singd.structures.toeplitz:convolve_fft", _convolve_fft_no_conjugate),
            _WIDE,
        ),
        Mutant(
            "toeplitz-fft-alias",
            "FFT path (d >= 48): lag products with FFT length 2d − 2 (one lag wraps around)",
            ("singd.structures.toeplitz:lag_products_fft",),
            _single("singd.structures.toeplitz:lag_products_fft", _lag_products_fft_aliased),
            _WIDE,
        ),
        # grad-scale handling
        Mutant(
            "grad-scale-inverted",
            "statistics corrected by s_t² instead of 1/s_t²",
            ("singd.optim.scaling:statistics_correction",),
            _single("singd.optim.scaling:statistics_correction", _correction_inverted),
            RunConfig(harness="grad-scale"),
        ),
        Mutant(
            "grad-scale-dropped",
            "no 1/s_t² correction of the statistics (IKFAC: H_C rescaled in place)",
            ("singd.optim.scaling:statistics_correction",),
            _single("singd.optim.scaling:statistics_correction", _correction_dropped),
            RunConfig(variant="ikfac", harness="grad-scale"),
        ),
        # momentum and parameter update
        Mutant(
            "momentum-not-applied",
            "m ← ĝ: the parameter momentum α2 is not applied",
            (f"{_U}:momentum_parameter_updates",),
            _single(f"{_U}:momentum_parameter_updates", _update_without_momentum),
        ),
        Mutant(
            "decay-before-preconditioning",
            "weight decay added to ∇W~ before preconditioning instead of after",
            (
                "singd.optim.base:KroneckerOptimizer._unscaled_grads",
                f"{_U}:momentum_parameter_updates",
            ),
            _decay_before_preconditioning,
            RunConfig(variant="weight-decay"),
        ),
        scaled_precondition(0.2),
        scaled_precondition(1e-3),
        scaled_precondition(1e-6),
        scaled_input_statistics(1e-3),
    ]
    return {mutant.name: mutant for mutant in entries}


#: The catalogue: name → mutant.
MUTANTS: dict[str, Mutant] = _catalogue()


# -------------------------------------------------------------------- running
def _dtypes(precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(model dtype, factor dtype or ``None``) of ``precision``."""
    dtype, factor_dtype = PRECISIONS[precision]
    return DTYPES[dtype], None if factor_dtype is None else DTYPES[factor_dtype]


def _states(run: RecordedRun) -> States:
    """The recorded state after every step, without the passes."""
    return [{name: step.state for name, step in layers.items()} for layers in run.steps]


class _ScaledSteps:
    """The optimizer as :func:`record_run` sees it, each ``step()`` through a ``GradScaler``."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self._optimizer = optimizer
        self._scaler = scaler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def step(self) -> None:
        """``scaler.step(optimizer)``, then ``scaler.update()``."""
        self._scaler.step(self._optimizer)
        self._scaler.update()


def grad_scale_states(config: RunConfig, precision: str, scaled: bool) -> States:
    """The states of ``config`` in ``precision``, stepped through :data:`GRAD_SCALER` or not.

    With ``scaled`` the loss is scaled by ``scaler.scale`` before backward and
    ``scaler.step``/``scaler.update`` drive the optimizer (SPEC §1.5).  The scales
    are powers of four, so the scaled run must equal the unscaled one bitwise.
    """
    scenario = SCENARIOS[config.scenario]
    dtype, factor_dtype = _dtypes(precision)
    hyper = SINGDHyperparameters(
        **{**BASE_HYPER, **VARIANTS[config.variant], "structures": config.structures}
    )
    torch.manual_seed(0)
    model = scenario.make_model().to(dtype)
    optimizer: Any = make_singd(model, scenario, hyper, factor_dtype)
    loss_fn = loss_function(scenario, dtype)
    if scaled:
        scaler = torch.amp.GradScaler("cpu", **GRAD_SCALER)
        optimizer = _ScaledSteps(optimizer, scaler)
        unscaled_loss = loss_fn

        def loss_fn(module: nn.Module, index: int) -> Tensor:
            return scaler.scale(unscaled_loss(module, index))

    run = record_run(model, optimizer, loss_fn, config.steps, scenario.micro_batches)
    return _states(run)


def _record_states(config: RunConfig, precision: str) -> States:
    """The states of the (possibly mutated) optimizer on ``config`` in ``precision``."""
    if config.harness == "grad-scale":
        return grad_scale_states(config, precision, scaled=True)
    scenario = SCENARIOS[config.scenario]
    overrides = {**VARIANTS[config.variant], "structures": config.structures}
    run, _ = record(scenario, overrides, *_dtypes(precision), config.steps)
    return _states(run)


@functools.cache
def correct_states(config: RunConfig, precision: str) -> States:
    """The unmutated states of ``config`` in ``precision`` (cached: shared by all mutants)."""
    return _record_states(config, precision)


@functools.cache
def unscaled_states(config: RunConfig, precision: str) -> States:
    """The grad-scale harness's expectation: the same run without a ``GradScaler`` (cached)."""
    return grad_scale_states(config, precision, scaled=False)


def ulps_apart(reference: States, other: States, precision: str) -> float:
    """``max |other − reference| / (eps · max|reference entry|)`` over steps, layers and keys.

    ``eps`` is that of the dtype storing the entry (factors: the factor dtype),
    and for ``W~``, ``m_W~`` the coarser of the model and factor dtypes: every
    change of the parameters arrives through the preconditioned gradient,
    which is computed and rounded in the factor dtype, so a change below that
    dtype's resolution of the update is not one the run can represent.  An
    entry that is zero in ``reference`` at a step is measured against
    ``other``'s scale instead.  The compensation terms ``c_K``, ``c_C`` of the
    compensated factor step are skipped: they hold what rounding dropped from
    ``K``, ``C`` (far below their ulp), and what a mutant does to them shows in
    ``K``, ``C`` themselves.
    """
    model_dtype, factor_dtype = _dtypes(precision)
    eps_factor = EPS[factor_dtype or model_dtype]
    eps_model = max(EPS[model_dtype], eps_factor)
    worst = 0.0
    for reference_step, other_step in zip(reference, other, strict=True):
        for layer, entries in reference_step.items():
            for key, value in entries.items():
                if key in COMPENSATION_KEYS:  # internal: their effect shows in K, C
                    continue
                mutated = other_step[layer][key]
                error = float(np.max(np.abs(mutated - value), initial=0.0))
                if error == 0.0:
                    continue
                scale = float(np.max(np.abs(value), initial=0.0)) or float(np.max(np.abs(mutated)))
                eps = eps_factor if key in FACTOR_KEYS else eps_model
                worst = max(worst, error / (eps * scale))
    return worst


def visibility(mutant: Mutant, precision: str) -> float:
    """How far ``mutant`` moves the run in ``precision``, in ulps of the entry's scale."""
    correct = correct_states(mutant.config, precision)
    with mutant.installed():
        mutated = _record_states(mutant.config, precision)
    return ulps_apart(correct, mutated, precision)


@dataclass(frozen=True)
class Detection:
    """What the verifier says about a (possibly mutated) optimizer in one precision.

    Attributes:
        killed: Whether it flags the run.
        worst_ratio: Oracle harness: the trajectory ``error / bound`` (flags ``> 1``).
        local_worst_ratio: Oracle harness: the one-step ``error / bound`` (flags ``> 1``).
        deviation_ulps: Grad-scale harness: the scaled run's distance from the unscaled
            one in ulps (flags ``> 0``).
    """

    killed: bool
    worst_ratio: float | None = None
    local_worst_ratio: float | None = None
    deviation_ulps: float | None = None


def detect(config: RunConfig, precision: str) -> Detection:
    """Run the verifier on the optimizer as currently installed (mutated or not)."""
    if config.harness == "grad-scale":
        scaled = grad_scale_states(config, precision, scaled=True)
        # tolerance 0: power-of-four scaling is exact (module docstring)
        deviation = ulps_apart(unscaled_states(config, precision), scaled, precision)
        return Detection(killed=deviation > 0.0, deviation_ulps=deviation)
    result = run_case(config.case(precision))
    return Detection(
        killed=not result.passed,
        worst_ratio=result.worst_ratio,
        local_worst_ratio=result.local_worst_ratio,
    )


def killed(mutant: Mutant, precision: str) -> Detection:
    """The verifier's verdict on ``mutant`` in ``precision``."""
    with mutant.installed():
        return detect(mutant.config, precision)


@dataclass(frozen=True)
class MutantResult:
    """One cell of the table: a mutant in one precision.

    Attributes:
        mutant: Its name.
        precision: Key of :data:`PRECISIONS`.
        visibility_ulps: :func:`visibility`.
        detection: :func:`killed`.
    """

    mutant: str
    precision: str
    visibility_ulps: float
    detection: Detection

    @property
    def killed(self) -> bool:
        """Whether the verifier flags the mutant."""
        return self.detection.killed

    @property
    def must_be_killed(self) -> bool:
        """Whether the mutant is visible by at least :data:`VISIBLE_ULPS` ulps."""
        return self.visibility_ulps >= VISIBLE_ULPS

    @property
    def ok(self) -> bool:
        """``visibility >= VISIBLE_ULPS ⇒ killed``."""
        return self.killed or not self.must_be_killed

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return {
            "visibility_ulps": self.visibility_ulps,
            "killed": self.killed,
            "must_be_killed": self.must_be_killed,
            "ok": self.ok,
            "worst_ratio": self.detection.worst_ratio,
            "local_worst_ratio": self.detection.local_worst_ratio,
            "deviation_ulps": self.detection.deviation_ulps,
        }


def evaluate(mutant: Mutant, precision: str) -> MutantResult:
    """Visibility and verdict of ``mutant`` in ``precision``."""
    return MutantResult(
        mutant.name, precision, visibility(mutant, precision), killed(mutant, precision)
    )


@functools.cache
def evaluate_named(name: str, precision: str) -> MutantResult:
    """:func:`evaluate` of the catalogue entry ``name`` (cached for the session)."""
    return evaluate(MUTANTS[name], precision)


# ------------------------------------------------------------------ resolution
def _family_point(family: str, delta: float, precision: str) -> Detection:
    return killed(FAMILIES[family](delta), precision)


def resolution(
    precision: str,
    families: Sequence[str] = tuple(FAMILIES),
    low: float = 1e-16,
    high: float = 1.0,
    ratio: float = 1.25,
) -> dict[str, object]:
    """The smallest relative perturbation the verifier detects in ``precision``.

    For each family of :data:`FAMILIES`, bisection on ``log δ`` over ``[low,
    high]`` until the bracket is within ``ratio``: the smallest ``δ`` found
    killed (``None`` if even ``high`` survives; ``low`` if ``low`` is killed),
    and :func:`visibility` there.  Rounding makes the kill not strictly
    monotone in ``δ``; the bisection reports one transition.

    Returns:
        ``{"precision", "delta" (smallest over the families or None), "families":
        {family: {"delta", "visibility_ulps", "evaluations"}}}``.
    """
    result: dict[str, dict[str, object]] = {}
    for family in families:
        evaluations = 2
        if not _family_point(family, high, precision).killed:
            result[family] = {"delta": None, "visibility_ulps": None, "evaluations": 1}
            continue
        if _family_point(family, low, precision).killed:
            hi = low
        else:
            lo, hi = low, high
            while hi / lo > ratio:
                mid = math.sqrt(lo * hi)
                evaluations += 1
                if _family_point(family, mid, precision).killed:
                    hi = mid
                else:
                    lo = mid
        result[family] = {
            "delta": hi,
            "visibility_ulps": visibility(FAMILIES[family](hi), precision),
            "evaluations": evaluations,
        }
    deltas = [entry["delta"] for entry in result.values() if entry["delta"] is not None]
    return {"precision": precision, "delta": min(deltas) if deltas else None, "families": result}


# ----------------------------------------------------------------------- table
def mutation_table(
    precisions: Sequence[str] = tuple(PRECISIONS),
    mutants: Sequence[str] | None = None,
    with_resolution: bool = True,
) -> dict[str, object]:
    """Mutant × precision → visibility and verdict, plus the resolution per precision.

    Returns:
        JSON-ready ``{"visible_ulps", "steps", "precisions", "mutants": {name: {…,
        "results": {precision: MutantResult.as_dict()}}}, "ok", "resolution":
        {precision: resolution(precision)}}``; ``ok`` iff every visible mutant is killed.
    """
    with warnings.catch_warnings():
        # mutants overflow and make the optimizer skip steps, with a warning each: expected
        warnings.simplefilter("ignore", UserWarning)
        return _mutation_table(precisions, mutants, with_resolution)


def _mutation_table(
    precisions: Sequence[str], mutants: Sequence[str] | None, with_resolution: bool
) -> dict[str, object]:
    names = list(MUTANTS) if mutants is None else list(mutants)
    rows: dict[str, object] = {}
    ok = True
    for name in names:
        cells = {precision: evaluate_named(name, precision) for precision in precisions}
        ok = ok and all(cell.ok for cell in cells.values())
        rows[name] = {
            **MUTANTS[name].as_dict(),
            "results": {precision: cell.as_dict() for precision, cell in cells.items()},
        }
    table: dict[str, object] = {
        "visible_ulps": VISIBLE_ULPS,
        "steps": STEPS,
        "precisions": list(precisions),
        "mutants": rows,
        "ok": ok,
    }
    if with_resolution:
        table["resolution"] = {precision: resolution(precision) for precision in precisions}
    return table


def _cell(result: dict[str, Any]) -> str:
    """``visibility verdict`` of one table cell."""
    visibility_ulps = result["visibility_ulps"]
    shown = f"{visibility_ulps:.3g}" if visibility_ulps < 1e6 else f"{visibility_ulps:.1e}"
    if result["killed"]:
        return f"{shown} killed"
    return f"{shown} **SURVIVES**" if result["must_be_killed"] else f"{shown} (survives)"


def format_markdown(table: dict[str, Any]) -> str:
    """The table of :func:`mutation_table` as Markdown."""
    precisions = table["precisions"]
    lines = [
        "Mutation check: visibility in ulps of the entry's scale, "
        f"and whether the verifier kills the mutant. Every mutant visible by "
        f">= {table['visible_ulps']:g} ulps must be killed: "
        f"{'all are' if table['ok'] else '**some survive**'}.",
        "",
        "| mutant | where | " + " | ".join(precisions) + " |",
        "|---|---|" + "---|" * len(precisions),
    ]
    for name, row in table["mutants"].items():
        where = f"{row['scenario']}/{row['variant']}/{'-'.join(row['structures'])}, "
        where += f"{row['steps']} steps"
        if row["harness"] != "oracle":
            where += f" ({row['harness']})"
        cells = " | ".join(_cell(row["results"][p]) for p in precisions)
        lines.append(f"| `{name}` | {where} | {cells} |")
    lines += ["", "Mutants:", ""]
    lines += [f"* `{name}`: {row['description']}" for name, row in table["mutants"].items()]
    if "resolution" in table:
        lines += [
            "",
            "Resolution (smallest relative perturbation δ killed; visibility at δ in ulps):",
            "",
            "| precision | δ | " + " | ".join(FAMILIES) + " |",
            "|---|---|" + "---|" * len(FAMILIES),
        ]
        for precision, entry in table["resolution"].items():
            cells = []
            for family in FAMILIES:
                point = entry["families"].get(family)
                if point is None or point["delta"] is None:
                    cells.append("not killed")
                else:
                    cells.append(f"δ = {point['delta']:.2g} ({point['visibility_ulps']:.3g} ulps)")
            delta = "—" if entry["delta"] is None else f"{entry['delta']:.2g}"
            lines.append(f"| {precision} | {delta} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m verification.mutants``: print the table; exit 1 if a visible mutant survives."""
    parser = argparse.ArgumentParser(prog="python -m verification.mutants", description=__doc__)
    parser.add_argument("--precision", action="append", choices=list(PRECISIONS))
    parser.add_argument("--mutant", action="append", choices=list(MUTANTS))
    parser.add_argument("--no-resolution", action="store_true", help="skip the bisection")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models; threads only contend (100× slower on a busy machine)
    table = mutation_table(tuple(args.precision or PRECISIONS), args.mutant, not args.no_resolution)
    print(format_markdown(table), end="")
    if args.json is not None:
        args.json.write_text(json.dumps(table, indent=2))
    return 0 if table["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
