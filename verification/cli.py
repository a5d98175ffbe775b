"""``singd-verify``: the oracle self-check as a command (``python -m verification``).

Prints :func:`verification.selfcheck.format_table` and exits 0 iff every
check passes; ``--json PATH`` also writes the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from verification.selfcheck import format_table, run_selfcheck


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        prog="singd-verify",
        description=(
            "Self-check of the SINGD oracle: float64 against mpmath(50) for every "
            "structure, the IKFAC fixed point and order against KFAC, and the "
            "Fisher identities, each against a derived bound."
        ),
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="default mode only in the trajectory checks"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the self-check; return 0 iff every check passes.

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when None).
    """
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    checks = run_selfcheck(quick=args.quick, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(format_table(checks))
    print(f"({elapsed:.1f} s{', quick' if args.quick else ''})")
    passed = all(check.passed for check in checks)
    if args.json is not None:
        result = {
            "passed": passed,
            "quick": args.quick,
            "seed": args.seed,
            "seconds": elapsed,
            "checks": [check.as_dict() for check in checks],
        }
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
