"""A stage graph run by ONNX Runtime inside Triton's Python backend (copied into a repository as
<model>/1/model.py by `dpa triton --backend python`, next to the graph as model.onnx), for servers without
Triton's onnxruntime backend, such as the nvidia-pytriton wheel's."""

import json
import os

import onnxruntime
import triton_python_backend_utils as pb_utils

from dpa.runtime.onnxruntime_engine import session_options


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        threads = int(parameters.get("threads", "0")) or None
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = onnxruntime.InferenceSession(path, session_options(threads),
                                                    providers=["CPUExecutionProvider"])
        self.inputs = [tensor.name for tensor in self.session.get_inputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            outputs = self.session.run(None, feed)
            names = [tensor.name for tensor in self.session.get_outputs()]
            tensors = [pb_utils.Tensor(name, value) for name, value in zip(names, outputs, strict=True)]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
