"""fp16 and int8 variants of an export's stage graphs, with their precision in the graph (SPEC §4.4). Torch-free.

`write_variant` writes a variant as a complete export folder: every graph converted (`dpa.calibration.fp16`) or
quantized (`dpa.calibration.int8`), saved in every exported form, verified against the fp32 graphs and described
in the manifest. Both are made from the `functions` form; the `plugin` form is the same graph without the function
bodies and the `portable` form the same graph with them inlined (standard ops only), so all forms of a variant agree.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dpa import stop
from dpa.calibration.feeds import FeedSet, check_feeds_match
from dpa.calibration.fp16 import FLOAT32_OP_TYPES, convert_to_float16, float32_nodes
from dpa.calibration.int8 import (
    CUSTOM_DOMAIN,
    QUANTIZED_OP_TYPES,
    SPLIT_RANGE_RATIO,
    prototype_nodes,
    quantize_int8,
    require_tensorrt_qdq,
)
from dpa.calibration.ranges import HISTOGRAM_BINS, PERCENTILE
from dpa.errors import DpaError
from dpa.files import atomic_path, file_sha256
from dpa.manifest import Manifest

log = logging.getLogger(__name__)

VARIANT_PRECISIONS = ("fp16", "int8")


def _forms_of(model, form: str):
    """The graph in `form` from its functions form: plugin drops the function bodies, portable inlines them."""
    import onnx.inliner

    if form == "functions":
        return model
    if form == "plugin":
        stripped = copy.deepcopy(model)
        del stripped.functions[:]
        return stripped
    if form == "portable":
        return onnx.inliner.inline_local_functions(model)
    raise DpaError(f"unknown form {form!r}")


def _save(model, path: Path, form: str) -> int:
    import onnx

    onnx.checker.check_model(model, full_check=form != "plugin")
    with atomic_path(path) as temporary:
        onnx.save(model, str(temporary))
    return path.stat().st_size


def _verify(reference_path: Path, variant_path: Path, feeds: list[dict[str, np.ndarray]], threads: int | None) -> dict:
    """Run the variant and the fp32 graph on the same feeds in ONNX Runtime: per output max abs and cosine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    reference = ort.InferenceSession(str(reference_path), options, providers=["CPUExecutionProvider"])
    variant = ort.InferenceSession(str(variant_path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in reference.get_outputs()]
    max_abs = dict.fromkeys(names, 0.0)
    cosine = dict.fromkeys(names, 1.0)
    for feed in feeds:
        for name, expected, actual in zip(names, reference.run(names, feed), variant.run(names, feed), strict=True):
            if actual.dtype != np.float32 or actual.shape != expected.shape:
                raise DpaError(f"{variant_path}: output {name} is {actual.dtype} {actual.shape}, the fp32 graph's "
                               f"{expected.dtype} {expected.shape}")
            expected, actual = expected.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
            max_abs[name] = max(max_abs[name], float(np.abs(actual - expected).max()))
            norms = np.linalg.norm(actual) * np.linalg.norm(expected)
            cosine[name] = min(cosine[name], float(actual @ expected / norms) if norms > 0 else 1.0)
    return {"feeds": len(feeds), "max_abs": max_abs, "cosine": cosine}


def write_variant(
    export_dir: str | Path, out_dir: str | Path, precision: str, feeds: FeedSet, method: str = "entropy",
    exclude: Iterable[str] = (), threads: int | None = None, verify_feeds: int = 4,
    split_ratio: float | None = SPLIT_RANGE_RATIO,
) -> Path:
    """Write the fp16 or int8 variant of the fp32 export `export_dir` as a complete export folder
    `out_dir/<precision>` (every exported form of every graph, manifest.json) and return it.

    feeds: recorded on real frames (`record_feeds`); int8 calibrates every graph on its own feeds, and both
    variants are verified against the fp32 graphs on `verify_feeds` of them (ONNX Runtime, CPU). exclude:
    int8 only, node-name patterns left float besides the prototype-attention nodes (`exclude_pattern_matches`).
    split_ratio: int8 only, see `quantize_int8`.
    """
    export_dir = Path(export_dir)
    manifest = _fp32_source(export_dir, precision, feeds)
    target = _variant_folder(export_dir, out_dir, precision)
    graphs = {}
    details: dict = {"excluded_nodes": {}, "quantized_nodes": {}, "float32_nodes": {}, "activation_amax": {},
                     "split_convs": {}, "split_ratio": split_ratio}
    started = time.perf_counter()
    for graph, spec in manifest.graphs.items():
        stop.check()  # a stop point between graphs; without manifest.json the folder is not a variant
        source = manifest.graph_file(export_dir, graph, "functions")
        if precision == "fp16":
            converted = _fp16_graph(source, graph, details)
        else:
            converted = _int8_graph(source, graph, feeds, method, exclude, threads, split_ratio, details)
        sizes = _save_forms(converted, target, spec.files, manifest.forms)
        sample = list(feeds.feeds(graph, limit=verify_feeds))
        verification = _verify_forms(source, target, spec.files, manifest.forms, sample, threads)
        graphs[graph] = dataclasses.replace(spec, details={
            **spec.details, "bytes": sizes, "sha256": {file: file_sha256(target / file) for file in sizes},
            "verification": {"form": "functions", "against": "fp32 graph", **verification}})
        log.info("%s %s: %s (max abs vs fp32 on %d feeds: %s)", precision, graph,
                 ", ".join(f"{f} {s / 2**20:.2f} MiB" for f, s in sizes.items()), len(sample),
                 ", ".join(f"{k} {v:.2e}" for k, v in verification["max_abs"].items()))
    checkpoint = manifest.checkpoint
    if checkpoint.path and not Path(checkpoint.path).is_absolute():
        checkpoint = dataclasses.replace(checkpoint, path=os.path.relpath(export_dir / checkpoint.path, target))
    variant = manifest.with_changes(
        precision=precision, graphs=graphs, checkpoint=checkpoint,
        record={**manifest.record, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        variant=_describe(precision, export_dir, target, feeds, method, list(exclude), details,
                          time.perf_counter() - started))
    variant.save(target)
    return target


def _fp32_source(export_dir: Path, precision: str, feeds: FeedSet):
    """The manifest of `export_dir` once it is known to be an fp32 export with the functions form that `feeds`
    were recorded from; DpaError otherwise, or when `precision` is not a variant precision."""
    if precision not in VARIANT_PRECISIONS:
        raise DpaError(f"unknown variant precision {precision!r}; choose from {', '.join(VARIANT_PRECISIONS)}")
    manifest = Manifest.load(export_dir)
    if manifest.precision != "fp32":
        raise DpaError(f"{export_dir} holds the {manifest.precision} variant; make variants from the fp32 export")
    if "functions" not in manifest.forms:
        raise DpaError(f"{export_dir} lacks the functions form (exported: {', '.join(manifest.forms)}); the "
                       "variants are made from it: re-export with --form functions or --form all")
    check_feeds_match(feeds, manifest)
    return manifest


def _variant_folder(export_dir: Path, out_dir: str | Path, precision: str) -> Path:
    """`out_dir/<precision>`, created; DpaError when it is the fp32 export itself or cannot be created."""
    target = Path(out_dir) / precision
    if target.resolve() == export_dir.resolve():
        raise DpaError(f"{target} is the fp32 export itself; choose another --out")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DpaError(f"cannot create {target}: {error}") from error
    return target


def _fp16_graph(source: Path, graph: str, details: dict):
    """The fp16 form of the graph at `source`; its float32 nodes are counted into `details`."""
    import onnx

    converted = convert_to_float16(onnx.load(str(source)))
    details["float32_nodes"][graph] = _count_types(float32_nodes(converted))
    return converted


def exclude_pattern_matches(pattern: str, graph: str, node: str) -> bool:
    """Whether an --exclude pattern names `node` of `graph`: `PATTERN` (fnmatch on the node name, in every graph)
    or `GRAPH:PATTERN` (only in that graph; node names repeat across graphs, e.g. node_conv2d)."""
    graph_pattern, separator, node_pattern = pattern.rpartition(":")
    if separator and not fnmatch.fnmatchcase(graph, graph_pattern):
        return False
    return fnmatch.fnmatchcase(node, node_pattern)


def _int8_graph(source: Path, graph: str, feeds: FeedSet, method: str, exclude: Iterable[str], threads: int | None,
                split_ratio: float | None, details: dict):
    """The int8 Q/DQ form of the graph at `source`, calibrated on its feeds and checked against TensorRT's rules;
    its ranges, split convolutions, excluded and quantized nodes are recorded into `details`."""
    import onnx

    names = [node.name for node in onnx.load(str(source)).graph.node]
    chosen = sorted({name for name in names for pattern in exclude if exclude_pattern_matches(pattern, graph, name)})
    converted, ranges, split = quantize_int8(source, feeds.feeds(graph), method, chosen, threads=threads,
                                             split_ratio=split_ratio)
    details["activation_amax"][graph] = ranges
    details["split_convs"][graph] = split
    require_tensorrt_qdq(converted, f"int8 {graph}")
    details["excluded_nodes"][graph] = sorted(set(prototype_nodes(converted)) | set(chosen))
    details["quantized_nodes"][graph] = _count_types(
        node for node in converted.graph.node
        if node.op_type in QUANTIZED_OP_TYPES
        and any(_is_dequantized(converted, name) for name in node.input[:2]))
    return converted


def _save_forms(converted, target: Path, files: dict[str, str], forms: Iterable[str]) -> dict[str, int]:
    """Save `converted` (functions form) in every form into `target`, once per file; returns file -> bytes."""
    sizes = {}
    for form in forms:
        file = files[form]
        if file not in sizes:
            sizes[file] = _save(_forms_of(converted, form), target / file, form)
    return sizes


def _verify_forms(source: Path, target: Path, files: dict[str, str], forms: Iterable[str],
                  sample: list[dict[str, np.ndarray]], threads: int | None) -> dict:
    """`_verify` of the functions form written into `target`, with the portable form's max abs added when it is
    a file of its own."""
    verification = _verify(source, target / files["functions"], sample, threads)
    if "portable" in forms and files["portable"] != files["functions"]:
        portable = _verify(source, target / files["portable"], sample, threads)
        verification["portable_max_abs"] = portable["max_abs"]
    return verification


def _is_dequantized(model, name: str) -> bool:
    return any(node.op_type == "DequantizeLinear" and name in node.output for node in model.graph.node)


def _count_types(nodes: Iterable) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in nodes:
        counts[node.op_type if not node.domain or node.domain == "ai.onnx" else f"{node.domain}.{node.op_type}"] += 1
    return dict(sorted(counts.items()))


def _describe(precision: str, export_dir: Path, target: Path, feeds: FeedSet, method: str, exclude: list[str],
              details: dict, seconds: float) -> dict:
    common = {
        "of": os.path.relpath(export_dir, target),
        "source_precision": "fp32",
        "made_from_form": "functions",
        "forms": "plugin = functions form without the function bodies; portable = function bodies inlined",
        "io": "float32 (graph inputs and outputs unchanged)",
        "feeds": {graph: feeds.count(graph) for graph in feeds.graphs},
        "calibration_clips": [{"name": clip["name"], "source": clip["source"], "frames": clip["frames"]}
                              for clip in feeds.clips],
        "flow": feeds.flow,
        "seconds": round(seconds, 2),
        # the fp32 files it was made from: a variant whose export changed since is refused (`resolve_variant`)
        "source_sha256": Manifest.load(export_dir).file_hashes(),
    }
    if precision == "fp16":
        return {**common, "float16": "every standard-op node except float32_op_types; initializers stored as float16",
                "float32_op_types": sorted(FLOAT32_OP_TYPES), "float32_domains": [CUSTOM_DOMAIN],
                "float32_nodes": details["float32_nodes"]}
    return {
        **common,
        "method": method,
        "percentile": PERCENTILE if method == "percentile" else None,
        "histogram_bins": HISTOGRAM_BINS if method != "max" else None,
        "activations": "int8, symmetric per tensor, zero point 0 (calibrated)",
        "weights": "int8, symmetric per output channel (axis 0), zero point 0, values in [-127, 127]",
        "biases": "float32",
        "quantized_op_types": list(QUANTIZED_OP_TYPES),
        "placement": "Q/DQ on the inputs of weighted layers only (TensorRT's rules); outputs of weighted layers "
                     "and graph outputs unquantized",
        "excluded_op_types": [f"{CUSTOM_DOMAIN}.*"],
        "exclude_patterns": exclude,
        "excluded_nodes": details["excluded_nodes"],
        "split_convs": details["split_convs"],
        "split_rule": (f"a Conv over a Concat whose parts' largest |x| differ more than {details['split_ratio']:g}x "
                       "is computed as one Conv per part plus Adds (exact in float), so each part gets its own "
                       "scale" if details["split_ratio"] is not None else "none"),
        "quantized_nodes": details["quantized_nodes"],
        "activation_amax": details["activation_amax"],
        "quantizer": f"onnxruntime.quantization.quantize_static (QDQ, ranges overridden) {_onnxruntime_version()}",
    }


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
