"""Record training runs of the *public* ``singd`` package (PyPI 0.0.5) in the recording format.

Run with the Python of a separate environment that has the public package,
never this project's ``singd`` (both import as ``singd``)::

    python3 -m venv /work/venv-public
    /work/venv-public/bin/pip install torch==2.13.0 singd==0.0.5
    /work/venv-public/bin/python scripts/record_public_singd.py --out recordings/public

and verify each file with this project's environment::

    python -m verification.verify_recording recordings/public/<file>.npz

The script trains the ``mlp`` scenario of ``verification/scenarios.py``
(Linear 6→5, tanh, Linear 5→3, squared error on seeded random data, batch 4,
the data generation copied here) and a wider variant (Linear 40→36, tanh,
Linear 36→20) in which ``block30diagonal`` and ``hierarchical15_15`` are not
dense, with the public ``SINGD``.  It records inputs and output gradients with
hooks of its own, ``∇W~`` before each step and the optimizer's state after it
(``Ks``, ``Cs``, ``m_Ks``, ``m_Cs`` by module name, the parameters and their
``momentum_buffer``), and writes one file per (scenario, mode, structures,
dtype) with ``verification/recording_format.py``, which is loaded from its file
path so that nothing else of this project (in particular not its ``singd``)
is imported.

Structures: the six that the public ``SINGD.SUPPORTED_STRUCTURES`` exposes,
plus the six further classes the package ships in ``singd.structures`` but does
not expose (``Block3DiagonalMatrix``, ``Hierarchical3_2Matrix``, the four
triangular-with-diagonal-block forms), registered here under this project's
SPEC names.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

import singd
from singd.optim.optimizer import SINGD
from singd.structures.blockdiagonal import Block3DiagonalMatrix
from singd.structures.hierarchical import Hierarchical3_2Matrix
from singd.structures.trilbottomrightdiag import TrilBottomRightDiagonalMatrix
from singd.structures.triltopleftdiag import TrilTopLeftDiagonalMatrix
from singd.structures.triubottomrightdiag import TriuBottomRightDiagonalMatrix
from singd.structures.triutopleftdiag import TriuTopLeftDiagonalMatrix

REPO = Path(__file__).resolve().parent.parent


def _load_format() -> ModuleType:
    """``verification/recording_format.py`` loaded by path (numpy + json only)."""
    path = REPO / "verification" / "recording_format.py"
    spec = importlib.util.spec_from_file_location("singd_recording_format", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


FORMAT = _load_format()
warnings.filterwarnings("ignore", message="Calling naive implementation")

#: Structures the public SINGD exposes (``SINGD.SUPPORTED_STRUCTURES``).
EXPOSED = tuple(SINGD.SUPPORTED_STRUCTURES)

#: Classes shipped in ``singd.structures`` but not exposed, by this project's SPEC names.
SHIPPED = {
    "block3diagonal": Block3DiagonalMatrix,
    "hierarchical3_2": Hierarchical3_2Matrix,
    "triltopleftdiagonal": TrilTopLeftDiagonalMatrix,
    "trilbottomrightdiagonal": TrilBottomRightDiagonalMatrix,
    "triutopleftdiagonal": TriuTopLeftDiagonalMatrix,
    "triubottomrightdiagonal": TriuBottomRightDiagonalMatrix,
}
SINGD.SUPPORTED_STRUCTURES = {**SINGD.SUPPORTED_STRUCTURES, **SHIPPED}

#: Hyper-parameters of ``verification.scenarios.BASE_HYPER`` (constant lr_cov), per mode.
BASE = {
    "lr": 0.05,
    "momentum": 0.5,
    "damping": 1e-3,
    "alpha1": 0.5,
    "weight_decay": 0.0,
    "T": 1,
    "lr_cov": 0.02,
    "kfac_like": False,
    "normalize_lr_cov": False,
}
MODES: dict[str, dict[str, Any]] = {
    "singd": {},
    "ikfac": {"kfac_like": True, "alpha1": 0.0},
    "normalized": {"normalize_lr_cov": True, "lr_cov": 0.05},
}

#: Model widths (in, hidden, out) per scenario; inputs are ``[4, in]``.
SCENARIOS = {"mlp": (6, 5, 3), "mlp-wide": (40, 36, 20)}

#: Mixed (K, C) pairs recorded besides the same-structure pairs.
MIXED = (("diagonal", "dense"), ("triltoeplitz", "triutoeplitz"), ("dense", "block3diagonal"))

BATCH = 4
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _numpy(tensor: Tensor) -> Any:
    """An exact float64 numpy copy."""
    return tensor.detach().to(torch.float64).cpu().numpy().copy()


def _combined(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[W, b]`` with ``W`` flattened from dim 1."""
    weight = weight.flatten(start_dim=1)
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(1)], dim=1)


class Hooks:
    """Forward hooks recording ``a``, and tensor hooks on the outputs recording ``g``."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.passes: dict[str, list[Any]] = {name: [] for name in layers}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            record = FORMAT.PlainPass(inputs=inputs[0].detach().clone(), output_grads=None)
            self.passes[name].append(record)

            def store(grad: Tensor) -> None:
                record.output_grads = grad.detach().clone()

            output.register_hook(store)

        return hook

    def pop(self) -> dict[str, list[Any]]:
        """The completed passes since the last call."""
        done = {n: [p for p in ps if p.output_grads is not None] for n, ps in self.passes.items()}
        self.passes = {name: [] for name in self.passes}
        return done


def record(
    scenario: str, mode: str, structures: tuple[str, str], dtype: str, steps: int, path: Path
) -> None:
    """Train the scenario with the public SINGD for ``steps`` steps and write the recording."""
    d_in, hidden, d_out = SCENARIOS[scenario]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))
    model = model.to(DTYPES[dtype])
    hyper = {**BASE, **MODES[mode]}
    optimizer = SINGD(
        model, **hyper, structures=structures, loss_average="batch", kfac_approx="expand"
    )
    names = dict(optimizer.module_names)  # module -> name
    layers = {name: module for module, name in names.items()}
    initial = {n: _numpy(_combined(m.weight, m.bias)) for n, m in layers.items()}
    hooks = Hooks(layers)
    generator = torch.Generator().manual_seed(1)  # verification.scenarios.loss_function's data
    recorded = []
    for _ in range(steps):
        optimizer.zero_grad()
        inputs = torch.randn((BATCH, d_in), generator=generator).to(DTYPES[dtype])
        outputs = model(inputs)
        targets = torch.randn(outputs.shape, generator=generator).to(DTYPES[dtype])
        loss = 0.5 * ((outputs - targets) ** 2).sum() / BATCH
        loss.backward()
        passes = hooks.pop()
        grads = {n: _numpy(_combined(m.weight.grad, m.bias.grad)) for n, m in layers.items()}
        optimizer.step()
        step = {}
        for name, module in layers.items():
            state = {
                "K": _numpy(optimizer.Ks[name].to_dense()),
                "C": _numpy(optimizer.Cs[name].to_dense()),
                "W": _numpy(_combined(module.weight, module.bias)),
                "m_W": _numpy(
                    _combined(
                        optimizer.state[module.weight]["momentum_buffer"],
                        optimizer.state[module.bias]["momentum_buffer"],
                    )
                ),
            }
            if name in optimizer.m_Ks:
                state["m_K"] = _numpy(optimizer.m_Ks[name].to_dense())
                state["m_C"] = _numpy(optimizer.m_Cs[name].to_dense())
            step[name] = FORMAT.PlainLayerStep(passes=passes[name], grad=grads[name], state=state)
        recorded.append(step)
    run = FORMAT.PlainRun(initial_weights=initial, steps=recorded, layers=layers)
    group = optimizer.param_groups[0]
    hyper_out = {key: group[key] for key in BASE}
    meta = {
        "model_dtype": dtype,
        "factor_dtypes": [dtype, dtype],
        "producer": f"singd {getattr(singd, '__version__', '0.0.5')} (PyPI) "
        "via scripts/record_public_singd.py",
        "singd_file": singd.__file__,
        "torch": torch.__version__,
        "scenario": scenario,
        "mode": mode,
        "exposed": all(name in EXPOSED for name in structures),
    }
    FORMAT.save_recording(
        run,
        {**hyper_out, "structures": structures, "loss_average": "batch", "kfac_approx": "expand"},
        meta,
        path,
    )


def plan() -> list[tuple[str, str, tuple[str, str], str]]:
    """Every (scenario, mode, structures, dtype) this script records by default."""
    same = [(name, name) for name in (*EXPOSED, *SHIPPED)]
    cases = [
        ("mlp", mode, pair, dtype)
        for dtype, mode, pair in itertools.product(DTYPES, MODES, [*same, *MIXED])
    ]
    wide = [(name, name) for name in EXPOSED]
    cases += [
        ("mlp-wide", mode, pair, dtype)
        for dtype, mode, pair in itertools.product(DTYPES, ("singd",), wide)
    ]
    return cases


def file_name(scenario: str, mode: str, structures: tuple[str, str], dtype: str) -> str:
    """``<scenario>_<mode>_<K>-<C>_<dtype>.npz``."""
    return f"{scenario}_{mode}_{structures[0]}-{structures[1]}_{dtype}.npz"


def main(argv: list[str] | None = None) -> int:
    """Record every case of :func:`plan` (or those whose file name contains ``--only``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "recordings" / "public")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", default="", help="record only files whose name contains this")
    args = parser.parse_args(argv)
    if Path(singd.__file__).resolve().is_relative_to(REPO):
        raise SystemExit(f"this imports the project's own singd ({singd.__file__}), not PyPI's")
    args.out.mkdir(parents=True, exist_ok=True)
    refused = {}
    for case in plan():
        name = file_name(*case)
        if args.only not in name:
            continue
        try:
            record(*case, args.steps, args.out / name)
        except NotImplementedError as error:  # the public package refuses the dtype
            refused[name] = f"{type(error).__name__}: {error}"
            print(f"refused {name}: {refused[name]}")
            continue
        print(f"wrote {args.out / name}")
    (args.out / "refused.json").write_text(json.dumps(refused, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
