"""The suite's tolerance rules: :mod:`verification.tolerances` (one source, with the derivation).

Tests import them from here so that every test module names its rules the same way.
"""

from verification.tolerances import EPS, EPS_BY_NAME, chain_bound, matmul_bound

__all__ = ["EPS", "EPS_BY_NAME", "chain_bound", "matmul_bound"]
