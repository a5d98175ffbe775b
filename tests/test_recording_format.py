"""The recording format (:mod:`verification.recording_format`) and ``singd-verify-recording``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reference.updates import SINGDHyperparameters
from tests.tolerances import EPS
from verification import verify_recording
from verification.recording import RecordedRun
from verification.recording_format import (
    FORMAT_VERSION,
    MANIFEST_KEY,
    LayerSpec,
    RecordingError,
    hyper_from_dataclass,
    load_recording,
    save_recording,
)
from verification.scenarios import DTYPES, SCENARIOS, run_and_replay

REPO = Path(__file__).resolve().parent.parent
STEPS = 4


def _record(
    scenario: str, dtype: str, variant: dict[str, object] | None = None
) -> tuple[RecordedRun, SINGDHyperparameters, dict[str, object], dict[str, object]]:
    """A short run of our SINGD on ``scenario`` and the ``hyper``/``meta`` to save it with."""
    case = SCENARIOS[scenario]
    overrides = {"structures": ("dense", "dense"), **(variant or {})}
    # format v1 holds no compensation terms: the plain factor step (factor_guard=None)
    run, _, hyper = run_and_replay(case, overrides, DTYPES[dtype], steps=STEPS, factor_guard=None)
    hyper_json = hyper_from_dataclass(hyper, case.loss_average, case.approx)
    meta = {"model_dtype": dtype, "factor_dtypes": [dtype, dtype], "scenario": scenario}
    return run, hyper, hyper_json, meta


@pytest.fixture(scope="module")
def float64_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A correct float64 recording of the MLP (block structures, so K is not symmetric)."""
    run, _, hyper, meta = _record("mlp", "float64", {"structures": ("block2diagonal", "dense")})
    path = tmp_path_factory.mktemp("rec") / "mlp-float64.npz"
    save_recording(run, hyper, meta, path)
    return path


def _rewrite(source: Path, target: Path, edit: object) -> None:
    """Copy ``source`` to ``target`` with ``edit(manifest, arrays)`` applied in place."""
    with np.load(source, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    manifest = json.loads(arrays.pop(MANIFEST_KEY).tobytes().decode())
    edit(manifest, arrays)
    arrays[MANIFEST_KEY] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    with open(target, "wb") as handle:
        np.savez(handle, **arrays)


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize(
    ("scenario", "dtype"),
    [("mlp", "float64"), ("mlp-nobias-sum", "bfloat16"), ("conv", "bfloat16"), ("conv", "float64")],
)
def test_round_trip_is_bitwise(scenario: str, dtype: str, tmp_path: Path) -> None:
    """save → load gives the same arrays bit for bit, hyper-parameters and layer specs."""
    run, hyper, hyper_json, meta = _record(scenario, dtype)
    path = tmp_path / "run.npz"
    save_recording(run, hyper_json, meta, path)
    loaded, loaded_hyper, loaded_meta = load_recording(path)
    assert loaded_hyper == hyper
    assert loaded_meta.version == FORMAT_VERSION
    assert loaded_meta.model_dtype == dtype and loaded_meta.bound_dtype == dtype
    assert loaded_meta.loss_average == SCENARIOS[scenario].loss_average
    assert loaded_meta.kfac_approx == SCENARIOS[scenario].approx
    assert loaded_meta.extra == {"scenario": scenario}
    assert list(loaded.layers) == list(run.layers)
    for name, module in run.layers.items():
        rebuilt = loaded.layers[name]
        assert type(rebuilt) is type(module) and rebuilt.weight.device.type == "meta"
        assert LayerSpec.from_module(name, rebuilt) == LayerSpec.from_module(name, module)
    for name, weights in run.initial_weights.items():
        assert np.array_equal(loaded.initial_weights[name], weights)
    assert len(loaded.steps) == len(run.steps) == STEPS
    for step, loaded_step in zip(run.steps, loaded.steps, strict=True):
        for name, layer_step in step.items():
            other = loaded_step[name]
            assert np.array_equal(other.grad, layer_step.grad)
            assert set(other.state) == set(layer_step.state)
            for key, value in layer_step.state.items():
                assert np.array_equal(other.state[key], value), key
            assert len(other.passes) == len(layer_step.passes)
            for mine, theirs in zip(layer_step.passes, other.passes, strict=True):
                assert theirs.inputs.dtype == mine.inputs.dtype == DTYPES[dtype]
                assert torch.equal(theirs.inputs, mine.inputs)
                assert torch.equal(theirs.output_grads, mine.output_grads)


def test_writer_needs_neither_torch_nor_singd(tmp_path: Path) -> None:
    """A fresh interpreter writes a plain-numpy run; torch and singd stay unimported."""
    path = tmp_path / "plain.npz"
    script = f"""
import sys
import numpy as np
from verification.recording_format import LayerSpec, PlainLayerStep, PlainPass, PlainRun
from verification.recording_format import save_recording
rng = np.random.default_rng(0)
spec = LayerSpec("fc", "linear", 3, 2, True)
steps = [{{"fc": PlainLayerStep(
    passes=[PlainPass(rng.standard_normal((4, 3)), rng.standard_normal((4, 2)))],
    grad=rng.standard_normal((2, 4)),
    state={{"K": np.eye(4), "C": np.eye(2), "W": np.zeros((2, 4)), "m_W": np.ones((2, 4))}},
)}}]
run = PlainRun(initial_weights={{"fc": np.zeros((2, 4))}}, steps=steps, layers={{"fc": spec}})
hyper = dict(lr=0.1, momentum=0.0, damping=0.01, alpha1=0.0, weight_decay=0.0, T=1,
             lr_cov=0.1, kfac_like=True, normalize_lr_cov=False, structures=["dense", "dense"],
             loss_average="batch", kfac_approx="expand")
save_recording(run, hyper, {{"model_dtype": "float64", "factor_dtypes": ["float64"] * 2}},
               {str(path)!r})
loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "singd", "reference")]
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True)
    run, hyper, _ = load_recording(path)
    assert hyper.kfac_like and run.layers["fc"].in_features == 3
    # alpha1 = 0 and no momenta recorded: they read as zeros.
    assert not run.steps[0]["fc"].state["m_K"].any()


def test_writer_rejects_bad_runs(tmp_path: Path) -> None:
    """Missing hyper-parameters, unknown dtypes, wrong shapes and non-bf16 values are refused."""
    run, _, hyper, meta = _record("mlp", "bfloat16")
    path = tmp_path / "bad.npz"
    with pytest.raises(RecordingError, match="missing \\['kfac_approx'\\]"):
        save_recording(run, {k: v for k, v in hyper.items() if k != "kfac_approx"}, meta, path)
    with pytest.raises(RecordingError, match="model_dtype"):
        save_recording(run, hyper, {**meta, "model_dtype": "float8"}, path)
    run.steps[1]["0"].state["K"] = run.steps[1]["0"].state["K"][:, :-1]
    with pytest.raises(RecordingError, match="step 1, layer '0': state K: shape"):
        save_recording(run, hyper, meta, path)
    run.steps[1]["0"].state["K"] = np.full((7, 7), 1 / 3)  # 1/3 is no bfloat16 number
    with pytest.raises(RecordingError, match="not bfloat16 numbers"):
        save_recording(run, hyper, meta, path)
    assert not path.exists()


# ------------------------------------------------------------- verify command
def test_verify_passes_a_correct_recording(float64_file: Path, tmp_path: Path) -> None:
    """Exit 0 and a JSON result whose every ratio is at most 1, both comparisons."""
    out = tmp_path / "result.json"
    assert verify_recording.main([str(float64_file), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["passed"] and result["bound_dtype"] == "float64"
    comparisons = {row["comparison"] for row in result["entries"]}
    assert comparisons == {"trajectory", "one-step"}
    assert all(row["ratio"] <= 1 for row in result["entries"])


def test_verify_passes_a_bfloat16_recording(tmp_path: Path) -> None:
    """Exit 0 for a bfloat16 run (bounds with eps(bfloat16))."""
    run, _, hyper, meta = _record("mlp", "bfloat16")
    save_recording(run, hyper, meta, tmp_path / "bf16.npz")
    assert verify_recording.main([str(tmp_path / "bf16.npz")]) == 0


def test_verify_fails_a_perturbed_k(
    float64_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One K entry off by 1e3 eps of K's scale at step 2: exit 1.

    The one-step bound of K (d_i = 7, batch 4) is a sum of (n + 2)·eps terms,
    tens of eps of the scale (the measured one-step errors are a few eps), so
    1e3 eps exceeds it by far.
    """
    broken = tmp_path / "perturbed.npz"

    def perturb(_: dict, arrays: dict[str, np.ndarray]) -> None:
        k = arrays["step/2/0/state/K"]
        k[1, 2] += 1e3 * EPS[torch.float64] * np.abs(k).max()

    _rewrite(float64_file, broken, perturb)
    assert verify_recording.main([str(broken)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_fails_k_stored_transposed(float64_file: Path, tmp_path: Path) -> None:
    """K stored transposed from step 2 on: exit 1 (block2diagonal K is not symmetric by then)."""
    broken = tmp_path / "transposed.npz"

    def transpose(_: dict, arrays: dict[str, np.ndarray]) -> None:
        for t in range(2, STEPS):
            for layer in (0, 1):
                key = f"step/{t}/{layer}/state/K"
                arrays[key] = np.ascontiguousarray(arrays[key].T)

    _rewrite(float64_file, broken, transpose)
    assert verify_recording.main([str(broken)]) == 1


# ----------------------------------------------------------------- bad files
def _invalid(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command on ``path``, check exit 2, return its error message."""
    assert verify_recording.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_truncated_and_corrupted_files_exit_2(
    float64_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated file, garbage and a missing file: exit 2 with a message naming the problem."""
    data = float64_file.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupted" in _invalid(truncated, capsys)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside a compressed member: a CRC or inflate error
    corrupted = tmp_path / "corrupted.npz"
    corrupted.write_bytes(bytes(flipped))
    assert "truncated or corrupted" in _invalid(corrupted, capsys)
    assert "cannot read" in _invalid(tmp_path / "missing.npz", capsys)
    no_manifest = tmp_path / "plain.npz"
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros(2))
    no_manifest.write_bytes(buffer.getvalue())
    assert "not a SINGD recording" in _invalid(no_manifest, capsys)


def test_wrong_version_and_inconsistent_contents_exit_2(
    float64_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unknown version, missing array, wrong shape, unknown structure: exit 2, clear messages."""
    cases = {
        "unsupported recording format version 2": lambda m, a: m.update(version=2),
        "lacks array 'step/1/0/grad'": lambda m, a: a.pop("step/1/0/grad"),
        "step 3, layer '0': grad: shape (5, 6), expected (5, 7)": lambda m, a: a.update(
            {"step/3/0/grad": a["step/3/0/grad"][:, :-1]}
        ),
        "unknown structure name 'banded'": lambda m, a: m["hyper"].update(
            structures=["banded", "dense"]
        ),
        "arrays the manifest does not list": lambda m, a: a.update(extra=np.zeros(1)),
        "lacks ['dilation', 'groups', 'kernel_size'": lambda m, a: m["layers"][0].update(
            kind="conv2d"
        ),
    }
    for index, (message, edit) in enumerate(cases.items()):
        path = tmp_path / f"bad{index}.npz"
        _rewrite(float64_file, path, edit)
        assert message in _invalid(path, capsys), message
