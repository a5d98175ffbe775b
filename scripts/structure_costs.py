"""Print the storage per structure and the time of the operations SINGD calls every step (SPEC §2).

Usage: ``python scripts/structure_costs.py [--dim 1024] [--cols 256] [--repeats 10] [--json PATH]``.

Prints a Markdown table: free entries and float32 bytes of a ``d × d`` factor,
and the median wall time (ms) of each per-step operation for a general member
``K``, a second member ``L`` and ``X`` of shape ``d × m``, in float32, after
one warm-up call, on the number of threads given (default 1).  ``--json``
also writes ``{"dim", "cols", "threads", "repeats", "structures": {name:
{"free_entries", "bytes", "seconds": {operation: median}}}}`` (what
``scripts/update_figures.py`` writes into docs/structures.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from singd.structures import STRUCTURE_NAMES, StructuredMatrix, get_structure

#: The operations of one optimizer step: (K, L, X) → anything.
OPERATIONS: dict[str, Callable[[StructuredMatrix, StructuredMatrix, torch.Tensor], object]] = {
    "K X": lambda k, ell, x: k.matmul(x),
    "Kᵀ X": lambda k, ell, x: k.t_matmul(x),
    "Π̂(KᵀXXᵀK)": lambda k, ell, x: k.project_inner(x),
    "Π̂(KᵀK)": lambda k, ell, x: k.project_self_inner(),
    "K L": lambda k, ell, x: k @ ell,
    "K += αL": lambda k, ell, x: k.add_(ell, alpha=1e-3),
    "K += vI": lambda k, ell, x: k.add_diag_(1e-3),
    "tr K": lambda k, ell, x: k.trace(),
    "max|K|": lambda k, ell, x: k.max_abs(),
}


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``call()`` over ``repeats`` calls, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_operations(
    cls: type[StructuredMatrix], dim: int, cols: int, repeats: int
) -> dict[str, float]:
    """Median seconds of every entry of :data:`OPERATIONS` (float32)."""
    generator = torch.Generator().manual_seed(0)
    factor = cls.from_dense(torch.randn(dim, dim, generator=generator))
    other = cls.from_dense(torch.randn(dim, dim, generator=generator))
    inputs = torch.randn(dim, cols, generator=generator)
    return {
        label: median_seconds(lambda op=op: op(factor, other, inputs), repeats)
        for label, op in OPERATIONS.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results")
    args = parser.parse_args()
    results: dict[str, dict[str, object]] = {}
    torch.set_num_threads(args.threads)
    print(
        f"d = {args.dim}, m = {args.cols}, float32, {args.threads} thread(s), "
        f"median of {args.repeats}, times in ms\n"
    )
    print(f"| structure | free entries | bytes (fp32) | % of dense | {' | '.join(OPERATIONS)} |")
    print(f"|---|---:|---:|---:|{'---:|' * len(OPERATIONS)}")
    for name in STRUCTURE_NAMES:
        try:
            cls = get_structure(name)
        except (ImportError, AttributeError) as error:
            print(f"| {name} | not available: {error} |")
            continue
        numel = cls.storage_numel(args.dim)
        share = 100 * numel / args.dim**2
        seconds = time_operations(cls, args.dim, args.cols, args.repeats)
        results[name] = {"free_entries": numel, "bytes": 4 * numel, "seconds": seconds}
        times = " | ".join(f"{1e3 * value:.2f}" for value in seconds.values())
        print(f"| {name} | {numel} | {4 * numel} | {share:.2f} | {times} |")
    if args.json is not None:
        settings = {"dim": args.dim, "cols": args.cols, "threads": args.threads}
        with open(args.json, "w") as handle:
            json.dump({**settings, "repeats": args.repeats, "structures": results}, handle)


if __name__ == "__main__":
    main()
