"""Training-step time of SINGD relative to AdamW, in one process (issue 9's measurement).

Usage: ``python scripts/step_ratio.py [--structures dense diagonal ...] [--T 1 10]
[--steps 30] [--threads 2] [--model mlp|cnn|transformer] [--json PATH]``.

Runs :func:`asv_benches/benchmarks/ratios.ratio` (models and protocol are
described there) with this project's ``singd``, or with the public package:
``/work/venv-public/bin/python scripts/step_ratio.py`` from outside the
repository root, so that ``import singd`` finds the public package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "asv_benches"))

from benchmarks.ratios import STRUCTURES, ratio


def main(argv: list[str] | None = None) -> None:
    """Print one line per configuration; optionally write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    parser.add_argument("--T", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn", "transformer"))
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for T in args.T:
        for structure in args.structures:
            result = ratio(args.model, structure, T, args.steps)
            results[f"{structure}/T={T}"] = result
            print(
                f"{args.model} {structure:>18} T={T:<2}: {result['ratio']:6.2f}× AdamW "
                f"({1e3 * result['singd_s']:.2f} ms vs {1e3 * result['adamw_s']:.2f} ms)",
                flush=True,
            )
    if args.json is not None:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "threads": args.threads, "results": results}, handle)


if __name__ == "__main__":
    main()
