"""`dpa bench`: per-stage latency, frames per second and peak memory of the runtime, side by side with the PyTorch
model; `dpa bench --targets` measures the speed targets as ratios of per-frame times in one run.

A command that composes the packages: the runtime's timers (`dpa.runtime.benchmark`), PyTorch through the pytorch
backend (`dpa.training.torch_engine`) and the public code's re-enactment (`dpa.training.bench_torch`), benchmark
exports (`dpa.export`) and the int8 variant (`dpa.calibration`). See `dpa.runtime.benchmark` for how a
measurement is timed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpa.errors import DpaError
from dpa.manifest import Manifest
from dpa.runtime.benchmark.measurements import (
    bench_clip,
    decode_source,
    live_flows,
    live_loop_timer,
    runtime_timer,
    segmenter_live_timer,
    synthetic_source_uri,
)
from dpa.runtime.benchmark.report import (
    SUPPLEMENTARY_RATIOS,
    TARGET_RATIOS,
    base_report,
    evaluate_ratios,
    finish_report,
)
from dpa.runtime.benchmark.timers import TimingSettings, interleave
from dpa.runtime.chain import StageChain

log = logging.getLogger(__name__)


BENCH_CACHE = "bench"  # under $DPA_CACHE or ~/.cache/dpa


@dataclass
class EngineOptions:
    """What `open_engine` is asked for (see `dpa.runtime.engines.open_engine`); threads come from TimingSettings."""

    backend: str = "onnxruntime"
    device: str = "auto"
    providers: list[str] | None = None
    cache: str | None = None
    plugins: str | None = None


def open_bench_engine(export_dir: str | Path, precision: str, options: EngineOptions, threads: int | None):
    """The engine for one export directory and precision (the only place the harness opens engines)."""
    from dpa.runtime.engines import open_engine

    return open_engine(export_dir, backend=options.backend, precision=precision, device=options.device,
                       threads=threads, providers=options.providers, cache_dir=options.cache,
                       plugin_library=options.plugins)


def bench_cache_root(override: str | Path | None = None) -> Path:
    """Where automatic benchmark exports go: `override`, else $DPA_CACHE/bench, else ~/.cache/dpa/bench."""
    if override is not None:
        return Path(override)
    root = os.environ.get("DPA_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dpa") / BENCH_CACHE


def bench_export(config_name: str, size: int | None, memory: int | None, width: float | None = None,
                 cache_root: str | Path | None = None) -> Path:
    """An export of the `config_name` preset at S, N (and width) with calibrated untrained weights (`dpa export
    --init calibrated`), in `cache_root/<config>-<S>-<N>[-w<width>]`; reused while its manifest matches.

    Timings do not depend on the weights; the calibrated initialisation keeps the activations in a trained
    network's range. Needs torch (the export); reusing a cached export does not.
    """
    from dpa.training.config import get_config

    config = get_config(config_name, size=size, memory=memory, width=width)
    name = f"{config.name}-{config.size}-{config.memory}" + (f"-w{config.width:g}" if width is not None else "")
    directory = bench_cache_root(cache_root) / name
    if (directory / "manifest.json").is_file():
        try:
            manifest = Manifest.load(directory)
        except DpaError:
            manifest = None
        if manifest and dict(manifest.model.config) == config.to_dict() and "functions" in manifest.forms:
            log.info("benchmark model %s: reusing %s", name, directory)
            return directory
    log.info("benchmark model %s: exporting %s (calibrated untrained weights) to %s", name, config.name, directory)
    from dpa.export.exporter import export_stage_graphs, model_for_export

    model, weights = model_for_export(None, config_name, size, memory, init="calibrated", out=directory, width=width)
    export_stage_graphs(model, directory, weights)
    return directory


def _engine_json(engine) -> dict:
    description = engine.describe()
    return {key: description[key] for key in ("backend", "precision", "device", "providers", "form", "directory",
                                               "versions") if key in description}


def _torch_device(engine_device: str, requested: str) -> str:
    """The PyTorch device next to an engine: cuda where the engine (or the request) is on a GPU, else cpu."""
    if requested.startswith("cuda"):
        return requested
    return "cuda" if str(engine_device).startswith("cuda") else "cpu"


def _check_torch_device(requested: str) -> None:
    """Fail before the long work when the PyTorch side is asked for CUDA that it cannot use."""
    if requested.startswith("cuda"):
        from dpa.training.torch_engine import torch_device

        torch_device(requested)


def _frame_description(settings: TimingSettings, size: int) -> dict:
    return {"frames": f"generate_clip(seed {settings.seed}), {settings.clip_length} frames of {size}x{size} px, "
                      "pre-decoded",
            "flow": f"DIS ({settings.flow_preset}) at the model's input size, live direction -flow(t->t-1)"}


def _torch_engine(export_dir: str | Path, device: str, threads: int | None):
    """The PyTorch model an export was made from, as the pytorch backend (`dpa.training.torch_engine`)."""
    from dpa.training.torch_engine import open_engine

    return open_engine(export_dir, "pytorch", device=device, threads=threads)


def eager_timer(torch_engine, frames, flows, settings: TimingSettings, name: str = "eager"):
    """PyTorch eager per frame with cached memory: the pytorch backend through the same `Segmenter` and chain as the
    runtime (`runtime_timer`), batch 1, inference mode."""
    from dpa.training.torch_engine import engine_model

    timer = runtime_timer(StageChain(torch_engine), frames, flows, settings, name=name)
    model = engine_model(torch_engine)
    timer.samples.description = (f"PyTorch eager ({model.config.name}) per frame with cached memory: the pytorch "
                                 "backend's stage graphs through the runtime's Segmenter (pre-processing + encoder, "
                                 "ima, decoder + post-processing), batch 1, inference_mode")
    timer.samples.info["device"] = torch_engine.device
    return timer


def run_bench(export_dir: str | Path, settings: TimingSettings, engine_options: EngineOptions | None = None,
              precision: str = "fp32", baselines: Sequence[str] = ()) -> dict:
    """`dpa bench`: the runtime on one export (backend, precision, size from the export) and, on request, the
    PyTorch baselines ("eager", "reference-code") of the same weights, interleaved repeat by repeat. Returns the
    report (see the module docstring): per measurement the per-frame and per-stage medians, spread, fps, peak
    RSS."""
    engine_options = engine_options or EngineOptions()
    unknown = sorted(set(baselines) - {"eager", "reference-code"})
    if unknown:
        raise DpaError(f"unknown baseline {', '.join(unknown)}; choose eager or reference-code")
    if baselines:
        _check_torch_device(engine_options.device)
    export_dir = Path(export_dir)
    manifest = Manifest.load(export_dir)
    frames = bench_clip(manifest.size, settings.clip_length, settings.seed)
    flows = live_flows(frames, manifest.size, settings.flow_preset)
    with open_bench_engine(export_dir, precision, engine_options, settings.threads) as engine:
        config = {
            "description": f"{manifest.config_name} S={manifest.size} N={manifest.memory}, "
                           f"{engine.backend} {engine.precision} on {engine.device}",
            "model": dict(manifest.model.config), "size": manifest.size, "memory": manifest.memory,
            "export": str(export_dir), "weights": manifest.checkpoint.init,
            "engine": _engine_json(engine), "timing": settings.to_json(),
            **_frame_description(settings, manifest.size),
        }
        report = base_report("bench", config)
        chain = StageChain(engine)
        timers = [runtime_timer(chain, frames, flows, settings)]
        if baselines:
            from dpa.training import bench_torch
            from dpa.training.torch_engine import engine_model

            device = _torch_device(engine.device, engine_options.device)
            config["pytorch"] = bench_torch.describe(device, settings.threads)
            torch_engine = _torch_engine(export_dir, device, settings.threads)
            if "eager" in baselines:
                timers.append(eager_timer(torch_engine, frames, flows, settings))
            if "reference-code" in baselines:
                timers.append(bench_torch.reference_code_timer(engine_model(torch_engine), frames, flows, settings,
                                                               device))
        interleave(timers, settings.repeats, settings.progress)
    report["measurements"] = {timer.samples.name: timer.samples.to_json() for timer in timers}
    return finish_report(report)


@dataclass
class TargetModels:
    """The exports `--targets` measures: paper-iv (the model under test) and paper-ii (IFA off, same S, N, width)."""

    paper_iv: Path
    paper_ii: Path


def target_models(export: str | Path | None, paper_ii_export: str | Path | None, size: int | None,
                  memory: int | None, width: float | None, cache_root: str | Path | None) -> TargetModels:
    """The paper-iv export (`export`, else exported into the benchmark cache) and a paper-ii export of the same S,
    N and width (`paper_ii_export`, else exported likewise)."""
    if export is not None:
        manifest = Manifest.load(export)
        config = dict(manifest.model.config)
        if not (config["ima"] != "off" and config["ifa"] != "off"):
            raise DpaError(f"--targets measures a model with IMA and IFA (paper-iv); {export} holds {config['name']}")
        width = None if config["width"] == 1.0 else config["width"]
        paper_iv = Path(export)
    else:
        paper_iv = bench_export("paper-iv", size, memory, width, cache_root)
    iv = Manifest.load(paper_iv)
    if paper_ii_export is not None:
        paper_ii = Path(paper_ii_export)
        ii = Manifest.load(paper_ii)
        config = dict(ii.model.config)
        if config["ifa"] != "off" or config["ima"] == "off":
            raise DpaError(f"--paper-ii-export must hold a model with IMA and without IFA; {paper_ii} holds "
                           f"{config['name']}")
        if (ii.size, dict(ii.model.config)["width"]) != (iv.size, dict(iv.model.config)["width"]):
            raise DpaError(f"--paper-ii-export {paper_ii} has S {ii.size}, width {config['width']}; the paper-iv "
                           f"export has S {iv.size}, width {iv.model.config['width']}: they must match")
    else:
        paper_ii = bench_export("paper-ii", iv.size, iv.memory, width, cache_root)
    return TargetModels(paper_iv, paper_ii)


def int8_variant(export_dir: Path, calibration_clips: str, threads: int | None = None,
                 max_frames: int = 6) -> tuple[Path | None, str | None]:
    """The int8 variant of an export: (directory, None), or (None, why not).

    An existing EXPORT/int8 is used as is. Otherwise `dpa.calibration.calibrate` makes it (entropy calibration on
    the first `max_frames` frames of each clip of `calibration_clips`, a comma-separated list of clip arguments);
    a calibration that fails is the reason returned.
    """
    from dpa.calibration.calibrate import calibrate
    from dpa.runtime.engine import resolve_variant

    try:
        return resolve_variant(export_dir, "int8"), None
    except DpaError:
        pass
    log.info("int8: calibrating %s on %s", export_dir, calibration_clips)
    try:
        result = calibrate(export_dir, calibration_clips.split(","), precisions=["int8"], max_frames=max_frames,
                           threads=threads)
    except DpaError as error:
        return None, f"calibrating the int8 variant failed: {error}"
    return result.variants["int8"], None


def _live_frames(uri: str, count: int) -> tuple[list | None, str | None]:
    """The live source's first `count` frames decoded through GStreamer, or (None, why not)."""
    try:
        return decode_source(uri, count), None
    except (DpaError, ImportError) as error:
        return None, f"the GStreamer source could not be read: {error}"


def _target_timers(engine, engine_ii, models: TargetModels, frames, flows, settings: TimingSettings, device: str,
                   config: dict) -> list:
    """The timers every target run has: the runtime on paper-iv and paper-ii, PyTorch eager on both, the public
    code's re-enactment on paper-iv."""
    from dpa.training import bench_torch
    from dpa.training.torch_engine import engine_model

    config["pytorch"] = bench_torch.describe(device, settings.threads)
    torch_iv = _torch_engine(models.paper_iv, device, settings.threads)
    torch_ii = _torch_engine(models.paper_ii, device, settings.threads)
    return [
        runtime_timer(StageChain(engine), frames, flows, settings),
        runtime_timer(StageChain(engine_ii), frames, flows, settings, name="runtime_paper_ii"),
        eager_timer(torch_iv, frames, flows, settings),
        eager_timer(torch_ii, frames, flows, settings, name="eager_paper_ii"),
        bench_torch.reference_code_timer(engine_model(torch_iv), frames, flows, settings, device),
    ]


def run_targets(models: TargetModels, settings: TimingSettings, engine_options: EngineOptions | None = None,
                live_source: str | None = None, calibration_clips: str = "synthetic:0..3",
                live: bool = True, int8: bool = True) -> dict:
    """`dpa bench --targets`: every measurement the target ratios need, interleaved repeat by repeat in one run,
    and the ratios.

    Measurements (paper-iv unless named): runtime, runtime_paper_ii, runtime_int8 (the int8 variant, made by
    `dpa calibrate` when missing), eager and eager_paper_ii (PyTorch, cached memory), reference_code (the public
    code's per-frame cost re-enacted), segmenter_live and live_loop (the GStreamer loop from `live_source`,
    default the benchmark clip through `test://synthetic`, to null://). A measurement that cannot run (no int8
    variant, no GStreamer) is listed under `skipped` with the reason, and its ratios are None with that reason.
    Long on purpose (~65 lines): one schedule opens every measured model and interleaves their repeats.
    """
    import contextlib

    engine_options = engine_options or EngineOptions()
    _check_torch_device(engine_options.device)
    iv_manifest, ii_manifest = Manifest.load(models.paper_iv), Manifest.load(models.paper_ii)
    size = iv_manifest.size
    frames = bench_clip(size, settings.clip_length, settings.seed)
    flows = live_flows(frames, size, settings.flow_preset)
    live_length = max(settings.warmup, 1) + settings.frames
    live_source = live_source or synthetic_source_uri(size, live_length, settings.seed)
    config = {
        "description": f"speed targets, {iv_manifest.config_name} S={size} N={iv_manifest.memory}",
        "paper_iv": dict(iv_manifest.model.config), "paper_ii": dict(ii_manifest.model.config),
        "size": size, "memory": iv_manifest.memory, "precision": "fp32",
        "exports": {"paper_iv": str(models.paper_iv), "paper_ii": str(models.paper_ii)},
        "weights": iv_manifest.checkpoint.init, "timing": settings.to_json(),
        **_frame_description(settings, size), "live_source": live_source if live else None,
        "schedule": "measurements interleaved: each round runs one repeat of every measurement, rotating the order",
    }
    report = base_report("targets", config)
    skipped = report["skipped"]
    int8_directory, skipped_int8 = (int8_variant(models.paper_iv, calibration_clips, settings.threads) if int8
                                    else (None, "left out (--no-int8)"))
    if skipped_int8:
        skipped["runtime_int8"] = skipped_int8
    source_frames, skipped_live = _live_frames(live_source, live_length) if live else (None, "left out (--no-live)")
    if skipped_live:
        skipped["live_loop"] = skipped_live
    with contextlib.ExitStack() as stack:
        def engine_of(directory: Path, precision: str = "fp32"):
            return stack.enter_context(open_bench_engine(directory, precision, engine_options, settings.threads))

        engine = engine_of(models.paper_iv)
        config["engine"] = _engine_json(engine)
        device = _torch_device(engine.device, engine_options.device)
        timers = _target_timers(engine, engine_of(models.paper_ii), models, frames, flows, settings, device, config)
        if int8_directory is not None:
            engine_int8 = engine_of(models.paper_iv, "int8")
            config["engine_int8"] = _engine_json(engine_int8)
            timers.append(runtime_timer(StageChain(engine_int8), frames, flows, settings, name="runtime_int8"))
        if source_frames is not None:
            timers.append(segmenter_live_timer(StageChain(engine), source_frames, settings))
            timers.append(live_loop_timer(StageChain(engine), live_source, settings, config["engine"]))
        interleave(timers, settings.repeats, settings.progress)
    measurements = report["measurements"] = {timer.samples.name: timer.samples.to_json() for timer in timers}
    report["ratios"], report["targets"] = evaluate_ratios(measurements, TARGET_RATIOS, skipped)
    report["supplementary_ratios"], report["supplementary"] = evaluate_ratios(measurements, SUPPLEMENTARY_RATIOS,
                                                                              skipped)
    report["gpu"] = ("not measured: no GPU was used in this run" if not device.startswith("cuda")
                     else f"PyTorch on {device}, engine on {config['engine'].get('device')}")
    return finish_report(report)

