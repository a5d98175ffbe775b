"""One oracle comparison as a number for the performance history (``asv_benches``).

Usage: ``python -m verification.track STRUCTURE DTYPE`` prints one JSON line,
``{"error_eps", "ratio", "passed"}``, for :class:`Case` ``("mlp", "singd",
(STRUCTURE, STRUCTURE), DTYPE, steps=6)`` run through :func:`run_case`: the
largest deviation from the float64 oracle over the trajectory in units of
``eps · max|entry|`` and the largest ``error / bound`` of its checks.  The asv
benchmark runs it in a subprocess, so ``asv_benches`` imports only singd and
torch (the oracle's independence rule, README "Layout").
"""

from __future__ import annotations

import argparse
import json

from verification.grid import run_case
from verification.scenarios import Case

#: Steps of the tracked case (the quick grid's length).
STEPS = 6


def tracked_error(structure: str, dtype: str) -> dict[str, float | bool]:
    """Trajectory error in eps and worst error/bound of the tracked case."""
    result = run_case(Case("mlp", "singd", (structure, structure), dtype, steps=STEPS))
    worst = max(result.worst_ratio, result.local_worst_ratio, result.block_worst_ratio)
    return {"error_eps": result.worst_error_eps, "ratio": worst, "passed": result.passed}


def main(argv: list[str] | None = None) -> None:
    """Print the tracked numbers of one structure and dtype as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("structure")
    parser.add_argument("dtype", choices=("float64", "float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    print(json.dumps(tracked_error(args.structure, args.dtype)))


if __name__ == "__main__":
    main()
