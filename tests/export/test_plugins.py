"""libdpa_plugins.so: the CMake build on a CPU machine, the CUDA kernels against the NumPy reference on a GPU,
and the TensorRT plugins in a tiny network (export/plugins/README.md)."""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dpa.export import reference
from dpa.runtime import plugins

REPO = Path(__file__).resolve().parents[2]
FLOAT32_TOLERANCE = 1e-5  # max |kernel - reference| / max |reference|
# float16 I/O: inputs are exact in the reference (it reads the same float16 values), the internals are float32,
# so the error is the rounding of the output to float16 (2^-11 relative) plus float32 accumulation: 2e-3.
FLOAT16_TOLERANCE = 2e-3


def cuda_available() -> bool:
    return torch.cuda.is_available()


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@dataclass
class Build:
    directory: Path
    configure_output: str
    library: Path


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Build:
    """Configure and build the library with CMake into a temporary folder (for this machine's GPU if any)."""
    cmake, nvcc = shutil.which("cmake"), find_nvcc()
    if cmake is None:
        pytest.skip("cmake not found")
    if nvcc is None:
        pytest.skip("the CUDA compiler nvcc was not found (CUDA toolkit needed to build the kernels)")
    directory = tmp_path_factory.mktemp("dpa-plugins-build")
    configure = [cmake, "-S", str(REPO), "-B", str(directory), f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    if cuda_available():  # this GPU only: faster, and it may be outside the default list
        major, minor = torch.cuda.get_device_capability()
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}")
    result = subprocess.run(configure, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = subprocess.run(
        [cmake, "--build", str(directory), "-j", str(os.cpu_count() or 2)], capture_output=True, text=True, timeout=900
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    return Build(directory, result.stdout, directory / plugins.LIBRARY_NAME)


@pytest.fixture(scope="module")
def library(build) -> ctypes.CDLL:
    return plugins.load_plugin_library(build.directory)


@pytest.mark.slow
def test_cmake_build_reports_what_it_built(build, library):
    report = [line for line in build.configure_output.splitlines() if "dpa_plugins:" in line]
    assert any("CUDA kernels: built" in line for line in report), report
    tensorrt_line = next(line for line in report if "TensorRT plugin classes" in line)
    symbols = ["dpa_abi_version", "dpa_status_string", "dpa_last_cuda_error"]
    for op in ("prototypes", "prototype_correlation", "cross_modal_attention", "prototype_memory_read"):
        symbols += [f"dpa_{op}", f"dpa_{op}_workspace_size"]
    assert all(hasattr(library, symbol) for symbol in symbols)
    built = "TensorRT plugin classes: built against TensorRT" in tensorrt_line
    assert built or "TensorRT plugin classes: skipped (" in tensorrt_line  # skipped, with the reason
    assert plugins.has_tensorrt_plugins(library) == built
    assert hasattr(library, "setLoggerFinder") == built
    assert hasattr(library, "dpa_tensorrt_major") == built
    if built:  # the major of the headers CMake reported, e.g. "built against TensorRT 10.3.0 (...)"
        major = int(re.search(r"built against TensorRT (\d+)\.", tensorrt_line).group(1))
        assert plugins.library_tensorrt_major(library) == major
    # The statically linked CUDA runtime is not re-exported.
    assert not hasattr(library, "cudaMalloc")


@pytest.mark.slow
def test_c_abi_checks_arguments_without_touching_the_gpu(library):
    assert library.dpa_abi_version() == plugins.ABI_VERSION
    assert library.dpa_status_string(2) == b"workspace too small"
    needed = library.dpa_prototype_memory_read_workspace_size(2, 128, 1024, 4, 128)
    assert needed >= 4 * 2 * (2 * 128 * 128 + 128 * 4 * 128 + 128 + 1024)  # query, read, weights, norms (float32)
    assert library.dpa_prototypes_workspace_size(1, 0, 16) == 0  # invalid sizes
    fake = ctypes.c_void_p(256)  # never dereferenced: every check below fails before a launch
    assert library.dpa_prototypes(None, fake, 1, 16, 64, 0, fake, 1 << 20, None) == 1  # NULL input
    assert library.dpa_prototypes(fake, fake, 1, 16, 64, 7, fake, 1 << 20, None) == 1  # unknown dtype
    assert library.dpa_prototypes(fake, fake, 1, 16, 64, 0, fake, 0, None) == 2  # workspace too small
    assert library.dpa_prototype_correlation(fake, fake, 1, 16, 64, 0.0, 0, fake, 1 << 20, None) == 1  # epsilon 0
    assert library.dpa_prototypes(None, None, 0, 16, 64, 0, None, 0, None) == 0  # batch 0: nothing to do


def test_plugin_creators_agree_with_the_op_specs_and_the_sources():
    """The (name, version, namespace) the runtime asks TensorRT's registry for are the exported ops' and those
    getCreators() hands TensorRT; the library records its TensorRT major where the plugins are compiled."""
    assert list(plugins.TENSORRT_PLUGINS) == [(spec.name, spec.version, spec.namespace)
                                              for spec in reference.OP_SPECS.values()]
    source = (REPO / "export" / "plugins" / "dpa_plugins.cpp").read_text()
    assert re.findall(r'\{"(Dpa\w+)", \d', source) == [name for name, *_ in plugins.TENSORRT_PLUGINS]
    assert 'kPluginVersion = "1";' in source and 'kPluginNamespace = "";' in source
    assert re.search(r"int32_t dpa_tensorrt_major\(void\)\s*\{\s*return NV_TENSORRT_MAJOR;\s*\}", source)
    header = (REPO / "export" / "plugins" / "dpa_plugins.h").read_text()
    assert "DPA_API int32_t dpa_tensorrt_major(void);" in header


# --- GPU: the kernels against the NumPy reference ------------------------------------------------------------

gpu = pytest.mark.skipif(not cuda_available(), reason="needs an NVIDIA GPU and PyTorch with CUDA")


def load_benchmark_module():
    """benchmarks/plugin_kernels.py (KernelRunner, the ctypes calls on torch CUDA tensors)."""
    spec = importlib.util.spec_from_file_location("plugin_kernels", REPO / "benchmarks" / "plugin_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runner(library):
    return load_benchmark_module().KernelRunner(library)


def relative_error(actual: torch.Tensor | np.ndarray, expected: np.ndarray) -> float:
    actual = torch.as_tensor(actual).detach().cpu().double().numpy()
    assert np.isfinite(actual).all()
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def input_array(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float64 inputs of a KINDS kind: standard normal, "zero_channels" (every third row of axis 1 zero) or
    "large" (uniform in [-1e4, 1e4])."""
    rng = np.random.default_rng(seed)
    array = rng.uniform(-1e4, 1e4, shape) if kind == "large" else rng.standard_normal(shape)
    if kind == "zero_channels":
        array[:, ::3] = 0.0
    return array


def make_inputs(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.from_numpy(input_array(kind, shape, seed)).to(dtype).cuda()


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.cpu().double().numpy()


DTYPES = [(torch.float32, FLOAT32_TOLERANCE), (torch.float16, FLOAT16_TOLERANCE)]
# (B, D, HW): 1/8 width at S = 352 (block 5), full width at S = 352 (block 5) and S = 512 (block 5, block 4)
SHAPES = [(2, 16, 484), (1, 128, 484), (1, 128, 1024), (1, 128, 4096)]
KINDS = ["normal", "zero_channels", "large"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_prototype_kernels_match_reference(runner, dtype, tolerance, shape, kind):
    x = make_inputs(kind, shape, dtype, seed=1)
    assert relative_error(runner.prototypes(x), reference.prototypes(as_numpy(x))) <= tolerance
    psi = runner.prototype_correlation(x)
    assert relative_error(psi, reference.prototype_correlation(as_numpy(x))) <= tolerance


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_cross_modal_attention_kernel_matches_reference(runner, dtype, tolerance, shape, kind):
    tensors = [make_inputs(kind, shape, dtype, seed=10 + i) for i in range(4)]
    scale = 1.0 / math.sqrt(shape[2])
    expected = reference.cross_modal_attention(*(as_numpy(t) for t in tensors), scale=scale)
    for actual, want in zip(runner.cross_modal_attention(*tensors, scale=scale), expected, strict=True):
        assert relative_error(actual, want) <= tolerance


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
@pytest.mark.parametrize("valid_dtype", [torch.float32, "io"])
def test_memory_read_kernel_matches_reference(runner, dtype, tolerance, shape, kind, valid_dtype):
    batch, dim, positions = shape
    slots = 4
    x = make_inputs(kind, shape, dtype, seed=20)
    keys = make_inputs(kind, (batch, slots, dim, dim), dtype, seed=21)
    values = make_inputs(kind, (batch, slots, dim, dim), dtype, seed=22)
    valid = torch.ones(batch, slots, device="cuda", dtype=dtype if valid_dtype == "io" else valid_dtype)
    valid[0, 1] = 0
    expected = reference.prototype_memory_read(as_numpy(x), as_numpy(keys), as_numpy(values), as_numpy(valid))
    actual = runner.prototype_memory_read(x, keys, values, valid)
    assert relative_error(actual, expected) <= tolerance


@pytest.mark.gpu
@gpu
def test_memory_read_kernel_ignores_invalid_slots_exactly(runner):
    x = make_inputs("normal", (2, 16, 484), torch.float32, seed=30)
    keys = make_inputs("normal", (2, 5, 16, 16), torch.float32, seed=31)
    values = make_inputs("normal", (2, 5, 16, 16), torch.float32, seed=32)
    valid = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.float32, device="cuda")
    with_empty_slots = runner.prototype_memory_read(x, keys, values, valid)
    for item, kept in enumerate(([0, 2], [3, 4])):
        ones = torch.ones(1, len(kept), device="cuda")
        alone = runner.prototype_memory_read(
            x[item : item + 1].contiguous(), keys[item : item + 1, kept].contiguous(),
            values[item : item + 1, kept].contiguous(), ones,
        )  # fmt: skip
        difference = (with_empty_slots[item : item + 1] - alone).abs().max().item()
        assert difference <= 1e-6 * alone.abs().max().item()
    keys[0, 1], values[0, 3], values[1, 0] = float("nan"), float("nan"), float("inf")
    assert torch.equal(runner.prototype_memory_read(x, keys, values, valid), with_empty_slots)
    no_slot = runner.prototype_memory_read(x, keys, values, torch.zeros_like(valid))
    assert torch.equal(no_slot, torch.zeros_like(no_slot))  # undefined in the model: the kernel writes zeros


@pytest.mark.gpu
@gpu
def test_benchmark_prints_timing_table(build):
    """The timing comparison against the PyTorch composition at S = 352 and 512 (numbers in the output)."""
    command = [sys.executable, str(REPO / "benchmarks" / "plugin_kernels.py"), "--library", str(build.directory)]
    result = subprocess.run([*command, "--repeats", "10"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    table = [line for line in result.stdout.splitlines() if line.startswith("| Dpa")]
    assert len(table) == 2 * 2 * (3 + 4)  # S x dtypes x (3 ops at block 4 + 4 at block 5)


# --- TensorRT: each plugin in a tiny network ------------------------------------------------------------------


def build_and_run(trt, name: str, fields: dict[str, float], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A network with one plugin layer; returns its outputs for `inputs` (CUDA tensors)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    creator = trt.get_plugin_registry().get_creator(name, "1", "")
    assert creator is not None, f"{name} not registered"
    collection = trt.PluginFieldCollection(
        [
            trt.PluginField(key, np.array([value], np.float32), trt.PluginFieldType.FLOAT32)
            for key, value in fields.items()
        ]
    )
    plugin = creator.create_plugin(name, collection, trt.TensorRTPhase.BUILD)
    types = {torch.float32: trt.float32, torch.float16: trt.float16}
    tensors = [network.add_input(f"input{i}", types[t.dtype], tuple(t.shape)) for i, t in enumerate(inputs)]
    layer = network.add_plugin_v3(tensors, [], plugin)
    for i in range(layer.num_outputs):
        layer.get_output(i).name = f"output{i}"
        network.mark_output(layer.get_output(i))
    serialized = builder.build_serialized_network(network, builder.create_builder_config())
    assert serialized is not None, f"building {name} failed"
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    outputs = []
    for i, tensor in enumerate(inputs):
        context.set_tensor_address(f"input{i}", tensor.data_ptr())
    for i in range(layer.num_outputs):
        shape = tuple(engine.get_tensor_shape(f"output{i}"))
        outputs.append(torch.empty(shape, dtype=inputs[0].dtype, device="cuda"))
        context.set_tensor_address(f"output{i}", outputs[-1].data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return outputs


@pytest.mark.tensorrt
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_tensorrt_plugins_in_a_network(build, dtype, tolerance):
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT (pip install tensorrt)")
    library = plugins.load_plugin_library(build.directory)
    if not plugins.has_tensorrt_plugins(library):
        pytest.skip("the library was built without TensorRT headers (set TensorRT_ROOT)")
    registered = plugins.registered_plugin_library()
    if registered not in (None, build.library.resolve()):
        pytest.skip(f"TensorRT already has the plugins of {registered} in this process (one library per process)")
    # Registered once per process: the second dtype (and any later caller) gets the same handle back.
    handle = plugins.register_tensorrt_plugins(build.library, trt, library)
    assert plugins.register_tensorrt_plugins(build.library, trt, library) is handle
    assert plugins.registered_plugins(trt.get_plugin_registry()) == [name for name, *_ in plugins.TENSORRT_PLUGINS]
    x = make_inputs("normal", (1, 16, 484), dtype, seed=40)
    keys, values = (make_inputs("normal", (1, 4, 16, 16), dtype, seed=41 + i) for i in range(2))
    valid = torch.tensor([[1.0, 0.0, 1.0, 1.0]], device="cuda")
    others = [make_inputs("normal", (1, 16, 484), dtype, seed=50 + i) for i in range(4)]
    cases = [
        ("DpaPrototypes", {}, [x], [reference.prototypes(as_numpy(x))]),
        ("DpaPrototypeCorrelation", {"epsilon": 1e-6}, [x], [reference.prototype_correlation(as_numpy(x))]),
        (
            "DpaCrossModalAttention",
            {"scale": 1.0 / 22.0},
            others,
            list(reference.cross_modal_attention(*(as_numpy(t) for t in others), scale=1.0 / 22.0)),
        ),
        (
            "DpaPrototypeMemoryRead",
            {"scale": 0.25, "epsilon": 1e-6},
            [x, keys, values, valid],
            [reference.prototype_memory_read(*(as_numpy(t) for t in (x, keys, values, valid)), scale=0.25)],
        ),
    ]
    for name, fields, inputs, expected in cases:
        outputs = build_and_run(trt, name, fields, inputs)
        for actual, want in zip(outputs, expected, strict=True):
            assert relative_error(actual, want) <= tolerance, name
