"""`dpa export` and `dpa check` from the command line: files, manifest, JSON report, exit codes, user errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from dpa.cli import main
from dpa.files import file_sha256
from dpa.training.checkpoint import save_checkpoint
from dpa.training.config import get_config

SIZE, MEMORY = 64, 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint with a trained network's gain (calibrated untrained weights)."""
    from dpa.export.untrained import calibrated_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored below: a global setting must not leak into the tests that follow
    try:
        config = get_config("tiny", size=SIZE, memory=MEMORY)
        path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
        save_checkpoint(path, calibrated_model(config)[0], config, step=7)
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("export")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--form", "all"]) == 0
    return out


@pytest.mark.slow
def test_export_writes_graphs_and_manifest(exported, checkpoint, capsys):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["checkpoint"] == {"path": str(checkpoint.resolve()), "sha256": file_sha256(checkpoint),
                                      "random_init": False, "init": "checkpoint", "seed": None, "step": 7,
                                      "calibration": None}
    assert manifest["forms"] == ["functions", "plugin", "portable"] and manifest["form"] == "all"
    for graph in manifest["graphs"].values():
        assert all((exported / file).is_file() for file in graph["files"].values())
        assert sum(graph["custom_nodes"]["plugin"].values()) > 0


@pytest.mark.slow
def test_check_reports_json_and_exit_code(exported, checkpoint, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code = main(["check", str(exported), "--checkpoint", str(checkpoint), "--frames", "2", "--clip-length", "4",
                 "--threads", "1", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert code == (0 if report["ok"] else 1)
    assert set(report) >= {"ok", "outputs", "probability_max_abs", "frames", "clip", "reference_frames"}
    assert report["frames"] == [0, 3] and report["clip"]["length"] == 4
    assert all(set(o) >= {"max_abs", "cosine"} for o in report["outputs"].values())
    assert report["probability_max_abs"] == report["outputs"]["decoder/probability"]["max_abs"]
    assert "decoder/probability" in capsys.readouterr().out
    # The probability bound: max(1e-4, twice PyTorch fp32's own distance to the float64 evaluation).
    rounding = report["float64"]["pytorch_fp32"]["max_abs"]
    assert 0 < rounding == report["tolerances"]["probability_fp32_rounding"]
    assert report["tolerances"]["probability_max_abs"] == max(1e-4, 2 * rounding)
    assert report["outputs"]["decoder/probability"]["ok"] == (report["probability_max_abs"] <= max(1e-4, 2 * rounding))


@pytest.mark.slow
def test_check_fails_on_a_wrong_graph(exported, checkpoint, tmp_path, capsys):
    """A decoder whose fusion weights were altered by 1 % is caught: exit code 1."""
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    model = onnx.load(broken / "decoder.onnx")
    weight = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.01), weight.name))
    onnx.save(model, broken / "decoder.onnx")
    arguments = ["check", str(broken), "--checkpoint", str(checkpoint), "--frames", "1", "--clip-length", "3",
                 "--threads", "1"]
    assert main(arguments) == 1  # the manifest's sha256 no longer matches: refused before running
    assert "decoder.onnx is not the file that was exported" in capsys.readouterr().err
    # an export whose manifest vouches for a wrong graph (the hash recorded after the change) is caught numerically
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["graphs"]["decoder"]["sha256"]["decoder.onnx"] = file_sha256(broken / "decoder.onnx")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    report_path = tmp_path / "report.json"
    assert main([*arguments, "--json", str(report_path)]) == 1
    assert not json.loads(report_path.read_text())["isolated"]["decoder/probability"]["ok"]


@pytest.mark.slow
def test_check_refuses_other_weights_and_the_plugin_form(exported, tmp_path, capsys):
    other = tmp_path / "other.pt"
    config = get_config("tiny", size=SIZE, memory=MEMORY)
    from dpa.training.model import build_model

    save_checkpoint(other, build_model(config, seed=1), config)
    assert main(["check", str(exported), "--checkpoint", str(other)]) == 1
    assert "not the ones the graphs were exported from" in capsys.readouterr().err
    plugin_only = tmp_path / "plugin"
    plugin_only.mkdir()
    manifest = json.loads((exported / "manifest.json").read_text())
    manifest["forms"] = ["plugin"]
    (plugin_only / "manifest.json").write_text(json.dumps(manifest))
    assert main(["check", str(plugin_only)]) == 1
    assert "ONNX Runtime cannot run" in capsys.readouterr().err


def test_user_errors_exit_1_with_one_line(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpa check: error:") and "manifest.json" in err and len(err.splitlines()) == 1
    assert main(["export", "--config", "tiny", "--out", str(tmp_path), "--form", "onnx"]) == 1
    assert "unknown form" in capsys.readouterr().err
    assert main(["export", "--config", "tiny", "--size", "70", "--out", str(tmp_path)]) == 1
    assert "multiple of 32" in capsys.readouterr().err


def test_config_must_match_the_checkpoint(tmp_path, capsys):
    config = get_config("paper-ii", width=0.125, size=SIZE)
    from dpa.training.model import build_model

    path = save_checkpoint(tmp_path / "ii.pt", build_model(config), config)
    assert main(["export", "--checkpoint", str(path), "--config", "tiny", "--out", str(tmp_path / "out")]) == 1
    assert "does not match the checkpoint" in capsys.readouterr().err


def test_chain_and_frames_import_without_torch():
    """The chaining helper is for the torch-free runtime."""
    code = (
        "import sys\n"
        "import dpa.runtime.chain, dpa.export.frames\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
