"""Checkpoints: config, weights, step, optimiser state and metrics in one file; named shipped checkpoints.

`--checkpoint small` and `--checkpoint tiny` (any command) resolve to the checkpoints shipped in
`training/checkpoints/`: `small` is the real-video model, `tiny` the synthetic-only test network; anything
else is a path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dpa.errors import DpaError
from dpa.files import atomic_path
from dpa.manifest import Manifest
from dpa.training.config import ModelConfig
from dpa.training.model import DPA

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"
SHIPPED = {"tiny": SHIPPED_DIR / "tiny.pt", "small": SHIPPED_DIR / "small.pt"}


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A shipped checkpoint's name (`tiny`) or a path -> an existing file path."""
    key = str(name_or_path)
    path = SHIPPED.get(key, Path(key))
    if not path.is_file():
        hint = f" (shipped names: {', '.join(SHIPPED)})" if key not in SHIPPED else ""
        raise DpaError(f"checkpoint {key!r} not found at {path}{hint}")
    return path


def save_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, config: ModelConfig, state: dict | None = None, **extra
) -> Path:
    """Write {config, model, **extra} atomically (temp file + rename, so a crash never leaves half a file).

    state: the weights to store (default: `model`'s state dict). extra: step, optimizer, scheduler, metrics,
    train (the training settings) — whatever resume needs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model
    state = module.state_dict() if state is None else state
    state = {name: tensor.contiguous() for name, tensor in state.items()}  # layout-neutral files
    payload = {"format": "dpa-checkpoint/1", "config": config.to_dict(), "model": state, **extra}
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path


def load_checkpoint(name_or_path: str | os.PathLike) -> dict:
    """Read a checkpoint (CPU tensors). Raises DpaError for missing or unreadable files."""
    path = resolve_checkpoint(name_or_path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for corrupt files
        raise DpaError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise DpaError(f"{path} is not a DPA checkpoint (no 'model'/'config' entries)")
    payload["path"] = str(path)
    return payload


def load_state(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    """load_state_dict that reports every missing and unexpected key in one DpaError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}")
        raise DpaError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)


def load_model(name_or_path: str | os.PathLike) -> tuple[DPA, dict]:
    """The model stored in a checkpoint, in eval mode, and the checkpoint dict."""
    payload = load_checkpoint(name_or_path)
    config = ModelConfig.from_dict(payload["config"])
    model = DPA(config)
    load_state(model, payload["model"], source=payload["path"])
    return model.eval(), payload


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes, in name order): identifies the weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def exported_model(directory: str | os.PathLike, manifest: Manifest, checkpoint: str | None = None) -> tuple[DPA, dict]:
    """The PyTorch model the graphs of export `directory` were exported from, at the manifest's S and N, and where
    its weights came from.

    checkpoint None: the manifest's record — the seeded initialisation, or the checkpoint it names (a relative
    path is looked up in `directory` first: `dpa export --init calibrated` stores its weights there). The
    weights must hash to the manifest's `weights_sha256`.
    """
    from dpa.files import file_sha256
    from dpa.training.model import build_model

    config = ModelConfig.from_dict(dict(manifest.model.config))
    recorded = manifest.checkpoint
    if checkpoint is None and recorded.path is None:
        model = build_model(config, seed=recorded.seed)
        source = {"path": None, "random_init": True, "seed": recorded.seed}
    else:
        if checkpoint is None:
            path = Path(recorded.path)
            checkpoint = str(Path(directory) / path if (Path(directory) / path).is_file() else path)
        payload = load_checkpoint(checkpoint)
        sha = file_sha256(payload["path"])
        if recorded.sha256 and sha != recorded.sha256:
            log.warning("checkpoint %s (sha256 %s…) is not the exported file (sha256 %s…); comparing the weights",
                        payload["path"], sha[:12], recorded.sha256[:12])
        model = DPA(config)
        load_state(model, payload["model"], source=payload["path"])
        source = {"path": payload["path"], "sha256": sha, "random_init": recorded.random_init}
    if weights_sha256(model) != manifest.model.weights_sha256:
        raise DpaError("these weights are not the ones the graphs were exported from (weights sha256 differs); "
                       "pass the checkpoint given to `dpa export`")
    return model.eval(), source
