"""Torch-free deployment: engines, memory bank, optical flow, pre/post-processing, GStreamer I/O.

Nothing in this package may import torch (Jetson images often have none); tests/runtime enforce it.
"""
