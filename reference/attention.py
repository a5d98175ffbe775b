"""Multi-head attention forward and backward from the definitions (SPEC §1.6, MHA).

The oracle's own float64 code (numpy only): per sample, ``q = W_q x_q + b_q``
(likewise ``k``, ``v``), optional rows appended to ``k`` and ``v``
(``bias_k``/``bias_v``, then zeros for ``add_zero_attn``), per head
``o_i = softmax(q_i k_iᵀ / √d_h + M) v_i``, ``o = [o_1 … o_h]``,
``out = W_o o + b_o``; and, from ``∂L/∂out``, the gradients of the four
projections' outputs by the chain rule.  From those the rows of the four
canonical layers, ``(x_q, ∂L/∂q)``, ``(x_k, ∂L/∂k)``, ``(x_v, ∂L/∂v)``,
``(o, ∂L/∂out)``, whose statistics are :func:`reference.statistics.linear_statistics`'s.

Alongside every quantity the same computation on magnitudes is carried (the
running-error bound of Higham §3.3: sums of absolute values, the softmax's
relative error ``2·max|s|`` from an absolute error of its arguments), so a
comparison can state its rule as ``bound · magnitude``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: The four canonical layers of an MHA, in the implementation's naming.
ROLES = ("q", "k", "v", "out_proj")
_ARRAYS = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")


class AttentionParameters(NamedTuple):
    """The parameters of one MHA as float64 arrays (``None``: absent).

    ``w_q`` is ``E × E_q``, ``w_k`` ``E × kdim``, ``w_v`` ``E × vdim``,
    ``w_o`` ``E × E``; biases ``[E]``; ``bias_k``/``bias_v`` ``[E]``.
    """

    w_q: np.ndarray
    w_k: np.ndarray
    w_v: np.ndarray
    w_o: np.ndarray
    b_q: np.ndarray | None
    b_k: np.ndarray | None
    b_v: np.ndarray | None
    b_o: np.ndarray | None
    num_heads: int
    bias_k: np.ndarray | None = None
    bias_v: np.ndarray | None = None
    add_zero_attn: bool = False


class Rows(NamedTuple):
    """One canonical layer's ``a`` ``[B, S, d_i]`` and ``g`` ``[B, S, d_o]``, and magnitudes."""

    inputs: np.ndarray
    grads: np.ndarray
    inputs_magnitude: np.ndarray
    grads_magnitude: np.ndarray


def additive_mask(
    batch: int,
    length: int,
    source: int,
    key_padding_mask: np.ndarray | None = None,
    attn_mask: np.ndarray | None = None,
) -> np.ndarray:
    """``M`` ``[B, 1, L, S]``: ``−inf`` where ``key_padding_mask[b, s]`` or a boolean
    ``attn_mask[l, s]`` is true, plus a float ``attn_mask``'s values."""
    mask = np.zeros((batch, 1, length, source))
    if key_padding_mask is not None:
        mask = mask + np.where(key_padding_mask[:, None, None, :], -np.inf, 0.0)
    if attn_mask is not None:
        if attn_mask.dtype == bool:
            mask = mask + np.where(attn_mask, -np.inf, 0.0)
        else:
            mask = mask + attn_mask
    return mask


def _project(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    out = x @ w.T
    return out if b is None else out + b


def _append(rows: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """``[B, S, E]`` with one row ``extra`` (``[E]``) appended to every sample."""
    return np.concatenate([rows, np.broadcast_to(extra, (rows.shape[0], 1, rows.shape[2]))], 1)


def _heads(x: np.ndarray, heads: int) -> np.ndarray:
    """``[B, S, E]`` → ``[B, h, S, E/h]``."""
    batch, length, dim = x.shape
    return x.reshape(batch, length, heads, dim // heads).transpose(0, 2, 1, 3)


def _merge(x: np.ndarray) -> np.ndarray:
    """``[B, h, S, d_h]`` → ``[B, S, h·d_h]``."""
    batch, heads, length, dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, heads * dim)


def projection_rows(
    params: AttentionParameters,
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    grad_output: np.ndarray,
    mask: np.ndarray | None = None,
) -> dict[str, Rows]:
    """The rows of the four projections of one MHA pass (module docstring).

    Args:
        params: the MHA's parameters.
        query: ``[B, L, E_q]``; key ``[B, S, kdim]``; value ``[B, S, vdim]``.
        grad_output: ``∂L/∂out``, ``[B, L, E]``.
        mask: additive ``[B, 1, L, S]`` (:func:`additive_mask`), columns for the
            appended ``bias_k`` / zero rows are added here (0: attended).

    Returns:
        ``role → Rows`` for ``q``, ``k``, ``v``, ``out_proj``.
    """
    h = params.num_heads
    abs_p = params._replace(
        **{f: np.abs(getattr(params, f)) for f in _ARRAYS if getattr(params, f) is not None}
    )
    inputs = {"q": query, "k": key, "v": value}
    q, k, v = (
        _project(inputs[r], getattr(params, f"w_{r}"), getattr(params, f"b_{r}")) for r in "qkv"
    )
    q_m, k_m, v_m = (
        _project(np.abs(inputs[r]), getattr(abs_p, f"w_{r}"), getattr(abs_p, f"b_{r}"))
        for r in "qkv"
    )
    source = key.shape[1]
    appended = []
    if params.bias_k is not None:
        appended.append((params.bias_k, params.bias_v))
    if params.add_zero_attn:
        zeros = np.zeros(q.shape[2])
        appended.append((zeros, zeros))
    for extra_k, extra_v in appended:
        k, v = _append(k, extra_k), _append(v, extra_v)
        k_m, v_m = _append(k_m, np.abs(extra_k)), _append(v_m, np.abs(extra_v))
    if mask is None:
        mask = np.zeros((q.shape[0], 1, q.shape[1], source))
    mask = np.concatenate([mask, np.zeros((*mask.shape[:3], len(appended)))], axis=3)
    qh, kh, vh = _heads(q, h), _heads(k, h), _heads(v, h)
    qh_m, kh_m, vh_m = _heads(q_m, h), _heads(k_m, h), _heads(v_m, h)
    root = np.sqrt(qh.shape[3])
    scores = qh @ kh.transpose(0, 1, 3, 2) / root + mask
    scores_m = qh_m @ kh_m.transpose(0, 1, 3, 2) / root + np.where(np.isfinite(mask), abs(mask), 0)
    shifted = np.exp(scores - scores.max(axis=3, keepdims=True))
    P = shifted / shifted.sum(axis=3, keepdims=True)
    P_m = P * (1 + 2 * scores_m.max(axis=3, keepdims=True))
    o, o_m = _merge(P @ vh), _merge(P_m @ vh_m)
    g_oh = _heads(grad_output @ params.w_o, h)
    g_oh_m = _heads(np.abs(grad_output) @ abs_p.w_o, h)
    g_P = g_oh @ vh.transpose(0, 1, 3, 2)
    g_P_m = g_oh_m @ vh_m.transpose(0, 1, 3, 2)
    g_s = P * (g_P - (g_P * P).sum(axis=3, keepdims=True))
    g_s_m = P_m * (g_P_m + (g_P_m * P_m).sum(axis=3, keepdims=True))
    g_q, g_q_m = _merge(g_s @ kh / root), _merge(g_s_m @ kh_m / root)
    g_k = _merge(g_s.transpose(0, 1, 3, 2) @ qh / root)[:, :source]
    g_k_m = _merge(g_s_m.transpose(0, 1, 3, 2) @ qh_m / root)[:, :source]
    g_v = _merge(P.transpose(0, 1, 3, 2) @ g_oh)[:, :source]
    g_v_m = _merge(P_m.transpose(0, 1, 3, 2) @ g_oh_m)[:, :source]
    return {
        "q": Rows(query, g_q, np.abs(query), g_q_m),
        "k": Rows(key, g_k, np.abs(key), g_k_m),
        "v": Rows(value, g_v, np.abs(value), g_v_m),
        "out_proj": Rows(o, grad_output, o_m, np.abs(grad_output)),
    }


def attention_output(
    params: AttentionParameters,
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """``out`` ``[B, L, E]`` of the forward alone (the oracle's own check differentiates it)."""
    zero = np.zeros((query.shape[0], query.shape[1], params.w_o.shape[0]))
    o = projection_rows(params, query, key, value, zero, mask)["out_proj"].inputs
    return _project(o, params.w_o, params.b_o)
