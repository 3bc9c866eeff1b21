"""`dpa run --server grpc://HOST:PORT`: the live loop with inference on a Triton server.

The client keeps what is per camera and cheap (decoding, DIS flow, pre-processing, post-processing, the sink);
the server keeps the stream's memory and runs the graphs (`dpa.runtime.triton.streams`). One run is one stream:
one correlation ID, START on its first frame, END when it closes (a frame-size change restarts the stream).
The `server` stage in the statistics is the round trip of a frame; `server_compute` the server's own part.
"""

from __future__ import annotations

import json
import secrets
import time
from urllib.parse import urlsplit

import numpy as np

from dpa.errors import DpaError, require_module
from dpa.manifest import Manifest
from dpa.runtime.memory import UniformPolicy, mask_confidence
from dpa.runtime.preprocess import postprocess_probability
from dpa.runtime.segmenter import FrameResult, timed_model_inputs
from dpa.runtime.triton.repository import SEQUENCE_MODEL
from dpa.runtime.triton.streams import NO_SLOT, PolicySettings

TIMEOUT_S = 60.0
INSTALL_HINT = "pip install 'dpa-edge[triton]' (tritonclient[grpc]; scripts/setup.sh installs it)"


def parse_server(url: str) -> str:
    """grpc://HOST:PORT (or HOST:PORT) -> "HOST:PORT"; DpaError otherwise."""
    parts = urlsplit(url if "://" in url else f"grpc://{url}")
    if parts.scheme != "grpc" or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise DpaError(f"--server {url!r}: give grpc://HOST:PORT (Triton's gRPC port, 8001 by default)")
    return f"{parts.hostname}:{parts.port}"


class TritonModel:
    """The `dpa` model of a Triton server: its manifest (S, N, the graphs; from the model's config) and a client.

    Stands where a `StageChain` stands for `dpa.runtime.run.StreamRunner`: `manifest`, `memory` and `segmenter`.
    """

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S):
        grpc = require_module("tritonclient.grpc", "tritonclient[grpc]", f"--server ({INSTALL_HINT})")
        self.url, self.timeout_s, self.grpc = url, timeout_s, grpc
        self.client = grpc.InferenceServerClient(parse_server(url))
        try:
            ready = self.client.is_server_ready() and self.client.is_model_ready(SEQUENCE_MODEL)
            config = self.client.get_model_config(SEQUENCE_MODEL, as_json=True)["config"] if ready else None
        except Exception as error:  # tritonclient raises InferenceServerException and grpc errors
            raise DpaError(f"Triton server {url}: {_reason(error)}") from error
        if config is None:
            raise DpaError(f"Triton server {url} is not ready or has no {SEQUENCE_MODEL!r} model; serve a "
                           "repository made by `dpa triton`")
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.manifest = Manifest.from_dict(json.loads(parameters["manifest"]), where=f"the manifest served by {url}")
        self.memory = self.manifest.pipeline.memory
        self.streams = int(parameters.get("streams", "1"))

    def describe(self) -> dict:
        return {"backend": "triton", "server": self.url, "device": "server", "precision": self.manifest.precision,
                "config": self.manifest.config_name, "size": self.manifest.size, "stream_slots": self.streams}

    def segmenter(self, policy: UniformPolicy | None) -> RemoteSegmenter:
        if policy is not None and not isinstance(policy, UniformPolicy):
            raise DpaError("a Triton server keeps each stream's memory with the uniform policy: run with "
                           "--policy uniform")
        return RemoteSegmenter(self, policy)

    def close(self) -> None:
        self.client.close()


def _reason(error: Exception) -> str:
    message = getattr(error, "message", None)
    text = message() if callable(message) else str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


class RemoteSegmenter:
    """A `Segmenter` whose memory and graphs are on the server: segment(frame, flow, index) -> FrameResult."""

    def __init__(self, model: TritonModel, policy: UniformPolicy | None):
        self.model = model
        self.size = model.manifest.size
        capacity = model.memory.capacity if model.memory else 1
        self.policy = PolicySettings(policy.capacity, policy.horizon, policy.min_confidence) if policy else \
            PolicySettings(capacity, 1, None)
        self.stream = secrets.randbits(62) + 1  # the correlation ID: one per run (and per restart)
        self.started = False

    def _infer(self, rgb: np.ndarray, flow: np.ndarray, index: int, end: bool = False):
        grpc = self.model.grpc
        arrays = {"RGB": rgb, "FLOW": flow, "INDEX": np.array([index], np.int64), "POLICY": self.policy.to_array()}
        inputs = []
        for name, array in arrays.items():
            tensor = grpc.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(tensor)
        outputs = [grpc.InferRequestedOutput(name) for name in ("PROBABILITY", "ADMITTED", "SERVER_MS")]
        try:
            reply = self.model.client.infer(SEQUENCE_MODEL, inputs, outputs=outputs, sequence_id=self.stream,
                                            sequence_start=not self.started, sequence_end=end,
                                            client_timeout=self.model.timeout_s)
        except Exception as error:
            raise DpaError(f"Triton server {self.model.url}, frame {index}: {_reason(error)}") from error
        self.started = True
        return reply

    def segment(self, frame: np.ndarray, flow: np.ndarray, index: int) -> FrameResult:
        rgb, flow_input, seconds = timed_model_inputs(frame, flow, self.size)
        sent = time.perf_counter()
        reply = self._infer(rgb, flow_input, index)
        answered = time.perf_counter()
        probability = reply.as_numpy("PROBABILITY")
        full, mask = postprocess_probability(probability, *frame.shape[:2])
        admitted = int(reply.as_numpy("ADMITTED")[0])
        seconds.update(server=answered - sent, server_compute=float(reply.as_numpy("SERVER_MS")[0]) / 1e3,
                       post=time.perf_counter() - answered)
        return FrameResult(full, mask, mask_confidence(probability), seconds, None if admitted == NO_SLOT else admitted)

    def reset(self) -> None:
        """A new stream (the frame size changed): the old one is ended, the next frame starts an empty memory."""
        self.close()
        self.stream = secrets.randbits(62) + 1

    def close(self) -> None:
        """End the stream on the server (its memory is freed now rather than at the idle timeout)."""
        if self.started:
            empty = np.zeros((3, self.size, self.size), np.float32)
            self._infer(empty, empty, -1, end=True)
            self.started = False
