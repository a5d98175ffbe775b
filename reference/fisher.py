"""Exact curvature of tiny deep linear networks, from explicit backpropagation (SPEC §1.1, §3).

The network is ``f = W~_L … W~_1 x`` with ``W~_l = [W_l, b_l]`` of shape
``d_l × (d_{l-1} + bias_l)`` acting on the last dim of an input ``x`` of
shape ``[B, d_0]`` or ``[B, S, d_0]`` (``S`` positions sharing the weights).
Two weight-sharing settings (Eschenhagen et al. 2023, arXiv 2311.00636):

* *expand* (``reduce_after=None``): the shared dim is kept to the output;
  there is one loss term per ``(b, s)``;
* *reduce* (``reduce_after=r``): the output of layer ``r`` (0-based) is
  averaged over the shared dim, layers after ``r`` act on ``[B, d]``; one loss
  term per sample.

The loss is ``L = (1/N) Σ_t ℓ_t`` over the output's terms ``t`` with
``ℓ_t = ‖f_t − y_t‖²`` (``"mse"``: summed over output dims, no ½) or
``ℓ_t = −log softmax(f_t)_{y_t}`` (``"cross_entropy"``).  ``N`` follows
SPEC §1.1: ``"batch"`` → ``B``, ``"batch+sequence"`` → ``B·S`` (expand
setting only), ``None`` → 1.

**vec convention**: column-major, ``vec(X) = [X[:, 0]; X[:, 1]; …]``, so that
``(U ⊗ Gc) vec(X) = vec(Gc X Uᵀ)`` with ``np.kron`` and a layer's
curvature block is comparable with ``np.kron(U, Gc)`` (``U`` over the
``d_{l-1} + bias`` inputs, ``Gc`` over the ``d_l`` outputs).

**Scalings**: every curvature here is that of the loss ``L`` as defined,
1/N included:

* ``exact_ggn``: ``Σ_t J_tᵀ (Λ_t / N) J_t`` with ``J_t = ∂f_t/∂vec(W~_l)``
  and ``Λ_t = ∂²ℓ_t/∂f_t²`` (``2I`` for MSE, ``diag(p) − ppᵀ`` for CE);
* ``empirical_fisher``: ``(1/N) Σ_b vec(∇ℓ_b) vec(∇ℓ_b)ᵀ`` with
  ``ℓ_b = Σ_{t in sample b} ℓ_t``, i.e. ``N Σ_b vec(∇_b) vec(∇_b)ᵀ`` for the
  per-sample gradients ``∇_b`` of :func:`per_sample_gradients` (which carry
  ``1/N`` and sum to ``∇L``);
* ``output_gradients`` and ``ggn_backprop_vectors`` are scaled like a
  gradient of ``L`` (they carry ``1/N``), as a backward hook sees them, so
  :func:`reference.statistics.linear_statistics` with the same
  ``loss_average`` turns them into KFAC's ``G``.

Works on float64 arrays and on object arrays of ``mpmath.mpf`` (call inside
``Numbers.context()`` for the latter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpmath import mp

from reference.statistics import check_choices

#: The losses of the deep linear problems.
LOSSES: tuple[str, ...] = ("mse", "cross_entropy")


def vec(x: np.ndarray) -> np.ndarray:
    """Column-major vectorisation: ``vec(X)[j·rows + i] = X[i, j]``.

    Args:
        x: A matrix, shape ``rows × cols``.

    Returns:
        ``vec(X)``, shape ``[rows · cols]``.
    """
    return np.asarray(x).T.reshape(-1)


def _is_mpf(x: np.ndarray) -> bool:
    return np.asarray(x).dtype == object


def _exp(x: np.ndarray) -> np.ndarray:
    return np.vectorize(mp.exp, otypes=[object])(x) if _is_mpf(x) else np.exp(x)


def _sqrt(x: Any) -> Any:
    if _is_mpf(x):
        return np.vectorize(mp.sqrt, otypes=[object])(x)
    return np.sqrt(np.asarray(x, dtype=np.float64))


def _with_ones(h: np.ndarray, bias: bool) -> np.ndarray:
    """``[h, 1]`` along the last dim if ``bias``, else ``h``."""
    if not bias:
        return h
    return np.concatenate([h, np.ones((*h.shape[:-1], 1), dtype=h.dtype)], axis=-1)


@dataclass(frozen=True)
class DeepLinearProblem:
    """A deep linear network, its data and its loss (see the module docstring).

    Attributes:
        weights: ``W~_l``, shape ``d_l × (d_{l-1} + bias[l])``, bias last column.
        bias: Whether each layer has a bias column.
        x: Inputs, ``[B, d_0]`` or ``[B, S, d_0]``.
        y: MSE: targets shaped like the output; CE: integer class labels
            shaped like the output without its last dim.
        loss: ``"mse"`` or ``"cross_entropy"``.
        loss_average: ``"batch"``, ``"batch+sequence"`` or ``None``.
        reduce_after: ``None`` (expand setting) or the 0-based layer whose
            output is averaged over the shared dim (reduce setting).
    """

    weights: Sequence[np.ndarray]
    bias: Sequence[bool]
    x: np.ndarray
    y: np.ndarray
    loss: str = "mse"
    loss_average: str | None = "batch"
    reduce_after: int | None = None

    def __post_init__(self) -> None:
        """Validate shapes and options.

        Raises:
            ValueError: On inconsistent layer sizes, input/target shapes, an
                unknown loss or loss average, or an impossible reduction.
        """
        check_choices("expand", self.loss_average)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if len(self.weights) != len(self.bias) or not self.weights:
            raise ValueError(
                f"need one bias flag per layer and at least one layer, got "
                f"{len(self.weights)} weights and {len(self.bias)} flags"
            )
        x = np.asarray(self.x)
        if x.ndim not in (2, 3):
            raise ValueError(f"x must have shape [B, d_0] or [B, S, d_0], got {x.shape}")
        width = x.shape[-1]
        for layer, (w, bias) in enumerate(zip(self.weights, self.bias, strict=True)):
            if np.ndim(w) != 2 or np.shape(w)[1] != width + bias:
                raise ValueError(
                    f"layer {layer}: weight must be d_out × {width + bias} "
                    f"(inputs {width} + bias {int(bias)}), got shape {np.shape(w)}"
                )
            width = np.shape(w)[0]
        if self.reduce_after is not None:
            if x.ndim != 3:
                raise ValueError("reduce_after needs a shared dim: x of shape [B, S, d_0]")
            if not 0 <= self.reduce_after < len(self.weights):
                raise ValueError(
                    f"reduce_after={self.reduce_after} is not a layer index "
                    f"(0 to {len(self.weights) - 1})"
                )
            if self.loss_average == "batch+sequence":
                raise ValueError(
                    "loss_average='batch+sequence' has no meaning in the reduce setting "
                    "(one loss term per sample)"
                )
        leading = x.shape[:1] if self.reduce_after is not None else x.shape[:-1]
        out_shape = (*leading, width)
        y = np.asarray(self.y)
        expected = out_shape if self.loss == "mse" else out_shape[:-1]
        if y.shape != expected:
            raise ValueError(f"y must have shape {expected} for {self.loss}, got {y.shape}")
        if self.loss == "cross_entropy" and (
            not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= width
        ):
            raise ValueError(f"cross_entropy labels must be integers in [0, {width})")

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(np.shape(self.x)[0])

    @property
    def shared(self) -> int:
        """``S``, positions per sample at the input (1 without a shared dim)."""
        return int(np.shape(self.x)[1]) if np.ndim(self.x) == 3 else 1

    @property
    def output_positions(self) -> int:
        """Positions per sample at the output: ``S`` (expand) or 1 (reduce)."""
        return 1 if self.reduce_after is not None else self.shared

    @property
    def loss_terms(self) -> int:
        """``N`` (module docstring)."""
        if self.loss_average is None:
            return 1
        if self.loss_average == "batch":
            return self.batch_size
        return self.batch_size * self.output_positions

    def keeps_shared_dim(self, layer: int) -> bool:
        """Whether layer ``layer``'s input still has the shared dim (public shapes)."""
        if np.ndim(self.x) == 2:
            return False
        return self.reduce_after is None or layer <= self.reduce_after

    def hook_shape(self, h: np.ndarray, layer: int) -> np.ndarray:
        """An internal ``[..., B, S_l, d]`` array in the shape a hook on ``layer`` sees."""
        return h if self.keeps_shared_dim(layer) else h[..., 0, :]


# ---------------------------------------------------------------------------
# forward and backward passes (internally every activation is [B, S_l, d])


def _forward(problem: DeepLinearProblem) -> tuple[list[np.ndarray], np.ndarray]:
    """Layer inputs ``[B, S_l, d_{l-1}]`` (no ones column) and output ``[B, S_out, d_L]``."""
    x = np.asarray(problem.x)
    h = x if x.ndim == 3 else x[:, None, :]
    inputs = []
    for layer, (w, bias) in enumerate(zip(problem.weights, problem.bias, strict=True)):
        inputs.append(h)
        h = _with_ones(h, bias) @ np.asarray(w).T
        if layer == problem.reduce_after:
            h = h.sum(axis=1, keepdims=True) / h.shape[1]
    return inputs, h


def _backward(problem: DeepLinearProblem, v: np.ndarray) -> list[np.ndarray]:
    """Vectors at each layer's output from a vector ``v`` ``[..., B, S_out, d_L]`` at f.

    The transpose of the forward pass: ``v ← v W_l`` (bias column dropped)
    through layer ``l``; through the average after layer ``r`` a vector is
    copied to every position and divided by ``S``.
    """
    at_outputs: list[np.ndarray] = [v] * len(problem.weights)
    for layer in range(len(problem.weights) - 1, -1, -1):
        if layer == problem.reduce_after:
            v = np.repeat(v, problem.shared, axis=-2) / problem.shared
        at_outputs[layer] = v
        w = np.asarray(problem.weights[layer])
        v = v @ w[:, : w.shape[1] - problem.bias[layer]]
    return at_outputs


def _per_sample_weight_gradients(
    problem: DeepLinearProblem, inputs: list[np.ndarray], at_outputs: list[np.ndarray]
) -> list[np.ndarray]:
    """``Σ_s v[..., b, s] a~[b, s]ᵀ`` per layer: shape ``[..., B, d_l, d_{l-1} + bias]``."""
    return [
        np.einsum("...bso,bsi->...boi", v, _with_ones(a, bias))
        for v, a, bias in zip(at_outputs, inputs, problem.bias, strict=True)
    ]


def _probabilities(f: np.ndarray) -> np.ndarray:
    """Softmax over the last dim."""
    shifted = f - f.max(axis=-1, keepdims=True)
    e = _exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def _targets(problem: DeepLinearProblem, f: np.ndarray) -> np.ndarray:
    """MSE targets, or one-hot CE labels, as ``[B, S_out, d_L]``."""
    if problem.loss == "mse":
        return np.asarray(problem.y).reshape(f.shape)
    labels = np.asarray(problem.y).reshape(f.shape[:-1])
    return (np.arange(f.shape[-1]) == labels[..., None]).astype(np.float64)


def _loss_gradient(problem: DeepLinearProblem, f: np.ndarray) -> np.ndarray:
    """``∂L/∂f_t``: ``(2/N)(f_t − y_t)`` (MSE) or ``(p_t − onehot(y_t))/N`` (CE)."""
    targets = _targets(problem, f)
    if problem.loss == "mse":
        return 2 * (f - targets) / problem.loss_terms
    return (_probabilities(f) - targets) / problem.loss_terms


# ---------------------------------------------------------------------------
# public API


def layer_inputs(problem: DeepLinearProblem) -> list[np.ndarray]:
    """What a forward hook sees: each layer's input ``[B, (S), d_{l-1}]``, no ones column."""
    inputs, _ = _forward(problem)
    return [problem.hook_shape(a, layer) for layer, a in enumerate(inputs)]


def network_output(problem: DeepLinearProblem) -> np.ndarray:
    """``f``, shape ``[B, (S), d_L]`` (no ``S`` in the reduce setting)."""
    _, f = _forward(problem)
    return problem.hook_shape(f, len(problem.weights))


def loss_value(problem: DeepLinearProblem) -> Any:
    """``L = (1/N) Σ_t ℓ_t`` (module docstring)."""
    _, f = _forward(problem)
    targets = _targets(problem, f)
    if problem.loss == "mse":
        terms = ((f - targets) ** 2).sum(axis=-1)
    else:
        p = (_probabilities(f) * targets).sum(axis=-1)
        terms = -np.vectorize(mp.log if _is_mpf(p) else math.log, otypes=[p.dtype])(p)
    return terms.sum() / problem.loss_terms


def loss_hessian(problem: DeepLinearProblem) -> np.ndarray:
    """``Λ_t = ∂²ℓ_t/∂f_t²`` per term, shape ``[B, S_out, d_L, d_L]`` (no 1/N).

    MSE: ``2I``; cross-entropy: ``diag(p) − ppᵀ`` with ``p = softmax(f_t)``.
    """
    _, f = _forward(problem)
    d = f.shape[-1]
    if problem.loss == "mse":
        return np.broadcast_to(2 * np.eye(d), (*f.shape[:-1], d, d)).copy()
    p = _probabilities(f)
    return p[..., :, None] * np.eye(d) - p[..., :, None] * p[..., None, :]


def loss_hessian_sqrt(problem: DeepLinearProblem) -> np.ndarray:
    """``R_t`` with ``R_t R_tᵀ = Λ_t``, shape ``[B, S_out, d_L, C]`` (``C = d_L``).

    MSE: ``sqrt(2)·I``; cross-entropy: ``diag(√p) − p √pᵀ`` (since ``Σ p = 1``).
    """
    _, f = _forward(problem)
    d = f.shape[-1]
    if problem.loss == "mse":
        root_two = _sqrt(np.full((), 2, dtype=f.dtype))
        return np.broadcast_to(root_two * np.eye(d), (*f.shape[:-1], d, d)).copy()
    p = _probabilities(f)
    root = _sqrt(p)
    return root[..., :, None] * np.eye(d) - p[..., :, None] * root[..., None, :]


def output_gradients(problem: DeepLinearProblem) -> list[np.ndarray]:
    """What a backward hook sees: ``∂L/∂(output of layer l)``, shape ``[B, (S), d_l]``.

    ``∂L/∂f_t = (2/N)(f_t − y_t)`` (MSE) or ``(p_t − onehot(y_t))/N`` (CE),
    backpropagated through the layers above.
    """
    _, f = _forward(problem)
    at_outputs = _backward(problem, _loss_gradient(problem, f))
    return [problem.hook_shape(v, layer) for layer, v in enumerate(at_outputs)]


def per_sample_gradients(problem: DeepLinearProblem) -> list[np.ndarray]:
    """Per-sample contributions ``∇_b`` to ``∇_{W~_l} L``, shape ``[B, d_l, d_{l-1} + bias]``.

    ``∇_b = Σ_s g[b, s] a~[b, s]ᵀ`` with ``g`` from :func:`output_gradients`;
    ``Σ_b ∇_b = ∇_{W~_l} L``.
    """
    inputs, f = _forward(problem)
    at_outputs = _backward(problem, _loss_gradient(problem, f))
    return _per_sample_weight_gradients(problem, inputs, at_outputs)


def empirical_fisher(problem: DeepLinearProblem) -> list[np.ndarray]:
    """Per-layer empirical Fisher ``N Σ_b vec(∇_b) vec(∇_b)ᵀ`` (module docstring).

    Returns:
        One ``P_l × P_l`` matrix per layer, ``P_l = d_l (d_{l-1} + bias)``,
        in the column-major vec order of :func:`vec`.
    """
    blocks = []
    for grads in per_sample_gradients(problem):
        flat = np.stack([vec(g) for g in grads])  # [B, P_l]
        blocks.append(problem.loss_terms * (flat.T @ flat))
    return blocks


def output_jacobians(problem: DeepLinearProblem) -> list[np.ndarray]:
    """``J_t = ∂f_t/∂vec(W~_l)`` for every output term ``t``, by one backprop per output unit.

    Returns:
        One array per layer, shape ``[B, S_out, d_L, P_l]``.
    """
    inputs, f = _forward(problem)
    batch, positions, d_out = f.shape
    units = np.eye(batch * positions * d_out).reshape(-1, batch, positions, d_out)
    if _is_mpf(f):
        units = units.astype(object)
    grads = _per_sample_weight_gradients(problem, inputs, _backward(problem, units))
    jacobians = []
    for layer_grads in grads:  # [B·S_out·d_L, B, d_l, P_l/d_l]: sum over samples b
        total = layer_grads.sum(axis=1)
        flat = np.stack([vec(g) for g in total])
        jacobians.append(flat.reshape(batch, positions, d_out, -1))
    return jacobians


def exact_ggn(problem: DeepLinearProblem) -> list[np.ndarray]:
    """Per-layer block of the GGN (= type-2 / exact Fisher) ``Σ_t J_tᵀ (Λ_t/N) J_t``.

    Returns:
        One ``P_l × P_l`` matrix per layer (column-major vec order).
    """
    hessian = loss_hessian(problem)
    return [
        np.einsum("bsop,bsoq,bsqr->pr", j, hessian, j) / problem.loss_terms
        for j in output_jacobians(problem)
    ]


def ggn_backprop_vectors(problem: DeepLinearProblem) -> list[np.ndarray]:
    """Columns of ``R_t / N`` backpropagated to each layer's output: KFAC's exact-Fisher ``g``.

    Backward pass ``c`` (one per column of ``R_t``, :func:`loss_hessian_sqrt`)
    backpropagates ``R_t[:, c] / N`` from every output term at once — the
    gradient a hook sees for the pseudo-loss ``(1/N) Σ_t (R_t e_c)ᵀ f_t``
    with ``R_t`` held constant.  Feeding pass ``c``'s vectors with
    :func:`layer_inputs` to ``linear_statistics(..., loss_average=problem.loss_average)``
    and summing ``GᵀG`` over ``c`` (gradient accumulation) gives KFAC's
    ``Gc`` whose ``U ⊗ Gc`` targets :func:`exact_ggn`.

    Returns:
        One array per layer, shape ``[C, B, (S), d_l]``.
    """
    roots = loss_hessian_sqrt(problem)  # [B, S_out, d_L, C]
    seeds = np.moveaxis(roots, -1, 0) / problem.loss_terms  # [C, B, S_out, d_L]
    return [problem.hook_shape(v, layer) for layer, v in enumerate(_backward(problem, seeds))]
