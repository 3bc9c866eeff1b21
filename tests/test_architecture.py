"""The floor plan, enforced: import-linter's contracts in pyproject.toml (layers; a torch-free runtime and ground floor)
hold for every import, function-level (lazy) imports included.

import-linter reads a package from its folder, and this repository maps `dpa.<package>` onto top-level folders
(setuptools package-dir), so the test lays the sources out as dpa/<package>/ in a temporary folder and runs
lint-imports on that copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "export", "runtime", "calibration")


def _laid_out(root: Path) -> Path:
    """A copy of the Python sources as an ordinary package tree: root/dpa/{*.py, commands/, training/, …}."""
    ignore = shutil.ignore_patterns("__pycache__", "checkpoints", "plugins", "*.md")
    shutil.copytree(REPO / "dpa", root / "dpa", ignore=ignore)
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / "dpa" / package, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    command = Path(sys.executable).with_name("lint-imports")
    if not command.is_file():
        pytest.skip("import-linter is not installed (the test extra installs it)")
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(command), str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=environment, capture_output=True, text=True, timeout=300)


def test_every_import_follows_the_floor_plan(tmp_path):
    result = _lint_imports(_laid_out(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("imported", "broken"), [
    ("from dpa.training.config import get_config", "dpa.runtime.flow -> dpa.training.config"),
    ("import torch", "dpa.runtime.flow -> torch"),
])
def test_a_lazy_import_against_the_plan_breaks_a_contract(tmp_path, imported, broken):
    """A function-level import in the runtime, upward (into training) or of torch, fails the check."""
    root = _laid_out(tmp_path)
    flow = root / "dpa" / "runtime" / "flow.py"
    flow.write_text(flow.read_text() + f"\n\ndef _lazy():\n    {imported}\n")
    result = _lint_imports(root)
    assert result.returncode != 0
    assert "1 kept, 1 broken" in result.stdout
    assert broken in result.stdout
