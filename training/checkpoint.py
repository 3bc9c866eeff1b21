"""Checkpoints: config, weights, step, optimiser state and metrics in one file; named shipped checkpoints.

`--checkpoint tiny` (any command) resolves to the small demo checkpoint shipped in
`training/checkpoints/tiny.pt`; anything else is a path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dpa.errors import DpaError
from dpa.training.config import ModelConfig
from dpa.training.model import DPA

SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"
SHIPPED = {"tiny": SHIPPED_DIR / "tiny.pt"}


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A shipped checkpoint's name (`tiny`) or a path -> an existing file path."""
    key = str(name_or_path)
    path = SHIPPED.get(key, Path(key))
    if not path.is_file():
        hint = f" (shipped names: {', '.join(SHIPPED)})" if key not in SHIPPED else ""
        raise DpaError(f"checkpoint {key!r} not found at {path}{hint}")
    return path


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, config: ModelConfig, **extra) -> Path:
    """Write {config, model, **extra} atomically (temp file + rename, so a crash never leaves half a file).

    extra: step, optimizer, scheduler, metrics, train (the training settings) — whatever resume needs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model
    state = {name: tensor.contiguous() for name, tensor in module.state_dict().items()}  # layout-neutral files
    payload = {"format": "dpa-checkpoint/1", "config": config.to_dict(), "model": state, **extra}
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)
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
