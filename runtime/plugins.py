"""Find and load libdpa_plugins.so: the prototype-attention CUDA kernels (C ABI) and TensorRT plugins.

Torch-free. The library is built by the top-level CMakeLists.txt (export/plugins/README.md); it always has
the kernels' C ABI (`dpa_*`, see export/plugins/dpa_kernels.h) and, when TensorRT headers were found at
build time, the TensorRT plugin entry points `getCreators` / `setLoggerFinder`.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from types import ModuleType

from dpa.errors import DpaError

LIBRARY_NAME = "libdpa_plugins.so"
ENVIRONMENT_VARIABLE = "DPA_PLUGIN_LIBRARY"
ABI_VERSION = 1  # DPA_KERNELS_ABI_VERSION of dpa_kernels.h this module was written for
REPOSITORY = Path(__file__).resolve().parents[1]

# dpa_kernels.h enums
DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1
STATUS_SUCCESS = 0

_P, _I64, _I32, _F, _SIZE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_size_t
# name -> (restype, argtypes) of the C ABI (dpa_kernels.h); the stream argument is a cudaStream_t (void*).
KERNEL_FUNCTIONS: dict[str, tuple[type, list[type]]] = {
    "dpa_abi_version": (_I32, []),
    "dpa_status_string": (ctypes.c_char_p, [_I32]),
    "dpa_last_cuda_error": (_I32, []),
    "dpa_prototypes_workspace_size": (_SIZE, [_I64] * 3),
    "dpa_prototypes": (_I32, [_P, _P, _I64, _I64, _I64, _I32, _P, _SIZE, _P]),
    "dpa_prototype_correlation_workspace_size": (_SIZE, [_I64] * 3),
    "dpa_prototype_correlation": (_I32, [_P, _P, _I64, _I64, _I64, _F, _I32, _P, _SIZE, _P]),
    "dpa_cross_modal_attention_workspace_size": (_SIZE, [_I64] * 3),
    "dpa_cross_modal_attention": (_I32, [_P] * 6 + [_I64, _I64, _I64, _F, _I32, _P, _SIZE, _P]),
    "dpa_prototype_memory_read_workspace_size": (_SIZE, [_I64] * 5),
    "dpa_prototype_memory_read": (_I32, [_P] * 5 + [_I64] * 5 + [_F, _F, _I32, _I32, _P, _SIZE, _P]),
}


def build_command(repository: Path = REPOSITORY) -> str:
    """The command that builds the library into <repository>/build."""
    return f"cmake -S {repository} -B {repository / 'build'} && cmake --build {repository / 'build'} -j"


def search_locations() -> list[Path]:
    """Where find_plugin_library looks after the explicit path and $DPA_PLUGIN_LIBRARY, in order."""
    locations = [REPOSITORY / "build", Path.cwd() / "build", Path(sys.prefix) / "lib"]
    locations += [Path("/usr/local/lib"), Path("/usr/lib")]  # `cmake --install` default prefix, system
    unique: list[Path] = []
    for location in locations:
        if location not in unique:
            unique.append(location)
    return unique


def _library_in(path: Path) -> Path:
    return path / LIBRARY_NAME if path.is_dir() else path


def find_plugin_library(explicit: str | os.PathLike | None = None) -> Path:
    """Path of libdpa_plugins.so.

    explicit: a library file or a folder holding it; when given it is the only place looked at. Otherwise
    $DPA_PLUGIN_LIBRARY (file or folder; likewise exclusive when set), then search_locations().
    Raises DpaError naming every place looked at and how to build the library.
    """
    if explicit is not None:
        candidates, origin = [_library_in(Path(explicit))], "the given path"
    elif os.environ.get(ENVIRONMENT_VARIABLE):
        candidates, origin = [_library_in(Path(os.environ[ENVIRONMENT_VARIABLE]))], f"${ENVIRONMENT_VARIABLE}"
    else:
        candidates, origin = [location / LIBRARY_NAME for location in search_locations()], "the default locations"
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(str(candidate) for candidate in candidates)
    raise DpaError(
        f"{LIBRARY_NAME} not found in {origin} (looked at: {looked}). Build it with `{build_command()}` "
        f"(needs the CUDA toolkit; TensorRT headers for the TensorRT plugins, hint -DTensorRT_ROOT=...), "
        f"or point {ENVIRONMENT_VARIABLE} at an existing build"
    )


def declare_kernel_functions(library: ctypes.CDLL) -> ctypes.CDLL:
    """Set the ctypes signatures of the C ABI on `library`; checks its ABI version. Returns `library`."""
    for name, (restype, argtypes) in KERNEL_FUNCTIONS.items():
        try:
            function = getattr(library, name)
        except AttributeError as error:
            raise DpaError(
                f"{library._name} has no {name}: not a DPA plugin library or an incompatible build; "
                f"rebuild with `{build_command()}`"
            ) from error
        function.restype, function.argtypes = restype, argtypes
    version = library.dpa_abi_version()
    if version != ABI_VERSION:
        raise DpaError(
            f"{library._name} has kernel ABI version {version}, this dpa expects {ABI_VERSION}; "
            f"rebuild it with `{build_command()}`"
        )
    return library


def has_tensorrt_plugins(library: ctypes.CDLL) -> bool:
    """Whether the library was built with the TensorRT plugin classes (exports getCreators)."""
    return hasattr(library, "getCreators")


def load_plugin_library(path: str | os.PathLike | None = None, tensorrt: ModuleType | None = None) -> ctypes.CDLL:
    """Load libdpa_plugins.so (found as find_plugin_library(path)) into this process with RTLD_GLOBAL.

    Returns the ctypes handle with the kernel C ABI declared. With `tensorrt` (the imported tensorrt
    module) the TensorRT plugins are also registered: see register_tensorrt_plugins.
    """
    library_path = find_plugin_library(path)
    try:
        library = ctypes.CDLL(str(library_path), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        raise DpaError(f"cannot load {library_path}: {error}; rebuild it with `{build_command()}`") from error
    declare_kernel_functions(library)
    if tensorrt is not None:
        register_tensorrt_plugins(library_path, tensorrt, library)
    return library


def register_tensorrt_plugins(
    path: str | os.PathLike, tensorrt: ModuleType, library: ctypes.CDLL | None = None
) -> object:
    """Register the plugins of the library at `path` with TensorRT's plugin registry.

    Calls tensorrt.get_plugin_registry().load_library(path) (TensorRT calls the library's getCreators and
    setLoggerFinder) and returns the registry's library handle. Raises DpaError when the library was built
    without the TensorRT plugin classes or TensorRT refuses it.
    """
    path = Path(path)
    library = library if library is not None else ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    if not has_tensorrt_plugins(library):
        raise DpaError(
            f"{path} was built without the TensorRT plugins (no TensorRT headers at build time); rebuild with "
            f"`export TensorRT_ROOT=/path/to/TensorRT && {build_command()}`"
        )
    handle = tensorrt.get_plugin_registry().load_library(str(path))
    if handle is None:
        raise DpaError(
            f"TensorRT {getattr(tensorrt, '__version__', '?')} could not load the plugins of {path} "
            "(built against another TensorRT major version?); rebuild it against the installed TensorRT"
        )
    return handle
