"""The schema: one typed tree of dataclasses, the single source of defaults and of each key's documentation.

Defaults are the paper's ImageNet recipe (Siddiqui et al. 2024, section "Recipe"); the CPU-scale recipes in
``configs/`` override what they need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DatasetName = Literal["fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic"]


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


@dataclass
class DataConfig:
    name: DatasetName = "imagefolder"  # ImageNet in its train/ and val/ folder layout
    root: str = ""  # "" = the dataset's standard location (e.g. Debian's package for Fashion-MNIST)
    # Use only N training images (pretraining and probe training), a random subset drawn with subset_seed: an
    # ImageFolder is sorted by class, so its first N images would hold only the first classes. 0 = all.
    subset: int = 0
    subset_seed: int = 0
    # Tuning without the test set: N training images outside the subset replace the test set in every evaluation
    # (probes, kNN), drawn from the same permutation as the subset. Needs data.subset. 0 = the test set.
    holdout: int = 0
    image_size: int = 0  # crop size; 0 = the dataset's native size (224 for ImageFolder)
    augment: Literal["auto", "barlow_twins", "simclr", "vicreg"] = "auto"  # auto = preset of loss.name
    min_crop_scale: float = 0.08  # RandomResizedCrop's smallest area fraction (Barlow Twins, SimCLR)
    blur: Literal["auto", "true", "false"] = "auto"  # the presets' Gaussian blur; auto = none at 32 px and below
    # torchvision = a kernel of about 10% of the side (SimCLR's definition; 23 px at 224); pil = PIL's untruncated
    # blur, as the Barlow Twins and VICReg reference code and the authors' (the ImageNet recipes; 20x faster at 224 px)
    blur_impl: Literal["torchvision", "pil"] = "torchvision"
    # loader = every augmentation in the loader's workers; device = workers crop and flip, the colour operations
    # (jitter, grayscale, blur, solarize) run batched on the training device with the same parameters
    photometric: Literal["loader", "device"] = "loader"
    strict: bool = False  # an unreadable image stops the run (false: it is replaced, counted in metrics.jsonl)
    num_workers: int = 8
    pin_memory: bool = True
    persistent_workers: bool = True
    synthetic_size: int = 2048  # images in the generated `synthetic` training set
    synthetic_classes: int = 10


@dataclass
class ModelConfig:
    # A registered backbone (blockssl.models.backbone.FAMILIES): resnet18, resnet34, resnet50, resnet101, resnet152,
    # wide_resnet50_2, wide_resnet101_2, resnext50_32x4d, or a timm ViT (vit_tiny_patch16_224, vit_small_patch16_224,
    # any vit_* model built as timm's VisionTransformer)
    arch: str = "resnet50"
    # Grouping of the backbone's stages into blocks: blocks separated by ",", stages of one block joined by "+", a
    # run of stages written first-last. ResNet stages: stem, layer1..layer4 (with granularity=unit: stem, layer1.0,
    # layer1.1, ..., one per residual unit); ViT stages: its transformer blocks 0..depth-1. auto = four blocks: the
    # paper's (stem+layer1,layer2,layer3,layer4) or a ViT's blocks in four equal runs (0-2,3-5,6-8,9-11 for depth 12).
    # blockssl cost --balance 4 prints the grouping whose largest block costs the fewest training FLOPs.
    blocks: str = "auto"
    # ResNets: what a stage is: a layer (the paper's) or a residual unit, so that a block can end inside a layer and
    # blocks can be balanced for pipelines across devices (docs/pipeline.md; beyond the paper)
    granularity: Literal["layer", "unit"] = "layer"
    # ResNets: small = 3x3 stride-1 conv, no max-pool; auto = small up to 64 px images
    stem: Literal["auto", "imagenet", "small"] = "auto"
    in_channels: int = 0  # 0 = the dataset's channels
    width: float = 1.0  # multiplier of every stage's width (CPU-scale models)
    zero_init_residual: bool = True
    # ViTs (timm vit_* models, blockssl.models.vit); 0 keeps the architecture's own value.
    patch_size: int = 0
    depth: int = 0  # transformer blocks
    embed_dim: int = 0
    num_heads: int = 0
    drop_path: float = 0.0  # stochastic depth rate (timm's drop_path_rate)
    # Token outputs (ViTs) as one vector, what heads and the pool readout read: cls = the class token (DINO), mean =
    # the mean of the patch tokens (MAE's linear probe, I-JEPA); auto = cls where the backbone has a class token
    token_pool: Literal["auto", "cls", "mean"] = "auto"
    # cbe = CbE + global pooling, the paper's best pooling design; cbe_pooled = the block output average-pooled to
    # head_grid x head_grid before the CbE, a fraction of its FLOPs and memory (blockssl cost shows both)
    head: Literal["gap", "cbe", "cbe_pooled"] = "cbe"
    head_dim: int = 2048  # CbE expansion width
    head_kernel: int = 1  # CbE kernel size (1x1 in the paper)
    head_grid: int = 2  # cbe_pooled: the side of the grid the block output is pooled to
    # CbE computed chunk by chunk without storing its full-resolution maps for backward (blockssl.models.lean_head):
    # the same outputs, gradients and BatchNorm statistics, a fraction of the memory (block 1 of ResNet-50: 51 MB
    # per image and view less) for one more convolution over the input in backward. false = conv, BN, ReLU modules.
    # For head=cbe only: cbe_pooled keeps grid x grid maps, too small for recomputation to pay; gap has none.
    lean_head: bool = True
    lean_head_chunk_mb: int = 24  # full-resolution maps per chunk (on a CPU, below glibc's 32 MB mmap threshold)
    projector: str = "8192-8192-8192"  # MLP widths; "" = no projector
    # Per-block overrides (one entry per block; empty = the values above for every block).
    block_head_dims: list[int] = field(default_factory=list)
    block_projectors: list[str] = field(default_factory=list)


@dataclass
class NoiseConfig:
    type: Literal["none", "global", "channel", "spatial"] = "global"
    std: float = 0.25  # sigma; best value in the paper (+0.33 points on ImageNet)
    # Backpropagate through s(x), as the reference code does; false: s(x) is a constant and the noise's gradient
    # is the identity.
    scale_grad: bool = True


@dataclass
class LossConfig:
    name: Literal["barlow_twins", "simclr", "vicreg"] = "barlow_twins"
    lambd: float = 0.0051  # Barlow Twins off-diagonal weight
    # Barlow Twins loss scale. 0.024 with one lr for every parameter is the authors' code (their main.py and
    # train.sh); current Barlow Twins uses scale 1 with train.bias_lr=0.0048 (= 0.2 x 0.024) instead. Under LARS both
    # give biases the same step; only the weight-decay balance differs. Never both: see check_lr_convention.
    scale: float = 0.024
    # Barlow Twins: sum the cross-correlation over processes with the reference code's plain all_reduce, which
    # autograd does not see: every gradient becomes 1/world_size of the true one (1/16 in the paper's runs), which
    # reproduces the paper's update exactly. Off (default): exact global-batch gradients.
    reference_allreduce: bool = False
    temperature: float = 0.1  # SimCLR
    sim_coeff: float = 25.0  # VICReg invariance
    std_coeff: float = 25.0  # VICReg variance
    cov_coeff: float = 1.0  # VICReg covariance


@dataclass
class TrainConfig:
    # Presets of two switches: which blocks carry a loss, and whether block inputs are detached.
    scheme: Literal["end_to_end", "simultaneous", "sequential"] = "simultaneous"
    loss_blocks: str = "auto"  # "auto" (scheme preset), "all", "last" or block numbers "1,3,4"
    detach: Literal["auto", "true", "false"] = "auto"  # auto = scheme preset (stop-gradient on if blockwise)
    frozen_blocks: list[int] = field(default_factory=list)  # blocks frozen at random initialisation (1-based)
    # lean = each block's backward and optimizer step as soon as its loss exists (same update, less memory);
    # reference = all blocks forward, then one backward (the authors' code). auto = lean when equivalent.
    # pipeline = lean with each stage of blocks in its own process, activations sent forward only (torchrun,
    # WORLD_SIZE = stages x data-parallel replicas); the same update as lean.
    execution: Literal["auto", "lean", "reference", "pipeline"] = "auto"
    # pipeline: the blocks of each stage: "blocks" (one block per stage), "auto" (contiguous groups balanced by
    # measured step time, one per process) or groups of block numbers, e.g. "1+2,3+4"
    stages: str = "blocks"
    in_flight: int = 2  # pipeline: batches a stage may send ahead of the next stage taking them
    # Seconds a collective or pipeline transfer may wait for another process before this one fails (torch's default:
    # 30 min on gloo). Bounds how long a run's processes outlive one that hangs; one that dies is noticed at once.
    dist_timeout_s: float = 600.0
    # Activation checkpointing: each backbone stage keeps only its input for backward and recomputes the rest there
    # (torch.utils.checkpoint; BatchNorm running statistics updated once). The cheapest cut of end-to-end memory.
    checkpoint_stages: bool = False
    # Log saved_mb/block{k} at logging steps: the MiB each block's forward saves for backward (blockssl.memory)
    log_saved_memory: bool = False
    epochs: int = 300
    batch_size: int = 2048  # global batch
    max_steps: int = 0  # 0 = no cap
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float = 0.2  # per 256 images: the peak lr is lr * batch_size / 256
    # lr per 256 for biases and norm parameters; 0 = train.lr, the authors' one lr for all (the loss carries 0.024)
    bias_lr: float = 0.0
    weight_decay: float = 1e-6
    momentum: float = 0.9
    # LARS momentum buffers in bfloat16: half the optimizer state (-1.18 GiB with ResNet-50's 8192-wide projectors),
    # weights within 1% (in norm) of float32's change after 20 steps (tests/test_optim.py); float32 is exact
    momentum_dtype: Literal["float32", "bfloat16"] = "float32"
    lars_eta: float = 0.001
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.001  # cosine decays to this fraction of the peak
    sync_bn: bool = False  # BatchNorm statistics over the global batch when distributed (on in the paper)
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest kernels for the fixed input size (CUDA only)
    compile: bool = False  # torch.compile each module in place (names and checkpoints unchanged)
    device: str = "auto"  # auto = cuda if available, else cpu
    log_every: int = 10  # steps between metrics.jsonl lines
    # Where each logging step's metrics also go (blockssl.loggers), and blockssl probe's and robustness' results:
    # jsonl = metrics.jsonl, always written (added when left out); tensorboard = event files in <out>/tensorboard
    # (pip install 'blockssl[tensorboard]'); wandb = Weights & Biases under <out>/wandb, offline unless WANDB_MODE
    # says otherwise or an API key is configured (pip install 'blockssl[wandb]')
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])
    checkpoint_every: int = 0  # steps between checkpoints; 0 = once per epoch
    keep_checkpoints: int = 2  # newest step-N.pt files kept beside last.pt
    on_nonfinite: Literal["stop", "skip"] = "stop"  # NaN/inf loss or gradient: stop the run, or skip and count
    progress: bool = True  # progress bar, on a terminal only (blockssl pretrain --quiet sets it false)


@dataclass
class ProbeConfig:
    """Linear-probe evaluation, one linear probe per block (and one on all blocks concatenated). ``fast``: features
    extracted once (no augmentation), standardised (``standardize``), each probe's hyperparameter chosen per block on
    a held-out part of the training set, never on the test set; kNN and label-fraction probes on the same features.
    Its ``solver``: ``lbfgs`` fits multinomial logistic regression by full-batch L-BFGS, the L2 weight chosen from
    ``weight_decays`` (a convex problem, as CLIP's linear probes and Kornblith et al. 2019 solve it);
    ``sgd`` trains ``epochs`` of SGD (momentum 0.9, cosine), the lr chosen from ``lrs``. A choice on the edge of its
    grid is flagged in ``probe.json``. Each block is read out through its trained head (``head``, the paper's
    features) and by plain global average pooling of the block output (``pool``), so that blocks and schemes can be
    compared at equal readouts. ``paper``: the reference ``evaluate.py`` for ImageNet-scale runs: every epoch goes
    through the frozen backbone on RandomResizedCrop + flip images, raw features, classifier initialised N(0, 0.01)
    with a zero bias, lr ``lr`` on a cosine stepped per epoch, Resize + CenterCrop evaluation after every epoch (100
    epochs, batch 256, lr 0.1, weight decay 1e-6), the best epoch reported beside the final one."""

    protocol: Literal["fast", "paper"] = "fast"
    epochs: int = 30
    batch_size: int = 256  # global, split across processes (paper protocol)
    solver: Literal["lbfgs", "sgd"] = "lbfgs"  # fast protocol
    # lbfgs: the L2 weight grid (on the mean cross-entropy, biases unpenalised), a decade apart
    weight_decays: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    # lbfgs: iterations per fit at most (warm-started along the grid). Fits stop earlier once no gradient entry
    # exceeds 1e-4 (scikit-learn's tolerance); near-separable features at the smallest penalties may not, which
    # stops them early like a few more epochs of SGD would (measured on a Fashion-MNIST run: held-out top-1 within
    # 0.3 points of 1,000 iterations, at a fifth of the time).
    max_iter: int = 200
    lrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1])  # sgd: the lr grid
    readouts: list[Literal["head", "pool"]] = field(default_factory=lambda: ["head", "pool"])  # fast protocol
    lr: float = 0.1  # paper protocol: the one lr
    val_fraction: float = 0.1  # held-out share of the training set for choosing the lr
    weight_decay: float = 1e-6  # the reference evaluate.py's
    standardize: bool = True  # fast protocol: features standardised by the training set's mean and std
    eval_batch_size: int = 512
    knn_k: list[int] = field(default_factory=lambda: [20, 200])  # weighted kNN on the same features
    # Linear probes trained on a fraction of the labels (semi-supervised evaluation on frozen features)
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    label_subset_dir: str = ""  # folder with 1percent.txt / 10percent.txt (ImageNet); "" = stratified subsets
    knn_temperature: float = 0.07
    # Also probe the same architecture at its random initialisation (the run's seed), the reference a trained network
    # must beat: probe.json's random_init (blockssl probe --random-init sets it; studies report it as VARIANT@init)
    random_init: bool = False


@dataclass
class OnlineProbeConfig:
    """Online linear evaluation during pretraining (as in solo-learn): a linear classifier per block on the detached
    head features of view 1, trained on the pretraining batch's labels by its own SGD; it never reaches the model.
    Per-block train top-1 and loss, averaged since the previous line, go to metrics.jsonl as online/block{k}_*."""

    enabled: bool = False  # off by default: it needs labels in the pretraining set
    # Train it on every N-th batch only: N > 1 cuts the extra head forward of trained blocks without a loss now
    # (earlier blocks in the sequential scheme, frozen blocks), the probe's only real cost. Blocks with a loss give
    # their features for free, and blocks no loss trains (end-to-end's first ones) only add a global pooling.
    every: int = 1
    lr: float = 0.1  # SGD lr, constant (features are standardised by a BatchNorm without affine first)
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class RobustnessConfig:
    """Corruption robustness of the per-block probes (ImageNet-C protocol, Hendrycks & Dietterich 2019)."""

    # generate = corrupt the test split on the fly (imagecorruptions library, cached); folder = a pre-generated
    # ImageNet-C tree <root>/<corruption>/<severity>/<class>/<image>
    source: Literal["generate", "folder"] = "generate"
    root: str = ""  # the ImageNet-C folder (source=folder)
    corruptions: list[Literal[
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    ]] = field(default_factory=lambda: [
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"])
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    max_images: int = 0  # evaluate a seeded random subset of N test images; 0 = all
    cache_dir: str = ""  # generated corruptions; "" = <run_dir>/../.corruption-cache, shared by sibling runs
    seed: int = 0  # corruption noise and the image subset
    batch_size: int = 256
    # mCE normaliser: "same" = each block against the baseline's block of the same name; or one baseline block
    # (e.g. "concat"), for every block, like AlexNet in the original benchmark
    baseline_block: str = "same"


@dataclass
class Config:
    out: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    online_probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
