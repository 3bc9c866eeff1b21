"""The DPA network (SPEC §2): two VGG-16 streams, IMA at blocks 4–5, IFA at block 5, the fusion decoder.

The network is written as the stages the deployment runs (SPEC §4.1), so export wraps these methods:
  encode(rgb, flow)             -> skips, IMA4-refined f4 of both streams, f5 of both streams
  ima_block5(f5_a, f5_m)        -> IMA5-refined block-5 features
  memory_entry(f5_a, f5_m)      -> one frame's IFA memory entry (keys and values per modality)
  decode(...)                   -> logits (IFA read, fusion, ASPP, decoder)
`forward` chains them for training, encoding the reference frames with the same encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dpa.errors import DpaError
from dpa.training import attention
from dpa.training.config import ModelConfig

MODALITIES = ("appearance", "motion")

# torchvision VGG-16 `features.<i>` indices of the 13 convolutions, grouped by block.
VGG16_CONV_INDICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CHANNELS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def upsample(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize with align_corners=True (SPEC §2.6)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def conv_bn_relu(inputs: int, outputs: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    """Convolution + BatchNorm + ReLU. The convolution has no bias: BatchNorm's shift makes it redundant
    (its gradient is exactly zero in training mode, and Adam would turn rounding noise into steps)."""
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


class VGG16Encoder(nn.Module):
    """VGG-16 convolution stack without batch norm, as five blocks; the 2x2 max-pool opens blocks 2–5.

    blocks[k](x) maps the previous tap to tap f(k+1): f1 64@1, f2 128@2, f3 256@4, f4 512@8, f5 512@16
    (paper channels @ stride; scaled by the width multiplier).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        blocks = []
        inputs = 3
        for index, block_channels in enumerate(VGG16_CHANNELS):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if index else []
            for paper_channels in block_channels:
                outputs = config.channels(paper_channels)
                layers += [nn.Conv2d(inputs, outputs, 3, padding=1), nn.ReLU(inplace=True)]
                inputs = outputs
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)

    def convolutions(self) -> list[nn.Conv2d]:
        return [layer for block in self.blocks for layer in block if isinstance(layer, nn.Conv2d)]

    def load_torchvision_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load ImageNet weights in torchvision's VGG-16 layout (`features.<i>.weight/bias`).

        Raises DpaError listing missing keys or shape mismatches (e.g. a width multiplier != 1).
        """
        indices = [i for block in VGG16_CONV_INDICES for i in block]
        missing = [f"features.{i}.{p}" for i in indices for p in ("weight", "bias")
                   if f"features.{i}.{p}" not in state_dict]
        if missing:
            raise DpaError(f"VGG-16 state dict lacks {len(missing)} keys, first {missing[:4]}")
        for index, conv in zip(indices, self.convolutions(), strict=True):
            for name in ("weight", "bias"):
                source = state_dict[f"features.{index}.{name}"]
                target = getattr(conv, name)
                if source.shape != target.shape:
                    raise DpaError(
                        f"features.{index}.{name} has shape {tuple(source.shape)}, the encoder expects "
                        f"{tuple(target.shape)} (ImageNet weights need width multiplier 1)"
                    )
                with torch.no_grad():
                    target.copy_(source)


class InterModalityAttention(nn.Module):
    """IMA at one block (SPEC §2.4): exchanges information between appearance and motion features.

    mode "prototype": keys/values embed the prototype correlation map; "plain": the squeezed features.
    The squeeze convolutions are passed in (block 5 shares them with IFA).
    """

    def __init__(self, channels: int, dim: int, mode: str, detach_soft_regions: bool):
        super().__init__()
        self.mode = mode
        self.detach_soft_regions = detach_soft_regions
        self.key = nn.ModuleDict({m: nn.Conv2d(dim, dim, 1) for m in MODALITIES})
        self.value = nn.ModuleDict({m: nn.Conv2d(dim, dim, 1) for m in MODALITIES})
        self.fuse = nn.ModuleDict({m: conv_bn_relu(channels + dim, channels, kernel=1) for m in MODALITIES})

    def forward(
        self, features: dict[str, torch.Tensor], squeezed: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """features: modality -> (B, C, H, W); squeezed: modality -> (B, D, H, W). Returns refined (B, C, H, W)."""
        keys, values = {}, {}
        for m in MODALITIES:
            embedded = squeezed[m]
            if self.mode == "prototype":
                flat = embedded.flatten(2)
                embedded = attention.prototype_correlation(flat, self.detach_soft_regions).view_as(embedded)
            keys[m] = self.key[m](embedded).flatten(2)
            values[m] = self.value[m](embedded).flatten(2)
        to_appearance, to_motion = attention.cross_modal_attention(
            keys["appearance"], keys["motion"], values["appearance"], values["motion"]
        )
        transferred = {"appearance": to_appearance, "motion": to_motion}
        return {
            m: self.fuse[m](torch.cat([features[m], transferred[m].view_as(squeezed[m])], dim=1))
            for m in MODALITIES
        }


class InterFrameAttention(nn.Module):
    """IFA for one modality (SPEC §2.5): reads a memory of reference frames with the query frame.

    mode "prototype": query, keys and values are prototype tokens (D tokens of D dims per frame);
    "plain": they are the pixel features themselves (HW tokens per frame).
    """

    def __init__(self, channels: int, dim: int, mode: str, detach_soft_regions: bool):
        super().__init__()
        self.mode = mode
        self.detach_soft_regions = detach_soft_regions
        # kappa has no bias: a bias shifts every logit of a query row by the same amount, which the softmax
        # cancels exactly (its gradient is zero; Adam would turn rounding noise into steps).
        self.key = nn.Conv2d(channels, dim, 1, bias=False)  # kappa
        self.value = nn.Conv2d(channels, dim, 1)  # nu
        self.fuse = conv_bn_relu(channels + dim, channels, kernel=1)

    def tokens(self, embedded: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> tokens (B, T, D): prototypes (T = D) or pixels (T = HW)."""
        flat = embedded.flatten(2)
        if self.mode == "prototype":
            return attention.prototypes(flat, self.detach_soft_regions)
        return flat.transpose(1, 2)

    def memory_entry(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reference frame's f5 (B, C, H, W) -> keys, values (B, T, D)."""
        return self.tokens(self.key(features)), self.tokens(self.value(features))

    def forward(
        self,
        features: torch.Tensor,
        squeezed: torch.Tensor,
        memory_keys: torch.Tensor,
        memory_values: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """features (B, C, H, W), squeezed = sq5(features) (B, D, H, W), memory (B, N, T, D), valid (B, N)."""
        if self.mode == "prototype":
            read = attention.prototype_memory_read(
                squeezed.flatten(2), memory_keys, memory_values, valid, self.detach_soft_regions
            )
        else:
            read = attention.memory_read(self.tokens(squeezed), memory_keys, memory_values, valid).transpose(1, 2)
        return self.fuse(torch.cat([features, read.reshape_as(squeezed)], dim=1))


class ResidualFusion(nn.Module):
    """Res(x) of SPEC §2.6: conv3x3(2c->c)+BN+ReLU on ReLU(x + conv3x3(ReLU(BN(conv3x3(x)))))."""

    def __init__(self, channels: int):
        super().__init__()
        wide = 2 * channels
        self.inner = conv_bn_relu(wide, wide)
        self.residual = nn.Conv2d(wide, wide, 3, padding=1)
        self.out = conv_bn_relu(wide, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(x + self.residual(self.inner(x))))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, 3x3 at dilation 6/12/18, image pooling; concat -> 1x1."""

    def __init__(self, channels: int):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(channels, channels, kernel=1)]
            + [conv_bn_relu(channels, channels, dilation=d) for d in (6, 12, 18)]
        )
        self.image_pool = conv_bn_relu(channels, channels, kernel=1)
        self.project = conv_bn_relu(5 * channels, channels, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class ModalityHead(nn.Module):
    """Per-modality decoder inputs: C4 on f4', C5 on X5, C6 = maxpool -> 1x1 -> 2x[3x3] -> ASPP on X5."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.c4 = nn.Conv2d(channels, dim, 1)
        self.c5 = nn.Conv2d(channels, dim, 1)
        self.c6 = nn.Sequential(
            nn.MaxPool2d(2), nn.Conv2d(channels, dim, 1), conv_bn_relu(dim, dim), conv_bn_relu(dim, dim), ASPP(dim)
        )

    def forward(self, f4: torch.Tensor, f5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.c4(f4), self.c5(f5), self.c6(f5)


class RefinementStep(nn.Module):
    """One decoder step with an appearance skip: gate, concat with the previous features, 2 convs, head."""

    def __init__(self, skip_channels: int, gate_channels: int, feature_channels: int):
        super().__init__()
        self.gate = nn.Conv2d(skip_channels, gate_channels, 1)
        width = gate_channels + feature_channels
        self.body = nn.Sequential(conv_bn_relu(width, width), conv_bn_relu(width, feature_channels))
        self.head = nn.Conv2d(feature_channels, 1, 1)

    def forward(self, skip: torch.Tensor, coarse_probability: torch.Tensor, previous: torch.Tensor):
        size = skip.shape[2:]
        gated = self.gate(skip) * upsample(coarse_probability, size)
        features = self.body(torch.cat([gated, upsample(previous, size)], dim=1))
        return features, self.head(features)


class Decoder(nn.Module):
    """Modality fusion at levels 4/5/6, F56, F45, p4, then three refinement steps with f3, f2, f1."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        channels, dim = config.channels(512), config.channels(128)
        fine, gate = config.channels(32), config.channels(64)
        self.heads = nn.ModuleDict({m: ModalityHead(channels, dim) for m in MODALITIES})
        self.fuse = nn.ModuleDict({f"t{k}": ResidualFusion(dim) for k in (4, 5, 6)})
        self.f56 = ResidualFusion(dim)
        self.f45 = nn.Sequential(ResidualFusion(dim), nn.Conv2d(dim, fine, 1))
        self.p4 = nn.Conv2d(fine, 1, 1)
        skip_channels = [config.channels(c) for c in (256, 128, 64)]
        self.steps = nn.ModuleList([RefinementStep(c, gate, fine) for c in skip_channels])

    def forward(
        self, f4: dict[str, torch.Tensor], x5: dict[str, torch.Tensor], skips: tuple[torch.Tensor, ...]
    ) -> dict[str, torch.Tensor]:
        """f4, x5: modality -> (B, C, H/8|H/16, .); skips (f1, f2, f3) of appearance. Returns logits at S."""
        levels = {m: self.heads[m](f4[m], x5[m]) for m in MODALITIES}
        fused = [self.fuse[f"t{k}"](torch.cat([levels[m][i] for m in MODALITIES], 1)) for i, k in enumerate((4, 5, 6))]
        t4, t5, t6 = fused
        f56 = self.f56(torch.cat([t5, upsample(t6, t5.shape[2:])], 1))
        features = self.f45(torch.cat([t4, upsample(f56, t4.shape[2:])], 1))
        logit4 = self.p4(features)
        coarse = torch.sigmoid(logit4)
        size = skips[0].shape[2:]
        logits = {"p4": upsample(logit4, size)}
        for name, step, skip in zip(("p3", "p2", "p1"), self.steps, reversed(skips), strict=True):
            features, logit = step(skip, coarse, features)
            logits[name] = logit if name == "p1" else upsample(logit, size)
        return logits


@dataclass
class Encoded:
    """Encoder stage outputs for a batch of frames."""

    skips: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # appearance f1, f2, f3
    f4: dict[str, torch.Tensor]  # IMA4-refined block-4 features per modality (B, 512w, S/8, S/8)
    f5: dict[str, torch.Tensor]  # block-5 features per modality (B, 512w, S/16, S/16)


class DPA(nn.Module):
    """Dual Prototype Attention network for one configuration (only the modules it uses are built)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        channels, dim = config.channels(512), config.channels(128)
        detach = config.detach_soft_regions
        self.encoders = nn.ModuleDict({m: VGG16Encoder(config) for m in MODALITIES})
        if config.uses_ima:
            self.squeeze4 = nn.ModuleDict({m: nn.Conv2d(channels, dim, 1) for m in MODALITIES})
            self.ima4 = InterModalityAttention(channels, dim, config.ima, detach)
            self.ima5 = InterModalityAttention(channels, dim, config.ima, detach)
        if config.uses_ima or config.uses_ifa:
            self.squeeze5 = nn.ModuleDict({m: nn.Conv2d(channels, dim, 1) for m in MODALITIES})  # sq5
        if config.uses_ifa:
            self.ifa = nn.ModuleDict({m: InterFrameAttention(channels, dim, config.ifa, detach) for m in MODALITIES})
        if config.uses_ima and config.uses_ifa:
            self.block5_fusion = nn.ModuleDict({m: nn.Conv2d(2 * channels, channels, 1) for m in MODALITIES})
        self.decoder = Decoder(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ---- stages -------------------------------------------------------------------------------------
    def encode(self, rgb: torch.Tensor, flow: torch.Tensor) -> Encoded:
        """rgb (B, 3, S, S) ImageNet-normalised, flow (B, 3, S, S) rendered flow in [0, 1]."""
        streams = {"appearance": rgb, "motion": flow}
        taps: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
        for m in MODALITIES:
            x = streams[m]
            for block in self.encoders[m].blocks[:4]:
                x = block(x)
                taps[m].append(x)
        f4 = {m: taps[m][3] for m in MODALITIES}
        if self.config.uses_ima:
            f4 = self.ima4(f4, {m: self.squeeze4[m](f4[m]) for m in MODALITIES})
        f5 = {m: self.encoders[m].blocks[4](f4[m]) for m in MODALITIES}
        return Encoded(skips=tuple(taps["appearance"][:3]), f4=f4, f5=f5)

    def ima_block5(self, f5: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IMA5: modality -> (B, C, h, w) refined block-5 features."""
        return self.ima5(f5, {m: self.squeeze5[m](f5[m]) for m in MODALITIES})

    def memory_entry(self, f5: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One frame's IFA memory entry from its own f5: modality -> (keys, values), each (B, T, D)."""
        return {m: self.ifa[m].memory_entry(f5[m]) for m in MODALITIES}

    def decode(
        self,
        encoded: Encoded,
        ima5: dict[str, torch.Tensor] | None = None,
        memory: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """IFA read, block-5 fusion and the decoder. memory: modality -> (keys, values) (B, N, T, D);
        valid (B, N). Returns logits p4, p3, p2, p1, each (B, 1, S, S)."""
        x5 = dict(encoded.f5)
        if self.config.uses_ifa:
            if memory is None or valid is None:
                raise DpaError(f"config {self.config.name} uses IFA: decode needs a memory bank")
            read = {
                m: self.ifa[m](encoded.f5[m], self.squeeze5[m](encoded.f5[m]), *memory[m], valid)
                for m in MODALITIES
            }
        if self.config.uses_ima and self.config.uses_ifa:
            x5 = {m: self.block5_fusion[m](torch.cat([ima5[m], read[m]], 1)) for m in MODALITIES}
        elif self.config.uses_ima:
            x5 = ima5
        elif self.config.uses_ifa:
            x5 = read
        return self.decoder(encoded.f4, x5, encoded.skips)

    # ---- training / offline inference ---------------------------------------------------------------
    def forward(
        self,
        rgb: torch.Tensor,
        flow: torch.Tensor,
        reference_rgb: torch.Tensor | None = None,
        reference_flow: torch.Tensor | None = None,
        reference_valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Query (B, 3, S, S) x2 and references (B, N, 3, S, S) x2 -> logits dict (B, 1, S, S) each.

        The references go through the same encoder as the query; their memory entries come from their
        own f5. Without references (or IFA off) the query frame is its own single reference.
        """
        batch = rgb.shape[0]
        if self.config.uses_ifa and reference_rgb is not None:
            slots = reference_rgb.shape[1]
            every_rgb = torch.cat([rgb, reference_rgb.flatten(0, 1)], 0)
            every_flow = torch.cat([flow, reference_flow.flatten(0, 1)], 0)
            encoded_all = self.encode(every_rgb, every_flow)
            encoded = Encoded(
                skips=tuple(s[:batch] for s in encoded_all.skips),
                f4={m: v[:batch] for m, v in encoded_all.f4.items()},
                f5={m: v[:batch] for m, v in encoded_all.f5.items()},
            )
            reference_f5 = {m: v[batch:] for m, v in encoded_all.f5.items()}
            entries = self.memory_entry(reference_f5)
            memory = {
                m: tuple(t.reshape(batch, slots, *t.shape[1:]) for t in entries[m]) for m in MODALITIES
            }
            if reference_valid is None:
                reference_valid = torch.ones(batch, slots, dtype=torch.bool, device=rgb.device)
        else:
            encoded = self.encode(rgb, flow)
            memory, reference_valid = None, None
            if self.config.uses_ifa:
                entries = self.memory_entry(encoded.f5)
                memory = {m: tuple(t[:, None] for t in entries[m]) for m in MODALITIES}
                reference_valid = torch.ones(batch, 1, dtype=torch.bool, device=rgb.device)
        ima5 = self.ima_block5(encoded.f5) if self.config.uses_ima else None
        return self.decode(encoded, ima5, memory, reference_valid)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(config: ModelConfig, seed: int | None = 0) -> DPA:
    """A DPA network with seeded random initialisation (reproducible exports of untrained models)."""
    if seed is None:
        return DPA(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DPA(config)


def memory_tokens(config: ModelConfig) -> int:
    """Tokens per memory entry: D prototypes, or HW pixels at block 5 for the plain IFA ablation."""
    dim = config.channels(128)
    return dim if config.ifa == "prototype" else (config.size // 16) ** 2


def block5_side(config: ModelConfig) -> int:
    return config.size // 16
