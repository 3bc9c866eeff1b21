"""Model size and cost per stage (`dpa info`): parameters and FLOPs of each deployment stage.

FLOPs are 2 x multiply-accumulates of convolutions and matrix products (torch's FLOP counter); the
element-wise work (softmax, normalisation, activations) is not counted. A frame's IFA memory entry is
computed once when the frame is admitted, not per query, so a frame costs encoder + ima + ifa_memory
+ decoder.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from dpa.training.config import ModelConfig
from dpa.training.model import DPA, MODALITIES, build_model, count_parameters

STAGES = ("encoder", "ima", "ifa_memory", "decoder")


def stage_of_parameter(name: str, config: ModelConfig) -> str:
    """Which deployment stage owns a parameter (sq5 belongs to IMA5 when present, else to the decoder)."""
    if name.startswith(("encoders.", "squeeze4.", "ima4.")):
        return "encoder"
    if name.startswith("ima5.") or (name.startswith("squeeze5.") and config.uses_ima):
        return "ima"
    if name.startswith("ifa.") and name.split(".")[2] in ("key", "value"):
        return "ifa_memory"
    return "decoder"


def _counted(function, *args):
    """(FLOPs, result) of one call."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = function(*args)
    return int(counter.get_total_flops()), result


@torch.no_grad()
def summarize(config: ModelConfig, model: DPA | None = None) -> dict:
    """Parameters (total and per stage) and GFLOPs per frame at the config's S and N (batch 1)."""
    model = (model or build_model(config)).eval()
    parameters = dict.fromkeys(STAGES, 0)
    for name, parameter in model.named_parameters():
        parameters[stage_of_parameter(name, config)] += parameter.numel()

    size = config.size
    rgb = torch.zeros(1, 3, size, size)
    flops = dict.fromkeys(STAGES, 0)
    flops["encoder"], encoded = _counted(model.encode, rgb, rgb)
    ima5 = None
    if config.uses_ima:
        flops["ima"], ima5 = _counted(model.ima_block5, encoded.f5)
    memory = valid = None
    if config.uses_ifa:
        flops["ifa_memory"], entry = _counted(model.memory_entry, encoded.f5)
        memory = {
            m: tuple(t[:, None].expand(-1, config.memory, *t.shape[1:]) for t in entry[m]) for m in MODALITIES
        }
        valid = torch.ones(1, config.memory, dtype=torch.bool)
    flops["decoder"], _ = _counted(model.decode, encoded, ima5, memory, valid)

    return {
        "config": config.name,
        "size": size,
        "memory": config.memory,
        "width": config.width,
        "ima": config.ima,
        "ifa": config.ifa,
        "parameters": count_parameters(model),
        "gflops_per_frame": sum(flops.values()) / 1e9,
        "stages": {
            stage: {"parameters": parameters[stage], "gflops": flops[stage] / 1e9}
            for stage in STAGES
            if parameters[stage] or flops[stage]
        },
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"config {summary['config']}  S={summary['size']}  N={summary['memory']}  width={summary['width']}"
        f"  IMA={summary['ima']}  IFA={summary['ifa']}",
        f"parameters {summary['parameters'] / 1e6:.2f} M   GFLOPs per frame {summary['gflops_per_frame']:.1f}",
        f"{'stage':<12}{'parameters (M)':>16}{'GFLOPs':>10}",
    ]
    for stage, values in summary["stages"].items():
        lines.append(f"{stage:<12}{values['parameters'] / 1e6:>16.3f}{values['gflops']:>10.2f}")
    return "\n".join(lines)
