"""The stage graphs (SPEC §4.1) as wrapper modules: one small module per graph, tensors in, tensors out.

`dpa export` writes them as ONNX (`dpa.export.exporter`); `dpa.training.torch_engine` runs them as the PyTorch
backend, so PyTorch chains the same graphs with the same names as ONNX Runtime and TensorRT do.

Each wrapper reuses the model's own stage method (`encode`, `ima_block5`, `memory_entry`, `decode`) and
fixes the names and order of its inputs and outputs; batch 1 everywhere. Which graphs exist depends on the
configuration: `ima` only with IMA, `ifa_memory` (and the decoder's memory inputs) only with IFA.
`pipeline(config)` describes, as plain data for the manifest, how a runtime chains them per frame.
"""

from __future__ import annotations

import torch
from torch import nn

from dpa.training.config import ModelConfig
from dpa.training.model import DPA, MODALITIES, Encoded

SKIPS = ("f1", "f2", "f3")
ENCODER_OUTPUTS = (*SKIPS, "f4_appearance", "f4_motion", "f5_appearance", "f5_motion")
F5 = ("f5_appearance", "f5_motion")
F4 = ("f4_appearance", "f4_motion")
IMA_OUTPUTS = ("ima5_appearance", "ima5_motion")
ENTRY_OUTPUTS = ("keys_appearance", "values_appearance", "keys_motion", "values_motion")
BANK_INPUTS = tuple(f"memory_{name}" for name in ENTRY_OUTPUTS)
VALID_INPUT = "memory_valid"
PROBABILITY = "probability"


def _pair(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """modality -> tensor, as (appearance, motion)."""
    return tensors["appearance"], tensors["motion"]


class EncoderGraph(nn.Module):
    """Graph `encoder`: one frame through both VGG-16 streams, IMA4 inside (SPEC §2.2).

    Inputs:  rgb (1, 3, S, S) ImageNet-normalised RGB; flow (1, 3, S, S) rendered flow in [0, 1].
    Outputs: f1 (1, 64w, S, S), f2 (1, 128w, S/2, S/2), f3 (1, 256w, S/4, S/4): appearance skips;
             f4_appearance, f4_motion (1, 512w, S/8, S/8): IMA4-refined block-4 features;
             f5_appearance, f5_motion (1, 512w, S/16, S/16): block-5 features (w = width multiplier).
    """

    input_names = ("rgb", "flow")
    output_names = ENCODER_OUTPUTS

    def __init__(self, model: DPA):
        super().__init__()
        self.model = model

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoded = self.model.encode(rgb, flow)
        return (*encoded.skips, *_pair(encoded.f4), *_pair(encoded.f5))


class ImaGraph(nn.Module):
    """Graph `ima`: IMA5 on the block-5 features (SPEC §2.4).

    Inputs:  f5_appearance, f5_motion (1, 512w, S/16, S/16).
    Outputs: ima5_appearance, ima5_motion (1, 512w, S/16, S/16).
    """

    input_names = F5
    output_names = IMA_OUTPUTS

    def __init__(self, model: DPA):
        super().__init__()
        self.model = model

    def forward(self, f5_appearance: torch.Tensor, f5_motion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        refined = self.model.ima_block5({"appearance": f5_appearance, "motion": f5_motion})
        return _pair(refined)


class IfaMemoryGraph(nn.Module):
    """Graph `ifa_memory`: one frame's IFA memory entry from its own block-5 features (SPEC §2.5 step 2).

    Inputs:  f5_appearance, f5_motion (1, 512w, S/16, S/16).
    Outputs: keys_appearance, values_appearance, keys_motion, values_motion (1, T, D): T = D = 128w prototype
             tokens (T = (S/16)^2 pixel tokens for the "plain" IFA ablation).
    """

    input_names = F5
    output_names = ENTRY_OUTPUTS

    def __init__(self, model: DPA):
        super().__init__()
        self.model = model

    def forward(self, f5_appearance: torch.Tensor, f5_motion: torch.Tensor) -> tuple[torch.Tensor, ...]:
        entry = self.model.memory_entry({"appearance": f5_appearance, "motion": f5_motion})
        return (*entry["appearance"], *entry["motion"])


def decoder_inputs(config: ModelConfig) -> tuple[str, ...]:
    """The decoder's inputs for a configuration, in order (only what the configuration reads)."""
    names: list[str] = []
    if config.uses_ifa or not config.uses_ima:
        names += F5  # the IFA query, or the block-5 features themselves without IMA and IFA
    if config.uses_ima:
        names += IMA_OUTPUTS
    if config.uses_ifa:
        names += (*BANK_INPUTS, VALID_INPUT)
    return (*names, *F4, *SKIPS)


class DecoderGraph(nn.Module):
    """Graph `decoder`: IFA read of the memory bank, block-5 fusion, ASPP and the decoder (SPEC §2.5–2.6).

    Inputs (those the configuration reads, in `decoder_inputs(config)` order):
      f5_appearance, f5_motion (1, 512w, S/16, S/16): the query frame's block-5 features (with IFA, or
        without IMA and IFA);
      ima5_appearance, ima5_motion (1, 512w, S/16, S/16): the `ima` graph's outputs (with IMA);
      memory_keys_appearance, memory_values_appearance, memory_keys_motion, memory_values_motion (1, N, T, D)
        and memory_valid (1, N) float, 1 = slot holds an entry, 0 = ignored exactly (with IFA);
      f4_appearance, f4_motion (1, 512w, S/8, S/8); f1, f2, f3: the encoder's outputs.
    Output: probability (1, 1, S, S) = sigmoid(p1), the foreground probability.
    """

    output_names = (PROBABILITY,)

    def __init__(self, model: DPA):
        super().__init__()
        self.model = model
        self.input_names = decoder_inputs(model.config)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names, inputs, strict=True))
        config = self.model.config
        encoded = Encoded(
            skips=tuple(named[name] for name in SKIPS),
            f4={m: named[f"f4_{m}"] for m in MODALITIES},
            f5={m: named[f"f5_{m}"] for m in MODALITIES if f"f5_{m}" in named},
        )
        ima5 = {m: named[f"ima5_{m}"] for m in MODALITIES} if config.uses_ima else None
        memory = valid = None
        if config.uses_ifa:
            memory = {m: (named[f"memory_keys_{m}"], named[f"memory_values_{m}"]) for m in MODALITIES}
            valid = named[VALID_INPUT]
        return torch.sigmoid(self.model.decode(encoded, ima5, memory, valid)["p1"])


def stage_graphs(model: DPA) -> dict[str, nn.Module]:
    """Graph name -> export wrapper, in chaining order (encoder, ima, ifa_memory, decoder)."""
    graphs: dict[str, nn.Module] = {"encoder": EncoderGraph(model)}
    if model.config.uses_ima:
        graphs["ima"] = ImaGraph(model)
    if model.config.uses_ifa:
        graphs["ifa_memory"] = IfaMemoryGraph(model)
    graphs["decoder"] = DecoderGraph(model)
    return graphs


def example_inputs(
    model: DPA, graphs: dict[str, nn.Module], rgb: torch.Tensor | None = None, flow: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs of every graph for batch 1 at the model's S and N, from one frame run through the chain.

    rgb, flow (1, 3, S, S): the frame (default: random, from `seed`). The memory bank holds N copies of that
    frame's entry, all valid.
    """
    return example_values(model, graphs, rgb, flow, seed)[0]


@torch.no_grad()
def example_values(
    model: DPA, graphs: dict[str, nn.Module], rgb: torch.Tensor | None = None, flow: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[dict[str, tuple[torch.Tensor, ...]], dict[str, tuple[torch.Tensor, ...]]]:
    """`example_inputs` and the outputs each graph gave on them (graph -> tuple in `output_names` order)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    size = config.size
    values = {
        "rgb": rgb if rgb is not None else torch.randn(1, 3, size, size, generator=generator),
        "flow": flow if flow is not None else torch.rand(1, 3, size, size, generator=generator),
    }
    examples: dict[str, tuple[torch.Tensor, ...]] = {}
    results: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, graph in graphs.items():
        if name == "decoder" and config.uses_ifa:
            for bank_name, entry_name in zip(BANK_INPUTS, ENTRY_OUTPUTS, strict=True):
                entry = values[entry_name]
                values[bank_name] = entry[:, None].expand(1, config.memory, *entry.shape[1:]).contiguous()
            values[VALID_INPUT] = torch.ones(1, config.memory)
        examples[name] = tuple(values[input_name] for input_name in graph.input_names)
        outputs = graph(*examples[name])
        results[name] = outputs if isinstance(outputs, tuple) else (outputs,)
        values.update(zip(graph.output_names, results[name], strict=True))
    return examples, results


def pipeline(config: ModelConfig) -> dict:
    """How a runtime chains the graphs for one frame, as plain data (the manifest's `pipeline`).

    Sources are "frame/<input>" (the pre-processed frame), "<graph>/<output>" (an output of a graph run
    earlier for the same frame) and "memory/<tensor>" (the memory bank). With IFA, `memory` says how the
    bank is laid out and filled: entries come from `graph` run on a frame's own tensors (`inputs`), each
    output is written into one slot (axis 1) of its bank tensor, and the slot's validity set to 1.
    """
    steps = [{"graph": "encoder", "inputs": {"rgb": "frame/rgb", "flow": "frame/flow"}}]
    if config.uses_ima:
        steps.append({"graph": "ima", "inputs": {name: f"encoder/{name}" for name in F5}})
    decoder = {}
    for name in decoder_inputs(config):
        if name in IMA_OUTPUTS:
            decoder[name] = f"ima/{name}"
        elif name in BANK_INPUTS or name == VALID_INPUT:
            decoder[name] = f"memory/{name}"
        else:
            decoder[name] = f"encoder/{name}"
    steps.append({"graph": "decoder", "inputs": decoder})
    description = {
        "frame_inputs": ["rgb", "flow"],
        "steps": steps,
        "output": f"decoder/{PROBABILITY}",
        "memory": None,
    }
    if config.uses_ifa:
        description["memory"] = {
            "capacity": config.memory,
            "graph": "ifa_memory",
            "inputs": {name: f"encoder/{name}" for name in F5},
            "slot_axis": 1,
            "bank": {bank: entry for bank, entry in zip(BANK_INPUTS, ENTRY_OUTPUTS, strict=True)},
            "valid": VALID_INPUT,
            "admission": (
                "an admitted frame's entry is ifa_memory run on that frame's own encoder outputs; each output "
                "(1, T, D) is written into one slot of its bank tensor (1, N, T, D) and memory_valid[0, slot] "
                "set to 1.0; slots never written keep 0.0 and are ignored exactly, whatever they hold. Which "
                "frames are admitted is the runtime's policy (offline: the paper's sampling "
                "k_i = floor(i (L-1) / (N-1)); live: uniform over a horizon)"
            ),
            "empty_bank": "current_frame",
        }
    return description
