"""Finding and loading libdpa_plugins.so (dpa.runtime.plugins) without a GPU or a built library."""

import ctypes
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


def test_tensorrt_registration_needs_the_plugin_classes(fresh_process, tmp_path):
    class LibraryWithoutPlugins:
        pass

    class NoTensorRT:
        def get_plugin_registry(self):
            raise AssertionError("must not reach TensorRT")

    with pytest.raises(DpaError, match="without the TensorRT plugins"):
        plugins.register_tensorrt_plugins(tmp_path / "lib.so", NoTensorRT(), LibraryWithoutPlugins())


# --- Registering the TensorRT plugins (fake TensorRT registry and library) ------------------------------------

class FakeRegistry:
    """TensorRT's IPluginRegistry as its Python docs describe it: get_creator(type, version, plugin_namespace) is
    None for an unknown plugin; load_library returns None when any of the library's plugins is registered."""

    def __init__(self, registered=(), refuses=False):
        self.creators = set(registered)
        self.refuses = refuses
        self.loaded = []

    def get_creator(self, type, version, plugin_namespace=""):
        return f"creator {type}" if (type, version, plugin_namespace) in self.creators else None

    def load_library(self, plugin_path):
        self.loaded.append(plugin_path)
        if self.refuses or self.creators & set(plugins.TENSORRT_PLUGINS):
            return None
        self.creators |= set(plugins.TENSORRT_PLUGINS)
        return f"handle {len(self.loaded)}"


class FakeTensorRT:
    def __init__(self, version="10.3.0.30", registry=None):
        self.__version__ = version
        self.registry = registry if registry is not None else FakeRegistry()

    def get_plugin_registry(self):
        return self.registry


class FakeLibrary:
    """A ctypes handle of libdpa_plugins.so built with the TensorRT plugins; `major` None: built before the library
    recorded its TensorRT major."""

    def __init__(self, major):
        self.getCreators = lambda: None
        if major is not None:
            self.dpa_tensorrt_major = lambda: major


@pytest.fixture
def fresh_process(monkeypatch):
    """No library registered by this process yet."""
    monkeypatch.setattr(plugins, "_REGISTERED_LIBRARIES", {})


def test_plugins_register_once_per_process(fresh_process, tmp_path):
    tensorrt = FakeTensorRT()
    path = tmp_path / plugins.LIBRARY_NAME
    assert plugins.register_tensorrt_plugins(path, tensorrt, FakeLibrary(10)) == "handle 1"
    # The registry would refuse a second load_library: the second registration must not call it.
    assert plugins.register_tensorrt_plugins(path, tensorrt, FakeLibrary(10)) == "handle 1"
    assert plugins.register_tensorrt_plugins(str(path), tensorrt, FakeLibrary(10)) == "handle 1"
    assert tensorrt.registry.loaded == [str(path.resolve())]
    assert plugins.registered_plugin_library() == path.resolve()
    assert len(tensorrt.registry.creators) == 4


def test_plugins_registered_by_other_code_are_used_without_load_library(fresh_process, tmp_path):
    tensorrt = FakeTensorRT(registry=FakeRegistry(plugins.TENSORRT_PLUGINS))
    assert plugins.register_tensorrt_plugins(tmp_path / plugins.LIBRARY_NAME, tensorrt, FakeLibrary(10)) is None
    assert tensorrt.registry.loaded == []


def test_plugin_names_taken_by_another_library_are_refused(fresh_process, tmp_path):
    path = tmp_path / plugins.LIBRARY_NAME
    tensorrt = FakeTensorRT(registry=FakeRegistry([("DpaPrototypes", "1", "")]))
    with pytest.raises(DpaError) as error:
        plugins.register_tensorrt_plugins(path, tensorrt, FakeLibrary(10))
    assert str(error.value) == (f"TensorRT already has plugins named DpaPrototypes from another library in this "
                                f"process, so it cannot register {path.resolve()}; run it in a new process")
    assert tensorrt.registry.loaded == []


def test_a_second_library_path_in_one_process_is_refused(fresh_process, tmp_path):
    tensorrt = FakeTensorRT()
    first, second = tmp_path / "a" / plugins.LIBRARY_NAME, tmp_path / "b" / plugins.LIBRARY_NAME
    plugins.register_tensorrt_plugins(first, tensorrt, FakeLibrary(10))
    with pytest.raises(DpaError) as error:
        plugins.register_tensorrt_plugins(second, tensorrt, FakeLibrary(10))
    assert str(error.value) == (f"TensorRT already has the DPA plugins in this process, registered for "
                                f"{first.resolve()}, and takes them once per process: use that library, or use "
                                f"{second.resolve()} in a new process")
    assert len(tensorrt.registry.loaded) == 1


def test_a_genuine_refusal_does_not_blame_the_tensorrt_major(fresh_process, tmp_path):
    path = tmp_path / plugins.LIBRARY_NAME
    tensorrt = FakeTensorRT("11.1.0.106", FakeRegistry(refuses=True))
    with pytest.raises(DpaError) as error:
        plugins.register_tensorrt_plugins(path, tensorrt, FakeLibrary(11))
    assert str(error.value) == (f"TensorRT 11.1.0.106 refused the plugin library {path.resolve()} "
                                "(IPluginRegistry.load_library returned None although none of its plugins was "
                                "registered; TensorRT's log says why)")
    assert plugins.registered_plugin_library() is None  # not recorded: a later try calls load_library again


def test_a_library_that_registers_too_few_plugins_is_an_outdated_build(fresh_process, tmp_path):
    class PartialRegistry(FakeRegistry):
        def load_library(self, plugin_path):
            self.creators |= set(plugins.TENSORRT_PLUGINS[:2])
            return "handle"

    with pytest.raises(DpaError, match=r"did not register DpaCrossModalAttention, DpaPrototypeMemoryRead: an "
                                       r"outdated build; rebuild it with `cmake .* -DTensorRT_ROOT=/path/to/"
                                       r"TensorRT-10 "):
        plugins.register_tensorrt_plugins(tmp_path / "lib.so", FakeTensorRT(registry=PartialRegistry()),
                                          FakeLibrary(10))


@pytest.mark.parametrize("built,running", [(10, "11.1.0.106"), (11, "10.3.0.30"), (11, "10.16.0.72")])
def test_a_library_of_another_tensorrt_major_is_refused_before_load_library(fresh_process, tmp_path, built,
                                                                               running):
    path = tmp_path / plugins.LIBRARY_NAME
    tensorrt = FakeTensorRT(running)
    major = int(running.split(".")[0])
    with pytest.raises(DpaError) as error:
        plugins.register_tensorrt_plugins(path, tensorrt, FakeLibrary(built))
    assert str(error.value) == (f"{path.resolve()} was built against TensorRT {built} headers, this process runs "
                                f"TensorRT {running}; rebuild it against TensorRT {major}: "
                                f"`{plugins.tensorrt_build_command(major)}`")
    assert len(str(error.value).splitlines()) == 1
    assert tensorrt.registry.loaded == []


def test_a_library_without_a_recorded_tensorrt_major_is_refused(fresh_process, tmp_path):
    path = tmp_path / plugins.LIBRARY_NAME
    tensorrt = FakeTensorRT("10.3.0.30")
    with pytest.raises(DpaError) as error:
        plugins.register_tensorrt_plugins(path, tensorrt, FakeLibrary(None))
    assert str(error.value) == (f"{path.resolve()} records no TensorRT major version (built before "
                                "dpa_tensorrt_major existed); rebuild it against TensorRT 10.3.0.30: "
                                f"`{plugins.tensorrt_build_command(10)}`")
    assert tensorrt.registry.loaded == []


def test_library_tensorrt_major_declares_the_ctypes_signature():
    library = FakeLibrary(11)
    assert plugins.library_tensorrt_major(library) == 11
    assert library.dpa_tensorrt_major.restype is ctypes.c_int32 and library.dpa_tensorrt_major.argtypes == []
    assert plugins.library_tensorrt_major(FakeLibrary(None)) is None
    assert plugins.tensorrt_major("11.1.0.106") == 11 and plugins.tensorrt_major("10.3.0.30") == 10


def test_tensorrt_rebuild_command_forgets_the_cached_tensorrt_paths():
    repository = Path("/src/dpa")
    assert plugins.tensorrt_build_command(11, repository) == (
        "cmake -S /src/dpa -B /src/dpa/build -DTensorRT_ROOT=/path/to/TensorRT-11 -UTensorRT_INCLUDE_DIR "
        "-UTensorRT_LIBRARY && cmake --build /src/dpa/build -j")
