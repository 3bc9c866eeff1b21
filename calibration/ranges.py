"""Activation ranges for symmetric int8: the amax (the value that maps to 127) of each tensor, from recorded feeds.

Torch-free (numpy + ONNX Runtime). The methods are TensorRT's calibrators' (and NVIDIA's
pytorch-quantization's) on the histogram of |x|:

- `max`: the largest |x| seen;
- `percentile`: the 99.999th percentile of |x| (bin edge of the 2048-bin histogram);
- `entropy`: the threshold whose 128-level quantization of the histogram loses the least information
  (KL divergence between the clipped reference distribution and its quantized version, thresholds from bin
  128 to 2048) — TensorRT's IInt8EntropyCalibrator2.
- `mse`: the threshold whose int8 quantize-dequantize of the histogram's bin centres has the least mean squared
  error (rounding below it, clipping above; thresholds from bin 128 to 2048) — pytorch-quantization's "mse".

ONNX Runtime's own entropy calibrator cannot be given a bin count through `quantize_static` and then uses 128
bins, which leaves a single candidate threshold (the max); hence this module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dpa.errors import DpaError, require_module

HISTOGRAM_BINS = 2048
QUANTIZED_BINS = 128  # int8 symmetric: 127 levels per sign (+ zero); TensorRT uses 128
PERCENTILE = 99.999
CALIBRATION_METHODS = ("entropy", "mse", "percentile", "max")  # what `activation_ranges` computes


def entropy_amax(histogram: np.ndarray, edges: np.ndarray, quantized_bins: int = QUANTIZED_BINS,
                 start_bin: int = QUANTIZED_BINS) -> float:
    """The KL-optimal clipping threshold of a histogram of |x| (counts (B,), edges (B + 1,) from 0).

    For each candidate i (start_bin … B): reference p = the first i bins with everything beyond added to the
    last; candidate q = those i bins merged into `quantized_bins` groups and spread back evenly over each
    group's non-empty bins. Returns edges[i] of the smallest KL(p || q) (the largest i among ties). The zero
    bin is replaced by its neighbour first (as pytorch-quantization does), so the zeros that ReLU produces do
    not dominate.
    """
    counts = np.asarray(histogram, np.float64).copy()
    if counts.ndim != 1 or len(edges) != counts.size + 1:
        raise ValueError("histogram needs B counts and B + 1 edges")
    if counts.size <= start_bin:
        return float(edges[-1])
    counts[0] = counts[1]
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = counts[i:].sum()
    best_divergence, best = np.inf, counts.size
    for i in range(start_bin, counts.size + 1):
        reference = counts[:i].copy()
        reference[-1] += tail[i]
        group = (np.arange(i) * quantized_bins) // i  # which of the quantized bins each bin falls in
        present = counts[:i] > 0
        sums = np.bincount(group, weights=counts[:i], minlength=quantized_bins)
        nonempty = np.bincount(group, weights=present, minlength=quantized_bins)
        candidate = np.where(present, sums[group] / np.maximum(nonempty[group], 1), 0.0)
        if reference.sum() == 0 or candidate.sum() == 0:
            continue
        reference /= reference.sum()
        candidate /= candidate.sum()
        support = reference > 0
        if np.any(candidate[support] == 0):
            continue  # infinite divergence
        divergence = float(np.sum(reference[support] * np.log(reference[support] / candidate[support])))
        if divergence <= best_divergence:
            best_divergence, best = divergence, i
    return float(edges[best])


def mse_amax(histogram: np.ndarray, edges: np.ndarray, levels: int = QUANTIZED_BINS - 1,
             start_bin: int = QUANTIZED_BINS) -> float:
    """The clipping threshold of a histogram of |x| (counts (B,), edges (B + 1,) from 0) that minimises the mean
    squared error of symmetric int8 quantization: each bin's centre c is quantized to
    min(round(c / step), levels) * step with step = amax / levels, its squared error weighted by the bin's count.
    Candidates are the edges of bins start_bin … B; the smallest error wins (the largest amax among ties)."""
    counts = np.asarray(histogram, np.float64)
    if counts.ndim != 1 or len(edges) != counts.size + 1:
        raise ValueError("histogram needs B counts and B + 1 edges")
    if counts.size <= start_bin or counts.sum() == 0:
        return float(edges[-1])
    centres = (edges[:-1] + edges[1:]) / 2
    best_error, best = np.inf, counts.size
    for i in range(start_bin, counts.size + 1):
        step = edges[i] / levels
        quantized = np.minimum(np.round(centres / step), levels) * step
        error = float(counts @ np.square(centres - quantized))
        if error <= best_error:
            best_error, best = error, i
    return float(edges[best])


def percentile_amax(histogram: np.ndarray, edges: np.ndarray, percentile: float = PERCENTILE) -> float:
    """The upper edge of the bin where the cumulative share of |x| reaches `percentile` (0-100)."""
    counts = np.asarray(histogram, np.float64)
    total = counts.sum()
    if total == 0:
        return float(edges[-1])
    index = int(np.searchsorted(np.cumsum(counts) / total, percentile / 100.0))
    return float(edges[min(index + 1, counts.size)])


def _with_outputs(model, names: list[str]):
    onnx = require_module("onnx", "onnx", "int8 calibration")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    infos = {info.name: info for info in (*inferred.graph.value_info, *inferred.graph.input)}
    exposed = copy.deepcopy(model)
    present = {output.name for output in exposed.graph.output}
    for name in names:
        if name not in present:
            if name not in infos:
                raise DpaError(f"no type information for tensor {name}")
            exposed.graph.output.append(infos[name])
    return exposed


def activation_ranges(
    model_path: str | Path, feeds: Iterable[dict[str, np.ndarray]], tensors: list[str], method: str,
    threads: int | None = None, bins: int = HISTOGRAM_BINS, percentile: float = PERCENTILE,
) -> dict[str, float]:
    """amax of each tensor of `tensors` (graph inputs or node outputs of the model at `model_path`) over the
    feeds, by `method` (entropy | mse | percentile | max). Two passes over the feeds: the max of |x|, then the
    `bins`-bin histogram of |x| on [0, max]. A tensor that is 0 everywhere gets amax 1 (any scale represents it)."""
    onnx = require_module("onnx", "onnx", "int8 calibration")
    ort = require_module("onnxruntime", "onnxruntime", "int8 calibration")
    if method not in CALIBRATION_METHODS:
        raise DpaError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if not tensors:
        return {}
    feeds = list(feeds)
    if not feeds:
        raise DpaError("int8 calibration needs feeds recorded from real frames; none were given")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    model = _with_outputs(onnx.load(str(model_path)), tensors)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    maxima = dict.fromkeys(tensors, 0.0)
    for feed in feeds:
        for name, array in zip(tensors, session.run(tensors, feed), strict=True):
            if not np.isfinite(array).all():
                raise DpaError(f"tensor {name} has NaN or Inf values on a calibration feed; check the fp32 graphs")
            maxima[name] = max(maxima[name], float(np.abs(array).max(initial=0.0)))
    if method == "max":
        return {name: value if value > 0 else 1.0 for name, value in maxima.items()}
    histograms = {name: np.zeros(bins, np.int64) for name in tensors}
    for feed in feeds:
        for name, array in zip(tensors, session.run(tensors, feed), strict=True):
            if maxima[name] > 0:
                histograms[name] += np.histogram(np.abs(array), bins=bins, range=(0.0, maxima[name]))[0]
    ranges = {}
    for name in tensors:
        if maxima[name] == 0:
            ranges[name] = 1.0
            continue
        edges = np.linspace(0.0, maxima[name], bins + 1)
        if method == "entropy":
            amax = entropy_amax(histograms[name], edges)
        elif method == "mse":
            amax = mse_amax(histograms[name], edges)
        else:
            amax = percentile_amax(histograms[name], edges, percentile)
        ranges[name] = amax if amax > 0 else maxima[name]
    return ranges
