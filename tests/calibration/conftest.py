"""Shared fixtures: the shipped tiny checkpoint exported once, and its fp16/int8 variants calibrated once."""

from __future__ import annotations

import pytest

from dpa.cli import main

CALIBRATION_CLIP = "synthetic:7"  # seeds 7 (calibration) and 11 (comparison) are different clips


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """`dpa export --checkpoint tiny` (S 128, N 4, functions form) into a temporary folder."""
    out = tmp_path_factory.mktemp("calibration") / "export"
    assert main(["export", "--checkpoint", "tiny", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def calibrated(tiny_export):
    """tiny_export with feeds/, fp16/ and int8/ from `dpa calibrate` on a 5-frame synthetic clip."""
    code = main(["calibrate", str(tiny_export), "--frames", CALIBRATION_CLIP, "--synthetic-length", "5",
                 "--threads", "2"])
    assert code == 0
    return tiny_export
