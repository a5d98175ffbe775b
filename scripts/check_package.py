"""Build the sdist and the wheel, install each in a fresh venv, and smoke-test it there.

Usage (what ``tox -e package`` runs)::

    python scripts/check_package.py [--work DIR]

``python -m build`` writes ``singd_verified-<version>.tar.gz`` and
``singd_verified-<version>-py3-none-any.whl`` into ``DIR/dist``; for each
artifact a new venv (no system site-packages) gets it with ``-c
constraints.txt`` (torch 2.13.0) and then, from a directory outside the source
tree (so nothing is imported from the checkout), :data:`SMOKE` runs: the
distribution is ``singd-verified``, the import name ``singd``, the
packages come from the venv, one SINGD step moves the weights, the oracle's
self-check passes, and both console scripts answer ``--help``.  Exit status 0
iff both artifacts pass.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "singd-verified"

#: Run by the venv's interpreter, in an empty directory.
SMOKE = """
import importlib.metadata as md, pathlib, sys
import torch
import reference, singd, verification
from singd import SINGD
from verification.selfcheck import run_selfcheck

assert md.version("singd-verified") == "{version}", md.version("singd-verified")
assert md.distribution("singd-verified").metadata["Name"] == "singd-verified"
prefix = pathlib.Path(sys.prefix).resolve()
for module in (singd, reference, verification):
    assert prefix in pathlib.Path(module.__file__).resolve().parents, module.__file__
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
before = model.weight.detach().clone()
opt = SINGD(model, lr=0.1, T=1, structures=("diagonal", "dense"))
model(torch.randn(4, 3)).square().mean().backward()
opt.step()
assert opt.steps == 1 and not torch.equal(before, model.weight)
checks = run_selfcheck(quick=True)
assert checks and all(check.passed for check in checks), [c.name for c in checks if not c.passed]
print("smoke test passed:", singd.__file__)
"""


def run(command: list[str], cwd: Path | None = None) -> None:
    """Run ``command`` (echoed), raising on a non-zero exit."""
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, check=True)


def version() -> str:
    """The version in ``pyproject.toml``."""
    match = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    if match is None:
        raise ValueError("no version in pyproject.toml")
    return match.group(1)


def check_artifact(artifact: Path, work: Path) -> None:
    """Install ``artifact`` into a fresh venv under ``work`` and run :data:`SMOKE` there."""
    env = work / ("venv-wheel" if artifact.suffix == ".whl" else "venv-sdist")
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    python = env / "bin" / "python"
    run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            str(artifact),
        ]
    )
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    run([str(python), "-c", SMOKE.format(version=version())], cwd=empty)
    for script in ("singd-verify", "singd-verify-recording"):
        run([str(env / "bin" / script), "--help"], cwd=empty)


def main(argv: list[str] | None = None) -> int:
    """Build both artifacts and check each; exit 1 if one is missing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch directory")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="singd-package-"))
    work.mkdir(parents=True, exist_ok=True)
    dist = work / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)])
    stem = DISTRIBUTION.replace("-", "_") + "-" + version()
    artifacts = [dist / f"{stem}.tar.gz", dist / f"{stem}-py3-none-any.whl"]
    missing = [a.name for a in artifacts if not a.exists()]
    if missing:
        print("missing artifacts:", missing, "found:", sorted(p.name for p in dist.iterdir()))
        return 1
    for artifact in artifacts:
        check_artifact(artifact, work)
    print("package check passed:", ", ".join(a.name for a in artifacts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
