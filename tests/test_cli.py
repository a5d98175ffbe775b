"""The oracle self-check command (``singd-verify`` / ``python -m verification``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reference.structures import STRUCTURE_NAMES
from verification import cli
from verification.selfcheck import Check, format_table


def test_quick_selfcheck_passes_and_writes_json(tmp_path: Path) -> None:
    """``--quick --json``: exit 0, every check passed, every structure covered twice."""
    out = tmp_path / "selfcheck.json"
    code = cli.main(["--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    failed = [c["name"] for c in result["checks"] if not c["passed"]]
    assert code == 0, failed
    assert result["passed"] is True and result["quick"] is True
    names = " ".join(c["name"] for c in result["checks"])
    for structure in STRUCTURE_NAMES:
        assert names.count(f"[{structure}]") == 2  # Π̂ and the SINGD trajectory
    assert {"measured", "bound", "unit", "rule", "passed"} <= set(result["checks"][0])


def test_exit_code_is_one_when_a_check_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing check turns into exit code 1 and a FAIL line in the table."""
    failing = Check(name="always fails", measured=2.0, bound=1.0, unit="u", rule="r")
    monkeypatch.setattr(cli, "run_selfcheck", lambda quick, seed: [failing])
    assert cli.main([]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_lower_bound_checks_pass_at_or_above_the_bound() -> None:
    """``lower=True`` checks (the IKFAC–KFAC order) pass when measured >= bound."""
    assert Check("order", 1.0, 0.9, "slope", "r", lower=True).passed
    assert not Check("order", 0.5, 0.9, "slope", "r", lower=True).passed
    table = format_table([Check("order", 1.0, 0.9, "slope", "r", lower=True)])
    assert ">=" in table and "1/1 passed" in table
