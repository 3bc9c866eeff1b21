"""Finding and loading libdpa_plugins.so (dpa.runtime.plugins) without a GPU or a built library."""

from pathlib import Path

import pytest

from dpa.errors import DpaError
from dpa.runtime import plugins


@pytest.fixture
def no_defaults(monkeypatch, tmp_path):
    """No $DPA_PLUGIN_LIBRARY and empty default locations (a real build in the checkout must not interfere)."""
    monkeypatch.delenv(plugins.ENVIRONMENT_VARIABLE, raising=False)
    empty = [tmp_path / "default-a", tmp_path / "default-b"]
    monkeypatch.setattr(plugins, "search_locations", lambda: empty)
    return empty


def test_absent_library_error_lists_locations_and_build_command(no_defaults):
    with pytest.raises(DpaError) as error:
        plugins.find_plugin_library()
    message = str(error.value)
    for location in no_defaults:
        assert str(location / "libdpa_plugins.so") in message
    assert "cmake -S" in message and "cmake --build" in message
    assert plugins.ENVIRONMENT_VARIABLE in message


def test_explicit_path_is_the_only_place_looked_at(no_defaults, tmp_path):
    (no_defaults[0]).mkdir()
    (no_defaults[0] / plugins.LIBRARY_NAME).write_bytes(b"")
    missing = tmp_path / "elsewhere"
    with pytest.raises(DpaError, match="given path") as error:
        plugins.find_plugin_library(missing)
    assert str(missing) in str(error.value)
    assert str(no_defaults[0]) not in str(error.value)


def test_finds_library_in_a_given_folder_or_file(no_defaults, tmp_path):
    library = tmp_path / "build" / plugins.LIBRARY_NAME
    library.parent.mkdir()
    library.write_bytes(b"")
    assert plugins.find_plugin_library(tmp_path / "build") == library.resolve()
    assert plugins.find_plugin_library(str(library)) == library.resolve()


def test_environment_variable_then_default_locations(no_defaults, monkeypatch, tmp_path):
    no_defaults[1].mkdir()
    (no_defaults[1] / plugins.LIBRARY_NAME).write_bytes(b"")
    assert plugins.find_plugin_library() == (no_defaults[1] / plugins.LIBRARY_NAME).resolve()

    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, str(tmp_path / "custom"))
    with pytest.raises(DpaError, match=r"\$DPA_PLUGIN_LIBRARY"):
        plugins.find_plugin_library()
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / plugins.LIBRARY_NAME).write_bytes(b"")
    assert plugins.find_plugin_library() == (tmp_path / "custom" / plugins.LIBRARY_NAME).resolve()


def test_default_locations_start_with_the_checkout_build_folder():
    assert plugins.search_locations()[0] == Path(plugins.__file__).resolve().parents[1] / "build"


def test_unloadable_file_is_a_clear_error(no_defaults, tmp_path):
    library = tmp_path / plugins.LIBRARY_NAME
    library.write_text("not a shared library")
    with pytest.raises(DpaError, match="cannot load") as error:
        plugins.load_plugin_library(library)
    assert "cmake --build" in str(error.value)


def test_tensorrt_registration_needs_the_plugin_classes(tmp_path):
    class LibraryWithoutPlugins:
        pass

    class NoTensorRT:
        def get_plugin_registry(self):
            raise AssertionError("must not reach TensorRT")

    with pytest.raises(DpaError, match="without the TensorRT plugins"):
        plugins.register_tensorrt_plugins(tmp_path / "lib.so", NoTensorRT(), LibraryWithoutPlugins())
