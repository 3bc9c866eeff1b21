"""Many streams on one Triton Inference Server (torch-free).

- `repository`: `dpa triton` writes a Triton model repository from an export: one model per stage graph (Triton's
  onnxruntime or tensorrt backend, or ONNX Runtime inside the Python backend) and the `dpa` sequence model.
- `streams`: what the `dpa` sequence model does with a request: each stream (a correlation ID) has its own memory
  bank and admission policy, the stage graphs are shared.
- `models/`: the Python-backend model files copied into a repository (they run inside the server).
- `server`: finds a `tritonserver` (the nvidia-pytriton wheel's, or an installed one) and starts and stops it
  (`dpa serve`).
- `client`: `dpa run --server grpc://HOST:PORT`: the live loop with inference on the server.
"""
