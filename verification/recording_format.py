"""A versioned file format for one recorded training run of a SINGD-like optimizer.

Any implementation of SINGD can be verified against the float64 oracle by
writing its run in this format and running ``singd-verify-recording FILE``
(:mod:`verification.verify_recording`).  The format is specified in
``docs/verification.md`` (section "Recording format"); in short, one ``.npz``
archive holds

* ``manifest``: a UTF-8 JSON document (stored as a ``uint8`` array) with the
  format name and version, the hyper-parameters, the dtypes, the layer specs,
  the number of passes per step and layer, and free-form metadata;
* float64 arrays (exact copies of the recorded low-precision values) named
  ``initial/<l>/W``, ``step/<t>/<l>/pass/<p>/a``, ``step/<t>/<l>/pass/<p>/g``,
  ``step/<t>/<l>/grad`` and ``step/<t>/<l>/state/<key>``, where ``<l>`` is the
  layer's index in the manifest's layer list.

**The writer needs numpy and the standard library only**: importing this
module imports neither torch nor the ``singd`` package, so an adapter running
in another environment (where a different package called ``singd`` is
installed) can import it by path and write recordings.  It accepts numpy
arrays and, by duck typing (``.detach()``), torch tensors of any float dtype.
Reading (:func:`load_recording`) rebuilds torch modules on the ``meta``
device and returns the :class:`verification.recording.RecordedRun` that
:mod:`verification.replay` and :mod:`verification.comparison` consume; it
imports torch and :mod:`reference` lazily.

``python -m verification.recording_format --scenario mlp --dtype bfloat16
--out run.npz`` records one of this project's own scenario cases
(:func:`record_scenario`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from reference.updates import SINGDHyperparameters
    from verification.recording import RecordedRun

#: The ``format`` field of every manifest.
FORMAT_NAME = "singd-recording"

#: The version this module writes and the only one it reads.
FORMAT_VERSION = 1

#: Name of the manifest member of the archive.
MANIFEST_KEY = "manifest"

#: Hyper-parameters every manifest holds (SPEC §1.1, §1.3, §1.4).
HYPER_KEYS = (
    "lr",
    "momentum",
    "damping",
    "alpha1",
    "weight_decay",
    "T",
    "lr_cov",
    "kfac_like",
    "normalize_lr_cov",
    "structures",
    "loss_average",
    "kfac_approx",
)

#: State entries after every step: always ``K``, ``C``, ``W`` (``W~``), ``m_W``;
#: ``m_K``, ``m_C`` when ``alpha1 != 0`` (optional, and read as zeros, with ``alpha1 = 0``).
STATE_KEYS = ("K", "C", "m_K", "m_C", "W", "m_W")
REQUIRED_STATE_KEYS = ("K", "C", "W", "m_W")

#: Floating dtypes a recording may declare.
DTYPE_NAMES = ("float64", "float32", "bfloat16", "float16")

#: ``loss_average`` and ``kfac_approx`` values (SPEC §1.1).
LOSS_AVERAGES = (None, "batch", "batch+sequence")
KFAC_APPROXES = ("expand", "reduce")


class RecordingError(ValueError):
    """A recording file (or a run to be saved) is unreadable or does not follow the format."""


# ------------------------------------------------------------------ layer specs
@dataclass(frozen=True)
class LayerSpec:
    """What the format records about one layer (enough to rebuild an equivalent module).

    Attributes:
        name: The layer's qualified name in the model.
        kind: ``"linear"`` or ``"conv2d"``.
        in_dim: ``in_features`` (linear) or ``in_channels`` (conv2d).
        out_dim: ``out_features`` (linear) or ``out_channels`` (conv2d).
        bias: Whether the layer has a bias (the last column of ``W~``).
        kernel_size: Conv2d only (``(1, 1)`` for linear).
        stride: Conv2d only.
        padding: Conv2d only (integers; string paddings are not supported).
        dilation: Conv2d only.
        groups: Conv2d only.
    """

    name: str
    kind: str
    in_dim: int
    out_dim: int
    bias: bool
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        """Validate every field.

        Raises:
            RecordingError: Naming the first invalid field.
        """
        where = f"layer {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise RecordingError(f"layer name must be a non-empty string, got {self.name!r}")
        if self.kind not in ("linear", "conv2d"):
            raise RecordingError(f"{where}: kind must be 'linear' or 'conv2d', got {self.kind!r}")
        for key in ("in_dim", "out_dim", "groups"):
            _check_positive_int(f"{where}: {key}", getattr(self, key))
        if not isinstance(self.bias, bool):
            raise RecordingError(f"{where}: bias must be true or false, got {self.bias!r}")
        for key, low in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
            value = getattr(self, key)
            if not (
                isinstance(value, tuple)
                and len(value) == 2
                and all(_is_int(v) and v >= low for v in value)
            ):
                raise RecordingError(f"{where}: {key} must be two integers >= {low}, got {value!r}")
        if self.kind == "linear" and (
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        ) != ((1, 1), (1, 1), (0, 0), (1, 1), 1):
            raise RecordingError(f"{where}: a linear layer has no kernel, stride, ... or groups")
        if self.in_dim % self.groups or self.out_dim % self.groups:
            raise RecordingError(
                f"{where}: groups={self.groups} must divide in_dim={self.in_dim} "
                f"and out_dim={self.out_dim}"
            )

    @property
    def d_in(self) -> int:
        """Columns of ``W~``: ``in_dim`` (linear) or ``in_dim/groups · k_h · k_w``, plus bias."""
        patch = self.in_dim // self.groups * self.kernel_size[0] * self.kernel_size[1]
        return (self.in_dim if self.kind == "linear" else patch) + int(self.bias)

    @property
    def d_out(self) -> int:
        """Rows of ``W~``: ``out_dim``."""
        return self.out_dim

    def output_grad_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of ``g`` for an input of ``input_shape``.

        Raises:
            RecordingError: If ``input_shape`` does not fit the layer.
        """
        where = f"layer {self.name!r}: input of shape {input_shape}"
        if self.kind == "linear":
            if len(input_shape) < 2 or input_shape[-1] != self.in_dim:
                raise RecordingError(f"{where}; expected [B, ..., {self.in_dim}]")
            return (*input_shape[:-1], self.out_dim)
        if len(input_shape) != 4 or input_shape[1] != self.in_dim:
            raise RecordingError(f"{where}; expected [B, {self.in_dim}, H, W]")
        spatial = []
        for size, k, s, p, d in zip(
            input_shape[2:],
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            strict=True,
        ):
            out = (size + 2 * p - d * (k - 1) - 1) // s + 1
            if out < 1:
                raise RecordingError(f"{where} is smaller than the (dilated) kernel")
            spatial.append(out)
        return (input_shape[0], self.out_dim, *spatial)

    def as_json(self) -> dict[str, Any]:
        """The manifest entry (conv-only fields left out for linear layers)."""
        entry: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "bias": self.bias,
        }
        if self.kind == "conv2d":
            for key in ("kernel_size", "stride", "padding", "dilation"):
                entry[key] = list(getattr(self, key))
            entry["groups"] = self.groups
        return entry

    @classmethod
    def from_json(cls, entry: object) -> LayerSpec:
        """The spec of a manifest entry.

        Raises:
            RecordingError: For a missing, unknown or invalid field.
        """
        if not isinstance(entry, dict):
            raise RecordingError(f"a layer entry must be a JSON object, got {entry!r}")
        required = {"name", "kind", "in_dim", "out_dim", "bias"}
        conv = {"kernel_size", "stride", "padding", "dilation", "groups"}
        missing = required - set(entry)
        if entry.get("kind") == "conv2d":
            missing |= conv - set(entry)
        if missing:
            raise RecordingError(f"layer entry {entry!r} lacks {sorted(missing)}")
        unknown = set(entry) - required - (conv if entry.get("kind") == "conv2d" else set())
        if unknown:
            raise RecordingError(f"layer entry {entry!r} has unknown fields {sorted(unknown)}")
        values = dict(entry)
        for key in ("kernel_size", "stride", "padding", "dilation"):
            if key in values:
                value = values[key]
                values[key] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    @classmethod
    def from_module(cls, name: str, module: Any) -> LayerSpec:
        """The spec of a torch ``nn.Linear`` or ``nn.Conv2d`` (duck-typed, torch not imported).

        Raises:
            RecordingError: For any other module, or a conv with a string padding.
        """
        if isinstance(module, LayerSpec):
            return module
        bias = getattr(module, "bias", None) is not None
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            return cls(name, "linear", module.in_features, module.out_features, bias)
        if hasattr(module, "in_channels") and hasattr(module, "kernel_size"):
            if len(module.kernel_size) != 2:
                raise RecordingError(f"layer {name!r}: only 2d convolutions are supported")
            if isinstance(module.padding, str):
                raise RecordingError(
                    f"layer {name!r}: padding={module.padding!r}; the format needs integers"
                )
            return cls(
                name,
                "conv2d",
                module.in_channels,
                module.out_channels,
                bias,
                tuple(module.kernel_size),
                tuple(module.stride),
                tuple(module.padding),
                tuple(module.dilation),
                module.groups,
            )
        raise RecordingError(
            f"layer {name!r}: {type(module).__name__} is neither Linear nor Conv2d"
        )


def _is_int(value: object) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(what: str, value: object) -> None:
    """Raise :class:`RecordingError` unless ``value`` is an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise RecordingError(f"{what} must be an integer >= 1, got {value!r}")


# --------------------------------------------------------- torch-free run model
@dataclass
class PlainPass:
    """One forward/backward pass through one layer (the writer's torch-free input).

    Attributes:
        inputs: The layer's input ``a`` as the layer received it.
        output_grads: ``∂loss/∂output`` as the layer received it in backward.
    """

    inputs: Any
    output_grads: Any


@dataclass
class PlainLayerStep:
    """One layer's record of one step (the writer's torch-free input).

    Attributes:
        passes: The passes before the step.
        grad: ``∇W~`` (``d_o × d_i``, bias column last) read before ``step()``.
        state: The state after the step: ``K``, ``C``, ``W`` (``W~``), ``m_W`` and,
            with ``alpha1 != 0``, ``m_K``, ``m_C`` (dense matrices).
    """

    passes: list[PlainPass]
    grad: Any
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlainRun:
    """A recorded run as the writer takes it; :class:`verification.recording.RecordedRun` also fits.

    Attributes:
        initial_weights: ``W~`` of each layer before the first step.
        steps: ``steps[t][layer_name]`` is that layer's :class:`PlainLayerStep`.
        layers: Layer name to :class:`LayerSpec` (or a torch Linear/Conv2d module).
    """

    initial_weights: dict[str, Any]
    steps: list[dict[str, PlainLayerStep]]
    layers: dict[str, Any]


# ---------------------------------------------------------------- array checks
def _dtype_name(value: Any) -> str | None:
    """The dtype name (``"bfloat16"``, …) of a numpy array or torch tensor, if floating."""
    name = str(value.dtype).removeprefix("torch.")
    return name if name in DTYPE_NAMES else None


def to_float64(value: Any, what: str) -> np.ndarray:
    """An exact float64 numpy copy of a floating numpy array or torch tensor.

    Torch tensors are recognised by ``.detach()`` (torch is not imported).

    Raises:
        RecordingError: For anything that is not a floating array.
    """
    if hasattr(value, "detach"):
        if not value.is_floating_point():
            raise RecordingError(f"{what}: expected a floating tensor, got {value.dtype}")
        return value.detach().cpu().double().numpy().copy()
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise RecordingError(f"{what}: expected a floating numpy array or torch tensor")
    return value.astype(np.float64, copy=True)


def representable(values: np.ndarray, dtype: str) -> bool:
    """Whether every (non-NaN) float64 entry is exactly a number of ``dtype``.

    bfloat16 is checked without torch: the value must be a float32 whose low 16
    bits are zero.
    """
    finite = values[~np.isnan(values)]
    if dtype == "float64":
        return True
    if dtype == "float16":
        return bool(np.all(finite.astype(np.float16).astype(np.float64) == finite))
    single = finite.astype(np.float32)
    if not np.all(single.astype(np.float64) == finite):
        return False
    return dtype == "float32" or not np.any(single.view(np.uint32) & np.uint32(0xFFFF))


def _check_array(values: np.ndarray, shape: tuple[int, ...], dtype: str, what: str) -> None:
    """Raise :class:`RecordingError` unless ``values`` has ``shape`` and fits ``dtype``."""
    if values.shape != shape:
        raise RecordingError(f"{what}: shape {values.shape}, expected {shape}")
    if not representable(values, dtype):
        raise RecordingError(f"{what}: holds values that are not {dtype} numbers")


# -------------------------------------------------------------------- manifest
def _json_number(what: str, value: object) -> float:
    """``value`` as a finite float, or :class:`RecordingError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordingError(f"hyper-parameter {what} must be a finite number, got {value!r}")
    return float(value)


def _checked_hyper(hyper: Mapping[str, object]) -> dict[str, Any]:
    """The manifest's ``hyper`` object: every key of :data:`HYPER_KEYS`, JSON-typed.

    Raises:
        RecordingError: For a missing or unknown key or an ill-typed value.
    """
    if not isinstance(hyper, Mapping):
        raise RecordingError(f"hyper must be a JSON object, got {type(hyper).__name__}")
    missing = [key for key in HYPER_KEYS if key not in hyper]
    unknown = sorted(set(hyper) - set(HYPER_KEYS))
    if missing or unknown:
        raise RecordingError(f"hyper-parameters: missing {missing}, unknown {unknown}")
    out: dict[str, Any] = {}
    for key in ("lr", "momentum", "damping", "alpha1", "weight_decay", "lr_cov"):
        if callable(hyper[key]):
            raise RecordingError(f"{key} must be a constant number (schedules are not recorded)")
        out[key] = _json_number(key, hyper[key])
    _check_positive_int("hyper-parameter T", hyper["T"])
    out["T"] = hyper["T"]
    for key in ("kfac_like", "normalize_lr_cov"):
        if not isinstance(hyper[key], bool):
            raise RecordingError(f"hyper-parameter {key} must be true or false")
        out[key] = hyper[key]
    structures = hyper["structures"]
    if (
        not isinstance(structures, (list, tuple))
        or len(structures) != 2
        or not all(isinstance(name, str) for name in structures)
    ):
        raise RecordingError(f"structures must be two names [K, C], got {structures!r}")
    out["structures"] = list(structures)
    if hyper["loss_average"] not in LOSS_AVERAGES:
        raise RecordingError(
            f"loss_average must be one of {LOSS_AVERAGES}, got {hyper['loss_average']!r}"
        )
    if hyper["kfac_approx"] not in KFAC_APPROXES:
        raise RecordingError(
            f"kfac_approx must be one of {KFAC_APPROXES}, got {hyper['kfac_approx']!r}"
        )
    out["loss_average"] = hyper["loss_average"]
    out["kfac_approx"] = hyper["kfac_approx"]
    return out


def _checked_dtypes(model_dtype: object, factor_dtypes: object) -> tuple[str, tuple[str, str]]:
    """``(model_dtype, (K dtype, C dtype))``, validated.

    Raises:
        RecordingError: For an unknown dtype name.
    """
    if model_dtype not in DTYPE_NAMES:
        raise RecordingError(f"model_dtype must be one of {DTYPE_NAMES}, got {model_dtype!r}")
    if (
        not isinstance(factor_dtypes, (list, tuple))
        or len(factor_dtypes) != 2
        or any(name not in DTYPE_NAMES for name in factor_dtypes)
    ):
        raise RecordingError(
            f"factor_dtypes must be two of {DTYPE_NAMES} ([K, C]), got {factor_dtypes!r}"
        )
    return model_dtype, (factor_dtypes[0], factor_dtypes[1])


def hyper_from_dataclass(hyper: Any, loss_average: str | None, kfac_approx: str) -> dict[str, Any]:
    """The ``hyper`` of :func:`save_recording` from a ``SINGDHyperparameters``-like object."""
    names = [key for key in HYPER_KEYS if key not in ("loss_average", "kfac_approx")]
    return {
        **{key: getattr(hyper, key) for key in names},
        "loss_average": loss_average,
        "kfac_approx": kfac_approx,
    }


# ---------------------------------------------------------------------- writer
def _state_dtype(key: str, model_dtype: str, factor_dtypes: tuple[str, str]) -> str:
    """The dtype whose numbers state entry ``key`` must hold."""
    if key in ("K", "m_K"):
        return factor_dtypes[0]
    if key in ("C", "m_C"):
        return factor_dtypes[1]
    return model_dtype


def _state_shape(key: str, spec: LayerSpec) -> tuple[int, int]:
    """The shape of state entry ``key`` of layer ``spec``."""
    if key in ("K", "m_K"):
        return (spec.d_in, spec.d_in)
    if key in ("C", "m_C"):
        return (spec.d_out, spec.d_out)
    return (spec.d_out, spec.d_in)


def save_recording(
    run: Any, hyper: Mapping[str, object], meta: Mapping[str, object], path: str | Path
) -> None:
    """Validate a recorded run and write it as one ``.npz`` file (format version 1).

    Args:
        run: A :class:`PlainRun` or :class:`verification.recording.RecordedRun`
            (anything with ``initial_weights``, ``steps`` and ``layers`` of that
            shape); arrays may be numpy arrays or torch tensors of any float dtype.
        hyper: Every key of :data:`HYPER_KEYS` (:func:`hyper_from_dataclass` builds it).
        meta: ``model_dtype`` (a name of :data:`DTYPE_NAMES`), ``factor_dtypes``
            (``[K, C]`` names) and any further JSON-serialisable entries
            (producer, package version, scenario, …), kept as they are.
        path: The file to write (replaced atomically; no suffix is added).

    Raises:
        RecordingError: If anything does not follow the format: names, shapes,
            values not representable in their declared dtype, missing passes on a
            factor step, missing state entries.
    """
    meta = dict(meta)
    model_dtype, factor_dtypes = _checked_dtypes(
        meta.pop("model_dtype", None), meta.pop("factor_dtypes", None)
    )
    checked_hyper = _checked_hyper(hyper)
    specs = [LayerSpec.from_module(name, module) for name, module in run.layers.items()]
    arrays: dict[str, np.ndarray] = {}
    for index, spec in enumerate(specs):
        initial = to_float64(run.initial_weights[spec.name], f"initial W~ of {spec.name!r}")
        _check_array(initial, (spec.d_out, spec.d_in), model_dtype, f"initial W~ of {spec.name!r}")
        arrays[f"initial/{index}/W"] = initial
    passes_per_step = []
    state_keys_per_step = []
    for t, step in enumerate(run.steps):
        if set(step) != {spec.name for spec in specs}:
            raise RecordingError(f"step {t}: layers {sorted(step)}, expected the run's layers")
        counts, keys_of_step = [], []
        for index, spec in enumerate(specs):
            layer_step = step[spec.name]
            prefix = f"step/{t}/{index}"
            for p, layer_pass in enumerate(layer_step.passes):
                what = f"step {t}, layer {spec.name!r}, pass {p}"
                a = to_float64(layer_pass.inputs, f"{what}: a")
                g = to_float64(layer_pass.output_grads, f"{what}: g")
                _check_array(a, a.shape, model_dtype, f"{what}: a")
                _check_array(g, spec.output_grad_shape(a.shape), model_dtype, f"{what}: g")
                arrays[f"{prefix}/pass/{p}/a"] = a
                arrays[f"{prefix}/pass/{p}/g"] = g
            counts.append(len(layer_step.passes))
            grad = to_float64(layer_step.grad, f"step {t}, layer {spec.name!r}: grad")
            _check_array(
                grad, (spec.d_out, spec.d_in), model_dtype, f"step {t}, {spec.name!r}: grad"
            )
            arrays[f"{prefix}/grad"] = grad
            keys = [key for key in STATE_KEYS if key in layer_step.state]
            for key in keys:
                what = f"step {t}, layer {spec.name!r}: state {key}"
                value = to_float64(layer_step.state[key], what)
                dtype = _state_dtype(key, model_dtype, factor_dtypes)
                _check_array(value, _state_shape(key, spec), dtype, what)
                arrays[f"{prefix}/state/{key}"] = value
            keys_of_step.append(keys)
        passes_per_step.append(counts)
        state_keys_per_step.append(keys_of_step)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "hyper": checked_hyper,
        "model_dtype": model_dtype,
        "factor_dtypes": list(factor_dtypes),
        "layers": [spec.as_json() for spec in specs],
        "passes": passes_per_step,
        "state_keys": state_keys_per_step,
        "meta": meta,
    }
    _check_manifest(manifest)
    try:
        text = json.dumps(manifest, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise RecordingError(f"meta is not JSON-serialisable: {error}") from error
    arrays[MANIFEST_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    path = Path(path)
    temporary = path.with_name(path.name + ".part")
    with open(temporary, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(temporary, path)


# ---------------------------------------------------------------------- reader
@dataclass(frozen=True)
class RecordingMeta:
    """What a recording says beyond the run and the oracle's hyper-parameters.

    Attributes:
        version: The format version of the file.
        model_dtype: The model's dtype name (``a``, ``g``, ``∇W~``, ``W~``, ``m_W~``).
        factor_dtypes: The dtype names of ``(K, C)`` (and their momenta).
        loss_average: SPEC §1.1's loss reduction.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        layers: The layer specs, in file order.
        extra: The free-form ``meta`` object of the manifest.
    """

    version: int
    model_dtype: str
    factor_dtypes: tuple[str, str]
    loss_average: str | None
    kfac_approx: str
    layers: tuple[LayerSpec, ...]
    extra: dict[str, Any]

    @property
    def bound_dtype(self) -> str:
        """The coarsest of the model and factor dtypes: the ``eps`` of the bounds."""
        from verification.tolerances import EPS_BY_NAME

        return max((self.model_dtype, *self.factor_dtypes), key=EPS_BY_NAME.__getitem__)


def _check_manifest(manifest: object) -> None:
    """Raise :class:`RecordingError` unless ``manifest`` is a well-formed version-1 manifest."""
    if not isinstance(manifest, dict):
        raise RecordingError("the manifest is not a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise RecordingError(
            f"not a SINGD recording: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise RecordingError(
            f"unsupported recording format version {version!r}; this reader knows version "
            f"{FORMAT_VERSION} only"
        )
    expected = {
        "format",
        "version",
        "hyper",
        "model_dtype",
        "factor_dtypes",
        "layers",
        "passes",
        "state_keys",
        "meta",
    }
    if set(manifest) != expected:
        raise RecordingError(
            f"manifest keys: missing {sorted(expected - set(manifest))}, "
            f"unknown {sorted(set(manifest) - expected)}"
        )
    hyper = _checked_hyper(manifest["hyper"])
    _checked_dtypes(manifest["model_dtype"], manifest["factor_dtypes"])
    if not isinstance(manifest["meta"], dict):
        raise RecordingError("manifest meta must be a JSON object")
    layers = manifest["layers"]
    if not isinstance(layers, list) or not layers:
        raise RecordingError("manifest layers must be a non-empty list")
    specs = [LayerSpec.from_json(entry) for entry in layers]
    if len({spec.name for spec in specs}) != len(specs):
        raise RecordingError("layer names must be unique")
    passes, state_keys = manifest["passes"], manifest["state_keys"]
    if not isinstance(passes, list) or not passes:
        raise RecordingError("manifest passes must list at least one step")
    if not isinstance(state_keys, list) or len(state_keys) != len(passes):
        raise RecordingError("manifest state_keys must have one entry per step")
    for t, (counts, keys) in enumerate(zip(passes, state_keys, strict=True)):
        if not (isinstance(counts, list) and len(counts) == len(specs)):
            raise RecordingError(f"step {t}: passes must list one count per layer")
        if not (isinstance(keys, list) and len(keys) == len(specs)):
            raise RecordingError(f"step {t}: state_keys must list one key list per layer")
        for spec, count, layer_keys in zip(specs, counts, keys, strict=True):
            if not _is_int(count) or count < 0:
                raise RecordingError(f"step {t}, {spec.name!r}: bad pass count {count!r}")
            if count == 0 and t % hyper["T"] == 0:
                raise RecordingError(
                    f"step {t}, {spec.name!r}: a factor step (t % T == 0) needs >= 1 pass"
                )
            if not isinstance(layer_keys, list) or not set(layer_keys) <= set(STATE_KEYS):
                raise RecordingError(f"step {t}, {spec.name!r}: bad state keys {layer_keys!r}")
            required = REQUIRED_STATE_KEYS + (("m_K", "m_C") if hyper["alpha1"] != 0 else ())
            missing = [key for key in required if key not in layer_keys]
            if missing:
                raise RecordingError(f"step {t}, layer {spec.name!r}: state lacks {missing}")


def _read_archive(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest and every array of the archive at ``path`` (fully read and CRC-checked).

    Raises:
        RecordingError: If the file is missing, not an ``.npz``, truncated or corrupted.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RecordingError(f"cannot read {path}: {error}") from error
    unreadable = (
        OSError,
        ValueError,
        EOFError,
        KeyError,
        NotImplementedError,
        zipfile.BadZipFile,
        zlib.error,
    )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            corrupted = archive.testzip()  # reads every member and checks its CRC-32
        if corrupted is None:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
    except unreadable as error:
        raise RecordingError(
            f"{path} is not a readable .npz archive (truncated or corrupted?): {error}"
        ) from error
    if corrupted is not None:
        raise RecordingError(
            f"{path} is not a readable .npz archive (truncated or corrupted?): member "
            f"{corrupted!r} fails its CRC-32 check"
        )
    if MANIFEST_KEY not in arrays:
        raise RecordingError(f"{path} has no {MANIFEST_KEY!r} member: not a SINGD recording")
    raw = arrays.pop(MANIFEST_KEY)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise RecordingError(f"{path}: the manifest must be a 1-d uint8 array of UTF-8 JSON")
    try:
        manifest = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordingError(f"{path}: the manifest is not valid UTF-8 JSON: {error}") from error
    return manifest, arrays


def _take(arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    """Remove and return float64 array ``key``, or :class:`RecordingError`."""
    if key not in arrays:
        raise RecordingError(f"the archive lacks array {key!r} (the manifest lists it)")
    value = arrays.pop(key)
    if value.dtype != np.float64:
        raise RecordingError(f"array {key!r} is {value.dtype}, the format stores float64")
    return value


def _module(spec: LayerSpec) -> Any:
    """An equivalent torch module on the ``meta`` device (no storage, attributes only)."""
    from torch import nn

    if spec.kind == "linear":
        return nn.Linear(spec.in_dim, spec.out_dim, bias=spec.bias, device="meta")
    return nn.Conv2d(
        spec.in_dim,
        spec.out_dim,
        spec.kernel_size,
        stride=spec.stride,
        padding=spec.padding,
        dilation=spec.dilation,
        groups=spec.groups,
        bias=spec.bias,
        device="meta",
    )


def load_recording(path: str | Path) -> tuple[RecordedRun, SINGDHyperparameters, RecordingMeta]:
    """Read and validate a recording; the run in the form replay and comparison consume.

    Passes ``a``, ``g`` come back as torch tensors of the model dtype (exact);
    ``W~``, ``∇W~`` and the state as float64 numpy arrays; layers as torch modules
    on the ``meta`` device.  With ``alpha1 = 0`` absent ``m_K``/``m_C`` read as
    zeros (the oracle never reads them then).

    Args:
        path: The ``.npz`` file.

    Returns:
        The run, the oracle's hyper-parameters and the rest of the manifest.

    Raises:
        RecordingError: For an unreadable file, a wrong format name or version,
            missing or extra arrays, wrong shapes, values outside their dtype,
            or hyper-parameters the oracle rejects (e.g. an unknown structure).
    """
    import torch

    from reference.updates import SINGDHyperparameters
    from verification.recording import LayerPass, LayerStep, RecordedRun

    path = Path(path)
    manifest, arrays = _read_archive(path)
    _check_manifest(manifest)
    hyper_json = _checked_hyper(manifest["hyper"])
    model_dtype, factor_dtypes = _checked_dtypes(manifest["model_dtype"], manifest["factor_dtypes"])
    specs = tuple(LayerSpec.from_json(entry) for entry in manifest["layers"])
    oracle_keys = [key for key in hyper_json if key not in ("loss_average", "kfac_approx")]
    try:
        hyper = SINGDHyperparameters(
            **{key: hyper_json[key] for key in oracle_keys if key != "structures"},
            structures=tuple(hyper_json["structures"]),
        )
    except ValueError as error:
        raise RecordingError(f"{path}: hyper-parameters rejected by the oracle: {error}") from error
    torch_dtype = getattr(torch, model_dtype)
    initial = {}
    for index, spec in enumerate(specs):
        value = _take(arrays, f"initial/{index}/W")
        _check_array(value, (spec.d_out, spec.d_in), model_dtype, f"initial W~ of {spec.name!r}")
        initial[spec.name] = value
    steps = []
    for t, (counts, keys) in enumerate(
        zip(manifest["passes"], manifest["state_keys"], strict=True)
    ):
        step = {}
        for index, (spec, count, layer_keys) in enumerate(zip(specs, counts, keys, strict=True)):
            prefix = f"step/{t}/{index}"
            passes = []
            for p in range(count):
                what = f"step {t}, layer {spec.name!r}, pass {p}"
                a = _take(arrays, f"{prefix}/pass/{p}/a")
                g = _take(arrays, f"{prefix}/pass/{p}/g")
                _check_array(a, a.shape, model_dtype, f"{what}: a")
                _check_array(g, spec.output_grad_shape(a.shape), model_dtype, f"{what}: g")
                passes.append(
                    LayerPass(
                        torch.from_numpy(a).to(torch_dtype), torch.from_numpy(g).to(torch_dtype)
                    )
                )
            grad = _take(arrays, f"{prefix}/grad")
            _check_array(
                grad, (spec.d_out, spec.d_in), model_dtype, f"step {t}, layer {spec.name!r}: grad"
            )
            state = {}
            for key in STATE_KEYS:
                shape = _state_shape(key, spec)
                if key not in layer_keys:  # only m_K, m_C with alpha1 = 0 (manifest check)
                    state[key] = np.zeros(shape)
                    continue
                value = _take(arrays, f"{prefix}/state/{key}")
                dtype = _state_dtype(key, model_dtype, factor_dtypes)
                _check_array(value, shape, dtype, f"step {t}, layer {spec.name!r}: state {key}")
                state[key] = value
            step[spec.name] = LayerStep(passes=passes, grad=grad, state=state)
        steps.append(step)
    if arrays:
        raise RecordingError(f"{path}: arrays the manifest does not list: {sorted(arrays)[:5]}")
    run = RecordedRun(
        initial_weights=initial,
        steps=steps,
        layers={spec.name: _module(spec) for spec in specs},
    )
    meta = RecordingMeta(
        version=manifest["version"],
        model_dtype=model_dtype,
        factor_dtypes=factor_dtypes,
        loss_average=hyper_json["loss_average"],
        kfac_approx=hyper_json["kfac_approx"],
        layers=specs,
        extra=manifest["meta"],
    )
    return run, hyper, meta


# ------------------------------------------------- recording our own scenarios
def record_scenario(
    path: str | Path,
    scenario: str = "mlp",
    variant: str = "singd",
    structures: Sequence[str] = ("dense", "dense"),
    dtype: str = "float64",
    factor_dtype: str | None = None,
    steps: int = 10,
) -> None:
    """Record one of this project's own cases (torch ``SINGD``) to ``path``.

    Args:
        path: The file to write.
        scenario: A key of :data:`verification.scenarios.SCENARIOS`.
        variant: A key of :data:`verification.scenarios.VARIANTS` (constant ``lr_cov`` only).
        structures: ``(K, C)`` structure names.
        dtype: The model's dtype name.
        factor_dtype: The factors' dtype name (``None``: the model's).
        steps: Optimizer steps.
    """
    from verification.scenarios import DTYPES, SCENARIOS, VARIANTS, run_and_replay

    case = SCENARIOS[scenario]
    overrides = {**VARIANTS[variant], "structures": tuple(structures)}
    factors = None if factor_dtype is None else DTYPES[factor_dtype]
    # format v1 stores no compensation terms: record the plain factor step
    run, _, hyper = run_and_replay(
        case, overrides, DTYPES[dtype], factors, steps, factor_guard=None
    )
    meta = {
        "model_dtype": dtype,
        "factor_dtypes": [factor_dtype or dtype] * 2,
        "producer": "singd (this project) via verification.recording_format",
        "scenario": scenario,
        "variant": variant,
    }
    save_recording(run, hyper_from_dataclass(hyper, case.loss_average, case.approx), meta, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m verification.recording_format``: record one own scenario case to a file."""
    parser = argparse.ArgumentParser(
        prog="python -m verification.recording_format",
        description="Record one case of this project's SINGD (verification.scenarios) "
        f"in the recording format, version {FORMAT_VERSION}.",
    )
    parser.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    parser.add_argument("--scenario", default="mlp", help="scenario name (default mlp)")
    parser.add_argument("--variant", default="singd", help="mode name (default singd)")
    parser.add_argument("--structures", nargs=2, default=("dense", "dense"), metavar=("K", "C"))
    parser.add_argument("--dtype", default="float64", choices=DTYPE_NAMES)
    parser.add_argument("--factor-dtype", choices=DTYPE_NAMES)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    record_scenario(
        args.out,
        args.scenario,
        args.variant,
        args.structures,
        args.dtype,
        args.factor_dtype,
        args.steps,
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
