"""The oracle on its own: its full self-check, importing neither torch nor ``singd``.

Runs in the default suite and alone in ``tox -e oracle-mpmath14`` (no torch
installed, mpmath 1.4), where ``SINGD_ORACLE_ONLY=1`` also requires that torch
cannot be imported at all.  Every check carries its own derived bound
(:mod:`verification.selfcheck`: float64 against mpmath at 50 digits, in
multiples of eps64 scaled by size and step count, and SPEC §3's laws).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import mpmath
import pytest

from verification.selfcheck import run_selfcheck

ORACLE_ONLY = os.environ.get("SINGD_ORACLE_ONLY") == "1"


def test_full_selfcheck_passes() -> None:
    """All 33 checks of ``singd-verify``'s self-check hold under this mpmath."""
    checks = run_selfcheck()
    assert len(checks) == 33
    failed = [(check.name, check.measured, check.bound) for check in checks if not check.passed]
    assert failed == [], (mpmath.__version__, failed)


def test_selfcheck_imports_neither_torch_nor_singd() -> None:
    """In a fresh interpreter, the self-check loads the oracle and numpy, scipy, mpmath only."""
    probe = (
        "import sys; import verification.selfcheck; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'singd'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(not ORACLE_ONLY, reason="only in the torch-free env (SINGD_ORACLE_ONLY=1)")
def test_torch_is_absent() -> None:
    """The oracle-only environment really has no torch (else the check above proves little)."""
    assert importlib.util.find_spec("torch") is None
