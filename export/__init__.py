"""Split ONNX export of DPA stage graphs with custom prototype-attention ops (SPEC §4.1–4.2)."""
