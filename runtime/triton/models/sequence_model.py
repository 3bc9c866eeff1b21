"""The `dpa` sequence model (Triton Python backend; copied into a repository as dpa/1/model.py by `dpa triton`).

Each request is one frame of one stream: RGB and FLOW (3, S, S, the client's pre-processed model inputs), INDEX
(the frame's number), POLICY (slots, horizon, minimum confidence) and the sequence batcher's START, END and CORRID
controls. The stream's segmenter (`dpa.runtime.triton.streams.Streams`) runs the stage graphs through BLS calls to
the stage models and keeps the stream's memory; the answer is the probability map at S x S and the memory slot
the frame was admitted to (-1: none). A request with INDEX -1 carries no frame (an END that only frees the
stream).
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from dpa.manifest import Manifest
from dpa.runtime.chain import StageChain
from dpa.runtime.engine import Engine, HostRunner
from dpa.runtime.triton.streams import NO_SLOT, PolicySettings, Streams


class StageModelRunner(HostRunner):
    """One stage graph answered by its Triton model through a BLS request."""

    def __init__(self, graph, model_name):
        self.name = model_name
        self.input_names = graph.input_names
        self.output_names = graph.output_names
        self.last_seconds = 0.0

    def run(self, output_names, feed):
        started = time.perf_counter()
        names = list(output_names or self.output_names)
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(feed[name])) for name in self.input_names]
        response = pb_utils.InferenceRequest(model_name=self.name, requested_output_names=names,
                                             inputs=inputs).exec()
        if response.has_error():
            raise RuntimeError(f"stage model {self.name}: {response.error().message()}")
        outputs = [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in names]
        self.last_seconds = time.perf_counter() - started
        return outputs


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        manifest = Manifest.from_dict(json.loads(parameters["manifest"]), where="the dpa model's manifest")
        stage_models = json.loads(parameters["stage_models"])
        runners = {name: StageModelRunner(graph, stage_models[name]) for name, graph in manifest.graphs.items()}
        engine = Engine(backend="triton", precision=manifest.precision, device="server",
                        directory=args["model_repository"], manifest=manifest, runners=runners, form="triton")
        idle = config["sequence_batching"].get("max_sequence_idle_microseconds", 60_000_000)
        self.streams = Streams(StageChain(engine), int(idle) / 1e6)
        self.size = manifest.size

    def execute(self, requests):
        self.streams.sweep()
        responses = []
        for request in requests:
            try:
                responses.append(self._answer(request))
            except Exception as error:  # one bad request fails alone, with its reason
                message = f"{type(error).__name__}: {error}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses

    def _answer(self, request):
        stream = int(_input(request, "CORRID").ravel()[0])
        start = bool(_input(request, "START").ravel()[0])
        end = bool(_input(request, "END").ravel()[0])
        index = int(_input(request, "INDEX").ravel()[0])
        probability = np.zeros((self.size, self.size), np.float32)
        admitted, server_ms = NO_SLOT, 0.0
        if index >= 0:
            started = time.perf_counter()
            result = self.streams.step(stream, start, _input(request, "RGB"), _input(request, "FLOW"), index,
                                       PolicySettings.from_array(_input(request, "POLICY")))
            probability, admitted = result.probability, result.admitted
            server_ms = (time.perf_counter() - started) * 1e3
        if end:
            self.streams.end(stream)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("PROBABILITY", np.ascontiguousarray(probability, np.float32)),
            pb_utils.Tensor("ADMITTED", np.array([admitted], np.int32)),
            pb_utils.Tensor("SERVER_MS", np.array([server_ms], np.float32)),
        ])
