"""The oracle never imports torch or singd (it must stay independent of the product)."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import importlib, json, pkgutil, sys
import reference
names = [m.name for m in pkgutil.walk_packages(reference.__path__, "reference.")]
for name in names:
    importlib.import_module(name)
forbidden = sorted(
    m for m in sys.modules if m.split(".")[0] in ("torch", "singd", "verification")
)
print(json.dumps({"imported": names, "forbidden": forbidden}))
"""


def test_reference_imports_neither_torch_nor_singd() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "reference.numbers" in report["imported"]
    assert "reference.structures" in report["imported"]
    assert report["forbidden"] == []
