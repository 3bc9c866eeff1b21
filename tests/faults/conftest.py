"""Fixtures of the fault-injection suite."""

import shutil

import pytest


@pytest.fixture
def tiny_export_copy(tiny_export, tmp_path):
    """A private copy of the tiny export, for tests that write into it (variants) or change it."""
    return shutil.copytree(tiny_export, tmp_path / "tiny-export")
