"""`TrainSettings`: everything a `dpa train` run depends on, shared by the data side (`dpa.training.loader`) and
the loop (`dpa.training.train`), and saved in every checkpoint of the run."""

from __future__ import annotations

from dataclasses import dataclass, field

from dpa.training.config import ModelConfig, get_config


@dataclass
class TrainSettings:
    """Everything a training run depends on (saved in its checkpoints).

    data: dataset roots, each "ROOT" or "ROOT:LAYOUT" (layout davis|youtube-vos|preprocessed|images|duts;
    auto-detected when omitted). Several roots are sampled with equal probability (stage 2: DAVIS 2016 +
    YouTube-VOS 2018, as in the paper).
    flow_roots: where each root's flow images are (`dpa flow --out`), in the order of `data`; empty: in the
    datasets themselves. sequences / exclude: keep only / leave out these sequences (e.g. a development split).
    """

    out: str
    data: list[str] = field(default_factory=list)
    flow_roots: list[str] = field(default_factory=list)
    sequences: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    stage: int = 2
    config: str = "paper-iv"
    size: int | None = None
    memory: int | None = None
    width: float | None = None
    split: str = "train"
    steps: int = 40000
    batch_size: int = 16  # global, over all processes
    learning_rate: float = 1e-4
    final_learning_rate: float = 1e-5
    seed: int = 0
    workers: int = 2
    augment: bool = True
    freeze_batch_norm: bool = False
    # Fraction of the steps after which BatchNorm switches to its running statistics for the rest of
    # training, so the network finishes training the way it runs at inference (None: never).
    freeze_batch_norm_from: float | None = None
    # Weight of the soft Jaccard (IoU) loss added to the paper's BCE on every side output (0: BCE only, the
    # paper's recipe). It trains the quantity J measures; see `segmentation_loss`.
    iou_loss_weight: float = 0.0
    # Chance that a training clip is seen from a camera following its object (`dpa.training.camera`; stage 2 only).
    camera_motion: float = 0.0
    # Quantization-aware training (`dpa.training.quantize`): convolutions see int8-rounded weights and inputs, and
    # the kept checkpoints (OUT/model*.pt) store every convolution's weight on its int8 grid.
    quantization_aware: bool = False
    init: str | None = None  # checkpoint to start from (stage 2 starts from stage 1)
    vgg_weights: str | None = None  # torchvision VGG-16 state dict file (ImageNet initialisation)
    save_every: int = 1000
    keep_checkpoints: bool = False  # also keep the weights of every --save-every step as OUT/model-<step>.pt
    log_every: int = 10
    device: str = "auto"
    # Mixed precision: "fp32", or "bf16" (autocast: convolutions and matrix products in bfloat16, weights and
    # optimiser in fp32). threads: torch intra-op threads (None: torch's default).
    precision: str = "fp32"
    threads: int | None = None

    def model_config(self) -> ModelConfig:
        return get_config(self.config, size=self.size, memory=self.memory, width=self.width)
