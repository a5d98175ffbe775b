"""Training-step time of SINGD relative to AdamW, in one process (issue 9's measurement).

Usage: ``python scripts/step_ratio.py [--structures dense diagonal ...] [--T 1 10]
[--steps 30] [--threads 2] [--model mlp|cnn|transformer] [--compile-updates] [--json PATH]``.

``--compile-updates`` measures every configuration a second time with SINGD's
parameter update compiled (:mod:`singd.optim.compiled`) and stores those
results under ``"compiled"`` (``null`` without it).

Runs :func:`asv_benches/benchmarks/ratios.ratio` (models and protocol are
described there) with this project's ``singd``, or with the public package:
``/work/venv-public/bin/python scripts/step_ratio.py`` from outside the
repository root, so that ``import singd`` finds the public package.
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
EXTRA_MODELS = ("cnn", "transformer")
EXTRA_STRUCTURES = ("diagonal", "dense")


def measure(args: argparse.Namespace, compile_updates: bool = False) -> dict[str, dict[str, float]]:
    """``model/structure/T=…`` → :func:`ratio`'s result, printed as it goes."""
    torch.set_num_threads(args.threads)
    configurations = [("mlp", s, T) for T in args.T for s in args.structures]
    if args.extra:
        configurations += [
            (m, s, T) for m in EXTRA_MODELS for T in args.T for s in EXTRA_STRUCTURES
        ]
    results = {}
    for model, structure, T in configurations:
        result = ratio(model, structure, T, args.steps, compile_updates)
        results[f"{model}/{structure}/T={T}"] = result
        print(
            f"{model:>11} {structure:>18} T={T:<2}{' compiled' if compile_updates else ''}: "
            f"{result['ratio']:6.2f}× AdamW "
            f"({1e3 * result['singd_s']:.2f} ms vs {1e3 * result['adamw_s']:.2f} ms)",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    """Print one line per configuration; optionally write the JSON.

    With ``--compare-python PY`` the same script is then run by ``PY`` from a
    temporary directory (so that its ``import singd`` is that environment's
    package, e.g. the public singd 0.0.5) and its results are stored beside
    ours under ``"compared"``; ``null`` without it.
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
    results = measure(args)
    # one compile worker: a pool of them would share the two cores with the timed steps
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    compiled = measure(args, compile_updates=True) if args.compile_updates else None
    compared = None
    if args.compare_python is not None:
        with tempfile.TemporaryDirectory() as work:
            out = Path(work) / "compared.json"
            forwarded = list(argv if argv is not None else sys.argv[1:])
            forwarded = _without_option(_without_option(forwarded, "--compare-python"), "--json")
            forwarded = [a for a in forwarded if a != "--compile-updates"]  # ours only
            command = [args.compare_python, str(Path(__file__).resolve()), *forwarded]
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own singd
            subprocess.run([*command, "--json", str(out)], cwd=work, env=env, check=True)
            compared = json.loads(out.read_text())
    if args.json is not None:
        with open(args.json, "w") as handle:
            record = {
                "threads": args.threads,
                "steps": args.steps,
                "singd": _singd_version(),
                "results": results,
                "compiled": compiled,
                "compared": compared,
            }
            json.dump(record, handle, indent=1)


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value."""
    if option not in argv:
        return argv
    index = argv.index(option)
    return argv[:index] + argv[index + 2 :]


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
