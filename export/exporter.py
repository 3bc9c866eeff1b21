"""`dpa export`: a DPA model -> stage graphs (ONNX, batch 1, static shapes for one S and N) + manifest.json.

One code path gives every form: `torch.onnx.export` (dynamo) of each export wrapper with the prototype ops
as `trt.plugins` custom nodes, then
- `functions`: the custom nodes plus model-local functions holding their standard-op bodies (ONNX Runtime
  runs it as is; TensorRT ≥ 10.7 uses the plugin where the library is loaded) — the default;
- `plugin`: the same custom nodes without the functions (TensorRT ≤ 10.6, whose parser would otherwise
  import the function body instead of the plugin);
- `portable`: the functions inlined into standard ops (no custom nodes).
A graph without custom nodes is written once, `<graph>.onnx`, and serves every form. Right after export each
file runs in ONNX Runtime on the export's example inputs and is compared with the PyTorch wrapper.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch

from dpa import stop
from dpa.errors import DpaError
from dpa.export import functions, ops
from dpa.export.reference import OP_SPECS, PLUGIN_DOMAIN, PLUGIN_VERSION
from dpa.files import atomic_path, file_sha256
from dpa.manifest import FORMS, MANIFEST_FORMAT, MANIFEST_NAME, Manifest, WeightsRecord
from dpa.training import stages
from dpa.training.checkpoint import weights_sha256
from dpa.training.model import DPA, count_parameters

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
PRECISION = "fp32"
PROBABILITY_TOLERANCE = 1e-4  # SPEC §4.1: max abs error of the probability map, ONNX Runtime vs PyTorch (fp32)
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export", "torch.fx")
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


def parse_forms(form: str) -> tuple[str, ...]:
    """--form value -> the forms to write ("all" = every form)."""
    if form == "all":
        return FORMS
    if form not in FORMS:
        raise DpaError(f"unknown form {form!r}; choose one of {', '.join(FORMS)} or all")
    return (form,)


def tensor_infos(values: list[onnx.ValueInfoProto], where: str) -> list[dict]:
    """Graph inputs/outputs as {"name", "shape", "dtype"}; every dimension must be a static number."""
    infos = []
    for value in values:
        tensor_type = value.type.tensor_type
        dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
        if not tensor_type.HasField("shape") or any(dim is None or dim <= 0 for dim in dims):
            raise AssertionError(f"{where}: {value.name} has a non-static shape {dims}")
        infos.append({"name": value.name, "shape": dims, "dtype": _DTYPES[tensor_type.elem_type]})
    return infos


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's own log records and warnings (onnxscript, onnx_ir, torch.onnx: pass statistics, "torchvision
    is not installed", …) only when dpa logs at debug level; errors always."""
    quiet = not log.isEnabledFor(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        if quiet:
            for logger in loggers:
                logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _torch_export(wrapper: torch.nn.Module, example: tuple[torch.Tensor, ...], opset: int) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of one wrapper with the custom ops; the exporter's chatter goes to debug."""
    chatter = io.StringIO()
    with ops.custom_ops(), _quiet_exporter(), contextlib.redirect_stdout(chatter):
        program = torch.onnx.export(
            wrapper, example, dynamo=True, opset_version=opset, external_data=False, verbose=False,
            custom_translation_table=ops.translation_table(), input_names=list(wrapper.input_names),
            output_names=list(wrapper.output_names),
        )
    if chatter.getvalue().strip():
        log.debug("torch.onnx: %s", chatter.getvalue().strip())
    return program.model_proto


def _finish(model: onnx.ModelProto, name: str, doc: str, metadata: dict[str, str]) -> onnx.ModelProto:
    """Attach the custom ops' functions, infer every shape (strict) and label the graph."""
    functions.attach_functions(model)
    model.graph.name = name
    model.graph.doc_string = doc
    model.producer_name = "dpa export"
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def _forms_of(model: onnx.ModelProto, forms: tuple[str, ...]) -> dict[str, onnx.ModelProto]:
    """form -> model. Portable = the functions inlined (shapes re-inferred); plugin = the functions removed."""
    result = {}
    for form in forms:
        if form == "functions":
            result[form] = model
        elif form == "plugin":
            result[form] = functions.strip_functions(model)
        else:
            result[form] = onnx.shape_inference.infer_shapes(
                functions.inline_functions(model), check_type=True, strict_mode=True, data_prop=True
            )
    return result


def _file_name(graph: str, form: str, has_custom_nodes: bool) -> str:
    return f"{graph}.onnx" if form == "functions" or not has_custom_nodes else f"{graph}.{form}.onnx"


def _verify(path: Path, wrapper: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Run the file in ONNX Runtime (CPU) on the example inputs: output name -> max abs error vs PyTorch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: tensor.numpy() for name, tensor in zip(wrapper.input_names, example, strict=True)}
    actual = session.run(list(wrapper.output_names), feed)
    with torch.no_grad():
        expected = wrapper(*example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return {
        name: float(np.abs(a.astype(np.float64) - e.numpy().astype(np.float64)).max())
        for name, a, e in zip(wrapper.output_names, actual, expected, strict=True)
    }


def _synthetic_frame(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A realistic example frame (rgb, flow), each (1, 3, S, S): a synthetic clip's first frame and its DIS flow.

    Tracing does not depend on the values; the check right after export does (noise inputs would drive an
    untrained network far outside the range it sees on video).
    """
    from dpa.export.frames import preprocess_clip, synthetic_clip

    rgb, flow, _ = preprocess_clip(synthetic_clip(2, size, seed=1), [0], size)
    return torch.from_numpy(rgb[0])[None], torch.from_numpy(flow[0])[None]


def export_stage_graphs(
    model: DPA, out: str | Path, weights: WeightsRecord, forms: tuple[str, ...] = ("functions",),
    opset: int = DEFAULT_OPSET, verify: bool = True,
) -> Manifest:
    """Write the stage graphs of `model` (at its config's S and N) in `forms` and manifest.json into `out`.

    Returns the manifest. Raises DpaError when `out` cannot be written or, with `verify`, when the probability
    map of a checkpoint's decoder differs from PyTorch by more than 1e-4 in ONNX Runtime on a synthetic frame
    (the files stay for inspection; for untrained weights this is a warning).
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_bytes(b"")
        (out / ".write-test").unlink()
    except OSError as error:
        raise DpaError(f"cannot write to {out}: {error}; choose another --out") from error
    model = model.eval()
    config = model.config
    wrappers = stages.stage_graphs(model)
    examples = stages.example_inputs(model, wrappers, *_synthetic_frame(config.size))
    weights_hash = weights_sha256(model)
    metadata = {
        "dpa.config": json.dumps(config.to_dict()),
        "dpa.checkpoint_sha256": weights.sha256 or "random-init",
        "dpa.weights_sha256": weights_hash,
        "dpa.precision": PRECISION,
    }
    entries: dict[str, dict] = {}
    start = time.perf_counter()
    for index, (name, wrapper) in enumerate(wrappers.items(), 1):
        stop.check()  # a stop point between graphs; without manifest.json the folder is not an export
        log.info("[%d/%d] exporting %s (inputs %s)", index, len(wrappers), name, ", ".join(wrapper.input_names))
        entries[name] = _export_graph(name, wrapper, examples[name], out, forms, opset, metadata, verify)
    manifest = Manifest.from_dict({
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "producer": {"dpa_export": 1, "torch": torch.__version__, "onnx": onnx.__version__},
        "model": {"config": config.to_dict(), "parameters": count_parameters(model), "weights_sha256": weights_hash},
        "checkpoint": weights.to_dict(),
        "size": config.size,
        "memory": config.memory,
        "batch": 1,
        "opset": opset,
        "precision": PRECISION,
        "forms": list(forms),
        "custom_ops": {
            "domain": PLUGIN_DOMAIN,
            "plugin_version": PLUGIN_VERSION,
            "ops": {op_type: [a.name for a in spec.attributes] for op_type, spec in OP_SPECS.items()},
        },
        "graphs": entries,
        "pipeline": stages.pipeline(config),
        "export_seconds": round(time.perf_counter() - start, 3),
    }, where=f"the manifest of {out}")
    manifest.save(out)
    log.info("wrote %s graphs and %s in %.1f s", len(entries), out / MANIFEST_NAME, manifest.record["export_seconds"])
    if verify:
        _judge_verification(entries["decoder"], out, weights)
    return manifest


def _export_graph(name: str, wrapper: torch.nn.Module, example: tuple[torch.Tensor, ...], out: Path,
                  forms: tuple[str, ...], opset: int, metadata: dict[str, str], verify: bool) -> dict:
    """Export one wrapper, write it in every form (checked by onnx), verify it in ONNX Runtime; its manifest entry."""
    start = time.perf_counter()
    model_proto = _finish(_torch_export(wrapper, example=example, opset=opset), name,
                          (type(wrapper).__doc__ or "").strip(), metadata)
    export_seconds = time.perf_counter() - start
    custom = functions.custom_nodes(model_proto.graph)
    files, sizes, counts = {}, {}, {}
    for form, form_model in _forms_of(model_proto, forms).items():
        file_name = _file_name(name, form, bool(custom))
        form_model.metadata_props.add(key="dpa.form", value=form if custom else "standard")
        onnx.checker.check_model(form_model, full_check=True)
        if file_name not in sizes:
            with atomic_path(out / file_name) as temporary:
                onnx.save(form_model, temporary)
            sizes[file_name] = (out / file_name).stat().st_size
        files[form] = file_name
        counts[form] = functions.custom_nodes(form_model.graph)
    entry = {
        "file": files[forms[0]],
        "files": files,
        "bytes": sizes,
        "sha256": {file: file_sha256(out / file) for file in sizes},  # checked when an engine opens the file
        "inputs": tensor_infos(list(model_proto.graph.input), name),
        "outputs": tensor_infos(list(model_proto.graph.output), name),
        "custom_nodes": counts,
        "export_seconds": round(export_seconds, 3),
    }
    runnable = next((f for f in ("functions", "portable") if f in files), None)
    if verify and runnable:
        entry["verification"] = {"form": runnable, "max_abs": _verify(out / files[runnable], wrapper, example)}
    entry["seconds"] = round(time.perf_counter() - start, 3)  # with forms, checks and verification
    log.info("  %s: export %.1f s (with forms, checks and verification %.1f s), %s, custom nodes %s", name,
             export_seconds, entry["seconds"],
             ", ".join(f"{file} {size / 2**20:.1f} MiB" for file, size in sizes.items()),
             ", ".join(f"{op} x{count}" for op, count in custom.items()) or "none")
    return entry


def _judge_verification(decoder: dict, out: Path, weights: WeightsRecord) -> None:
    """DpaError (a checkpoint) or a warning (untrained weights) when the decoder's probability map differed from
    PyTorch by more than the tolerance right after export."""
    error = decoder.get("verification", {}).get("max_abs", {}).get(stages.PROBABILITY)
    if error is None or error <= PROBABILITY_TOLERANCE:
        return
    message = (f"decoder probability differs from PyTorch by {error:.2e} > {PROBABILITY_TOLERANCE:g} in ONNX "
               f"Runtime right after export (the files in {out} are kept)")
    if weights.init == "checkpoint":
        raise DpaError(message)
    log.warning("%s; untrained weights amplify fp32 rounding (raw initialisation: logits of |100|s), so this "
                "is expected for them; `dpa check` tells rounding from export errors (float64)", message)


UNTRAINED_WEIGHTS = "untrained.pt"
INITS = ("random", "calibrated")


def model_for_export(
    checkpoint: str | None, config_name: str | None, size: int | None, memory: int | None,
    init: str = "random", out: str | Path | None = None, seed: int = 0, width: float | None = None,
    calibration_clip: str | Path | None = None,
) -> tuple[DPA, WeightsRecord]:
    """The model to export at S = size and N = memory, and where its weights came from.

    With a checkpoint its configuration is used (S and N may differ from training: no weight depends on
    them); `config_name`, when also given, must name the same architecture. Without one, the preset's seeded
    initialisation (`build_model(config, seed)`), with a warning; init "calibrated" scale-calibrates it on a
    clip (`calibration_clip`, default a synthetic one; `dpa.export.untrained`) and saves the weights as
    OUT/untrained.pt for `dpa check`. width: the preset's width multiplier override (without a checkpoint only).
    """
    from dpa.files import file_sha256
    from dpa.training.checkpoint import load_checkpoint, load_state, save_checkpoint
    from dpa.training.config import ModelConfig, get_config
    from dpa.training.model import build_model

    if checkpoint is None:
        if init not in INITS:
            raise DpaError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
        config = get_config(config_name or "paper-iv", size=size, memory=memory, width=width)
        log.warning("no --checkpoint: exporting the seeded %s initialisation of %s (build_model(seed=%d)); the "
                    "graphs are for tests and timings, their masks mean nothing", init, config.name, seed)
        if init == "random":
            if calibration_clip is not None:
                raise DpaError("--calibration-clip goes with --init calibrated")
            return build_model(config, seed=seed).eval(), WeightsRecord("random", seed=seed)
        from dpa.export.untrained import calibrated_model

        if out is None:
            raise DpaError("init 'calibrated' needs the output directory to store its weights")
        model, frames = calibrated_model(config, seed=seed, clip=calibration_clip)
        path = save_checkpoint(Path(out) / UNTRAINED_WEIGHTS, model, config, init="calibrated", seed=seed,
                               calibration=frames)
        source = WeightsRecord("calibrated", path=UNTRAINED_WEIGHTS, sha256=file_sha256(path), seed=seed,
                               calibration=frames)
        return model, source
    if init != "random" or width is not None or calibration_clip is not None:
        raise DpaError("--init, --width and --calibration-clip apply without --checkpoint only "
                       "(a checkpoint fixes the weights)")
    payload = load_checkpoint(checkpoint)
    trained = ModelConfig.from_dict(payload["config"])
    changes = {key: value for key, value in (("size", size), ("memory", memory)) if value is not None}
    config = trained.replace(**changes)
    if config_name is not None:
        preset = get_config(config_name)
        architecture = ("ima", "ifa", "width", "detach_soft_regions")
        differ = [f"{key} {getattr(preset, key)} vs {getattr(trained, key)}" for key in architecture
                  if getattr(preset, key) != getattr(trained, key)]
        if differ:
            raise DpaError(f"--config {config_name} does not match the checkpoint's {trained.name} "
                           f"({'; '.join(differ)}); leave --config out to use the checkpoint's")
    model = DPA(config)
    load_state(model, payload["model"], source=payload["path"])
    path = Path(payload["path"]).resolve()
    source = WeightsRecord("checkpoint", path=str(path), sha256=file_sha256(path), step=payload.get("step"))
    return model.eval(), source
