"""Model configurations: the paper's ablation presets (Table 1, versions I–XI), `small` and its ablations, `tiny`.

A `ModelConfig` is plain data: it is saved in checkpoints and export manifests and rebuilt from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from dpa.constants import SIZE_MULTIPLE
from dpa.errors import DpaError

AttentionMode = Literal["prototype", "plain", "off"]
ATTENTION_MODES = ("prototype", "plain", "off")


@dataclass(frozen=True)
class ModelConfig:
    """What defines a DPA network.

    ima / ifa: "prototype" (the paper's DPA), "plain" (the "without prototypes" ablation: keys and values
    embedded from the features directly) or "off".
    width: channel multiplier applied to every layer (1.0 = the paper; 1/8 for tests and the demo).
    size: S, the square input resolution (a multiple of 32).
    memory: N, the number of reference frames (memory capacity).
    detach_soft_regions: treat the soft regions S as constants in back-propagation (the reference code).
    """

    name: str = "paper-iv"
    ima: AttentionMode = "prototype"
    ifa: AttentionMode = "prototype"
    width: float = 1.0
    size: int = 352
    memory: int = 4
    detach_soft_regions: bool = True

    def __post_init__(self) -> None:
        for field in ("ima", "ifa"):
            if getattr(self, field) not in ATTENTION_MODES:
                raise DpaError(f"{field} must be one of {ATTENTION_MODES}, got {getattr(self, field)!r}")
        if self.size <= 0 or self.size % SIZE_MULTIPLE:
            raise DpaError(f"size must be a positive multiple of {SIZE_MULTIPLE}, got {self.size}")
        if not 1 <= self.memory <= 64:
            raise DpaError(f"memory (reference frames N) must be in 1..64, got {self.memory}")
        if not 0 < self.width <= 4:
            raise DpaError(f"width multiplier must be in (0, 4], got {self.width}")

    def channels(self, paper_channels: int) -> int:
        """A layer's channel count under the width multiplier (at least 4)."""
        return max(4, int(round(paper_channels * self.width)))

    @property
    def uses_ima(self) -> bool:
        return self.ima != "off"

    @property
    def uses_ifa(self) -> bool:
        return self.ifa != "off"

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DpaError(f"unknown model config fields {sorted(unknown)}")
        return cls(**data)


# Table 1 of the paper: I baseline, II IMA, III IFA, IV both (DPA); V–VII the "without prototypes"
# variants; VIII–XI the number of reference frames N = 1, 2, 3, 5 with both modules (IV is N = 4).
PRESETS: dict[str, ModelConfig] = {
    "paper-i": ModelConfig("paper-i", ima="off", ifa="off"),
    "paper-ii": ModelConfig("paper-ii", ima="prototype", ifa="off"),
    "paper-iii": ModelConfig("paper-iii", ima="off", ifa="prototype"),
    "paper-iv": ModelConfig("paper-iv", ima="prototype", ifa="prototype"),
    "paper-v": ModelConfig("paper-v", ima="plain", ifa="prototype"),
    "paper-vi": ModelConfig("paper-vi", ima="prototype", ifa="plain"),
    "paper-vii": ModelConfig("paper-vii", ima="plain", ifa="plain"),
    "paper-viii": ModelConfig("paper-viii", memory=1),
    "paper-ix": ModelConfig("paper-ix", memory=2),
    "paper-x": ModelConfig("paper-x", memory=3),
    "paper-xi": ModelConfig("paper-xi", memory=5),
    # The demo / test network: the full DPA structure at 1/8 width and a small input.
    "tiny": ModelConfig("tiny", width=0.125, size=128, memory=4),
}
PRESETS["paper"] = PRESETS["paper-iv"].replace(name="paper")
# The real-video model for live use on modest hardware: the paper's structure at 1/4 width (VGG-16 filters
# 16/32/64/128/128, attention 32 dims: multiples of 16, which CPU kernels run at full speed; 20 channels ran
# 2x slower than 16 here) and S = 224, with encoders initialised from a subset of the ImageNet VGG-16
# filters. `small-i` … `small-xi` are the paper's ablations at the same scale; `small` is `small-iv`.
SMALL_WIDTH, SMALL_SIZE = 0.25, 224
for _name in [name for name in PRESETS if name.startswith("paper-")]:
    _small = "small-" + _name.removeprefix("paper-")
    PRESETS[_small] = PRESETS[_name].replace(name=_small, width=SMALL_WIDTH, size=SMALL_SIZE)
PRESETS["small"] = PRESETS["small-iv"].replace(name="small")


def get_config(
    name: str, size: int | None = None, memory: int | None = None, width: float | None = None
) -> ModelConfig:
    """A preset by name, with optional overrides of S, N and the width multiplier."""
    if name not in PRESETS:
        raise DpaError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)}")
    changes = {k: v for k, v in (("size", size), ("memory", memory), ("width", width)) if v is not None}
    return PRESETS[name].replace(**changes)
