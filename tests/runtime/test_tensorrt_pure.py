"""The TensorRT backend's decisions that need neither TensorRT nor a GPU (runtime/tensorrt_policy.py, and the
paths of runtime/tensorrt_engine.py that make them): which cuda-python pairs with the installed TensorRT, the
timing cache fallback, the CUDA device per thread, the plugin library already registered in this process.
TensorRT, cuda-python and the CUDA runtime are fakes here."""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dpa.errors import DpaError
from dpa.runtime import plugins
from dpa.runtime import tensorrt_engine as trt_engine
from dpa.runtime import tensorrt_policy as policy

REPO = Path(__file__).resolve().parents[2]


# --- cuda-python for the installed TensorRT --------------------------------------------------------------------

@pytest.mark.parametrize("distributions,debian,major", [
    ({"tensorrt-cu12": "10.3.0", "tensorrt_cu12_libs": "10.3.0", "tensorrt_cu12_bindings": "10.3.0",
      "numpy": "2.1.0"}, {}, 12),
    ({"tensorrt": "11.1.0.106", "tensorrt_cu13": "11.1.0.106", "tensorrt_cu13_libs": "11.1.0.106"}, {}, 13),
    ({"Tensorrt.CU13-Bindings": "11.1.0.106"}, {}, 13),
    # JetPack: python3-libnvinfer, CUDA from the system, named in the Debian version
    ({"tensorrt": "10.3.0"}, {"python3-libnvinfer": "10.3.0.30-1+cuda12.5", "libnvinfer10": "10.3.0.30-1+cuda12.5",
                              "libnvinfer-dev": "10.3.0.30-1+cuda12.5"}, 12),
    ({}, {"libnvinfer10": "10.13.3.9-1+cuda13.0"}, 13),
    # pip names the major: it wins over a Debian TensorRT of another CUDA
    ({"tensorrt-cu13": "10.16.0.72"}, {"python3-libnvinfer": "10.3.0.30-1+cuda12.5"}, 13),
    ({"tensorrt-cu12": "10.16.0.72", "tensorrt-cu13": "10.16.0.72"}, {}, None),  # ambiguous
    ({"tensorrt-lean-cu13": "10.16.0.72"}, {}, None),  # another module, not `tensorrt`
    ({"tensorrt": "10.3.0"}, {"python3-libnvinfer": "10.3.0.30-1"}, None),  # no +cuda in the version
    ({}, {}, None),
])
def test_tensorrt_cuda_major_from_installed_packages(distributions, debian, major):
    assert policy.tensorrt_cuda_major(distributions, debian) == major


def test_cuda_python_requirement_pairs_majors_and_matches_the_extras():
    assert policy.cuda_python_requirement(12) == "cuda-python>=12.0,<13"
    assert policy.cuda_python_requirement(13) == "cuda-python>=13.0,<14"
    assert policy.cuda_python_requirement(None) is None
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for major in policy.TENSORRT_EXTRA_CUDA_MAJORS:
        requirements = extras[f"tensorrt-cu{major}"]
        assert policy.cuda_python_requirement(major) in requirements, requirements
        assert [r for r in requirements if r.startswith("tensorrt")] == [
            r for r in requirements if r.startswith(f"tensorrt-cu{major}>=")]
    assert extras["tensorrt"] == extras["tensorrt-cu12"]  # the plain extra is the CUDA 12 pair (JetPack 6)
    assert not any(r.startswith("cuda-python") and "<" not in r for r in extras["tensorrt"])


def test_cuda_python_of_another_major_is_refused_with_the_pin():
    with pytest.raises(DpaError) as error:
        policy.check_cuda_python("13.0.1", "10.3.0.30", 12)
    assert str(error.value) == ("cuda-python 13.0.1 does not pair with TensorRT 10.3.0.30, built for CUDA 12: "
                                "pip install 'cuda-python>=12.0,<13'")
    with pytest.raises(DpaError, match=r"pip install 'cuda-python>=13\.0,<14'$"):
        policy.check_cuda_python("12.9.0", "11.1.0.106", 13)
    policy.check_cuda_python("12.9.0", "10.3.0.30", 12)
    policy.check_cuda_python("13.0.1", "11.1.0.106", 13)
    policy.check_cuda_python(None, "10.3.0.30", 12)  # no metadata: the import decides
    policy.check_cuda_python("13.0.1", "10.3.0.30", None)  # TensorRT's CUDA unknown: the driver check decides


def test_cuda_python_newer_than_the_driver_is_refused():
    with pytest.raises(DpaError) as error:
        policy.check_cuda_driver("13.0.1", 12060, None)  # JetPack 6: a CUDA 12.6 driver
    assert str(error.value) == ("cuda-python 13.0.1 needs a CUDA 13 driver, this driver supports CUDA 12.6: "
                                "pip install 'cuda-python>=12.0,<13'")
    with pytest.raises(DpaError) as error:
        policy.check_cuda_driver("13.0.1", 12080, 13)
    assert str(error.value) == ("cuda-python 13.0.1 needs a CUDA 13 driver, this driver supports CUDA 12.8: "
                                "install a driver for CUDA 13, or TensorRT and cuda-python for CUDA 12: "
                                "pip install 'dpa-edge[tensorrt-cu12]'")
    policy.check_cuda_driver("12.9.0", 12060, 12)  # minor versions: CUDA's minor-version compatibility
    policy.check_cuda_driver("12.9.0", 13000, 12)
    policy.check_cuda_driver(None, 12060, 13)


def test_install_hints_name_the_pins():
    assert policy.cuda_python_hint(12) == "pip install 'cuda-python>=12.0,<13'"
    assert "'cuda-python>=12.0,<13' for CUDA 12" in policy.cuda_python_hint(None)
    assert "'cuda-python>=13.0,<14' for CUDA 13" in policy.cuda_python_hint(None)
    assert "pip install cuda-python" not in policy.INSTALL_HINT  # never the unpinned one
    assert "'dpa-edge[tensorrt-cu12]'" in policy.INSTALL_HINT
    assert "'cuda-python>=12.0,<13'" in policy.INSTALL_HINT


def test_installed_distributions_are_normalized():
    import importlib.metadata

    distributions = trt_engine.installed_distributions()
    assert distributions["numpy"] == importlib.metadata.version("numpy")
    assert all(name == policy.normalized_name(name) for name in distributions)
    assert policy.normalized_name("tensorrt_cu13.Libs") == "tensorrt-cu13-libs"


def fake_tensorrt_install(monkeypatch, distributions, cudart=None):
    """open_tensorrt_engine sees a TensorRT 10.3 module, these Python distributions and no Debian TensorRT;
    `cudart` is what importing cuda-python gives (None: the import must not happen)."""
    def import_cudart(cuda_major):
        assert cudart is not None, "cuda-python must not be imported"
        return cudart

    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda: SimpleNamespace(__version__="10.3.0.30"))
    monkeypatch.setattr(trt_engine, "installed_distributions", lambda: distributions)
    monkeypatch.setattr(trt_engine, "installed_debian_packages", lambda: {})
    monkeypatch.setattr(trt_engine, "import_cudart", import_cudart)


def test_opening_an_engine_refuses_cuda_python_of_another_major(monkeypatch, tmp_path):
    fake_tensorrt_install(monkeypatch, {"tensorrt-cu12": "10.3.0.30", "cuda-bindings": "13.0.1",
                                        "cuda-python": "13.0.1"})
    with pytest.raises(DpaError) as error:
        trt_engine.open_tensorrt_engine(tmp_path, None, "fp32", device="cuda", cache_dir=tmp_path)
    assert str(error.value) == ("cuda-python 13.0.1 does not pair with TensorRT 10.3.0.30, built for CUDA 12: "
                                "pip install 'cuda-python>=12.0,<13'")


def test_opening_an_engine_refuses_cuda_python_newer_than_the_driver(monkeypatch, tmp_path):
    cudart = FakeCudart(driver_version=12060)
    fake_tensorrt_install(monkeypatch, {"tensorrt": "10.3.0.30", "cuda-python": "13.0.1"}, cudart)
    with pytest.raises(DpaError, match=r"^cuda-python 13\.0\.1 needs a CUDA 13 driver, this driver supports CUDA "
                                       r"12\.6: pip install 'cuda-python>=12\.0,<13'$"):
        trt_engine.open_tensorrt_engine(tmp_path, None, "fp32", device="cuda", cache_dir=tmp_path)
    assert [name for _, name, _ in cudart.calls] == ["cudaDriverGetVersion"]  # before any other CUDA call


def test_cuda_version_strings():
    assert policy.cuda_version_string(12060) == "12.6"
    assert policy.cuda_version_string(12090) == "12.9"
    assert policy.cuda_version_string(13000) == "13.0"
    assert policy.cuda_version_string(11080) == "11.8"


def test_dpkg_status_lists_installed_packages_only():
    status = ("Package: libnvinfer10\nStatus: install ok installed\nArchitecture: arm64\n"
              "Version: 10.3.0.30-1+cuda12.5\nDescription: TensorRT runtime\n continued line\n\n"
              "Package: python3-libnvinfer\nStatus: install ok installed\nVersion: 10.3.0.30-1+cuda12.5\n\n"
              "Package: libnvinfer8\nStatus: deinstall ok config-files\nVersion: 8.6.2.3-1+cuda12.2\n")
    assert policy.parse_dpkg_status(status) == {"libnvinfer10": "10.3.0.30-1+cuda12.5",
                                                    "python3-libnvinfer": "10.3.0.30-1+cuda12.5"}
    assert policy.tensorrt_cuda_major({}, policy.parse_dpkg_status(status)) == 12


@pytest.fixture
def cuda_modules():
    """A `cuda` package of our own on sys.path (the real cuda-python must not be installed); every cuda* module
    imported during the test is forgotten afterwards."""
    if policy.cuda_python_installed():
        pytest.skip("cuda-python is installed here")
    yield
    for name in [name for name in sys.modules if name == "cuda" or name.startswith("cuda.")]:
        del sys.modules[name]


def test_a_bare_cuda_namespace_package_is_not_cuda_python(cuda_modules, tmp_path, monkeypatch):
    (tmp_path / "cuda" / "core").mkdir(parents=True)  # e.g. left by cuda-core or another NVIDIA wheel
    (tmp_path / "cuda" / "core" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib.util

    assert importlib.util.find_spec("cuda") is not None  # what the old check looked at
    assert not policy.cuda_python_installed()
    with pytest.raises(DpaError) as error:
        trt_engine.import_cudart(12)
    assert str(error.value).startswith("the TensorRT backend needs cuda-python (")
    assert str(error.value).endswith("): pip install 'cuda-python>=12.0,<13'")

    (tmp_path / "cuda" / "bindings").mkdir()
    (tmp_path / "cuda" / "bindings" / "__init__.py").write_text("")
    (tmp_path / "cuda" / "bindings" / "runtime.py").write_text("MARK = 'fake cuda.bindings.runtime'\n")
    importlib.invalidate_caches()
    assert policy.cuda_python_installed()
    assert trt_engine.import_cudart(12).MARK == "fake cuda.bindings.runtime"


# --- timing cache ------------------------------------------------------------------------------------------------

class FakeBuilderConfig:
    """IBuilderConfig's timing-cache calls: create_timing_cache gives None for data it cannot read (TensorRT's
    Python API), set_timing_cache False for a cache it rejects."""

    def __init__(self, readable=(b"",), rejected=()):
        self.readable, self.rejected = readable, rejected
        self.created, self.set = [], []

    def create_timing_cache(self, data):
        self.created.append(data)
        return f"cache of {data!r}" if data in self.readable else None

    def set_timing_cache(self, cache, ignore_mismatch):
        self.set.append((cache, ignore_mismatch))
        return cache not in self.rejected


def test_timing_cache_is_used_when_tensorrt_reads_it():
    config = FakeBuilderConfig(readable=(b"good", b""))
    assert trt_engine.attach_timing_cache(config, b"good") == "cache of b'good'"
    assert config.created == [b"good"] and config.set == [("cache of b'good'", False)]


def test_unreadable_or_rejected_timing_cache_starts_an_empty_one(caplog):
    config = FakeBuilderConfig()  # create_timing_cache(b"damaged") returns None
    with caplog.at_level(logging.WARNING, logger=trt_engine.__name__):
        assert trt_engine.attach_timing_cache(config, b"damaged") == "cache of b''"
    assert config.created == [b"damaged", b""] and config.set == [("cache of b''", False)]
    assert len(caplog.records) == 1 and "starting an empty one" in caplog.records[0].getMessage()
    config = FakeBuilderConfig(readable=(b"stale", b""), rejected=("cache of b'stale'",))
    assert trt_engine.attach_timing_cache(config, b"stale") == "cache of b''"
    assert config.created == [b"stale", b""]


def test_timing_cache_failure_is_one_line_error():
    config = FakeBuilderConfig(readable=())
    with pytest.raises(DpaError) as error:
        trt_engine.attach_timing_cache(config, b"damaged")
    assert str(error.value) == ("TensorRT could not create an empty timing cache (out of memory?); see TensorRT's "
                                "messages")
    assert config.created == [b"damaged", b""]
    config = FakeBuilderConfig(readable=())
    with pytest.raises(DpaError):
        trt_engine.attach_timing_cache(config, b"")
    assert config.created == [b""]  # no cache to drop: one try


# --- the CUDA device of every thread that runs the engine ----------------------------------------------------

class FakeCudart:
    """cuda-python's runtime module on host memory: "device" buffers are host buffers, copies are memmoves, and
    every call is logged with the calling thread."""

    cudaError_t = SimpleNamespace(cudaSuccess=0)
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice="to device", cudaMemcpyDeviceToHost="to host")

    def __init__(self, driver_version=12060):
        self.driver_version = driver_version
        self.calls: list[tuple[int, str, tuple]] = []
        self.buffers: dict[int, ctypes.Array] = {}

    def _log(self, name, *arguments):
        self.calls.append((threading.get_ident(), name, arguments))

    def _allocate(self, name, nbytes):
        self._log(name, nbytes)
        buffer = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    def cudaDriverGetVersion(self):
        self._log("cudaDriverGetVersion")
        return 0, self.driver_version

    def cudaSetDevice(self, device):
        self._log("cudaSetDevice", device)
        return (0,)

    def cudaMalloc(self, nbytes):
        return self._allocate("cudaMalloc", nbytes)

    def cudaMallocHost(self, nbytes):
        return self._allocate("cudaMallocHost", nbytes)

    def cudaMemcpyAsync(self, destination, source, nbytes, kind, stream):
        self._log("cudaMemcpyAsync", kind)
        ctypes.memmove(destination, source, nbytes)
        return (0,)

    def cudaMemcpy(self, destination, source, nbytes, kind):
        self._log("cudaMemcpy", kind)
        ctypes.memmove(destination, source, nbytes)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self._log("cudaStreamSynchronize")
        return (0,)

    def cudaFree(self, pointer):
        self._log("cudaFree")
        return (0,)

    cudaFreeHost = cudaFree

    def cudaGetErrorName(self, status):
        return 0, b"cudaErrorFake"


class DoublingContext:
    """An execution context whose graph is y = 2 x, float32 (1, 4)."""

    def __init__(self):
        self.addresses = {}

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream):
        x = np.frombuffer((ctypes.c_float * 4).from_address(self.addresses["x"]), np.float32)
        np.frombuffer((ctypes.c_float * 4).from_address(self.addresses["y"]), np.float32)[:] = 2 * x
        return True


class DoublingEngine:
    num_io_tensors = 2

    def create_execution_context(self):
        return DoublingContext()

    def get_tensor_name(self, index):
        return ("x", "y")[index]

    def get_tensor_mode(self, name):
        return "input" if name == "x" else "output"

    def get_tensor_shape(self, name):
        return (1, 4)

    def get_tensor_dtype(self, name):
        return "float32"


FAKE_TENSORRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="input", OUTPUT="output"),
                                nptype=lambda dtype: np.float32)


def in_thread(function):
    """function() in a new thread -> (its result, the thread's ident); its exception is raised here."""
    result = {}

    def target():
        result["thread"] = threading.get_ident()
        try:
            result["value"] = function()
        except BaseException as error:  # re-raised in the test's thread
            result["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=30)
    if "error" in result:
        raise result["error"]
    return result["value"], result["thread"]


def test_set_device_once_in_every_thread():
    cudart = FakeCudart()
    cuda = trt_engine.Cuda(cudart, device=1)
    cuda.use_device()
    cuda.use_device()
    in_thread(lambda: (cuda.use_device(), cuda.use_device()))
    in_thread(cuda.use_device)  # a new thread, even one that reuses the ident of the finished one
    set_device = [(name, arguments) for _, name, arguments in cudart.calls]
    assert set_device == [("cudaSetDevice", (1,))] * 3


def test_runner_sets_the_device_in_the_thread_that_runs_it():
    cudart = FakeCudart()
    cuda = trt_engine.Cuda(cudart, device=1)
    runner = trt_engine.TensorRTRunner("decoder", DoublingEngine(), cuda, 0, FAKE_TENSORRT)
    opener = threading.get_ident()
    assert [(thread, name) for thread, name, _ in cudart.calls][0] == (opener, "cudaSetDevice")

    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    outputs, worker = in_thread(lambda: [runner.run(None, {"x": x}), runner.run(None, {"x": x + 1})])
    assert np.array_equal(outputs[0][0], [[2.0, 4.0, 6.0, 8.0]])
    assert np.array_equal(outputs[1][0], [[4.0, 6.0, 8.0, 10.0]])
    worker_calls = [(name, arguments) for thread, name, arguments in cudart.calls if thread == worker]
    assert worker_calls[0] == ("cudaSetDevice", (1,))  # before the first copy of that thread
    assert [call for call in worker_calls if call[0] == "cudaSetDevice"] == [("cudaSetDevice", (1,))]
    assert len(worker_calls) == 1 + 2 * 3  # per run: copy in, copy out, synchronise

    before = len(cudart.calls)
    in_thread(runner.close)  # a new thread (its ident may be the finished worker's)
    assert [name for _, name, _ in cudart.calls[before:]] == ["cudaSetDevice"] + ["cudaFree"] * 4


def test_transfers_set_the_device_in_their_thread():
    cudart = FakeCudart()
    transfer = trt_engine.CudaTransfer(trt_engine.Cuda(cudart, device=2))
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    copy, _ = in_thread(lambda: transfer.download(transfer.upload(array)))
    assert np.array_equal(copy, array)
    calls = [name for _, name, _ in cudart.calls]
    assert calls == ["cudaSetDevice", "cudaMalloc", "cudaMemcpy", "cudaMemcpy", "cudaFree"]  # freed when collected


# --- the plugin library already registered in this process -------------------------------------------------

def test_engine_reuses_the_library_this_process_registered(monkeypatch, tmp_path):
    registered = tmp_path / "earlier" / plugins.LIBRARY_NAME
    monkeypatch.setattr(plugins, "_REGISTERED_LIBRARIES", {registered: "handle"})
    monkeypatch.delenv(plugins.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(plugins, "search_locations", lambda: [tmp_path / "nowhere"])

    class NoTensorRT:
        def get_plugin_registry(self):
            raise AssertionError("the registered library must not be registered again")

    assert trt_engine.load_plugins(NoTensorRT(), None) == registered
    monkeypatch.setattr(plugins, "_REGISTERED_LIBRARIES", {})
    assert trt_engine.load_plugins(NoTensorRT(), None) is None  # nothing registered, nothing found
