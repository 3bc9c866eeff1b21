"""Subcommands of dpa.training.

Each command is an independent `run(args)` registered with `@command`; heavy modules (numpy, OpenCV,
torch) are imported inside `run`, so `dpa --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging

from dpa import options
from dpa.command import command
from dpa.errors import DpaError
from dpa.outputs import FILE, FOLDER, optional

log = logging.getLogger(__name__)

FLOW_DATASET_SIZE = 352  # `dpa flow`'s default working size: the paper's S


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    masks = parser.add_argument_group("score mask folders (DIR/<sequence>/<frame>.png)")
    masks.add_argument("--pred", metavar="DIR", help="predicted masks; any non-zero pixel is foreground")
    masks.add_argument("--gt", metavar="DIR", help="ground-truth masks, at the resolution to evaluate at")
    model = parser.add_argument_group("run a checkpoint and score it")
    model.add_argument("--checkpoint", metavar="CKPT", help="model checkpoint (.pt)")
    model.add_argument("--data", metavar="DIR", help="dataset to run the checkpoint on")
    model.add_argument("--layout", default="auto",
                       help="dataset layout: davis|youtube-vos|preprocessed|images (detected by default)")
    model.add_argument("--split", default="val", help="dataset split (default val)")
    model.add_argument("--flow-root", metavar="DIR", help="where the dataset's flow images are (`dpa flow --out`)")
    _sequence_arguments(model)
    model.add_argument("--flow", choices=("auto", "files", "dis"), default="auto",
                       help="files: pre-computed flow images; dis: estimate now (offline direction); "
                       "auto: files when every frame has one, else DIS (the report says which)")
    model.add_argument("--flow-size", type=options.FLOW_SIZE, metavar="PIXELS",
                       help="--flow dis: estimate the flow on the frames resized to PIXELS x PIXELS (default: the "
                       "model's input size S, as the runtime does; 0: the frames' own size)")
    model.add_argument("--save-masks", metavar="DIR", help="also write the predicted masks as DIR/<seq>/<frame>.png")
    model.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, …)")
    parser.add_argument("--json", metavar="OUT", help="also write per-frame and per-sequence results as JSON")
    parser.add_argument(
        "--protocol",
        choices=("all", "davis2016"),
        default="all",
        help="all: every frame (unsupervised protocol, default); "
        "davis2016: drop the first and last frame of each sequence (DAVIS-2016 toolkit)",
    )


def _eval_mode(args: argparse.Namespace) -> str:
    """"masks" or "checkpoint", or DpaError when the options do not pick exactly one complete mode."""
    masks = {"--pred": args.pred, "--gt": args.gt}
    model = {"--checkpoint": args.checkpoint, "--data": args.data}
    uses_masks = any(value is not None for value in masks.values())
    uses_model = any(value is not None for value in model.values())
    if uses_masks and uses_model:
        raise DpaError("give either --pred and --gt (score mask folders) or --checkpoint and --data "
                       "(run a model and score it), not both")
    if not uses_masks and not uses_model:
        raise DpaError("nothing to evaluate: give --pred DIR --gt DIR, or --checkpoint CKPT --data DIR")
    chosen = masks if uses_masks else model
    missing = [name for name, value in chosen.items() if value is None]
    if missing:
        raise DpaError(f"{' and '.join(chosen)} go together: {missing[0]} is missing")
    return "masks" if uses_masks else "checkpoint"


def _eval_outputs(args: argparse.Namespace):
    return optional(args.json, FILE, "results JSON") + optional(args.save_masks, FOLDER, "mask folder")


@command("eval", "DAVIS evaluation (J, F, G, recall, decay) of predicted masks or of a checkpoint",
         arguments=_eval_arguments, outputs=_eval_outputs)
def run_eval(args: argparse.Namespace) -> int:
    """Score, print the per-sequence table, write the JSON when asked.

    Checkpoint mode delegates to `dpa.training.inference.evaluate_checkpoint(args)`, which returns a
    result dict in the `dpa.training.evaluate.summarise` format; it is reported the same way.
    """
    mode = _eval_mode(args)
    from dpa.training.evaluate import format_table, score_directories, write_json

    if mode == "masks":
        result = score_directories(args.pred, args.gt, protocol=args.protocol, progress=True)
    else:
        from dpa.training.inference import evaluate_checkpoint

        args.sequences, args.exclude = _names(args.sequences), _names(args.exclude)
        result = evaluate_checkpoint(args)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        log.info("wrote %s", args.json)
    return 0


def _sequence_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sequences", metavar="NAMES", help="only these sequences (comma-separated names)")
    parser.add_argument("--exclude", metavar="NAMES",
                        help="leave out these sequences (comma-separated names), e.g. a development split")


def _names(value: str | None) -> list[str] | None:
    """A comma-separated --sequences/--exclude value as a list (None when not given)."""
    return None if value is None else [name.strip() for name in value.split(",") if name.strip()]


def _model_arguments(parser: argparse.ArgumentParser, default_config: str = "paper-iv") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--config", default=default_config, help=f"preset name (default {default_config}): "
                       "paper-i … paper-xi (Table 1 ablations), paper (= paper-iv), small (= small-iv; its "
                       "ablations small-i … small-xi), tiny")
    group.add_argument("--size", type=options.SIZE, help="input size S, a multiple of 32 (preset default)")
    group.add_argument("--memory", type=options.MEMORY, help="reference frames N (preset default)")
    group.add_argument("--width", type=options.WIDTH, help="channel width multiplier (preset default)")


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("info", "parameters and GFLOPs per frame of a configuration, per deployment stage",
         arguments=_info_arguments)
def run_info(args: argparse.Namespace) -> int:
    import json

    from dpa.training.config import get_config
    from dpa.training.summary import format_summary, summarize

    summary = summarize(get_config(args.config, size=args.size, memory=args.memory, width=args.width))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder: checkpoints last.pt/model.pt, metrics.jsonl")
    parser.add_argument("--data", action="append", default=[], metavar="ROOT[:LAYOUT]",
                        help="dataset root (repeatable; several are sampled with equal probability); layout "
                        "davis|youtube-vos|preprocessed|images|duts, detected when omitted")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2,
                        help="1: saliency images (DUTS), then the appearance encoder is copied to the motion "
                        "encoder; 2: video clips with N references (default)")
    parser.add_argument("--flow-root", action="append", default=[], metavar="DIR",
                        help="where a --data root's flow images are (`dpa flow --out DIR`); one per --data, in the "
                        "same order (default: in the dataset)")
    parser.add_argument("--split", default="train", help="dataset split (default train)")
    _sequence_arguments(parser)
    _model_arguments(parser)
    group = parser.add_argument_group("optimisation (paper defaults)")
    group.add_argument("--steps", type=options.COUNT, default=40000)
    group.add_argument("--batch-size", type=options.integer(1, 4096), default=16,
                       help="global batch over all processes")
    group.add_argument("--lr", type=options.POSITIVE, default=1e-4, help="start of the cosine schedule")
    group.add_argument("--final-lr", type=options.number(0), default=1e-5, help="end of the cosine schedule")
    group.add_argument("--seed", type=options.SEED, default=0)
    group.add_argument("--workers", type=options.integer(0, 64), default=2,
                       help="data-loading processes per training process")
    group.add_argument("--no-augment", action="store_true")
    group.add_argument("--freeze-batch-norm", action="store_true", help="keep BatchNorm in inference mode")
    group.add_argument("--freeze-batch-norm-from", type=options.FRACTION, metavar="FRACTION",
                       help="switch BatchNorm to its running statistics after this fraction of the steps")
    group.add_argument("--iou-loss", type=options.number(0), default=0.0, metavar="WEIGHT",
                       help="add WEIGHT × soft Jaccard (IoU) loss to the BCE of every side output (default 0: "
                       "the paper's BCE only)")
    group.add_argument("--camera-motion", type=options.FRACTION, default=0.0, metavar="P",
                       help="stage 2: the chance that a clip is seen from a camera following its object (its flow "
                       "is computed live, DIS at S, and shifted by the object's motion; default 0: the flow "
                       "images as stored)")
    group.add_argument("--quantization-aware", action="store_true",
                       help="quantization-aware training for the int8 variant: convolutions see their weights and "
                       "inputs rounded to int8 as `dpa calibrate` quantizes them, and OUT/model*.pt store the "
                       "weights on their int8 grid (fine-tune a trained --init for a few hundred steps)")
    group.add_argument("--init", help="start from this checkpoint's weights (stage 2: the stage-1 checkpoint)")
    group.add_argument("--vgg-weights", help="torchvision VGG-16 ImageNet state dict (.pth) for both encoders")
    group.add_argument("--save-every", type=options.COUNT, default=1000, help="steps between checkpoints (OUT/last.pt)")
    group.add_argument("--log-every", type=options.COUNT, default=10,
                       help="steps per record of the mean loss in OUT/metrics.jsonl (default 10)")
    group.add_argument("--keep-checkpoints", action="store_true",
                       help="also keep the weights at every --save-every step as OUT/model-<step>.pt (to select a "
                       "step on a development split)")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0, …")
    group.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="bf16: autocast convolutions and matrix products to bfloat16 (weights and optimiser stay "
                       "fp32); default fp32")
    group.add_argument("--threads", type=options.THREADS, metavar="N",
                       help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--resume", action="store_true", help="continue OUT/last.pt exactly where it stopped")
    parser.add_argument("--until", type=options.COUNT, help="stop after this step (resume later with --resume)")


def _train_outputs(args: argparse.Namespace):
    """The run folder, claimed by the first process only (torchrun starts one per GPU, RANK 0 writes); --resume and
    --until keep what is there."""
    import os

    if int(os.environ.get("RANK", "0")) > 0:
        return []
    return optional(args.out, FOLDER, "training folder", keep=args.resume)


@command("train", "train DPA (stage 1 or 2); multi-GPU/multi-node with torchrun", arguments=_train_arguments,
         outputs=_train_outputs)
def run_train(args: argparse.Namespace) -> int:
    from dpa.training.settings import TrainSettings
    from dpa.training.train import train

    settings = TrainSettings(
        out=args.out, data=args.data, flow_roots=args.flow_root, sequences=_names(args.sequences),
        exclude=_names(args.exclude) or [], precision=args.precision, threads=args.threads, stage=args.stage,
        config=args.config, size=args.size, memory=args.memory, width=args.width, split=args.split, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.lr,
        final_learning_rate=args.final_lr, seed=args.seed, workers=args.workers, augment=not args.no_augment,
        freeze_batch_norm=args.freeze_batch_norm, freeze_batch_norm_from=args.freeze_batch_norm_from,
        iou_loss_weight=args.iou_loss, camera_motion=args.camera_motion,
        quantization_aware=args.quantization_aware, init=args.init, vgg_weights=args.vgg_weights,
        save_every=args.save_every, log_every=args.log_every, keep_checkpoints=args.keep_checkpoints,
        device=args.device,
    )
    last = train(settings, resume=args.resume, until=args.until)
    print(f"checkpoint: {last}")
    return 0


def _flow_estimator_arguments(parser: argparse.ArgumentParser, option: str, size_help: str) -> None:
    parser.add_argument(option, dest="estimator", choices=("dis", "raft"), default="dis",
                        help="flow estimator: dis (OpenCV, what the runtime uses; default) or raft "
                             "(torchvision, where installed)")
    parser.add_argument("--preset", choices=("ultrafast", "fast", "medium"),
                        help="DIS preset (default fast)")
    # --flow-size is the name dpa run/eval use for the same choice; --work-size is its earlier name here
    parser.add_argument("--flow-size", "--work-size", dest="flow_size", type=options.FLOW_SIZE, metavar="PIXELS",
                        help=size_help)


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset root; writes DIR/<split>/...")
    parser.add_argument("--clips", type=options.integer(1, 100000), default=20, help="number of clips (default 20)")
    parser.add_argument("--frames", type=options.integer(1, 10000), default=12,
                        help="frames per clip (default 12)")
    parser.add_argument("--size", type=options.integer(16, 2048), default=128, metavar="PX",
                        help="square frame side (default 128)")
    parser.add_argument("--seed", type=options.SEED, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--split", default="train", metavar="NAME", help="split folder name (default train)")
    parser.add_argument("--overwrite", action="store_true", help="replace a split that dpa synth wrote")
    _flow_estimator_arguments(parser, "--flow", "compute DIS flow on the frames resized to S x S (default: the "
                              "frames' own size, which is the model's input size for synthetic clips)")


def _synth_outputs(args: argparse.Namespace):
    from pathlib import Path

    # kept: `write_dataset` replaces only a split that dpa synth wrote, on --overwrite
    return optional(Path(args.out) / args.split, FOLDER, "synthetic split", keep=True)


def _round_weights_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="the checkpoint to round (a path, small or "
                        "tiny)")
    parser.add_argument("--out", required=True, help="the rounded checkpoint (.pt)")


def _round_weights_outputs(args: argparse.Namespace):
    """The rounded checkpoint; never the checkpoint it is made from (--overwrite would remove it before reading)."""
    from pathlib import Path

    from dpa.training.checkpoint import resolve_checkpoint

    if Path(args.out).resolve() == resolve_checkpoint(args.checkpoint).resolve():
        raise DpaError(f"--out {args.out} is the checkpoint being rounded; write the rounded one to another path")
    return optional(args.out, FILE, "checkpoint")


@command("round-weights", "put every convolution's weight on its int8 grid (per output channel, as `dpa calibrate` "
         "quantizes it): the int8 graphs' weights then equal the fp32 graphs'",
         arguments=_round_weights_arguments, outputs=_round_weights_outputs)
def run_round_weights(args: argparse.Namespace) -> int:
    from dpa.training.checkpoint import load_model, save_checkpoint
    from dpa.training.quantize import int8_grid_state, largest_grid_change

    model, payload = load_model(args.checkpoint)
    state = int8_grid_state(model)
    count, change = largest_grid_change(model, state)
    extra = {key: payload[key] for key in ("step", "train", "metrics") if key in payload}
    rounded = {"source": payload["path"], "convolutions": count, "largest_change": change}
    save_checkpoint(args.out, model, model.config, state, **extra, int8_grid=rounded)
    print(f"{count} convolutions on their int8 grid (largest change: {change:.2%} of a channel's largest |w|): "
          f"{args.out}")
    return 0


@command("synth", "generate a procedural video dataset with exact masks and flow (pre-processed layout)",
         arguments=_synth_arguments, outputs=_synth_outputs)
def run_synth(args: argparse.Namespace) -> int:
    import time

    from dpa.training.flowgen import estimator_options
    from dpa.training.synth import write_dataset

    start = time.perf_counter()
    options = estimator_options(args.estimator, args.preset, args.flow_size)
    manifest = write_dataset(
        args.out, clips=args.clips, frames=args.frames, size=args.size, seed=args.seed, split=args.split,
        estimator_name=args.estimator, estimator_options=options, overwrite=args.overwrite,
    )
    print(f"wrote {args.clips} clips x {args.frames} frames of {args.size} px to {manifest.parent} "
          f"in {time.perf_counter() - start:.1f} s (manifest: {manifest})")
    return 0


def _flow_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset root")
    # dpa.training.flowgen.LAYOUTS (tested), copied: importing it loads OpenCV, which parsing should not
    parser.add_argument("--layout", required=True, choices=("davis", "preprocessed", "images", "youtube-vos"),
                        help="davis: JPEGImages/<res>/<seq>/; preprocessed: <split>/RGB/<seq>/ (or "
                             "<seq>_<frame> files); images: <seq>/JPEGImages/; youtube-vos: "
                             "<split>/JPEGImages/<video>/")
    parser.add_argument("--out", metavar="DIR",
                        help="write the flow under DIR, mirroring the dataset's relative paths "
                             "(default: into the dataset)")
    parser.add_argument("--resolution", default="480p", help="DAVIS resolution folder (default 480p)")
    parser.add_argument("--overwrite", action="store_true", help="recompute flow images that already exist")
    _flow_estimator_arguments(parser, "--estimator", f"the input size S of the model the flow is for: DIS runs on "
                              f"the frames resized to S x S and the flow images are written at S x S, as the "
                              f"runtime computes them (default {FLOW_DATASET_SIZE}, the paper's S; 0: the frames' "
                              "own size, as the public pre-processed datasets)")


def _flow_outputs(args: argparse.Namespace):
    # kept: existing flow images are kept (a stopped run continues) unless --overwrite recomputes them; without
    # --out the flow goes into the dataset, which is not claimed
    return optional(args.out, FOLDER, "flow folder", keep=True)


@command("flow", "pre-compute flow images (offline direction, RAFT colour wheel) for a dataset",
         arguments=_flow_arguments, outputs=_flow_outputs)
def run_flow(args: argparse.Namespace) -> int:
    from dpa.training.flowgen import compute_flow, create_estimator, estimator_options, find_sequences

    sequences = find_sequences(args.data, args.layout, args.out, args.resolution)
    flow_size = args.flow_size
    if flow_size is None and args.estimator == "dis":
        flow_size = FLOW_DATASET_SIZE
    options = estimator_options(args.estimator, args.preset, flow_size or None)
    summary = compute_flow(sequences, create_estimator(args.estimator, **options), overwrite=args.overwrite)
    print(f"{summary.sequences} sequences: wrote {summary.written} flow images, kept {summary.existing} "
          f"existing, skipped {len(summary.unreadable)} unreadable frames -> {args.out or args.data}")
    if summary.unreadable:
        log.warning("unreadable frames (no flow written): %s", ", ".join(summary.unreadable[:10])
                    + (" ..." if len(summary.unreadable) > 10 else ""))
    return 0
