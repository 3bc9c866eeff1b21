"""Find and load libdpa_plugins.so: the prototype-attention CUDA kernels (C ABI) and TensorRT plugins.

Torch-free. The library is built by the top-level CMakeLists.txt (export/plugins/README.md); it always has
the kernels' C ABI (`dpa_*`, see export/plugins/dpa_kernels.h) and, when TensorRT headers were found at
build time, the TensorRT plugin entry points `getCreators` / `setLoggerFinder` and `dpa_tensorrt_major` (the
TensorRT major of those headers).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from dpa.errors import DpaError

log = logging.getLogger(__name__)

LIBRARY_NAME = "libdpa_plugins.so"
ENVIRONMENT_VARIABLE = "DPA_PLUGIN_LIBRARY"
ABI_VERSION = 1  # DPA_KERNELS_ABI_VERSION of dpa_kernels.h this module was written for
REPOSITORY = Path(__file__).resolve().parents[1]

# dpa_kernels.h enums
DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1
STATUS_SUCCESS = 0

# The creators getCreators() hands TensorRT (dpa_plugins.cpp; export/reference.py OP_SPECS, which the runtime may
# not import): (plugin name, version, namespace).
TENSORRT_PLUGINS: tuple[tuple[str, str, str], ...] = tuple(
    (name, "1", "")
    for name in ("DpaPrototypes", "DpaPrototypeCorrelation", "DpaCrossModalAttention", "DpaPrototypeMemoryRead")
)

# TensorRT's plugin registry lives as long as the process and takes a library's creators once: so does this
# record of the libraries dpa registered in it (resolved path -> the registry's library handle, None when the
# creators were already there).
_REGISTERED_LIBRARIES: dict[Path, object] = {}

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


def tensorrt_build_command(tensorrt_major: int, repository: Path = REPOSITORY) -> str:
    """The command that rebuilds the library against the headers of TensorRT `tensorrt_major` (forgets the
    TensorRT paths CMake cached from an earlier configure)."""
    build = repository / "build"
    return (f"cmake -S {repository} -B {build} -DTensorRT_ROOT=/path/to/TensorRT-{tensorrt_major} "
            f"-UTensorRT_INCLUDE_DIR -UTensorRT_LIBRARY && cmake --build {build} -j")


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
    module) the TensorRT plugins are also registered, once per process: see register_tensorrt_plugins.
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


def library_tensorrt_major(library: ctypes.CDLL) -> int | None:
    """NV_TENSORRT_MAJOR of the headers the library's plugins were built against (its dpa_tensorrt_major()), or
    None for a library built before it recorded one."""
    try:
        function = library.dpa_tensorrt_major
    except AttributeError:
        return None
    function.restype, function.argtypes = ctypes.c_int32, []
    return int(function())


def tensorrt_major(tensorrt_version: str) -> int:
    """"10.3.0.30" -> 10."""
    major = re.match(r"\d+", tensorrt_version)
    if major is None:
        raise DpaError(f"cannot tell the major version of TensorRT {tensorrt_version!r}")
    return int(major.group())


def check_tensorrt_major(path: str | os.PathLike, library: ctypes.CDLL, tensorrt_version: str) -> None:
    """DpaError unless the library's plugins were built against the major version of the running TensorRT
    (`tensorrt_version`, e.g. "10.3.0.30"): the plugin interfaces change between majors (TensorRT 11.1 gave
    ILoggerFinder a base class), so a library of another major loads and then crashes."""
    major = tensorrt_major(tensorrt_version)
    built = library_tensorrt_major(library)
    if built is None:
        raise DpaError(f"{path} records no TensorRT major version (built before dpa_tensorrt_major existed); "
                       f"rebuild it against TensorRT {tensorrt_version}: `{tensorrt_build_command(major)}`")
    if built != major:
        raise DpaError(f"{path} was built against TensorRT {built} headers, this process runs TensorRT "
                       f"{tensorrt_version}; rebuild it against TensorRT {major}: `{tensorrt_build_command(major)}`")


def registered_plugin_library() -> Path | None:
    """The library whose plugins register_tensorrt_plugins registered with TensorRT in this process, if any."""
    return next(iter(_REGISTERED_LIBRARIES), None)


def registered_plugins(registry) -> list[str]:
    """The names of TENSORRT_PLUGINS that TensorRT's plugin registry already has a creator for."""
    return [name for name, version, namespace in TENSORRT_PLUGINS
            if registry.get_creator(name, version, namespace) is not None]


def register_tensorrt_plugins(
    path: str | os.PathLike, tensorrt: ModuleType, library: ctypes.CDLL | None = None
) -> object:
    """Register the plugins of the library at `path` with TensorRT's plugin registry, once per process.

    Checks that the library has the TensorRT plugin classes and was built against the running TensorRT major,
    then calls tensorrt.get_plugin_registry().load_library(path) (TensorRT calls the library's getCreators and
    setLoggerFinder) unless this process already registered it, or the registry already has all of its creators
    (registered by other code: used as they are). Returns the registry's library handle (None in the latter case).
    Raises DpaError for a library without the plugins or of another TensorRT major, when another library
    registered some or all of these plugin names, or when TensorRT refuses the library.
    """
    path = Path(path).resolve()
    if path in _REGISTERED_LIBRARIES:
        return _REGISTERED_LIBRARIES[path]
    library = library if library is not None else ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    if not has_tensorrt_plugins(library):
        raise DpaError(
            f"{path} was built without the TensorRT plugins (no TensorRT headers at build time); rebuild with "
            f"`export TensorRT_ROOT=/path/to/TensorRT && {build_command()}`"
        )
    version = str(getattr(tensorrt, "__version__", "?"))
    check_tensorrt_major(path, library, version)
    registry = tensorrt.get_plugin_registry()
    present = registered_plugins(registry)
    other = registered_plugin_library()
    if other is not None and present:
        raise DpaError(f"TensorRT already has the DPA plugins in this process, registered for {other}, and takes "
                       f"them once per process: use that library, or use {path} in a new process")
    if len(present) == len(TENSORRT_PLUGINS):
        log.info("TensorRT already has the DPA plugins (registered by other code in this process): using them")
        _REGISTERED_LIBRARIES[path] = None
        return None
    if present:
        raise DpaError(f"TensorRT already has plugins named {', '.join(present)} from another library in this "
                       f"process, so it cannot register {path}; run it in a new process")
    handle = registry.load_library(str(path))
    if handle is None:
        raise DpaError(f"TensorRT {version} refused the plugin library {path} (IPluginRegistry.load_library "
                       "returned None although none of its plugins was registered; TensorRT's log says why)")
    missing = [name for name, *_ in TENSORRT_PLUGINS if name not in registered_plugins(registry)]
    if missing:
        raise DpaError(f"{path} did not register {', '.join(missing)}: an outdated build; rebuild it with "
                       f"`{tensorrt_build_command(tensorrt_major(version))}`")
    _REGISTERED_LIBRARIES[path] = handle
    return handle
