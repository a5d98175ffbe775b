"""Step time and state bytes of the README's optimizers, with the asv benchmark's own code.

Usage: ``python scripts/optimizer_costs.py [--repeats 200] [--json PATH]``.

Runs ``asv_benches/benchmarks/optimizer.py``'s ``OptimizerStep`` directly (its
``setup``, ``time_step`` and ``track_state_bytes``; one CPU thread), without
asv: the mean of ``--repeats`` timed iterations after the two warm-up steps of
``setup`` (a mean, as asv's, so T = 10 includes one statistics step in ten),
and the exact state bytes.  ``asv run`` measures the same code with asv's
sampling.  ``--json`` writes ``{"repeats", "optimizers": {name: {"seconds",
"state_bytes"}}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "asv_benches"))

from benchmarks.optimizer import OPTIMIZERS, OptimizerStep


def measure(name: str, repeats: int) -> dict[str, float | int]:
    """Mean seconds of one iteration and the optimizer-state bytes for ``name``."""
    bench = OptimizerStep()
    bench.setup(name)
    start = time.perf_counter()
    for _ in range(repeats):
        bench.time_step(name)
    seconds = (time.perf_counter() - start) / repeats
    return {"seconds": seconds, "state_bytes": bench.track_state_bytes(name)}


def main(argv: list[str] | None = None) -> None:
    """Print one line per optimizer; optionally write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)
    results = {name: measure(name, args.repeats) for name in OPTIMIZERS}
    for name, result in results.items():
        print(f"{name:>20}: {1e3 * result['seconds']:.2f} ms, {result['state_bytes']} bytes")
    if args.json is not None:
        with open(args.json, "w") as handle:
            json.dump({"repeats": args.repeats, "optimizers": results}, handle, indent=2)


if __name__ == "__main__":
    main()
