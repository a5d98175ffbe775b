"""Tracked oracle error: how far SINGD is from the float64 oracle, per structure and dtype.

``track_error_eps`` is the largest trajectory deviation of a 6-step MLP run
from the oracle in units of ``eps · max|entry|`` (``python -m
verification.track``, run in a subprocess so this package imports only singd
and torch); ``track_bound_ratio`` the largest ``error / bound`` of its checks
(above 1 is a failed verification).  Deterministic on one machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

STRUCTURES = ("dense", "diagonal", "block3diagonal", "hierarchical2_3", "triltoeplitz")
DTYPES = ("float32", "bfloat16")


def _tracked(structure: str, dtype: str) -> dict[str, float]:
    command = [sys.executable, "-m", "verification.track", structure, dtype]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.splitlines()[-1])


class OracleError:
    """One subprocess per (structure, dtype), run once (``setup_cache``) for both tracks."""

    params = (list(STRUCTURES), list(DTYPES))
    param_names = ("structure", "dtype")
    timeout = 600.0

    def setup_cache(self) -> dict[str, dict[str, float]]:
        return {f"{s}/{d}": _tracked(s, d) for s in STRUCTURES for d in DTYPES}

    def track_error_eps(
        self, cache: dict[str, dict[str, float]], structure: str, dtype: str
    ) -> float:
        return cache[f"{structure}/{dtype}"]["error_eps"]

    track_error_eps.unit = "eps"

    def track_bound_ratio(
        self, cache: dict[str, dict[str, float]], structure: str, dtype: str
    ) -> float:
        return cache[f"{structure}/{dtype}"]["ratio"]

    track_bound_ratio.unit = "error/bound"
