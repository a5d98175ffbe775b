"""Training-step time of SINGD relative to AdamW, in one process (issue 9's measurement).

Usage: ``python scripts/step_ratio.py [--structures dense diagonal ...] [--T 1 10]
[--steps 30] [--threads 2] [--model mlp|cnn|transformer] [--compile-updates] [--json PATH]``.

``--compile-updates`` measures every configuration a second time with SINGD's
parameter update compiled (:mod:`singd.optim.compiled`) and stores those
results under ``"compiled"`` (``null`` without it).

Runs :func:`asv_benches/benchmarks/ratios.ratio` (models and protocol are
described there) with this project's ``singd``.  ``--compare-python PY`` loads
the ``singd`` that ``PY`` imports (the public package, in its own environment)
into this process under its own module objects (:func:`load_rival`), and times
it in the same windows as ours and AdamW; the script also runs as is under
the public package's Python (from outside the repository root, so that
``import singd`` finds that package).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "asv_benches"))

from benchmarks.ratios import STRUCTURES, ratio

#: The second table's models and structures (issue 9: also a small CNN and a transformer block).
EXTRA_MODELS = ("cnn", "transformer", "transformer-linear")
EXTRA_STRUCTURES = ("diagonal", "dense")


def measure(
    args: argparse.Namespace,
    compile_updates: bool = False,
    rival: type[torch.optim.Optimizer] | None = None,
) -> dict[str, dict[str, float]]:
    """``model/structure/T=…`` → :func:`ratio`'s result, printed as it goes."""
    torch.set_num_threads(args.threads)
    configurations = [("mlp", s, T) for T in args.T for s in args.structures]
    if args.extra:
        configurations += [
            (m, s, T) for m in EXTRA_MODELS for T in args.T for s in EXTRA_STRUCTURES
        ]
    results = {}
    for model, structure, T in configurations:
        result = ratio(model, structure, T, args.steps, compile_updates, rival)
        results[f"{model}/{structure}/T={T}"] = result
        versus = (
            ""
            if rival is None
            else f"; public {result['rival_ratio']:6.2f}×, ours / public {result['vs_rival']:.3f}"
        )
        print(
            f"{model:>11} {structure:>18} T={T:<2}{' compiled' if compile_updates else ''}: "
            f"{result['ratio']:6.2f}× AdamW "
            f"({1e3 * result['singd_s']:.2f} ms vs {1e3 * result['adamw_s']:.2f} ms){versus}",
            flush=True,
        )
    return results


def load_rival(python: str) -> tuple[type[torch.optim.Optimizer], str]:
    """The ``SINGD`` class of the ``singd`` that ``python`` imports, loaded in this process.

    Its directory is asked of ``python`` (run from a temporary directory, without
    ``PYTHONPATH``, so it finds its own package); ``sys.modules`` is emptied of
    this project's ``singd`` while that one is imported from there, then restored,
    so each package's modules keep their own globals.  The directory is appended
    to ``sys.path``: the rival's other dependencies (einops, …) resolve there,
    torch stays this process's (the same version is required).  Returns the class
    and ``"<name> <version>"``.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import os, torch, singd; "
        "print(os.path.dirname(os.path.dirname(singd.__file__))); print(torch.__version__)"
    )
    with tempfile.TemporaryDirectory() as work:
        found = subprocess.run(
            [python, "-c", probe], cwd=work, env=env, check=True, capture_output=True, text=True
        ).stdout.split()
    site, torch_version = found[0], found[1]
    if torch_version != torch.__version__:
        raise SystemExit(f"{python} has torch {torch_version}, this process {torch.__version__}")
    ours = {k: m for k, m in sys.modules.items() if k == "singd" or k.startswith("singd.")}
    for key in ours:
        del sys.modules[key]
    sys.path.insert(0, site)
    try:
        rival = importlib.import_module("singd.optim.optimizer").SINGD
    finally:
        sys.path.remove(site)
        sys.path.append(site)
        for key in [k for k in sys.modules if k == "singd" or k.startswith("singd.")]:
            del sys.modules[key]
        sys.modules.update(ours)
    version = next(
        (
            f"singd {d.version}"
            for d in importlib.metadata.distributions(path=[site])
            if d.metadata["Name"] == "singd"
        ),
        "singd (unknown version)",
    )
    return rival, version


def main(argv: list[str] | None = None) -> None:
    """Print one line per configuration; optionally write the JSON.

    With ``--compare-python PY`` that environment's ``singd`` (e.g. the public
    singd 0.0.5) is timed in the same windows (:func:`load_rival`): each result
    then holds ``rival_ratio`` and ``vs_rival``, and ``"compared"`` names the
    package (``null`` without it).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    parser.add_argument("--T", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-extra",
        dest="extra",
        action="store_false",
        help="only the MLP (not the CNN and the transformer block)",
    )
    parser.add_argument("--compare-python", metavar="PY", default=None)
    parser.add_argument("--compile-updates", action="store_true")
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)
    rival, rival_name = (None, None)
    if args.compare_python is not None:
        rival, rival_name = load_rival(args.compare_python)
    results = measure(args, rival=rival)
    # one compile worker: a pool of them would share the two cores with the timed steps
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    compiled = measure(args, compile_updates=True) if args.compile_updates else None
    if args.json is not None:
        with open(args.json, "w") as handle:
            record = {
                "threads": args.threads,
                "steps": args.steps,
                "singd": _singd_version(),
                "results": results,
                "compiled": compiled,
                "compared": rival_name,
            }
            json.dump(record, handle, indent=1)


def _singd_version() -> str:
    """Which ``singd`` this process imported: this project or another distribution."""
    import singd

    for dist in ("singd-verified", "singd"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist == "singd-verified" or "site-packages" in singd.__file__:
            return f"{dist} {version}"
    return "singd (unknown version)"


if __name__ == "__main__":
    main()
