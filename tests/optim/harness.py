"""Record a real torch training run and replay it through the float64 oracle.

The harness is independent of the optimizer's own plumbing: it registers its
*own* forward hooks (layer inputs ``a``) and tensor hooks on the layer outputs
(output gradients ``g``) on every layer the optimizer preconditions, reads
``p.grad`` before each ``step()`` and the optimizer's state after it.  The
raw ``a``, ``g`` go through :mod:`reference.statistics` (SPEC §1.1) to the
oracle's :class:`~reference.updates.StepRecord`; the oracle stepper then runs
in float64 from the same initial ``W~``, and the two trajectories are compared.

In low precision the oracle is fed the *same* recorded low-precision tensors,
upcast exactly to float64, so the comparison measures only the optimizer's own
rounding, never the model's.

Tolerance rule (first-order rounding-error analysis, ``tests/tolerances.py``):
one step adds to every state entry an error of at most ``ρ · M`` where
``ρ = chain_bound(dtype, [every reduction length of one step])`` and ``M`` is
the entry's *magnitude*, the same expression evaluated on absolute values
(Higham: error relative to ``|A||B|``, never to ``|AB|``).  Over ``s`` steps
the errors add (``s · ρ · M``), and an error already in ``K`` is multiplied
by ``‖I − β1 m‖_∞ ≤ 1 + β1 ‖m‖_∞`` at each factor update, so the sum grows by
at most ``G = exp(Σ_t β1_t ‖m_t‖_∞)`` (:func:`growth_factor`, first order:
the dependence of ``m`` on ``K`` is second order in the rounding error times
``β1``; the cases use small ``β1`` so that ``G`` stays near 1).  The
parameter update inherits the factors' relative error four times
(``C Cᵀ ∇W K Kᵀ``), hence ``PRECONDITIONER_ERROR_TERMS = 5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from reference.kfac import KFACHyperparameters, KFACState, kfac_trajectory
from reference.numbers import FLOAT64
from reference.statistics import conv2d_statistics, linear_statistics
from reference.updates import SINGDHyperparameters, SINGDState, StepRecord, singd_trajectory
from tests.tolerances import EPS, chain_bound

#: Rounding of ``C Cᵀ ∇W K Kᵀ`` itself plus the relative error of its four factors.
PRECONDITIONER_ERROR_TERMS = 5
#: Π̂ at most doubles an entry (tril/triu/hierarchical coupling blocks, SPEC §2).
PROJECTION_GAIN = 2.0

#: A model's loss on one micro-batch: ``loss_fn(model, micro_batch_index)``.
LossFunction = Callable[[nn.Module, int], Tensor]


@dataclass
class LayerPass:
    """One forward/backward pass through one layer.

    Attributes:
        inputs: The layer's input ``a`` (as the layer received it).
        output_grads: ``∂loss/∂output``, set by the tensor hook during backward.
    """

    inputs: Tensor
    output_grads: Tensor | None = None


@dataclass
class LayerStep:
    """What one layer saw during one ``step()`` and its state afterwards.

    Attributes:
        passes: The forward/backward passes before the step (accumulation).
        grad: ``∇W~`` (``d_o × d_i``, bias column last), read before ``step()``.
        state: Dense float64 copies of the optimizer's layer state after the
            step (``"K"``, ``"C"``, … or ``"S_K"``, ``"S_C"``), plus ``"W"``
            (``W~``) and ``"m_W"`` (its momentum).
    """

    passes: list[LayerPass]
    grad: np.ndarray
    state: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class RecordedRun:
    """A recorded torch run.

    Attributes:
        initial_weights: ``W~`` of each layer before the first step (float64).
        steps: ``steps[t][layer_name]`` is that layer's :class:`LayerStep`.
        layers: The preconditioned modules by qualified name.
    """

    initial_weights: dict[str, np.ndarray]
    steps: list[dict[str, LayerStep]]
    layers: dict[str, nn.Module]


def combined_weight(module: nn.Module) -> Tensor:
    """``W~ = [W, b]`` (``d_o × d_i``) of a Linear or Conv2d layer (weight flattened from dim 1)."""
    weight = module.weight.flatten(start_dim=1)
    if module.bias is None:
        return weight
    return torch.cat([weight, module.bias.unsqueeze(1)], dim=1)


def combined_grad(module: nn.Module) -> Tensor:
    """``∇W~`` from ``weight.grad`` and ``bias.grad`` (same layout as :func:`combined_weight`)."""
    grad = module.weight.grad.flatten(start_dim=1)
    if module.bias is None:
        return grad
    return torch.cat([grad, module.bias.grad.unsqueeze(1)], dim=1)


def _combined_momentum(optimizer: torch.optim.Optimizer, module: nn.Module) -> Tensor:
    """The momentum buffers of ``weight`` and ``bias`` in the ``W~`` layout."""
    weight = optimizer.state[module.weight]["momentum_buffer"].flatten(start_dim=1)
    if module.bias is None:
        return weight
    bias = optimizer.state[module.bias]["momentum_buffer"]
    return torch.cat([weight, bias.unsqueeze(1)], dim=1)


def to_numpy(tensor: Tensor) -> np.ndarray:
    """An exact float64 numpy copy of ``tensor`` (any float dtype upcasts exactly)."""
    return tensor.detach().to(dtype=torch.float64, device="cpu").numpy().copy()


class PassRecorder:
    """Forward hooks + output tensor hooks that record ``a`` and ``g`` per pass."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.passes: dict[str, list[LayerPass]] = {name: [] for name in layers}
        self._handles = [
            module.register_forward_hook(self._forward_hook(name))
            for name, module in layers.items()
        ]

    def _forward_hook(self, name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        """The hook that records the input of layer ``name`` and hooks its output."""

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            record = LayerPass(inputs=inputs[0].detach().clone())
            self.passes[name].append(record)

            def store_grad(grad: Tensor) -> None:
                record.output_grads = grad.detach().clone()

            if output.requires_grad:
                output.register_hook(store_grad)

        return hook

    def pop(self) -> dict[str, list[LayerPass]]:
        """The completed passes since the last call (passes without backward are dropped)."""
        done = {
            name: [p for p in passes if p.output_grads is not None]
            for name, passes in self.passes.items()
        }
        self.passes = {name: [] for name in self.passes}
        return done

    def remove(self) -> None:
        """Remove all hooks."""
        for handle in self._handles:
            handle.remove()


def record_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFunction,
    steps: int,
    micro_batches: int = 1,
) -> RecordedRun:
    """Train ``model`` for ``steps`` steps and record everything the oracle needs.

    Args:
        model: The model (already in its dtype).
        optimizer: A ``SINGD`` or ``KFAC`` instance built on ``model``.
        loss_fn: ``loss_fn(model, index)`` runs the forward pass of the
            ``index``-th micro-batch of the *current step* and returns its loss;
            it must draw fresh data on every call.
        steps: Number of optimizer steps.
        micro_batches: Backward passes per step (gradient accumulation).

    Returns:
        The recording.
    """
    layers = {name: model.get_submodule(name) for name in optimizer.layer_names()}
    initial = {name: to_numpy(combined_weight(module)) for name, module in layers.items()}
    recorder = PassRecorder(layers)
    recorded: list[dict[str, LayerStep]] = []
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            for index in range(micro_batches):
                loss_fn(model, index).backward()
            passes = recorder.pop()
            step = {
                name: LayerStep(passes=passes[name], grad=to_numpy(combined_grad(module)))
                for name, module in layers.items()
            }
            optimizer.step()
            for name, module in layers.items():
                state = {key: _dense(value) for key, value in optimizer.layer_state(name).items()}
                state["W"] = to_numpy(combined_weight(module))
                state["m_W"] = to_numpy(_combined_momentum(optimizer, module))
                step[name].state = state
            recorded.append(step)
    finally:
        recorder.remove()
    return RecordedRun(initial_weights=initial, steps=recorded, layers=layers)


def _dense(value: object) -> np.ndarray:
    """A layer-state entry (``StructuredMatrix`` or tensor) as dense float64."""
    if isinstance(value, Tensor):
        return to_numpy(value)
    return to_numpy(value.to_dense())


# ------------------------------------------------------------ oracle replay
def layer_statistics(
    module: nn.Module, layer_pass: LayerPass, approx: str, loss_average: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's scaled ``(A, G)`` (SPEC §1.1) for one recorded pass."""
    inputs, grads = to_numpy(layer_pass.inputs), to_numpy(layer_pass.output_grads)
    bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        return conv2d_statistics(
            inputs,
            grads,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=bias,
            approx=approx,
            loss_average=loss_average,
        )
    return linear_statistics(inputs, grads, bias=bias, approx=approx, loss_average=loss_average)


def step_records(
    run: RecordedRun, name: str, approx: str, loss_average: str | None
) -> list[StepRecord]:
    """The oracle's records of layer ``name``, one per step."""
    module = run.layers[name]
    return [
        StepRecord(
            grad=step[name].grad,
            stats=tuple(
                layer_statistics(module, p, approx, loss_average) for p in step[name].passes
            ),
        )
        for step in run.steps
    ]


def replay_singd(
    run: RecordedRun,
    hyper: SINGDHyperparameters,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> dict[str, list[SINGDState]]:
    """The float64 oracle trajectory of every layer, fed the recorded run."""
    return {
        name: singd_trajectory(
            run.initial_weights[name], step_records(run, name, approx, loss_average), hyper, FLOAT64
        )
        for name in run.layers
    }


def replay_kfac(
    run: RecordedRun,
    hyper: KFACHyperparameters,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> dict[str, list[KFACState]]:
    """The float64 KFAC oracle trajectory of every layer, fed the recorded run."""
    return {
        name: kfac_trajectory(
            run.initial_weights[name], step_records(run, name, approx, loss_average), hyper, FLOAT64
        )
        for name in run.layers
    }


# ------------------------------------------------------------- comparison
@dataclass(frozen=True)
class Deviation:
    """Largest deviation of one state entry over a trajectory.

    Attributes:
        layer: The layer name.
        key: The state entry (``"K"``, ``"W"``, …).
        step: The step (0-based) where ``error / bound`` is largest.
        error: ``max |torch − oracle|`` at that step.
        bound: The allowed error at that step.
        magnitude: The magnitude ``M`` the bound was built from.
    """

    layer: str
    key: str
    step: int
    error: float
    bound: float
    magnitude: float


def _abs_chain(*matrices: np.ndarray) -> np.ndarray:
    """``|X1| |X2| … |Xk|``: the magnitude of a product for rounding-error bounds."""
    result = np.abs(matrices[0])
    for matrix in matrices[1:]:
        result = result @ np.abs(matrix)
    return result


def _momentum_magnitude(
    k: np.ndarray, c: np.ndarray, stats: Sequence[tuple[np.ndarray, np.ndarray]], hyper
) -> tuple[float, float]:
    """Magnitudes of the new ``m_K`` and ``m_C`` brackets (SPEC §1.3) from ``|·|`` values."""
    h_k = sum(PROJECTION_GAIN * _abs_chain(k.T, a.T, a, k) for a, _ in stats)
    h_c = sum(PROJECTION_GAIN * _abs_chain(c.T, g.T, g, c) for _, g in stats)
    gram_k = PROJECTION_GAIN * _abs_chain(k.T, k)
    gram_c = PROJECTION_GAIN * _abs_chain(c.T, c)
    d_i, d_o = k.shape[0], c.shape[0]
    if hyper.kfac_like:
        m_k = h_k.max() + hyper.damping * gram_k.max() + 1
        m_c = h_c.max() + hyper.damping * gram_c.max() + 1
    else:
        m_k = (np.trace(h_c) * h_k.max() + hyper.damping * np.trace(gram_c) * gram_k.max()) / d_o
        m_c = (np.trace(h_k) * h_c.max() + hyper.damping * np.trace(gram_k) * gram_c.max()) / d_i
        m_k, m_c = m_k + 1, m_c + 1
    return float(m_k), float(m_c)


def reduction_lengths(run: RecordedRun, name: str) -> list[int]:
    """Every reduction length of one SINGD step of layer ``name`` (SPEC §1.1–§1.4).

    Statistics: the averaging/summing over shared positions (``s``), ``Kᵀ Aᵀ``
    (``d_i``), the Gram product (``n``), ``KᵀK`` (``d_i``), ``K m`` (``d_i``),
    the traces (``d``), the same for ``C``; preconditioning: two products with
    ``d_o`` and two with ``d_i``; the momentum/parameter updates (``1`` each).
    """
    d_o, d_i = run.initial_weights[name].shape
    first = run.steps[0][name].passes[0]
    rows = first.inputs.numel() // max(first.inputs.shape[-1], 1)
    shared = max(rows // first.inputs.shape[0], 1)
    per_factor = [shared, rows]
    return per_factor + [d_i] * 4 + per_factor + [d_o] * 4 + [d_o, d_o, d_i, d_i] + [1, 1, 1]


def growth_factor(states: Sequence[SINGDState], hyper: SINGDHyperparameters) -> float:
    """``G = exp(Σ_t β1_t (‖m_K‖_∞ + ‖m_C‖_∞))`` over the factor updates (module docstring)."""
    total = 0.0
    for t, state in enumerate(states):
        if t % hyper.T:
            continue
        beta1 = hyper.lr_cov(t) if callable(hyper.lr_cov) else hyper.lr_cov
        for m in (state.m_K, state.m_C):
            norm = float(np.abs(m).sum(axis=1).max())
            scale = 1 / max(1, np.abs(m).max()) if hyper.normalize_lr_cov else 1
            total += beta1 * scale * norm
    return math.exp(total)


def compare_singd(
    run: RecordedRun,
    oracle: dict[str, list[SINGDState]],
    hyper: SINGDHyperparameters,
    dtype: torch.dtype,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> list[Deviation]:
    """Worst deviation (relative to its bound) of every layer's K, C, m_K, m_C, W~, m_W~.

    The bound at step ``t`` (``s = t + 1`` steps, ``u`` factor updates so far)
    is ``u · ρ · G · M`` for the factors and their momenta and
    ``s · ρ · G · M`` for ``W~``, ``m_W~``, with ``M`` the running maximum
    of each entry's magnitude (see the module docstring):

    * ``K``, ``C``: ``max |K|`` (``K ← K − β1 K m`` rounds relative to
      ``|K| (1 + β1 |m|)``, and ``β1 |m| ≤ 1``);
    * ``m_K``, ``m_C``: the bracket's magnitude (traces times ``|H|`` plus the
      damping term plus ``I``) divided by ``1 − α1`` (the momentum sums them);
    * ``m_W~``: ``PRECONDITIONER_ERROR_TERMS · max |C||Cᵀ||∇W||K||Kᵀ| + γ |W~|``
      over ``1 − α2``;
    * ``W~``: ``max |W~|`` (storage rounding) plus ``β2`` times the above
      (the update error enters with the learning rate).
    """
    deviations = []
    for name, states in oracle.items():
        rho = chain_bound(dtype, reduction_lengths(run, name))
        growth = growth_factor(states, hyper)
        records = step_records(run, name, approx, loss_average)
        worst: dict[str, Deviation] = {}
        running = dict.fromkeys(("K", "C", "m_K", "m_C", "m_W", "W"), 0.0)
        factor_updates = 0
        previous = (np.eye(states[0].K.shape[0]), np.eye(states[0].C.shape[0]))
        for t, (state, record) in enumerate(zip(states, records, strict=True)):
            if t % hyper.T == 0:
                factor_updates += 1
                m_k_mag, m_c_mag = _momentum_magnitude(*previous, record.stats, hyper)
                running["m_K"] = max(running["m_K"], m_k_mag / (1 - hyper.alpha1))
                running["m_C"] = max(running["m_C"], m_c_mag / (1 - hyper.alpha1))
            running["K"] = max(running["K"], float(np.abs(state.K).max()))
            running["C"] = max(running["C"], float(np.abs(state.C).max()))
            g_hat = PRECONDITIONER_ERROR_TERMS * _abs_chain(
                state.C, state.C.T, record.grad, state.K, state.K.T
            ).max() + hyper.weight_decay * float(np.abs(state.W).max())
            running["m_W"] = max(running["m_W"], g_hat / (1 - hyper.momentum))
            running["W"] = max(
                running["W"], float(np.abs(state.W).max()) + hyper.lr * running["m_W"]
            )
            torch_state = run.steps[t][name].state
            for key, counter in (
                ("K", factor_updates),
                ("C", factor_updates),
                ("m_K", factor_updates),
                ("m_C", factor_updates),
                ("W", t + 1),
                ("m_W", t + 1),
            ):
                if key not in torch_state:
                    continue
                error = float(np.abs(torch_state[key] - getattr(state, key)).max())
                bound = counter * rho * growth * running[key]
                candidate = Deviation(name, key, t, error, bound, running[key])
                if key not in worst or error / bound > worst[key].error / worst[key].bound:
                    worst[key] = candidate
            previous = (state.K, state.C)
        deviations.extend(worst.values())
    return deviations


def relative_errors_in_eps(deviations: Sequence[Deviation], dtype: torch.dtype) -> float:
    """Largest ``error / M`` over ``deviations`` in units of ``eps(dtype)`` (for reports)."""
    return (
        max((d.error / d.magnitude for d in deviations if d.magnitude > 0), default=0.0)
        / EPS[dtype]
    )


def violations(deviations: Sequence[Deviation]) -> list[Deviation]:
    """The deviations above their bounds."""
    return [d for d in deviations if not d.error <= d.bound]
