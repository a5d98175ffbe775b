"""The deterministic cost tracks of one ``SINGD.step``, per structure and number of layers.

Usage: ``python scripts/step_costs.py [--json PATH]``.

Runs ``asv_benches/benchmarks/costs.py`` (``profiled_step``, ``launches``,
``host_syncs``, ``allocated_bytes``; one CPU thread) for every structure of
its ``STRUCTURES`` on stacks of 1, 2 and 4 ``nn.Linear(64, 64)`` layers:
operators launched as the CPU runs the step and as a device would (the fused
finiteness checks), host syncs and bytes allocated.  ``--json`` writes
``{structure: {layers: {"launches", "launches_device_path", "host_syncs",
"allocated_bytes"}}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "asv_benches"))

from benchmarks.costs import STRUCTURES, allocated_bytes, host_syncs, launches, profiled_step

LAYERS = (1, 2, 4)


def measure(structure: str, layers: int) -> dict[str, int]:
    """The four counts of one configuration."""
    prof = profiled_step(structure, layers)
    return {
        "launches": launches(prof),
        "launches_device_path": launches(profiled_step(structure, layers, device_path=True)),
        "host_syncs": host_syncs(prof),
        "allocated_bytes": allocated_bytes(prof),
    }


def main(argv: list[str] | None = None) -> None:
    """Print one line per structure; optionally write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {s: {str(n): measure(s, n) for n in LAYERS} for s in STRUCTURES}
    for structure, rows in results.items():
        cells = " | ".join(
            f"{r['launches']}/{r['launches_device_path']} ops, {r['host_syncs']} syncs"
            for r in rows.values()
        )
        print(f"{structure:>18}: {cells}", flush=True)
    if args.json is not None:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
