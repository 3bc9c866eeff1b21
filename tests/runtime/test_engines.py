"""Engines (runtime/engines.py, runtime/tensorrt_engine.py) and `dpa build`: ONNX Runtime parity with plain
sessions, precision variants, provider checks, the TensorRT plan cache key and builder decisions (pure, no
TensorRT needed), and — with TensorRT and a GPU — plans against ONNX Runtime."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from dpa.cli import main
from dpa.errors import DpaError
from dpa.manifest import PRECISIONS, GraphSpec, Manifest, ModelRecord, Pipeline, Step, TensorSpec, WeightsRecord
from dpa.runtime import cli as runtime_cli
from dpa.runtime.chain import StageChain
from dpa.runtime.engine import Engine, check_engine, resolve_variant, zero_feed
from dpa.runtime.engines import BACKENDS, open_engine, visible_gpus
from dpa.runtime.onnxruntime_engine import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    TENSORRT_PROVIDER,
    choose_onnxruntime_form,
    choose_providers,
)
from dpa.runtime.tensorrt_policy import (
    BuildSettings,
    GpuInfo,
    PlanInputs,
    builder_policy,
    choose_tensorrt_form,
    cuda_python_installed,
    plan_file_name,
    plan_hash,
    timing_cache_name,
    version_tuple,
)

GRAPHS = ("encoder", "ima", "ifa_memory", "decoder")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped tiny checkpoint exported in every form (S 128, N 4)."""
    out = tmp_path_factory.mktemp("export")
    assert main(["export", "--checkpoint", "tiny", "--out", str(out), "--form", "all"]) == 0
    return out


def frames(manifest: Manifest, count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pre-processed-looking (rgb, flow) pairs, each (3, S, S) float32."""
    rng = np.random.default_rng(seed)
    size = manifest.size
    return [(rng.standard_normal((3, size, size), np.float32), rng.standard_normal((3, size, size), np.float32))
            for _ in range(count)]


class PlainRunner:
    """A runner answered through its host path (`infer`: numpy in and out, a plain session.run on ONNX Runtime)."""

    def __init__(self, runner):
        self.runner = runner
        self.name, self.input_names, self.output_names = runner.name, runner.input_names, runner.output_names

    def run_resident(self, feed):
        return self.runner.infer({name: np.asarray(value) for name, value in feed.items()})


def run_clip(engine: Engine, clip) -> list[dict[str, np.ndarray]]:
    """Every value of every frame (as host arrays); the first frame's entry goes into slot 0 of the memory after
    frame 0."""
    chain = StageChain(engine)
    bank = chain.new_bank()
    values = []
    for index, (rgb, flow) in enumerate(clip):
        values.append(chain.download(chain.process(rgb, flow, bank)))
        if index == 0:
            bank.write(0, {name.split("/", 1)[1]: array for name, array in values[0].items()
                           if name.startswith("ifa_memory/")})
    return values


# --- ONNX Runtime engine -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_onnxruntime_engine_equals_plain_sessions(exported):
    """The chain's resident path (OrtValues through I/O binding, the memory bank uploaded once) gives bit-identical
    values to plain session.run calls on host arrays, every value of every frame, with an empty and a filled
    memory bank."""
    with open_engine(exported, device="cpu", threads=1) as engine:
        assert (engine.backend, engine.precision, engine.device, engine.form) == ("onnxruntime", "fp32", "cpu",
                                                                                  "functions")
        clip = frames(engine.manifest, 2)
        ours = run_clip(engine, clip)
        plain = engine.with_runners({name: PlainRunner(runner) for name, runner in engine.runners.items()})
        reference = run_clip(plain, clip)
    for frame_ours, frame_reference in zip(ours, reference, strict=True):
        assert frame_ours.keys() == frame_reference.keys()
        for name in frame_reference:
            assert np.array_equal(frame_ours[name], frame_reference[name]), name
    assert "decoder/probability" in ours[1] and "ifa_memory/keys_appearance" in ours[0]


@pytest.mark.slow
def test_runner_infer_names_timing_and_describe(exported, tmp_path):
    engine = open_engine(exported, device="cpu", threads=1, cache_dir=tmp_path)
    for name, graph in engine.manifest.graphs.items():
        runner = engine.runners[name]
        outputs = runner.infer(zero_feed(graph.inputs))
        assert list(outputs) == graph.output_names
        assert all(outputs[t.name].shape == t.shape for t in graph.outputs)
        assert runner.last_seconds > 0
    described = engine.describe()
    assert described["backend"] == "onnxruntime" and described["providers"] == [CPU_PROVIDER]
    assert set(described["graphs"]) == set(GRAPHS) and described["versions"]["onnxruntime"]
    assert described["graphs"]["decoder"]["file"].endswith("decoder.onnx")
    json.dumps(described)
    engine.close()
    assert engine.runners == {}


@pytest.mark.slow
def test_portable_form_and_fp16_variant_directory(exported, tmp_path):
    """form= picks another exported form; precision fp16 opens EXPORT_DIR/fp16 as a drop-in export."""
    with open_engine(exported, device="cpu", threads=1, form="portable") as engine:
        assert engine.form == "portable" and engine.loads["decoder"].file.name == "decoder.portable.onnx"
    copy = tmp_path / "export"
    shutil.copytree(exported, copy)
    shutil.copytree(exported, copy / "fp16")
    manifest = json.loads((copy / "fp16" / "manifest.json").read_text())
    (copy / "fp16" / "manifest.json").write_text(json.dumps({**manifest, "precision": "fp16"}))
    with open_engine(copy, precision="fp16", device="cpu", threads=1) as engine:
        assert engine.precision == "fp16" and engine.directory == copy / "fp16"
        assert check_engine(engine).keys() == set(GRAPHS)


def test_cuda_provider_on_a_cpu_only_onnxruntime_is_an_error():
    onnxruntime = pytest.importorskip("onnxruntime")
    if CUDA_PROVIDER in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    available = onnxruntime.get_available_providers()
    with pytest.raises(DpaError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        choose_providers("cuda", available)
    with pytest.raises(DpaError, match="TensorrtExecutionProvider"):
        choose_providers("auto", available, ["tensorrt"])


def test_provider_choice():
    everything = [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]
    assert choose_providers("auto", everything) == everything
    assert choose_providers("auto", [CPU_PROVIDER, "AzureExecutionProvider"]) == [CPU_PROVIDER]
    assert choose_providers("cpu", everything) == [CPU_PROVIDER]
    assert choose_providers("cuda:1", everything) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert choose_providers("auto", everything, ["cuda", "cpu"]) == [CUDA_PROVIDER, CPU_PROVIDER]
    with pytest.raises(DpaError, match="device cpu with a GPU"):
        choose_providers("cpu", everything, ["tensorrt"])
    with pytest.raises(DpaError, match="device 'gpu'"):
        choose_providers("gpu", everything)


def test_onnxruntime_form_choice():
    assert choose_onnxruntime_form(["functions", "plugin", "portable"]) == "functions"
    assert choose_onnxruntime_form(["portable"]) == "portable"
    with pytest.raises(DpaError, match="cannot run"):
        choose_onnxruntime_form(["plugin"])
    with pytest.raises(DpaError, match="cannot run the 'plugin' form"):
        choose_onnxruntime_form(["functions", "plugin"], "plugin")


def test_nan_in_an_output_is_reported_with_the_graph(tmp_path):
    graph = GraphSpec("decoder", {"functions": "decoder.onnx"}, (TensorSpec("x", (1, 2), "float32"),),
                      (TensorSpec("y", (1, 2), "float32"),))

    class NanRunner:
        last_seconds = 0.001

        def infer(self, feed):
            return {"y": np.array([[0.0, np.nan]], np.float32)}

    engine = Engine(backend="onnxruntime", precision="fp16", device="cpu", directory=tmp_path,
                    manifest=SimpleNamespace(graphs={"decoder": graph}), runners={"decoder": NanRunner()},
                    form="functions", providers=[CPU_PROVIDER])
    with pytest.raises(DpaError, match="graph decoder output y: 1 of 2 values are NaN or Inf"):
        check_engine(engine)


# --- precision variants --------------------------------------------------------------------------------------

def write_manifest(directory, precision):
    """A minimal valid manifest of `precision`: one graph from the frame to the probability."""
    directory.mkdir(parents=True, exist_ok=True)
    graph = GraphSpec("decoder", {"functions": "decoder.onnx"}, (TensorSpec("rgb", (1, 3, 32, 32), "float32"),),
                      (TensorSpec("probability", (1, 1, 32, 32), "float32"),))
    Manifest(size=32, memory=1, graphs={"decoder": graph}, precision=precision,
             pipeline=Pipeline(("rgb",), (Step("decoder", {"rgb": "frame/rgb"}),), "decoder/probability"),
             model=ModelRecord({"name": "test"}, 1, "0" * 64), checkpoint=WeightsRecord("random", seed=0)
             ).save(directory)


def test_resolve_variant(tmp_path):
    write_manifest(tmp_path, "fp32")
    assert resolve_variant(tmp_path, "fp32") == tmp_path
    write_manifest(tmp_path / "fp16", "fp16")
    assert resolve_variant(tmp_path, "fp16") == tmp_path / "fp16"
    assert resolve_variant(tmp_path / "fp16", "fp16") == tmp_path / "fp16"
    with pytest.raises(DpaError, match=r"no int8 variant.*`dpa calibrate .* --frames .* --out "):
        resolve_variant(tmp_path, "int8")
    write_manifest(tmp_path / "int8", "fp32")  # a folder called int8 that is not an int8 variant
    with pytest.raises(DpaError, match="dpa calibrate"):
        resolve_variant(tmp_path, "int8")
    with pytest.raises(DpaError, match="choose one of fp32, fp16, int8"):
        resolve_variant(tmp_path, "bf16")


# --- TensorRT decisions (pure: no TensorRT needed) ----------------------------------------------------------

ORIN = GpuInfo("Orin", (8, 7))
BASE = PlanInputs("a" * 64, "fp32", "functions", "10.3.0.30", ORIN, "b" * 64, BuildSettings())


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "c" * 64}, {"precision": "fp16"}, {"form": "plugin"}, {"tensorrt_version": "10.3.0.31"},
    {"gpu": GpuInfo("NVIDIA GeForce RTX 4090", (8, 9))}, {"gpu": GpuInfo("Orin", (8, 8))},
    {"plugin_sha256": None}, {"plugin_sha256": "d" * 64}, {"settings": BuildSettings(workspace_bytes=1 << 31)},
    {"settings": BuildSettings(strongly_typed=False)}, {"settings": BuildSettings(tf32=True)},
])
def test_plan_hash_changes_with_every_input(change):
    assert plan_hash(replace(BASE, **change)) != plan_hash(BASE)


def test_plan_hash_is_stable_and_names_files():
    same = PlanInputs("a" * 64, "fp32", "functions", "10.3.0.30", GpuInfo("Orin", (8, 7)), "b" * 64, BuildSettings())
    assert plan_hash(same) == plan_hash(BASE) and re.fullmatch(r"[0-9a-f]{64}", plan_hash(BASE))
    assert plan_file_name("decoder", BASE) == f"decoder-{plan_hash(BASE)[:16]}.plan"
    assert re.fullmatch(r"ifa_memory-[0-9a-f]{16}\.plan", plan_file_name("ifa_memory", BASE))
    gpu = GpuInfo("NVIDIA GeForce RTX 4090", (8, 9))
    assert gpu.slug == "nvidia-geforce-rtx-4090-sm89"
    assert timing_cache_name("10.16.0.72", gpu) == "timing-10.16.0.72-nvidia-geforce-rtx-4090-sm89.cache"


def test_builder_policy_per_tensorrt_major_version():
    for precision in PRECISIONS:  # strongly typed everywhere by default; precision comes from the graph
        for version in ("10.3.0.30", "10.16.0.72", "11.0.0.1", "11.1.0"):
            policy = builder_policy(version, precision)
            assert policy.strongly_typed and policy.set_flags == () and policy.clear_flags == ("TF32",)
    weak = BuildSettings(strongly_typed=False)
    assert builder_policy("10.3.0.30", "fp16", weak).set_flags == ("FP16",)
    assert builder_policy("10.3.0.30", "int8", weak).set_flags == ("INT8",)
    assert builder_policy("10.3.0.30", "fp32", weak).set_flags == ()
    assert not builder_policy("10.3.0.30", "fp16", weak).strongly_typed
    eleven = builder_policy("11.0.0.1", "fp16", weak)  # TensorRT 11 has no weak typing and no precision flags
    assert eleven.strongly_typed and eleven.set_flags == ()
    assert builder_policy("10.3.0.30", "fp32", BuildSettings(tf32=True)).clear_flags == ()
    with pytest.raises(DpaError, match="too old"):
        builder_policy("8.6.1", "fp32")
    with pytest.raises(DpaError, match="too old"):
        builder_policy("10.2.0", "fp32")


def test_tensorrt_form_choice_per_version():
    every = ["functions", "plugin", "portable"]
    for version in ("10.3.0.30", "11.0.0.1"):
        choice = choose_tensorrt_form(every, True, version)
        assert (choice.form, choice.uses_plugins) == ("plugin", True)
    old = choose_tensorrt_form(["functions", "portable"], True, "10.3.0.30")
    assert (old.form, old.uses_plugins) == ("functions", False) and "--form plugin" in old.note
    new = choose_tensorrt_form(["functions", "portable"], True, "10.7.0.23")
    assert (new.form, new.uses_plugins) == ("functions", True)
    assert choose_tensorrt_form(every, False, "11.0.0.1").form == "functions"
    assert choose_tensorrt_form(["portable"], False, "10.3.0.30").form == "portable"
    assert choose_tensorrt_form(every, True, "10.8.0", form="portable").form == "portable"
    with pytest.raises(DpaError, match="libdpa_plugins.so"):
        choose_tensorrt_form(["plugin"], False, "10.8.0")
    with pytest.raises(DpaError, match="needs libdpa_plugins.so"):
        choose_tensorrt_form(every, False, "10.8.0", form="plugin")
    assert version_tuple("10.3.0.30") == (10, 3, 0, 30) and version_tuple("11.1.0.post1") == (11, 1, 0)


# --- dpa build -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_build_command_with_onnxruntime(exported, tmp_path, capsys):
    code = main(["build", str(exported), "--device", "cpu", "--threads", "1", "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    for graph in GRAPHS:
        assert re.search(rf"^{graph}\s+{graph}\.onnx\s", out, re.MULTILINE), out
    assert "onnxruntime fp32 on cpu, functions form" in out and "outputs finite" in out


@pytest.mark.slow
def test_build_command_without_the_variant_fails_with_one_line(exported, capsys):
    assert main(["build", str(exported), "--precision", "fp16"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpa build: error:") and "dpa calibrate" in err and len(err.splitlines()) == 1


def test_build_options_agree_with_the_engines_and_stay_light():
    assert runtime_cli.BACKEND_CHOICES == (*BACKENDS, "auto")
    assert runtime_cli.PRECISION_CHOICES == PRECISIONS
    code = ("import sys\nfrom dpa.cli import build_parser\nbuild_parser().parse_args(['build', 'x'])\n"
            "heavy = [m for m in ('onnxruntime', 'tensorrt', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# --- TensorRT (NVIDIA machines) ------------------------------------------------------------------------------

@pytest.fixture
def tensorrt_gpu():
    tensorrt = pytest.importorskip("tensorrt", reason="TensorRT not installed")
    if not cuda_python_installed():  # not importorskip("cuda"): a bare `cuda` namespace package imports too
        pytest.skip("cuda-python not installed")
    if not visible_gpus():
        pytest.skip("no GPU visible")
    return tensorrt


def probability_error(engine, exported, clip) -> float:
    ours = run_clip(engine, clip)
    with open_engine(exported, device="cpu") as onnxruntime:
        reference = run_clip(onnxruntime, clip)
    output = engine.manifest.pipeline.output
    return max(float(np.abs(a[output] - b[output]).max()) for a, b in zip(ours, reference, strict=True))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_plans_match_onnxruntime_and_are_reused(tensorrt_gpu, exported, tmp_path):
    with open_engine(exported, backend="tensorrt", cache_dir=tmp_path, plugin_library=None) as engine:
        assert all(load.built for load in engine.loads.values())
        plans = {name: load.plan for name, load in engine.loads.items()}
        assert all(plan.parent == tmp_path and plan.is_file() for plan in plans.values())
        assert list(tmp_path.glob("timing-*.cache"))
        assert probability_error(engine, exported, frames(engine.manifest, 3)) <= 1e-4
    modified = {name: plan.stat().st_mtime_ns for name, plan in plans.items()}
    with open_engine(exported, backend="tensorrt", cache_dir=tmp_path) as again:
        assert not any(load.built for load in again.loads.values())
        assert {name: load.plan for name, load in again.loads.items()} == plans
        assert {name: plan.stat().st_mtime_ns for name, plan in plans.items()} == modified
        assert check_engine(again).keys() == set(GRAPHS)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_uses_the_plugin_library_for_the_plugin_form(tensorrt_gpu, exported, tmp_path):
    from dpa.runtime.plugins import (
        find_plugin_library,
        has_tensorrt_plugins,
        load_plugin_library,
        registered_plugin_library,
    )

    library = registered_plugin_library()  # TensorRT takes one library's plugins per process
    if library is None:
        try:
            library = find_plugin_library()
        except DpaError as error:
            pytest.skip(str(error))
        if not has_tensorrt_plugins(load_plugin_library(library)):
            pytest.skip(f"{library} was built without the TensorRT plugins")
    # Registered before the engine opens, as an application would: the engine must not register them again.
    load_plugin_library(library, tensorrt=tensorrt_gpu)
    with open_engine(exported, backend="tensorrt", cache_dir=tmp_path, plugin_library=library) as engine:
        assert engine.form == "plugin" and engine.describe()["plugin_library"] == str(library)
        for name, graph in engine.manifest.graphs.items():
            custom = sum(graph.custom_nodes["plugin"].values())
            assert engine.loads[name].plugin_layers == custom, name
        assert probability_error(engine, exported, frames(engine.manifest, 3)) <= 1e-4


def test_runtime_readme_build_commands_parse():
    from pathlib import Path

    from dpa.cli import build_parser

    readme = (Path(__file__).resolve().parents[2] / "runtime" / "README.md").read_text()
    lines = [line.split("dpa ", 1)[1] for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
             for line in block.splitlines() if "dpa build" in line]
    assert len(lines) >= 4
    for line in lines:
        args = build_parser().parse_args(shlex.split(line, comments=True))
        assert args._command.run is runtime_cli.run_build, line
