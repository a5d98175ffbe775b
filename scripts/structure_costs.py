"""Print the storage per structure and the time of ``Π̂(Kᵀ X Xᵀ K)`` (SPEC §2).

Usage: ``python scripts/structure_costs.py [--dim 1024] [--cols 256] [--repeats 10]``.

Prints a Markdown table: free entries and float32 bytes of a ``d × d`` factor,
and the median wall time of :meth:`StructuredMatrix.project_inner` for a
general member ``K`` and ``X`` of shape ``d × m`` in float32, after one
warm-up call, on the number of threads given (default 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from singd.structures import STRUCTURE_NAMES, StructuredMatrix, get_structure


def time_project_inner(cls: type[StructuredMatrix], dim: int, cols: int, repeats: int) -> float:
    """Median seconds of ``K.project_inner(X)`` over ``repeats`` calls (float32)."""
    generator = torch.Generator().manual_seed(0)
    factor = cls.from_dense(torch.randn(dim, dim, generator=generator))
    inputs = torch.randn(dim, cols, generator=generator)
    factor.project_inner(inputs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        factor.project_inner(inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"d = {args.dim}, m = {args.cols}, float32, {args.threads} thread(s), "
        f"median of {args.repeats}\n"
    )
    print("| structure | free entries | bytes (fp32) | % of dense | Π̂(Kᵀ X Xᵀ K) [ms] |")
    print("|---|---:|---:|---:|---:|")
    for name in STRUCTURE_NAMES:
        try:
            cls = get_structure(name)
        except (ImportError, AttributeError) as error:
            print(f"| {name} | — | — | — | not available: {error} |")
            continue
        numel = cls.storage_numel(args.dim)
        share = 100 * numel / args.dim**2
        seconds = time_project_inner(cls, args.dim, args.cols, args.repeats)
        print(f"| {name} | {numel} | {4 * numel} | {share:.2f} | {1e3 * seconds:.2f} |")


if __name__ == "__main__":
    main()
