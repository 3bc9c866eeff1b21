"""Artefact integrity (issue 13, guarantee 3): the manifest's sha256 of every graph file is checked when an
engine opens it, and a variant made from other fp32 graphs than its parent holds now is refused."""

import json
import shutil

from fault_support import assert_one_error_line, run_dpa


def _run(export, *extra):
    return run_dpa("run", "test://ball?frames=3&width=96&height=64", "null://", "--export", str(export),
                   "--backend", "onnxruntime", *extra)


def test_the_manifest_records_every_graph_files_sha256(tiny_export):
    from dpa.files import file_sha256

    manifest = json.loads((tiny_export / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        assert graph["sha256"] == {file: file_sha256(tiny_export / file) for file in graph["bytes"]}


def test_a_graph_changed_after_export_is_refused(tiny_export_copy):
    assert _run(tiny_export_copy).code == 0
    decoder = json.loads((tiny_export_copy / "manifest.json").read_text())["graphs"]["decoder"]["file"]
    path = tiny_export_copy / decoder
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last initializer
    path.write_bytes(bytes(data))
    assert_one_error_line(_run(tiny_export_copy), decoder, "not the file that was exported", "re-export")


def test_a_variant_older_than_its_parent_is_refused(tiny_export_copy, tmp_path):
    calibrated = run_dpa("calibrate", str(tiny_export_copy), "--frames", "synthetic:1", "--precisions", "fp16")
    assert calibrated.code == 0, calibrated.stderr[-3000:]
    assert _run(tiny_export_copy, "--precision", "fp16").code == 0
    kept = shutil.copytree(tiny_export_copy / "fp16", tmp_path / "old-fp16")
    # the parent is re-exported with other weights; the old variant is put back by hand
    assert run_dpa("export", "--config", "tiny", "--out", str(tiny_export_copy), "--overwrite").code == 0
    shutil.copytree(kept, tiny_export_copy / "fp16")
    assert_one_error_line(_run(tiny_export_copy, "--precision", "fp16"), "calibrated from other fp32 graphs",
                          "dpa calibrate")
