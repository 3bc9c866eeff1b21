"""Time the prototype-attention CUDA kernels (libdpa_plugins.so) against the PyTorch composition.

Needs an NVIDIA GPU, PyTorch with CUDA and a built library (`cmake -S . -B build && cmake --build build -j`):

    python benchmarks/plugin_kernels.py [--library build] [--sizes 352 512] [--dtypes float32 float16]

Prints a Markdown table per op: input size S, positions HW (block 4 at S/8, block 5 at S/16), width D, dtype,
median milliseconds of the PyTorch composition (dpa.training.attention) and of the kernel, and the largest
difference between the two. `KernelRunner` is also what tests/export/test_plugins.py calls the kernels with.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from dpa.errors import DpaError
from dpa.runtime import plugins
from dpa.training import attention

DTYPES = {"float32": (torch.float32, plugins.DTYPE_FLOAT32), "float16": (torch.float16, plugins.DTYPE_FLOAT16)}


class KernelRunner:
    """Calls the C ABI of libdpa_plugins.so on torch CUDA tensors, on the current stream.

    Inputs: contiguous CUDA tensors of one dtype (float32 or float16); `valid` float32 or that dtype.
    Each method allocates its output and workspace, enqueues the kernels and returns the output(s).
    """

    def __init__(self, library: ctypes.CDLL):
        self.library = library

    def _dtype(self, tensor: torch.Tensor) -> int:
        for torch_dtype, code in DTYPES.values():
            if tensor.dtype == torch_dtype:
                return code
        raise DpaError(f"the kernels take float32 or float16 tensors, not {tensor.dtype}")

    def _call(self, function: str, *args) -> None:
        status = getattr(self.library, function)(*args)
        if status != plugins.STATUS_SUCCESS:
            detail = self.library.dpa_status_string(status).decode()
            raise DpaError(f"{function} failed: {detail} (CUDA error {self.library.dpa_last_cuda_error()})")

    @staticmethod
    def _workspace(size: int, device: torch.device) -> torch.Tensor:
        return torch.empty(max(size, 1), dtype=torch.uint8, device=device)

    @staticmethod
    def _stream() -> ctypes.c_void_p:
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def prototypes(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, HW) -> (B, C, C)."""
        batch, channels, positions = features.shape
        out = torch.empty(batch, channels, channels, dtype=features.dtype, device=features.device)
        size = self.library.dpa_prototypes_workspace_size(batch, channels, positions)
        workspace = self._workspace(size, features.device)
        self._call(
            "dpa_prototypes", features.data_ptr(), out.data_ptr(), batch, channels, positions,
            self._dtype(features), workspace.data_ptr(), size, self._stream(),
        )  # fmt: skip
        return out

    def prototype_correlation(self, features: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
        """(B, C, HW) -> (B, C, HW)."""
        batch, channels, positions = features.shape
        out = torch.empty_like(features)
        size = self.library.dpa_prototype_correlation_workspace_size(batch, channels, positions)
        workspace = self._workspace(size, features.device)
        self._call(
            "dpa_prototype_correlation", features.data_ptr(), out.data_ptr(), batch, channels, positions,
            epsilon, self._dtype(features), workspace.data_ptr(), size, self._stream(),
        )  # fmt: skip
        return out

    def cross_modal_attention(
        self,
        key_appearance: torch.Tensor,
        key_motion: torch.Tensor,
        value_appearance: torch.Tensor,
        value_motion: torch.Tensor,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Four (B, D, HW) -> T_A, T_M (B, D, HW); scale None: 1/sqrt(HW)."""
        batch, dim, positions = key_appearance.shape
        scale = 1.0 / math.sqrt(positions) if scale is None else scale
        to_appearance, to_motion = torch.empty_like(key_appearance), torch.empty_like(key_appearance)
        size = self.library.dpa_cross_modal_attention_workspace_size(batch, dim, positions)
        workspace = self._workspace(size, key_appearance.device)
        tensors = (key_appearance, key_motion, value_appearance, value_motion, to_appearance, to_motion)
        self._call(
            "dpa_cross_modal_attention", *(t.data_ptr() for t in tensors), batch, dim, positions, scale,
            self._dtype(key_appearance), workspace.data_ptr(), size, self._stream(),
        )  # fmt: skip
        return to_appearance, to_motion

    def prototype_memory_read(
        self,
        features: torch.Tensor,
        memory_keys: torch.Tensor,
        memory_values: torch.Tensor,
        valid: torch.Tensor,
        scale: float | None = None,
        epsilon: float = 1e-6,
    ) -> torch.Tensor:
        """features (B, D, HW), memory (B, N, T, D), valid (B, N) -> (B, D, HW); scale None: 1/sqrt(D)."""
        batch, dim, positions = features.shape
        slots, tokens = memory_keys.shape[1], memory_keys.shape[2]
        scale = 1.0 / math.sqrt(dim) if scale is None else scale
        out = torch.empty_like(features)
        size = self.library.dpa_prototype_memory_read_workspace_size(batch, dim, positions, slots, tokens)
        workspace = self._workspace(size, features.device)
        self._call(
            "dpa_prototype_memory_read", features.data_ptr(), memory_keys.data_ptr(), memory_values.data_ptr(),
            valid.data_ptr(), out.data_ptr(), batch, dim, positions, slots, tokens, scale, epsilon,
            self._dtype(features), self._dtype(valid), workspace.data_ptr(), size, self._stream(),
        )  # fmt: skip
        return out


def median_milliseconds(function: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median time of `function` over `repeats` runs, measured with CUDA events on the current stream."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _largest_difference(a, b) -> float:
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    return max(float((x.float() - y.float()).abs().max()) for x, y in pairs)


def _cases(runner: KernelRunner, inputs: dict[str, torch.Tensor]) -> dict[str, tuple[Callable, Callable]]:
    """op -> (PyTorch composition, kernel) on the same inputs."""
    x, keys = inputs["features"], [inputs[f"key_value_{i}"] for i in range(4)]
    memory = (inputs["memory_keys"], inputs["memory_values"], inputs["valid"])
    return {
        "DpaPrototypes": (lambda: attention.prototypes(x), lambda: runner.prototypes(x)),
        "DpaPrototypeCorrelation": (
            lambda: attention.prototype_correlation(x),
            lambda: runner.prototype_correlation(x),
        ),
        "DpaCrossModalAttention": (
            lambda: attention.cross_modal_attention(*keys),
            lambda: runner.cross_modal_attention(*keys),
        ),
        "DpaPrototypeMemoryRead": (
            lambda: attention.correlation(attention.memory_read(attention.prototypes(x), *memory), x),
            lambda: runner.prototype_memory_read(x, *memory),
        ),
    }


def _inputs(
    generator: torch.Generator, dtype: torch.dtype, batch: int, dim: int, positions: int, slots: int
) -> dict[str, torch.Tensor]:
    shapes = {f"key_value_{i}": (batch, dim, positions) for i in range(4)}
    shapes |= {"features": (batch, dim, positions), "memory_keys": (batch, slots, dim, dim)}
    shapes["memory_values"] = (batch, slots, dim, dim)
    inputs = {}
    for name, shape in shapes.items():
        inputs[name] = torch.randn(*shape, generator=generator, device="cuda").to(dtype)
    inputs["valid"] = torch.ones(batch, slots, device="cuda")
    return inputs


def benchmark(
    runner: KernelRunner, sizes: list[int], dtypes: list[str], dim: int, slots: int, batch: int, repeats: int
) -> list[dict]:
    """One row per op, S, HW, dtype: PyTorch and kernel median milliseconds, largest difference.

    IMA runs at block 4 (HW = (S/8)^2) and block 5 (HW = (S/16)^2), IFA at block 5 only.
    """
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for size in sizes:
        for stride in (8, 16):
            positions = (size // stride) ** 2
            for dtype_name in dtypes:
                inputs = _inputs(generator, DTYPES[dtype_name][0], batch, dim, positions, slots)
                for op, (torch_function, kernel_function) in _cases(runner, inputs).items():
                    if op == "DpaPrototypeMemoryRead" and stride == 8:
                        continue
                    with torch.no_grad():
                        difference = _largest_difference(torch_function(), kernel_function())
                        rows.append(
                            {
                                "op": op, "size": size, "positions": positions, "dim": dim, "dtype": dtype_name,
                                "torch_ms": median_milliseconds(torch_function, repeats),
                                "kernel_ms": median_milliseconds(kernel_function, repeats),
                                "max_difference": difference,
                            }
                        )  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| op | S | HW | D | dtype | PyTorch ms | kernel ms | speed-up | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['op']} | {row['size']} | {row['positions']} | {row['dim']} | {row['dtype']} | "
            f"{row['torch_ms']:.4f} | {row['kernel_ms']:.4f} | {row['torch_ms'] / row['kernel_ms']:.2f}x | "
            f"{row['max_difference']:.2e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, default=None, help="libdpa_plugins.so or its folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[352, 512], help="input sizes S")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "float16"])
    parser.add_argument("--dim", type=int, default=128, help="D = C, 128 at full width")
    parser.add_argument("--slots", type=int, default=4, help="memory slots N")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("plugin_kernels: needs PyTorch with CUDA and an NVIDIA GPU")
    try:
        runner = KernelRunner(plugins.load_plugin_library(args.library))
    except DpaError as error:
        raise SystemExit(f"plugin_kernels: {error}") from error
    rows = benchmark(runner, args.sizes, args.dtypes, args.dim, args.slots, args.batch, args.repeats)
    print(f"GPU: {torch.cuda.get_device_name()}, batch {args.batch}, N = {args.slots}, {args.repeats} repeats")
    print(markdown_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
