"""Shared fixtures: the DAVIS 2016 sample sequences in ../shared/data/davis16 (skip when absent)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAVIS16 = REPO.parent / "shared" / "data" / "davis16"


@pytest.fixture(scope="session")
def davis16() -> Path:
    """Root of the DAVIS 2016 samples: <sequence>/JPEGImages/*.jpg, <sequence>/Annotations/*.png."""
    if not (DAVIS16 / "blackswan" / "Annotations").is_dir():
        pytest.skip(f"DAVIS 2016 sample data not found at {DAVIS16}")
    return DAVIS16


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """The shipped tiny checkpoint exported once per test session (functions form, S = 128, N = 4)."""
    from dpa.cli import main

    directory = tmp_path_factory.mktemp("tiny-export")
    assert main(["export", "--checkpoint", "tiny", "--out", str(directory)]) == 0
    return directory
