"""The CUDA kernels of export/plugins against the NumPy reference on a CPU machine: dpa_kernels.cu and .cuh, the
files the CUDA build compiles, built by g++ against a host emulation of CUDA (tests/export/cuda_emulation/).

This checks the kernels' logic (indexing, tiling, split-K, slot masking, barriers), not their speed; the GPU
tests in test_plugins.py run the same comparisons on a GPU.
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from test_plugins import FLOAT16_TOLERANCE, FLOAT32_TOLERANCE, KINDS, SHAPES, input_array, relative_error

from dpa.constants import L2_EPSILON
from dpa.export import reference
from dpa.runtime import plugins

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "export" / "plugins"
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
KERNEL_LAUNCH = re.compile(r"<<<(.*?)>>>", re.S)  # kernel<<<grid, block, shared, stream>>>(arguments)
GUARD = 64  # NaN elements either side of every buffer handed to the kernels

pytestmark = pytest.mark.slow  # about 30 s on two cores, the build included

DTYPES = [(np.float32, FLOAT32_TOLERANCE), (np.float16, FLOAT16_TOLERANCE)]
# (B, C, HW); each shape is one path through the kernels.
EMULATED_SHAPES = [
    SHAPES[0],  # the GPU tests' 1/8 width at S = 352
    (2, 37, 45),  # odd sizes: a full and a partial 32-tile per matrix side, a partial K tile, batch 2
    (1, 64, 96),  # exact multiples of the tile: no partial tile anywhere
    (1, 1, 7),  # one channel, fewer positions than a tile
    (1, 16, 529),  # split-K over 2 blocks, the last one partial (HW >= 512)
    (3, 5, 5000),  # split-K capped at 16 blocks, batch 3
]
# (B, D, HW, N, T)
MEMORY_SHAPES = [
    (2, 16, 484, 4, 16),  # the GPU tests' shape, T = D as in the model
    (2, 37, 45, 3, 7),  # odd sizes, T != D: slot boundaries inside the 32-token tiles
    (1, 9, 30, 40, 9),  # 360 memory tokens: more than the 256 threads of a softmax row, 12 K tiles of W V
]


def include_flags(build_directory: Path) -> list[str]:
    """The emulation's stand-ins for the CUDA headers, then the kernel sources, then the rewritten .cu."""
    return [f"-I{EMULATION / 'include'}", f"-iquote{PLUGINS}", f"-iquote{build_directory}"]


@dataclass
class EmulatedBuild:
    """The compiler, the build folder and the library it built."""

    compiler: str
    directory: Path
    library: Path


def build_emulated_kernels(compiler: str, directory: Path) -> EmulatedBuild:
    """Compile export/plugins/dpa_kernels.cu for the CUDA host emulation into a shared library in `directory`.

    No C++ compiler parses a launch `kernel<<<config>>>(args)`, so the build writes dpa_kernels.cu into
    `directory` with each one spelled `kernel | ::cuda_emulation::LaunchConfiguration(config)(args)`, under a
    #line directive that keeps the original file name and line numbers. Everything else, dpa_kernels.cuh and
    dpa_kernels.h included, is compiled from export/plugins as it is.
    """
    source = (PLUGINS / "dpa_kernels.cu").read_text()
    rewritten, launches = KERNEL_LAUNCH.subn(r"| ::cuda_emulation::LaunchConfiguration(\1)", source)
    assert launches > 0 and "<<<" not in rewritten and ">>>" not in rewritten, "unexpected launch syntax"
    (directory / "dpa_kernels_launches_rewritten.cu").write_text(f'#line 1 "{PLUGINS / "dpa_kernels.cu"}"\n{rewritten}')
    library = directory / "libdpa_kernels_emulated.so"
    command = [
        compiler, "-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
        "-Wall", "-Wextra", "-Wno-unknown-pragmas",  # `#pragma unroll` is CUDA's
        *include_flags(directory), str(EMULATION / "dpa_kernels_emulated.cpp"), "-o", str(library),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return EmulatedBuild(compiler, directory, library)


class GuardedBuffers:
    """Host buffers for the kernels, each inside NaN guard bands: a kernel that writes outside a buffer changes a
    guard, one that reads outside reads NaN. Outputs and the workspace start as NaN, so an output element the
    kernels skip, or scratch read before it is written, shows up as NaN."""

    def __init__(self):
        self._storages: list[np.ndarray] = []

    def _allocate(self, count: int, dtype: npt.DTypeLike) -> np.ndarray:
        storage = np.full(count + 2 * GUARD, np.nan, dtype)
        self._storages.append(storage)
        return storage[GUARD : GUARD + count]

    def input(self, array: np.ndarray) -> np.ndarray:
        view = self._allocate(array.size, array.dtype).reshape(array.shape)
        view[...] = array
        return view

    def output(self, shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
        return self._allocate(math.prod(shape), dtype).reshape(shape)

    def workspace(self, size: int) -> np.ndarray:
        return self._allocate(-(-size // 4), np.float32)  # bytes -> float32 elements

    def assert_guards_intact(self) -> None:
        for storage in self._storages:
            guards = np.concatenate([storage[:GUARD], storage[-GUARD:]])
            nan = np.full(1, np.nan, storage.dtype)
            assert (guards.view(np.uint8).reshape(2 * GUARD, -1) == nan.view(np.uint8)).all(), "write out of bounds"


def pointer(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


class EmulatedKernels:
    """Calls the C ABI (dpa_kernels.h) of the emulated library on NumPy arrays (float32 or float16, one dtype per
    call; `valid` float32 or that dtype), in guarded buffers; returns the outputs as new arrays."""

    def __init__(self, library: ctypes.CDLL):
        self.library = plugins.declare_kernel_functions(library)
        library.cuda_emulation_error_message.restype = ctypes.c_char_p
        library.cuda_emulation_set_reverse_thread_order.argtypes = [ctypes.c_int32]

    def set_reverse_thread_order(self, reverse: bool) -> None:
        self.library.cuda_emulation_set_reverse_thread_order(int(reverse))

    @staticmethod
    def _dtype(array: np.ndarray) -> int:
        return {np.dtype(np.float32): plugins.DTYPE_FLOAT32, np.dtype(np.float16): plugins.DTYPE_FLOAT16}[array.dtype]

    def _call(self, function: str, buffers: GuardedBuffers, *args) -> None:
        status = getattr(self.library, function)(*args, None)  # stream: none
        message = self.library.cuda_emulation_error_message().decode()
        detail = self.library.dpa_status_string(status).decode()
        assert status == plugins.STATUS_SUCCESS, f"{function}: {detail} ({message})"
        buffers.assert_guards_intact()

    def prototypes(self, features: np.ndarray) -> np.ndarray:
        """(B, C, HW) -> (B, C, C)."""
        batch, channels, positions = features.shape
        buffers = GuardedBuffers()
        x, out = buffers.input(features), buffers.output((batch, channels, channels), features.dtype)
        size = self.library.dpa_prototypes_workspace_size(batch, channels, positions)
        workspace = buffers.workspace(size)
        self._call(
            "dpa_prototypes", buffers, pointer(x), pointer(out), batch, channels, positions, self._dtype(x),
            pointer(workspace), size,
        )  # fmt: skip
        return out.copy()

    def prototype_correlation(self, features: np.ndarray) -> np.ndarray:
        """(B, C, HW) -> (B, C, HW); the model's epsilon."""
        batch, channels, positions = features.shape
        buffers = GuardedBuffers()
        x, out = buffers.input(features), buffers.output(features.shape, features.dtype)
        size = self.library.dpa_prototype_correlation_workspace_size(batch, channels, positions)
        workspace = buffers.workspace(size)
        self._call(
            "dpa_prototype_correlation", buffers, pointer(x), pointer(out), batch, channels, positions, L2_EPSILON,
            self._dtype(x), pointer(workspace), size,
        )  # fmt: skip
        return out.copy()

    def cross_modal_attention(self, *tensors: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """K_A, K_M, V_A, V_M (B, D, HW) -> T_A, T_M (B, D, HW)."""
        batch, dim, positions = tensors[0].shape
        buffers = GuardedBuffers()
        inputs = [buffers.input(tensor) for tensor in tensors]
        outputs = [buffers.output(tensors[0].shape, tensors[0].dtype) for _ in range(2)]
        size = self.library.dpa_cross_modal_attention_workspace_size(batch, dim, positions)
        workspace = buffers.workspace(size)
        self._call(
            "dpa_cross_modal_attention", buffers, *map(pointer, inputs + outputs), batch, dim, positions, scale,
            self._dtype(inputs[0]), pointer(workspace), size,
        )  # fmt: skip
        return outputs[0].copy(), outputs[1].copy()

    def prototype_memory_read(
        self, features: np.ndarray, keys: np.ndarray, values: np.ndarray, valid: np.ndarray
    ) -> np.ndarray:
        """X (B, D, HW), keys and values (B, N, T, D), valid (B, N) -> Psi2 (B, D, HW); the model's scale and
        epsilon."""
        (batch, dim, positions), (slots, tokens) = features.shape, keys.shape[1:3]
        buffers = GuardedBuffers()
        inputs = [buffers.input(array) for array in (features, keys, values, valid)]
        out = buffers.output(features.shape, features.dtype)
        size = self.library.dpa_prototype_memory_read_workspace_size(batch, dim, positions, slots, tokens)
        workspace = buffers.workspace(size)
        self._call(
            "dpa_prototype_memory_read", buffers, *map(pointer, inputs), pointer(out), batch, dim, positions, slots,
            tokens, 1.0 / math.sqrt(dim), L2_EPSILON, self._dtype(inputs[0]), self._dtype(inputs[3]),
            pointer(workspace), size,
        )  # fmt: skip
        return out.copy()


@pytest.fixture(scope="session")
def emulated_build(tmp_path_factory) -> EmulatedBuild:
    """The emulated kernel library, compiled once per test session."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found: the CUDA host emulation of the kernels needs a C++17 compiler")
    if not sys.platform.startswith("linux"):
        pytest.skip("the CUDA host emulation runs CUDA threads as Linux ucontext fibers")
    return build_emulated_kernels(compiler, tmp_path_factory.mktemp("dpa-kernels-emulated"))


@pytest.fixture(scope="session")
def kernels(emulated_build) -> EmulatedKernels:
    return EmulatedKernels(ctypes.CDLL(str(emulated_build.library)))


def make_inputs(kind: str, shape: tuple[int, ...], dtype: npt.DTypeLike, seed: int) -> np.ndarray:
    return input_array(kind, shape, seed).astype(dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", EMULATED_SHAPES)
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_prototype_kernels_match_reference(kernels, dtype, tolerance, shape, kind):
    x = make_inputs(kind, shape, dtype, seed=1)
    assert relative_error(kernels.prototypes(x), reference.prototypes(x)) <= tolerance
    assert relative_error(kernels.prototype_correlation(x), reference.prototype_correlation(x)) <= tolerance


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", EMULATED_SHAPES)
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_cross_modal_attention_kernel_matches_reference(kernels, dtype, tolerance, shape, kind):
    tensors = [make_inputs(kind, shape, dtype, seed=10 + i) for i in range(4)]
    scale = 1.0 / math.sqrt(shape[2])
    expected = reference.cross_modal_attention(*tensors, scale=scale)
    for actual, want in zip(kernels.cross_modal_attention(*tensors, scale=scale), expected, strict=True):
        assert relative_error(actual, want) <= tolerance


@pytest.mark.parametrize("valid_dtype", [np.float32, "io"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", MEMORY_SHAPES)
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_memory_read_kernel_matches_reference(kernels, dtype, tolerance, shape, kind, valid_dtype):
    batch, dim, positions, slots, tokens = shape
    x = make_inputs(kind, (batch, dim, positions), dtype, seed=20)
    keys = make_inputs(kind, (batch, slots, tokens, dim), dtype, seed=21)
    values = make_inputs(kind, (batch, slots, tokens, dim), dtype, seed=22)
    valid = np.ones((batch, slots), dtype if valid_dtype == "io" else valid_dtype)
    valid[0, 1] = 0
    expected = reference.prototype_memory_read(x, keys, values, valid)
    assert relative_error(kernels.prototype_memory_read(x, keys, values, valid), expected) <= tolerance


def test_memory_read_kernel_ignores_invalid_slots_exactly(kernels):
    x = make_inputs("normal", (2, 16, 484), np.float32, seed=30)
    keys = make_inputs("normal", (2, 5, 16, 16), np.float32, seed=31)
    values = make_inputs("normal", (2, 5, 16, 16), np.float32, seed=32)
    valid = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], np.float32)
    with_empty_slots = kernels.prototype_memory_read(x, keys, values, valid)
    for item, kept in enumerate(([0, 2], [3, 4])):
        ones = np.ones((1, len(kept)), np.float32)
        alone = kernels.prototype_memory_read(
            x[item : item + 1], keys[item : item + 1, kept], values[item : item + 1, kept], ones
        )
        difference = np.abs(with_empty_slots[item : item + 1] - alone).max()
        assert difference <= 1e-6 * np.abs(alone).max()
    keys[0, 1], values[0, 3], values[1, 0] = np.nan, np.nan, np.inf
    assert np.array_equal(kernels.prototype_memory_read(x, keys, values, valid), with_empty_slots)
    no_slot = kernels.prototype_memory_read(x, keys, values, np.zeros_like(valid))
    assert np.array_equal(no_slot, np.zeros_like(no_slot))  # undefined in the model: the kernel writes zeros


def test_results_do_not_depend_on_the_thread_order(kernels):
    """Every value a thread reads from shared memory was written before a barrier: running the threads of each
    block in reverse order gives bitwise the same outputs (float32: the barriers do not depend on the type)."""
    x, *others = (make_inputs("normal", (2, 37, 45), np.float32, seed=60 + i) for i in range(5))
    keys, values = (make_inputs("normal", (2, 3, 7, 37), np.float32, seed=70 + i) for i in range(2))
    valid = np.array([[1, 0, 1], [1, 1, 1]], np.float32)

    def run_all() -> list[np.ndarray]:
        return [
            kernels.prototypes(x),
            kernels.prototype_correlation(x),
            *kernels.cross_modal_attention(*others[:4], scale=0.125),
            kernels.prototype_memory_read(x, keys, values, valid),
        ]

    forward = run_all()
    kernels.set_reverse_thread_order(True)
    try:
        backward = run_all()
    finally:
        kernels.set_reverse_thread_order(False)
    for ahead, behind in zip(forward, backward, strict=True):
        assert np.array_equal(ahead, behind)


def test_emulated_build_compiles_the_plugin_sources(emulated_build):
    """The kernels come from export/plugins (no copy), the CUDA headers from the emulation (no CUDA toolkit)."""
    command = [
        emulated_build.compiler, "-std=c++17", "-M", *include_flags(emulated_build.directory),
        str(EMULATION / "dpa_kernels_emulated.cpp"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    dependencies = {Path(word).resolve() for word in result.stdout.replace("\\\n", " ").split()[1:]}
    assert {PLUGINS / "dpa_kernels.cuh", PLUGINS / "dpa_kernels.h"} <= dependencies
    assert (emulated_build.directory / "dpa_kernels_launches_rewritten.cu").resolve() in dependencies
    cuda_headers = {path for path in dependencies if path.name.startswith("cuda")}
    assert cuda_headers and all(path.is_relative_to(EMULATION / "include") for path in cuda_headers)
