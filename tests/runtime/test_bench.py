"""`dpa bench`: statistics on hand-made samples, ratio arithmetic, the reference-code re-enactment's extra encoder
passes, and the report's structure. No timing thresholds: timings belong in benchmarks, not tests."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import time

import numpy as np
import pytest

from dpa.errors import DpaError
from dpa.runtime.benchmark import machine, measurements, timers
from dpa.runtime.benchmark.report import SCHEMA, TARGET_RATIOS, Ratio, evaluate_ratios, quantity
from dpa.runtime.benchmark.timers import Samples, TimingSettings, summarize

TIMING = {"frames": 2, "warmup": 1, "repeats": 2}


def _main(argv: list[str]) -> int:
    from dpa.cli import main

    return main(argv)


def test_summarize_gives_median_quartiles_and_range_in_milliseconds():
    summary = summarize([0.004, 0.001, 0.100, 0.003, 0.002])
    assert summary == pytest.approx({"median": 3.0, "q1": 2.0, "q3": 4.0, "iqr": 2.0, "min": 1.0, "max": 100.0,
                                     "n": 5})
    assert summarize([0.001, 0.002]) == pytest.approx({"median": 1.5, "q1": 1.25, "q3": 1.75, "iqr": 0.5, "min": 1.0,
                                                       "max": 2.0, "n": 2})
    assert summarize([0.25])["median"] == summarize([0.25])["q1"] == summarize([0.25])["max"] == pytest.approx(250.0)
    with pytest.raises(DpaError):
        summarize([])


def test_stage_means_amortise_stages_that_ran_on_some_frames_only():
    records = [{"encoder": 0.010, "ifa_memory": 0.004}, {"encoder": 0.030}]
    assert timers.per_frame_means(records, 2) == pytest.approx({"encoder": 0.020, "ifa_memory": 0.002})


def test_samples_fill_stages_missing_from_a_repeat_with_zero():
    samples = Samples("runtime", "test", frames=2, warmup=1)
    samples.add_repeat(0.010, {"encoder": 0.006}, with_flow=0.012)
    samples.add_repeat(0.030, {"encoder": 0.008, "ifa_memory": 0.002}, with_flow=0.034)
    assert samples.stages == {"encoder": [0.006, 0.008], "ifa_memory": [0.0, 0.002]}
    report = samples.to_json()
    assert report["per_frame_ms"]["median"] == pytest.approx(20.0)
    assert report["fps"] == pytest.approx(50.0)
    assert report["with_flow_ms"]["median"] == pytest.approx(23.0)
    assert report["fps_with_flow"] == pytest.approx(1e3 / 23.0)
    assert report["stages_ms"]["ifa_memory"]["max"] == pytest.approx(2.0)
    assert list(report["stages_ms"]) == ["encoder", "ifa_memory"]
    assert report["repeats"] == 2 and report["memory_entry_ms"] is None


def test_steady_per_frame_spans_end_of_warmup_to_end_of_last_timed_frame():
    assert measurements._steady_per_frame([10.0, 11.0, 13.0, 16.0], warmup=1, frames=3) == pytest.approx(2.0)
    assert measurements._steady_per_frame([10.0, 11.0, 13.0, 16.0, 30.0], warmup=2, frames=2) == pytest.approx(2.5)
    with pytest.raises(DpaError):
        measurements._steady_per_frame([1.0, 2.0], warmup=1, frames=2)


def _entry(per_frame_ms: float, **stages_ms: float) -> dict:
    return {"per_frame_ms": {"median": per_frame_ms}, "with_flow_ms": {"median": per_frame_ms + 5.0},
            "stages_ms": {stage: {"median": value} for stage, value in stages_ms.items()}}


def test_ratios_are_numerator_median_over_denominator_median():
    measurements = {"runtime": _entry(40.0, flow=5.0), "eager": _entry(50.0), "reference_code": _entry(200.0),
                    "runtime_paper_ii": _entry(38.0), "segmenter_live": _entry(45.0), "live_loop": _entry(46.0)}
    values, details = evaluate_ratios(measurements, TARGET_RATIOS, {"runtime_int8": "no int8 variant"})
    assert values == pytest.approx({"runtime_vs_eager": 0.8, "runtime_vs_reference_code": 0.2,
                                    "ifa_marginal": 40.0 / 38.0, "live_overhead": 46.0 / 45.0, "flow_share": 5.0 / 45.0,
                                    "int8_vs_fp32": None})
    assert details["runtime_vs_eager"]["met"] is True and details["ifa_marginal"]["met"] is True
    assert details["flow_share"]["numerator_ms"] == 5.0 and details["flow_share"]["denominator_ms"] == 45.0
    assert details["int8_vs_fp32"]["met"] is None and "no int8 variant" in details["int8_vs_fp32"]["reason"]
    _, missed = evaluate_ratios({"a": _entry(3.0), "b": _entry(2.0)}, [Ratio("r", "a.per_frame_ms", "b.per_frame_ms",
                                                                             1.10, "")])
    assert missed["r"]["value"] == pytest.approx(1.5) and missed["r"]["met"] is False
    assert quantity(measurements, "runtime.stages_ms.flow") == 5.0
    assert quantity(measurements, "runtime.stages_ms.missing") is None
    assert quantity(measurements, "absent.per_frame_ms") is None


def test_peak_memory_sees_an_allocation_inside_the_block():
    if timers.resident_bytes() is None:
        pytest.skip("no /proc/self/statm on this system")
    with timers.PeakMemory(interval=0.001) as memory:
        block = mmap.mmap(-1, 64 * 2**20)  # fresh pages, whatever the allocator keeps from earlier tests
        np.frombuffer(block, np.uint8)[:] = 1  # touch every page
        time.sleep(0.2)  # the sampling thread runs while this one sleeps
        block.close()
    assert memory.peak - memory.before >= 48 * 2**20
    assert timers.lifetime_peak_rss_bytes() >= 0.95 * memory.peak  # getrusage counts pages a little differently


def test_interleave_alternates_measurements_and_rotates_the_order():
    calls = []

    def timer(name):
        samples = Samples(name, "test", frames=1, warmup=0)

        def repeat(bar):
            calls.append(name)
            samples.add_repeat(0.001)

        return timers.Timer(samples, repeat, frames_per_repeat=1)

    measured = [timer("a"), timer("b"), timer("c")]
    timers.interleave(measured, repeats=4, progress=False)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(len(t.samples.per_frame) == 4 for t in measured)
    if timers.resident_bytes() is not None:
        assert all(t.samples.peak_rss >= t.samples.rss_before > 0 for t in measured)


def test_oversubscribed_machine_is_flagged():
    assert machine.oversubscription_warning({"usable_cores": 2, "load_average": [1.5, 1, 1],
                                           "load_average_end": [1.9, 1, 1]}) is None
    warning = machine.oversubscription_warning({"usable_cores": 2, "load_average": [1.0, 1, 1],
                                              "load_average_end": [5.2, 3, 2]})
    assert "load 5.2 on 2 usable cores" in warning and "--threads 1" in warning
    assert "ratios" in machine.oversubscription_warning({"usable_cores": 2, "load_average": [3.0, 1, 1]}, threads=1)


def test_timing_settings_reject_nonsense():
    with pytest.raises(DpaError):
        TimingSettings(frames=0)
    with pytest.raises(DpaError):
        TimingSettings(repeats=0)
    with pytest.raises(DpaError):
        TimingSettings(warmup=-1)
    assert TimingSettings().threads == machine.usable_cores()


def test_machine_info_names_the_cpu_and_versions_without_importing_torch():
    info = machine.machine_info()
    assert info["usable_cores"] >= 1 and info["python"]
    assert set(info["packages"]) >= {"numpy", "onnxruntime", "torch", "opencv"}


# ---- the PyTorch timers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch = pytest.importorskip("torch")
    from dpa.training.config import get_config
    from dpa.training.model import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_model(get_config("tiny", size=64, memory=3)).eval()
    torch.set_num_threads(threads)  # a global setting must not leak into the tests that follow


def _count_encoder_passes(model) -> tuple[dict[str, int], list]:
    """Forward hooks on the first block of each encoder: every pass through an encoder starts there."""
    counts = {"appearance": 0, "motion": 0}

    def counter(modality):
        def hook(module, inputs, output):
            counts[modality] += inputs[0].shape[0]  # frames, whatever the batch
        return hook

    handles = [model.encoders[m].blocks[0].register_forward_hook(counter(m)) for m in counts]
    return counts, handles


def test_reference_code_reencodes_the_n_references_for_every_query_frame(tiny_model):
    import torch

    from dpa.commands.bench import eager_timer
    from dpa.training import bench_torch
    from dpa.training.torch_engine import model_engine

    memory_size = tiny_model.config.memory
    frames = measurements.bench_clip(64, TIMING["warmup"] + TIMING["frames"], seed=3)
    flows = measurements.live_flows(frames, 64)
    settings = TimingSettings(**TIMING, threads=1, progress=False)
    counts, handles = _count_encoder_passes(tiny_model)
    try:
        rgb, flow = bench_torch.model_inputs(frames, flows, 64, "cpu")
        references = rgb[:memory_size], flow[:memory_size]
        with torch.inference_mode():
            clock = bench_torch.StageClock("cpu")
            probability = bench_torch.reference_code_frame(tiny_model, rgb[:1], flow[:1], *references, clock)
            assert counts == {"appearance": memory_size + 1, "motion": memory_size + 1}
            assert set(clock.seconds) == {"references", "reference_memory", "encoder", "ima", "decoder"}
            assert probability.shape == (1, 1, 64, 64)
        frames_per_repeat = settings.warmup + settings.frames
        counts.update(appearance=0, motion=0)
        reenacted = timers.run_timer(bench_torch.reference_code_timer(tiny_model, frames, flows, settings),
                                    settings.repeats, progress=False)
        assert counts["appearance"] == counts["motion"] == settings.repeats * frames_per_repeat * (memory_size + 1)
        engine = model_engine(tiny_model)  # describing its graphs runs each once, before the counting
        counts.update(appearance=0, motion=0)
        eager = timers.run_timer(eager_timer(engine, frames, flows, settings), settings.repeats, progress=False)
        # the cached memory costs N passes once per repeat, then one pass per frame
        assert counts["appearance"] == counts["motion"] == settings.repeats * (memory_size + frames_per_repeat)
    finally:
        for handle in handles:
            handle.remove()
    assert len(reenacted.per_frame) == len(eager.per_frame) == settings.repeats
    assert set(reenacted.stages) == {"references", "reference_memory", "encoder", "ima", "decoder"}
    assert len(eager.memory_entry) == settings.repeats and not reenacted.memory_entry


def test_reference_features_are_the_plain_vgg_stack(tiny_model):
    import torch

    from dpa.training import bench_torch

    frame = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        expected = frame
        for block in tiny_model.encoders["motion"].blocks:
            expected = block(expected)
        features = bench_torch.reference_code_features(tiny_model, "motion", frame)
    assert features.shape == (1, tiny_model.config.channels(512), 4, 4)
    assert torch.equal(features, expected)


def test_pytorch_cuda_fails_clearly_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from dpa.training.torch_engine import torch_device

    with pytest.raises(DpaError, match="no CUDA GPU"):
        torch_device("cuda")
    assert str(torch_device("cpu")) == "cpu"


# ---- the command ---------------------------------------------------------------------------------------------


def test_bench_cli_reports_runtime_and_baselines(tiny_export, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = _main(["bench", "--export", str(tiny_export), "--baseline", "eager", "--baseline", "reference-code",
                  "--frames", "2", "--warmup", "1", "--repeats", "2", "--threads", "1", "--no-progress",
                  "--json", str(out), "--markdown", str(tmp_path / "bench.md")])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA and report["kind"] == "bench"
    assert set(report["measurements"]) == {"runtime", "eager", "reference_code"}
    runtime = report["measurements"]["runtime"]
    assert runtime["repeats"] == 2 and runtime["frames"] == 2 and runtime["per_frame_ms"]["n"] == 2
    assert set(runtime["stages_ms"]) >= {"flow", "pre", "encoder", "ima", "decoder", "post"}
    assert runtime["fps"] == pytest.approx(1e3 / runtime["per_frame_ms"]["median"])
    # with two repeats the medians are means: the whole frame is the frame without flow plus the flow stage
    assert runtime["with_flow_ms"]["median"] == pytest.approx(
        runtime["per_frame_ms"]["median"] + runtime["stages_ms"]["flow"]["median"], rel=1e-9)
    assert runtime["memory_entry_ms"]["n"] == 2 and runtime["peak_rss_mib"] >= runtime["rss_before_mib"]
    assert report["config"]["engine"]["backend"] == "onnxruntime" and report["config"]["timing"]["threads"] == 1
    assert report["config"]["pytorch"]["device"] == "cpu"
    assert report["machine"]["cpu"] and report["machine"]["packages"]["onnxruntime"]
    assert "| measurement |" in (tmp_path / "bench.md").read_text()
    assert "runtime" in capsys.readouterr().out


def test_bench_cli_user_errors(tiny_export, capsys):
    assert _main(["bench", "--export", str(tiny_export), "--size", "64"]) == 1
    assert "--export fixes the model" in capsys.readouterr().err
    assert _main(["bench", "--export", str(tiny_export), "--frames", "0"]) == 1
    assert "argument --frames: must be an integer from 1 to 100000000, got 0" in capsys.readouterr().err
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        assert _main(["bench", "--export", str(tiny_export), "--device", "cuda", "--baseline", "eager"]) == 1
        assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_targets_report_six_ratios_recomputable_from_the_medians(tmp_path):
    # In a process of its own: it exports, calibrates and loads every engine and model at once.
    out = tmp_path / "targets.json"
    argv = ["bench", "--targets", "--quick", "--threads", "1", "--no-progress", "--export-cache",
            str(tmp_path / "cache"), "--json", str(out)]
    code = f"import sys; from dpa.cli import main; sys.exit(main({argv!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["ratios"]) == {"runtime_vs_eager", "runtime_vs_reference_code", "ifa_marginal",
                                     "live_overhead", "flow_share", "int8_vs_fp32"}
    assert report["machine"]["cpu"] and report["config"]["paper_iv"]["ifa"] == "prototype"
    assert report["config"]["paper_ii"]["ifa"] == "off"
    measurements = report["measurements"]
    assert {"runtime", "runtime_paper_ii", "eager", "eager_paper_ii", "reference_code"} <= set(measurements)
    for ratio in TARGET_RATIOS:
        value = report["ratios"][ratio.name]
        if value is None:
            assert report["targets"][ratio.name]["reason"]
            continue
        numerator, denominator = quantity(measurements, ratio.numerator), quantity(measurements, ratio.denominator)
        assert value == pytest.approx(numerator / denominator, rel=1e-12)
    runtime = measurements["runtime"]
    assert report["ratios"]["flow_share"] == pytest.approx(
        runtime["stages_ms"]["flow"]["median"] / runtime["with_flow_ms"]["median"], rel=1e-12)
    assert report["ratios"]["runtime_vs_eager"] == pytest.approx(
        runtime["per_frame_ms"]["median"] / measurements["eager"]["per_frame_ms"]["median"], rel=1e-12)
