"""Triton Inference Server: the repository `dpa triton` writes (configs checked with Triton's own protobuf schema),
the per-stream memory of the sequence model, and a real server (the nvidia-pytriton wheel's, from .venv-triton)
serving several interleaved `dpa run --server` streams that must match the local runtime frame for frame."""

import json
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from dpa.errors import DpaError
from dpa.runtime.chain import StageChain
from dpa.runtime.engines import open_engine
from dpa.runtime.memory import UniformPolicy
from dpa.runtime.segmenter import Segmenter
from dpa.runtime.triton.client import parse_server
from dpa.runtime.triton.repository import RepositorySettings, write_repository
from dpa.runtime.triton.server import PROJECT_ENVIRONMENT, Server, find_installation, free_port
from dpa.runtime.triton.streams import NO_SLOT, PolicySettings, Streams

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def _parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", ["python", "onnxruntime", "tensorrt"])
def test_repository_configs_follow_tritons_schema(backend, tiny_export, tmp_path):
    from dpa.manifest import Manifest

    manifest = Manifest.load(tiny_export)
    plans = None
    if backend == "tensorrt":  # plans come from `dpa build` on the serving GPU; any file stands in for one here
        plans = {name: tmp_path / f"{name}.plan" for name in manifest.graphs}
        for path in plans.values():
            path.write_bytes(b"plan")
    repository = write_repository(tiny_export, tmp_path / "repo", RepositorySettings(backend=backend, streams=6,
                                                                                     instances=2), plans)
    sequence = _parse(repository / "dpa" / "config.pbtxt")
    assert sequence.backend == "python" and sequence.max_batch_size == 0
    assert sequence.sequence_batching.oldest.max_candidate_sequences == 6
    assert {control.name for control in sequence.sequence_batching.control_input} == {"START", "END", "CORRID"}
    assert sequence.instance_group[0].count == 2
    served = json.loads(sequence.parameters["manifest"].string_value)
    assert served["size"] == manifest.size and list(served["graphs"]) == list(manifest.graphs)
    for name, graph in manifest.graphs.items():
        config = _parse(repository / f"dpa_{name}" / "config.pbtxt")
        assert config.backend == backend
        assert [(t.name, list(t.dims)) for t in config.input] == [(t.name, list(t.shape)) for t in graph.inputs]
        assert [(t.name, list(t.dims)) for t in config.output] == [(t.name, list(t.shape)) for t in graph.outputs]
        model_file = "model.plan" if backend == "tensorrt" else "model.onnx"
        assert (repository / f"dpa_{name}" / "1" / model_file).is_file()
        assert (repository / f"dpa_{name}" / "1" / "model.py").is_file() == (backend == "python")


def test_a_misspelt_config_is_caught_by_the_schema(tmp_path):
    config = tmp_path / "config.pbtxt"
    config.write_text('name: "x"\nbackend: "python"\nmax_batch_sise: 0\n')
    with pytest.raises(text_format.ParseError, match="max_batch_sise"):
        _parse(config)


def test_server_addresses():
    assert parse_server("grpc://127.0.0.1:8001") == "127.0.0.1:8001"
    assert parse_server("gpu-box:9001") == "gpu-box:9001"
    for bad in ("http://host:8000", "grpc://host", "grpc://host:8001/models"):
        with pytest.raises(DpaError, match="grpc://HOST:PORT"):
            parse_server(bad)


def test_streams_keep_one_memory_each(tiny_export):
    """Two streams interleaved frame by frame through one `Streams` give exactly what two separate segmenters
    give; END and the idle sweep free a stream."""
    engine = open_engine(tiny_export, "onnxruntime", device="cpu", threads=1)
    chain = StageChain(engine)
    size = chain.manifest.size
    now = [0.0]
    streams = Streams(chain, idle_seconds=5.0, clock=lambda: now[0])
    policy = PolicySettings(slots=4, horizon=4, min_confidence=None)
    rng = np.random.default_rng(0)
    clips = {stream: [(rng.normal(size=(3, size, size)).astype(np.float32),
                       rng.normal(size=(3, size, size)).astype(np.float32)) for _ in range(6)] for stream in (7, 9)}
    alone = {stream: Segmenter(chain, UniformPolicy(4, 4)) for stream in clips}
    for index in range(6):
        for stream, frames in clips.items():
            served = streams.step(stream, index == 0, *frames[index], index, policy)
            expected = alone[stream].segment_inputs(*frames[index], (size, size), index)
            np.testing.assert_array_equal(served.probability, expected.probability)
            assert served.admitted == (NO_SLOT if expected.admitted is None else expected.admitted)
    streams.end(7)
    assert set(streams.segmenters) == {9}
    now[0] = 6.0
    assert streams.sweep() == [9] and not streams.segmenters
    with pytest.raises(DpaError, match="1 to 4"):
        streams.step(1, True, *clips[7][0], 0, PolicySettings(slots=5, horizon=4, min_confidence=None))
    engine.close()


needs_server = pytest.mark.skipif(not (PROJECT_ENVIRONMENT / "bin" / "python").exists(),
                                  reason=f"no Triton server environment at {PROJECT_ENVIRONMENT} (scripts/setup.sh)")


@pytest.fixture(scope="module")
def served(tiny_export, tmp_path_factory):
    """A real tritonserver on 127.0.0.1 serving the tiny export with 4 stream slots."""
    folder = tmp_path_factory.mktemp("triton")
    repository = write_repository(tiny_export, folder / "repo", RepositorySettings(streams=4, idle_seconds=20))
    with Server(repository, find_installation(), grpc_port=free_port(), http_port=free_port()) as server:
        yield server


def _source(seed):
    return f"test://synthetic?seed={seed}&frames=48&size=160&live=0"


def _masks(folder):
    return [cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127 for path in sorted(folder.glob("*.png"))]


def _iou(a, b):
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


@needs_server
def test_interleaved_streams_on_a_real_server_match_the_local_runtime(served, tiny_export, tmp_path):
    """Four `dpa run --server` processes at once (their requests interleave on the server's one sequence-model
    instance): each stream's masks equal the local runtime's on the same frames, so no memory leaks across."""
    seeds = (11, 12, 13, 14)
    runs = {}
    for seed in seeds:
        command = [sys.executable, "-m", "dpa", "run", _source(seed), "null://", "--server", served.address,
                   "--masks", str(tmp_path / f"server-{seed}"), "--stats-json", str(tmp_path / f"server-{seed}.json"),
                   "--stats-interval", "0"]
        runs[seed] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for process in runs.values():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    spans = []
    for seed in seeds:
        local = tmp_path / f"local-{seed}"
        finished = subprocess.run([sys.executable, "-m", "dpa", "run", _source(seed), "null://", "--export",
                                   str(tiny_export), "--policy", "uniform", "--masks", str(local)],
                                  capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stderr[-3000:]
        remote, expected = _masks(tmp_path / f"server-{seed}"), _masks(local)
        assert len(remote) == len(expected) == 48
        assert min(_iou(a, b) for a, b in zip(remote, expected, strict=True)) >= 0.999
        stats = json.loads((tmp_path / f"server-{seed}.json").read_text())
        assert stats["engine"]["backend"] == "triton" and stats["stages_ms"]["server"]["median"] > 0
        files = sorted((tmp_path / f"server-{seed}").glob("*.png"))
        spans.append((files[0].stat().st_mtime, files[-1].stat().st_mtime))
    # the four streams were served at the same time: every span overlaps every other
    assert max(start for start, _ in spans) < min(end for _, end in spans)


@needs_server
def test_dpa_serve_starts_and_stops_on_sigterm(tiny_export, tmp_path):
    repository = tmp_path / "repo"
    assert subprocess.run([sys.executable, "-m", "dpa", "triton", str(tiny_export), "--out", str(repository)],
                          capture_output=True, timeout=120).returncode == 0
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "dpa", "serve", str(repository), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    from dpa.runtime.triton.client import TritonModel

    while True:
        try:
            model = TritonModel(f"grpc://127.0.0.1:{port}", timeout_s=5)
            break
        except DpaError:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.3)
    assert model.manifest.size == 128 and model.streams == 4
    model.close()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-3000:]
    assert "tritonserver stopped (exit code 0)" in stdout and "stopped by SIGTERM" in stderr
    leftover = subprocess.run(["pgrep", "-f", f"--grpc-port={port}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
