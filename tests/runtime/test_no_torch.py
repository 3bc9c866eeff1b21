"""`dpa.runtime` must not import torch: Jetson deployments often have no PyTorch."""

import pkgutil
import subprocess
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


def test_runtime_modules_import_without_torch():
    modules = ["dpa.runtime"] + [m.name for m in pkgutil.walk_packages([str(RUNTIME)], prefix="dpa.runtime.")]
    assert len(modules) >= 4, modules  # flow, preprocess, plugins, and the package itself
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(len(loaded)); assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "0"
