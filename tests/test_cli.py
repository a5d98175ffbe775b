"""The ``singd-verify`` command: self-check, comparison grid and the report it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reference.structures import STRUCTURE_NAMES
from verification import cli
from verification.grid import KEYS, CaseResult, EntryResult
from verification.scenarios import DTYPES, GRIDS, Case
from verification.selfcheck import Check, format_table


def test_quick_run_passes_and_writes_the_report(tmp_path: Path) -> None:
    """``--quick --out DIR``: exit 0, report.md/json written, every verdict passes."""
    extra = tmp_path / "copy.json"
    code = cli.main(["--quick", "--out", str(tmp_path), "--json", str(extra)])
    result = json.loads((tmp_path / "report.json").read_text())
    assert code == 0
    assert json.loads(extra.read_text())["passed"] is True
    assert result["passed"] is True and result["grid"] == "quick"
    assert {"torch", "numpy", "mpmath", "cpu", "date"} <= set(result["environment"])
    # Self-check: every structure covered twice (Π̂ and the SINGD trajectory).
    checks = result["selfcheck"]["checks"]
    assert all(check["passed"] for check in checks)
    names = " ".join(check["name"] for check in checks)
    for structure in STRUCTURE_NAMES:
        assert names.count(f"[{structure}]") == 2
    # Comparison: one case per dtype, every state entry within its bound, along the
    # trajectory and one step at a time.
    comparison = result["comparison"]
    assert set(comparison["summary"]) == set(DTYPES)
    for summary in comparison["summary"].values():
        assert summary["local_worst_ratio"] <= 1 and summary["local_worst_error_eps"] > 0
    for case in comparison["cases"]:
        assert case["passed"] and case["worst_ratio"] <= 1 and case["local_worst_ratio"] <= 1
        assert case["local_worst_error_eps"] > 0
        assert set(case["local_entries"]) == set(case["entries"])
        assert {"K", "C", "W", "m_W"} <= set(case["entries"]) <= set(KEYS)
        for entry in [*case["entries"].values(), *case["local_entries"].values()]:
            assert {"ratio", "error_eps", "layer", "step"} <= set(entry)
        assert case["block_worst_ratio"] <= 1 and "accumulate in" in case["model"]
    # The arithmetic model of every dtype was probed and not contradicted.
    models = result["arithmetic_models"]
    assert {model["model"]["storage"] for model in models} == set(DTYPES)
    assert all(model["passed"] and 0 < model["worst_ratio"] <= 1 for model in models)
    markdown = (tmp_path / "report.md").read_text()
    assert "Verdict: PASS" in markdown and "Tolerance rule" in markdown
    assert "one-step err/bound" in markdown and "Arithmetic model in force" in markdown
    for plot in result["plots"]:
        assert (tmp_path / plot).stat().st_size > 0
        assert f"]({plot})" in markdown


def test_exit_code_is_one_when_a_check_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A failing self-check turns into exit code 1, FAIL in the table and in report.md."""
    failing = Check(name="always fails", measured=2.0, bound=1.0, unit="u", rule="r")
    monkeypatch.setattr(cli, "run_selfcheck", lambda quick, seed: [failing])
    monkeypatch.setattr(cli, "GRIDS", {**GRIDS, "quick": lambda: GRIDS["quick"]()[:1]})
    assert cli.main(["--quick", "--out", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert "**FAIL**" in (tmp_path / "report.md").read_text()


def test_grids_are_data() -> None:
    """Quick ⊂ default in kind; default covers every dtype and structure pair; full is larger."""
    default, full = GRIDS["default"](), GRIDS["full"]()
    assert all(isinstance(case, Case) for case in default)
    assert {case.dtype for case in default} == set(DTYPES)
    assert {case.structures for case in default} == {case.structures for case in full}
    assert len(GRIDS["quick"]()) < len(default) < len(full)
    assert len(set(default)) == len(default)


def test_lower_bound_checks_pass_at_or_above_the_bound() -> None:
    """``lower=True`` checks (the IKFAC–KFAC order) pass when measured >= bound."""
    assert Check("order", 1.0, 0.9, "slope", "r", lower=True).passed
    assert not Check("order", 0.5, 0.9, "slope", "r", lower=True).passed
    table = format_table([Check("order", 1.0, 0.9, "slope", "r", lower=True)])
    assert ">=" in table and "1/1 passed" in table


def test_verdict_needs_every_check() -> None:
    """A case within two of its bounds but over the third (one-step or block) fails."""
    within = EntryResult(key="K", layer="0", step=0, ratio=0.5, error_eps=1.0)
    over = EntryResult(key="K", layer="0", step=15, ratio=2.0, error_eps=100.0)
    one_step = CaseResult(Case("mlp", "singd"), (within,), (), (over,), (), (within,), None, 0.0)
    assert one_step.worst_ratio <= 1 and not one_step.passed
    assert one_step.as_dict()["local_entries"]["K"]["ratio"] == 2.0
    block = CaseResult(Case("mlp", "singd"), (within,), (), (within,), (), (over,), None, 0.0)
    assert not block.passed and block.as_dict()["block_worst_ratio"] == 2.0
    fine = CaseResult(Case("mlp", "singd"), (within,), (), (within,), (), (within,), None, 0.0)
    assert fine.passed


def test_the_strip_plot_colours_every_scenario_of_the_default_grid() -> None:
    """One colour per scenario however many the grid has (11 made tab10's ten run out,
    a KeyError in ``singd-verify``): a ten-colour palette repeats."""
    from verification.plots import scenario_colours

    scenarios = list(dict.fromkeys(case.scenario for case in GRIDS["default"]()))
    assert len(scenarios) > 10
    colours = scenario_colours(scenarios, list(range(10)))
    assert set(colours) == set(scenarios)
