"""TensorRT decisions that need neither TensorRT nor a GPU: the builder flags per TensorRT version, the form
to build, the plan hash and file names, and which cuda-python (and CUDA driver) pairs with the installed
TensorRT's CUDA flavour. Plain functions of version strings and package lists, tested on any machine;
`tensorrt_engine.py` is the thin layer over TensorRT and the CUDA runtime that uses them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dpa.errors import DpaError

PLAN_FORMAT = "dpa-plan/1"  # part of every plan hash: change it when the build recipe changes
MINIMUM_TENSORRT = (10, 3)
PLUGIN_PREFERRED_FROM = (10, 7)  # TensorRT's ONNX parser prefers a registered plugin over a local function
INSTALL_HINT = ("RTX desktops: pip install 'dpa-edge[tensorrt-cu12]' for a CUDA 12 driver, 'dpa-edge[tensorrt-cu13]' "
                "for CUDA 13; Jetson: JetPack's python3-libnvinfer plus pip install 'cuda-python>=12.0,<13' "
                "(JetPack 6; JetPack 7: 'cuda-python>=13.0,<14')")
TENSORRT_EXTRA_CUDA_MAJORS = (12, 13)  # pyproject.toml's tensorrt-cu12 and tensorrt-cu13 extras
DPKG_STATUS = Path("/var/lib/dpkg/status")


@dataclass(frozen=True)
class GpuInfo:
    """The GPU a plan is built for: name and compute capability (major, minor)."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def slug(self) -> str:
        """File-name form, e.g. "nvidia-geforce-rtx-4090-sm89"."""
        name = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        return f"{name}-sm{self.compute_capability[0]}{self.compute_capability[1]}"


@dataclass(frozen=True)
class BuildSettings:
    """Builder settings that change a plan (all part of its hash).

    workspace_bytes: the builder's WORKSPACE memory pool limit. strongly_typed: keep every tensor's type from
    the graph (always on in TensorRT 11; on 10.x off means weak typing with precision flags). tf32: allow TF32
    for fp32 convolutions and matrix products (off: fp32 plans match ONNX Runtime within 1e-4).
    """

    workspace_bytes: int = 1 << 30
    strongly_typed: bool = True
    tf32: bool = False


@dataclass(frozen=True)
class BuilderPolicy:
    """How to create the network and builder config: strongly typed or not, BuilderFlag names to set and to
    clear."""

    strongly_typed: bool
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]


@dataclass(frozen=True)
class FormChoice:
    """Which exported form to build and whether its custom nodes become libdpa_plugins.so plugins."""

    form: str
    uses_plugins: bool
    note: str


def version_tuple(version: str) -> tuple[int, ...]:
    """"10.3.0.30" -> (10, 3, 0, 30); non-numeric parts end it."""
    numbers = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if not digits:
            break
        numbers.append(int(digits.group()))
    return tuple(numbers)


def builder_policy(tensorrt_version: str, precision: str, settings: BuildSettings = BuildSettings()) -> BuilderPolicy:
    """The network flag and builder flags for a graph variant of `precision` on a TensorRT version.

    Precision lives in the graph (fp16 variants carry fp16 tensors, int8 variants Q/DQ nodes). TensorRT 11:
    every network is strongly typed and has no precision flags. TensorRT 10: strongly typed by default
    (STRONGLY_TYPED network flag: the graph's types are kept and explicit Q/DQ quantization needs no flag);
    with settings.strongly_typed off, weak typing needs FP16 for the fp16 variant and INT8 for the Q/DQ
    variant. TF32 is cleared unless settings.tf32.
    """
    version = version_tuple(tensorrt_version)
    if version[:2] < MINIMUM_TENSORRT:
        raise DpaError(f"TensorRT {tensorrt_version} is too old: this project needs "
                       f"{'.'.join(map(str, MINIMUM_TENSORRT))} or newer (JetPack 6.1+)")
    clear = () if settings.tf32 else ("TF32",)
    if version[0] >= 11 or settings.strongly_typed:
        return BuilderPolicy(True, (), clear)
    weak_flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}
    return BuilderPolicy(False, weak_flags[precision], clear)


def choose_tensorrt_form(exported: Sequence[str], plugins_loaded: bool, tensorrt_version: str,
                         form: str | None = None) -> FormChoice:
    """The form TensorRT builds.

    With the plugin library loaded: `plugin` when exported (custom nodes only; every TensorRT version uses the
    plugins), else `functions` (TensorRT >= 10.7 swaps the registered plugin in; <= 10.6 imports the function
    bodies). Without it: `functions` (TensorRT imports the bodies), else `portable`. The `plugin` form without
    the library is an error. `form` forces one.
    """
    plugin_preferred = version_tuple(tensorrt_version)[:2] >= PLUGIN_PREFERRED_FROM
    if form is None:
        order = ("plugin", "functions", "portable") if plugins_loaded else ("functions", "portable")
        form = next((candidate for candidate in order if candidate in exported), None)
        if form is None:
            raise DpaError(f"only the {', '.join(exported)} form was exported, whose custom nodes need "
                           "libdpa_plugins.so: build it (export/plugins/README.md) and pass --plugins, or re-export "
                           "with --form functions")
    elif form not in exported:
        raise DpaError(f"form {form!r} was not exported (exported: {', '.join(exported)})")
    if form == "plugin":
        if not plugins_loaded:
            raise DpaError("the plugin form needs libdpa_plugins.so loaded: build it (export/plugins/README.md) "
                           "and pass --plugins")
        return FormChoice(form, True, "custom nodes run as libdpa_plugins.so plugins")
    if form == "functions" and plugins_loaded and plugin_preferred:
        return FormChoice(form, True, f"TensorRT {tensorrt_version} swaps the registered plugins in")
    if form == "functions" and plugins_loaded:
        return FormChoice(form, False, f"TensorRT {tensorrt_version} (< 10.7) imports the function bodies, not the "
                          "plugins: re-export with --form plugin (or all) to use libdpa_plugins.so")
    if form == "functions":
        return FormChoice(form, False, "no plugin library: the custom nodes run as their standard-op function bodies")
    return FormChoice(form, False, "standard ops only")


@dataclass(frozen=True)
class PlanInputs:
    """Everything that invalidates a plan."""

    onnx_sha256: str
    precision: str
    form: str
    tensorrt_version: str
    gpu: GpuInfo
    plugin_sha256: str | None
    settings: BuildSettings


def plan_hash(inputs: PlanInputs) -> str:
    """sha256 (hex) over the plan format and every field of `inputs`."""
    fields = {"format": PLAN_FORMAT, **asdict(inputs)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def plan_file_name(graph: str, inputs: PlanInputs) -> str:
    """"<graph>-<first 16 hex digits of plan_hash>.plan"."""
    return f"{graph}-{plan_hash(inputs)[:16]}.plan"


def timing_cache_name(tensorrt_version: str, gpu: GpuInfo) -> str:
    """"timing-<TensorRT version>-<GPU slug>.cache": one timing cache per TensorRT version and GPU."""
    return f"timing-{tensorrt_version}-{gpu.slug}.cache"


def normalized_name(distribution: str) -> str:
    """A distribution name as pip compares them (PEP 503): "tensorrt_cu12_libs" -> "tensorrt-cu12-libs"."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def tensorrt_cuda_major(distributions: Mapping[str, str], debian_packages: Mapping[str, str] | None = None
                        ) -> int | None:
    """The CUDA major version the installed TensorRT was built for, or None when it cannot be told.

    distributions: installed Python distributions, name -> version; pip's TensorRT names its CUDA major
    (tensorrt-cu12, tensorrt_cu13_libs, ...; several majors at once are ambiguous: None). debian_packages:
    installed Debian packages, name -> version, asked only when no pip TensorRT names a major: JetPack's
    python3-libnvinfer and libnvinferN carry it in the version ("10.3.0.30-1+cuda12.5" -> 12).
    """
    pip = {int(match.group(1)) for name in distributions
           if (match := re.fullmatch(r"tensorrt-cu(\d+)(-bindings|-libs)?", normalized_name(name)))}
    if pip:
        return pip.pop() if len(pip) == 1 else None
    debian = {int(match.group(1)) for name, version in (debian_packages or {}).items()
              if re.fullmatch(r"(python3-)?libnvinfer\d*", name) and (match := re.search(r"\+cuda(\d+)", version))}
    return debian.pop() if len(debian) == 1 else None


def cuda_python_requirement(cuda_major: int | None) -> str | None:
    """The cuda-python requirement that pairs with TensorRT built for CUDA `cuda_major` (12 ->
    "cuda-python>=12.0,<13": cuda-python 13 needs a CUDA 13 driver); None when the major is unknown."""
    return None if cuda_major is None else f"cuda-python>={cuda_major}.0,<{cuda_major + 1}"


def cuda_python_hint(cuda_major: int | None) -> str:
    """`pip install '<requirement>'` for TensorRT's CUDA major, or both choices when it is unknown."""
    requirement = cuda_python_requirement(cuda_major)
    if requirement is not None:
        return f"pip install '{requirement}'"
    return ("pip install the cuda-python of your TensorRT's CUDA major: 'cuda-python>=12.0,<13' for CUDA 12 "
            "(JetPack 6), 'cuda-python>=13.0,<14' for CUDA 13")


def check_cuda_python(cuda_python_version: str | None, tensorrt_version: str, cuda_major: int | None) -> None:
    """DpaError unless the installed cuda-python (`cuda_python_version`; None: no distribution metadata) has the
    CUDA major TensorRT was built for (`cuda_major`; None: unknown, nothing to check)."""
    if cuda_python_version is None or cuda_major is None:
        return
    if version_tuple(cuda_python_version)[:1] != (cuda_major,):
        raise DpaError(f"cuda-python {cuda_python_version} does not pair with TensorRT {tensorrt_version}, built for "
                       f"CUDA {cuda_major}: {cuda_python_hint(cuda_major)}")


def check_cuda_driver(cuda_python_version: str | None, driver_version: int, cuda_major: int | None) -> None:
    """DpaError when the installed cuda-python is of a newer CUDA major than the driver supports
    (`driver_version` from cudaDriverGetVersion, e.g. 12060): every CUDA call would fail with
    cudaErrorInsufficientDriver. The fix named depends on TensorRT's CUDA major `cuda_major` (None: unknown)."""
    driver_major = driver_version // 1000
    if cuda_python_version is None or version_tuple(cuda_python_version)[:1] <= (driver_major,):
        return
    if cuda_major is None or cuda_major <= driver_major:
        fix = cuda_python_hint(driver_major)
    elif driver_major in TENSORRT_EXTRA_CUDA_MAJORS:
        fix = (f"install a driver for CUDA {cuda_major}, or TensorRT and cuda-python for CUDA {driver_major}: "
               f"pip install 'dpa-edge[tensorrt-cu{driver_major}]'")
    else:
        fix = f"install a driver for CUDA {cuda_major}"
    raise DpaError(f"cuda-python {cuda_python_version} needs a CUDA {version_tuple(cuda_python_version)[0]} driver, "
                   f"this driver supports CUDA {cuda_version_string(driver_version)}: {fix}")


def cuda_version_string(version: int) -> str:
    """A CUDA version number as CUDA reports it -> "major.minor": 12060 -> "12.6"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def parse_dpkg_status(text: str) -> dict[str, str]:
    """Installed Debian packages, name -> version, from the text of /var/lib/dpkg/status."""
    packages = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.MULTILINE))
        if "Package" in fields and "Version" in fields and fields.get("Status", "").endswith(" installed"):
            packages[fields["Package"]] = fields["Version"]
    return packages


def cuda_python_installed() -> bool:
    """Whether cuda-python's CUDA runtime bindings can be imported (cuda.bindings.runtime, or cuda.cudart before
    cuda-python 12.6). A bare `cuda` namespace package (left by other NVIDIA wheels) does not count."""
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            if importlib.util.find_spec(module) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False
