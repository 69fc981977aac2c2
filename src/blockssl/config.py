"""One typed configuration tree: the single source of defaults.

Defaults are the paper's ImageNet recipe (Siddiqui et al. 2024, section "Recipe"); the CPU-scale recipes in
``configs/`` override what they need. YAML files and ``key=value`` overrides are merged onto the defaults and
validated, so a typo or a bad value fails before any compute starts, naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

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
    # wide_resnet50_2, wide_resnet101_2, resnext50_32x4d
    arch: str = "resnet50"
    # Grouping of the backbone's stages into blocks: blocks separated by ",", stages of one block joined by "+".
    # Paper default: 4 blocks (stem+layer1, layer2, layer3, layer4).
    blocks: str = "stem+layer1,layer2,layer3,layer4"
    # ResNets: small = 3x3 stride-1 conv, no max-pool; auto = small up to 64 px images
    stem: Literal["auto", "imagenet", "small"] = "auto"
    in_channels: int = 0  # 0 = the dataset's channels
    width: float = 1.0  # multiplier of every stage's width (CPU-scale models)
    zero_init_residual: bool = True
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



# ---------------------------------------------------------------------------------------------------------
# Loading, overriding, validating


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; return it converted (int -> float, str list)."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value is True or value is False:  # YAML reads true/false for "true"/"false" literals
            value = str(value).lower()
        if value not in choices:
            hint_text = _suggest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}"
                              f"{hint_text}")
        return value
    if origin is list:
        (item,) = get_args(hint)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}; write e.g. {key}=[1,2]")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool | dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported annotation {hint!r} for {key}")


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _apply(node: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set ``values`` (a nested dict) on the dataclass ``node``, validating every key and value."""
    hints = _hints(type(node))
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in hints:
            valid = sorted(f"{prefix}{k}" for k in hints)
            raise ConfigError(f"unknown key {full!r}{_suggest(full, valid)}; valid keys here: {', '.join(valid)}")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                example = next(iter(_hints(type(current))))
                raise ConfigError(f"{full}: is a section; set its keys, e.g. {full}.{example}=...")
            _apply(current, value, f"{full}.")
        else:
            setattr(node, key, _coerce(full, value, hints[key]))


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=0.1"`` -> ``{"train": {"lr": 0.1}}``; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=10")
    key, raw = text.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML recipe as nested values; ``base: other.yaml`` (relative to the file) is read first and overridden."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; recipes are in configs/")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    return _merge(read_recipe(path.parent / base, (*_seen, path.resolve())), loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML recipe, then ``key=value`` overrides; validated."""
    values = read_recipe(path) if path is not None else {}
    for text in overrides:
        values = _merge(values, parse_override(text))
    cfg = Config()
    _apply(cfg, values)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any]) -> Config:
    """A saved configuration (a run's ``config.yaml``): validated, but a run made before a check existed still
    loads, with a warning, so that it can be evaluated and resumed as it was trained."""
    cfg = Config()
    _apply(cfg, values)
    validate(cfg, saved=True)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff_configs(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ, as ``key: a -> b`` lines."""
    out: list[str] = []

    def walk(x: dict[str, Any], y: dict[str, Any], prefix: str) -> None:
        for k in x:
            if isinstance(x[k], dict):
                walk(x[k], y[k], f"{prefix}{k}.")
            elif x[k] != y[k]:
                out.append(f"{prefix}{k}: {x[k]!r} -> {y[k]!r}")

    walk(to_dict(a), to_dict(b), "")
    return out


def describe_keys() -> str:
    """Every key with its type and default, for ``--help``."""
    lines: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            hint = _hints(type(node))[f.name]
            kind = "|".join(map(str, get_args(hint))) if get_origin(hint) is Literal else getattr(
                hint, "__name__", str(hint))
            lines.append(f"  {prefix}{f.name} = {value!r}  ({kind})")

    walk(Config(), "")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Derived settings and cross-field checks

def parse_blocks(spec: str, stages: tuple[str, ...] | None = None) -> list[list[str]]:
    """``"stem+layer1,layer2,layer3,layer4"`` -> ``[["stem", "layer1"], ["layer2"], ...]``; with ``stages`` (the
    backbone's, in order) checked: every stage exactly once and in network order, since block k+1 reads block k's
    output."""
    blocks = [[s.strip() for s in group.split("+") if s.strip()] for group in spec.split(",")]
    flat = [s for b in blocks for s in b]
    if any(not b for b in blocks) or (stages is not None and flat != list(stages)):
        example = ",".join(stages or ("stem+layer1", "layer2", "layer3", "layer4"))
        raise ConfigError(
            f"model.blocks: {spec!r} must list each stage of {'+'.join(stages or ('...',))} exactly once, in order, "
            f"grouped into blocks by ',' and '+' (e.g. {example!r})")
    return blocks


def check_lr_convention(cfg: Config) -> str | None:
    """The problem, if any, of a Barlow Twins loss scale combined with a separately pre-scaled bias lr.

    The authors' code scales the loss by 0.024 and gives every parameter lr 0.2 x batch/256; current Barlow Twins
    leaves the loss unscaled and gives biases and norm parameters 0.0048 = 0.2 x 0.024. LARS makes the weights'
    step insensitive to the loss scale, so both conventions move biases alike; applying both shrinks their step
    by the loss scale a second time (42x at 0.024).
    """
    t, loss = cfg.train, cfg.loss
    if loss.name != "barlow_twins" or loss.scale == 1 or t.bias_lr in (0, t.lr):
        return None
    slower = t.lr / t.bias_lr  # their step is bias_lr x scale, against lr x scale in the authors' code
    return (f"loss.scale={loss.scale} with train.bias_lr={t.bias_lr} (train.lr={t.lr}) scales the biases' step "
            f"twice: they would learn {slower:.0f}x slower than in the authors' code. Use "
            "train.bias_lr=0 (the authors' code: one lr for all parameters, the loss scaled; the default) or "
            "loss.scale=1 with train.bias_lr=0.0048 (current Barlow Twins)")


def validate(cfg: Config, saved: bool = False) -> None:
    """Cross-field checks, each naming the key and the fix. ``saved``: a run's own configuration, where checks added
    since it was made warn instead (its results were computed under it)."""
    from blockssl.models.backbone import stage_names  # here: importing blockssl.config stays free of torch
    from blockssl.plan import plan  # which reads this module's schema

    try:
        stages = stage_names(cfg.model.arch)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    blocks = parse_blocks(cfg.model.blocks, stages)
    n = len(blocks)
    t, m, d = cfg.train, cfg.model, cfg.data
    positive = {"train.epochs": t.epochs, "train.batch_size": t.batch_size, "model.head_dim": m.head_dim,
                "model.head_kernel": m.head_kernel, "model.head_grid": m.head_grid,
                "model.lean_head_chunk_mb": m.lean_head_chunk_mb,
                "train.log_every": t.log_every,
                "train.keep_checkpoints": t.keep_checkpoints, "online_probe.every": cfg.online_probe.every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    for key, value in {"train.max_steps": t.max_steps, "data.subset": d.subset, "data.num_workers": d.num_workers,
                       "data.image_size": d.image_size, "train.checkpoint_every": t.checkpoint_every,
                       "model.in_channels": m.in_channels}.items():
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    if t.batch_size < 2:
        raise ConfigError("train.batch_size: the losses use batch statistics and need at least 2 images per batch")
    if t.momentum_dtype != "float32" and t.optimizer != "lars":
        raise ConfigError(f"train.momentum_dtype={t.momentum_dtype} is implemented for train.optimizer=lars only; "
                          "set train.momentum_dtype=float32")
    if t.log_saved_memory and t.compile:
        raise ConfigError("train.log_saved_memory counts saved tensors with autograd hooks in eager mode; set "
                          "train.compile=false to measure, or train.log_saved_memory=false")
    if m.head_kernel % 2 == 0:
        raise ConfigError(f"model.head_kernel: must be odd to keep the spatial size, got {m.head_kernel}")
    if not 0 < d.min_crop_scale <= 1:
        raise ConfigError(f"data.min_crop_scale: must lie in (0, 1], got {d.min_crop_scale}")
    if m.width <= 0:
        raise ConfigError(f"model.width: must be positive, got {m.width}")
    if cfg.noise.std < 0:
        raise ConfigError(f"noise.std: must be 0 or more, got {cfg.noise.std}")
    if t.lr <= 0 or t.bias_lr < 0 or t.weight_decay < 0:
        raise ConfigError("train.lr must be positive, train.bias_lr and train.weight_decay 0 or more")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio: must lie in [0, 1], got {t.min_lr_ratio}")
    if t.warmup_epochs < 0:
        raise ConfigError(f"train.warmup_epochs: must be 0 or more, got {t.warmup_epochs}")
    o = cfg.online_probe
    if o.lr <= 0 or o.weight_decay < 0 or not 0 <= o.momentum < 1:
        raise ConfigError(f"online_probe: lr must be positive (got {o.lr}), weight_decay 0 or more (got "
                          f"{o.weight_decay}) and momentum in [0, 1) (got {o.momentum})")
    p = cfg.probe
    if p.epochs < 1 or p.batch_size < 1 or p.eval_batch_size < 1:
        raise ConfigError("probe.epochs, probe.batch_size and probe.eval_batch_size must be at least 1")
    if p.lr <= 0 or not p.lrs or min(p.lrs) <= 0:
        raise ConfigError(f"probe.lr and every entry of probe.lrs must be positive, got {p.lr} and {p.lrs}")
    if not p.weight_decays or min(p.weight_decays) < 0 or p.max_iter < 1:
        raise ConfigError(f"probe.weight_decays must be a non-empty list of numbers >= 0 (got {p.weight_decays}) and "
                          f"probe.max_iter at least 1 (got {p.max_iter})")
    if "head" not in p.readouts:
        raise ConfigError(f"probe.readouts: {p.readouts} must include head (the features robustness and the report "
                          "read); add pool for the plain-pooling readout")
    if d.holdout and (not d.subset or d.holdout < 0):
        raise ConfigError(f"data.holdout={d.holdout}: held-out images are drawn from outside data.subset; set "
                          "data.subset (e.g. data.subset=20000) or data.holdout=0 to evaluate on the test set")
    if not 0 < p.val_fraction < 1 or not all(0 < f <= 1 for f in p.label_fractions):
        raise ConfigError(f"probe.val_fraction must lie in (0, 1) (got {p.val_fraction}) and probe.label_fractions "
                          f"in (0, 1] (got {p.label_fractions})")
    for key, lst in (("model.block_head_dims", m.block_head_dims), ("model.block_projectors", m.block_projectors)):
        if lst and len(lst) != n:
            raise ConfigError(f"{key}: has {len(lst)} entries but model.blocks defines {n} blocks; give one per "
                              "block or leave it empty")
    for spec in [m.projector, *m.block_projectors]:
        parse_projector(spec)
    bad = [b for b in t.frozen_blocks if not 1 <= b <= n]
    if bad:
        raise ConfigError(f"train.frozen_blocks: {bad} outside 1..{n} (blocks are numbered from 1)")
    if t.scheme == "sequential" and t.frozen_blocks:
        raise ConfigError("train.frozen_blocks: not supported with train.scheme=sequential, which freezes "
                          "blocks itself; use scheme=simultaneous with frozen_blocks")
    if t.scheme == "sequential" and t.loss_blocks not in ("auto", "all"):
        raise ConfigError("train.loss_blocks: the sequential scheme trains each block in turn; leave it auto")
    plan(cfg)  # the scheme's switches consistent: loss blocks, detach, execution, stages
    # metrics.jsonl is the run directory's record (the report reads it, resume truncates it): always written, so
    # always listed, first, and each logger once.
    t.loggers = ["jsonl", *dict.fromkeys(name for name in t.loggers if name != "jsonl")]
    if t.in_flight < 1:
        raise ConfigError(f"train.in_flight: {t.in_flight}; a stage needs at least 1 batch in flight")
    if t.dist_timeout_s <= 0:
        raise ConfigError(f"train.dist_timeout_s: {t.dist_timeout_s}; give the seconds a process may wait for the "
                          "others, e.g. 600")
    if cfg.loss.reference_allreduce and cfg.loss.name != "barlow_twins":
        raise ConfigError(f"loss.reference_allreduce: only Barlow Twins' reference code sums with a raw all_reduce; "
                          f"the {cfg.loss.name} reference gradients are exact, set it to false")
    convention = check_lr_convention(cfg)
    if convention and not saved:
        raise ConfigError(convention)
    if convention:
        warnings.warn(convention, stacklevel=2)
    if t.device not in ("auto", "cpu") and not t.device.startswith("cuda"):
        raise ConfigError(f"train.device: {t.device!r}; use auto, cpu, cuda or cuda:N")
    if d.name == "synthetic" and d.synthetic_size < t.batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than data.synthetic_size={d.synthetic_size}")
    if d.subset and d.subset < t.batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is larger than data.subset={d.subset}; "
                          "lower the batch size or use more images")


def parse_projector(spec: str) -> list[int]:
    """``"8192-8192-8192"`` -> ``[8192, 8192, 8192]``; ``""`` -> ``[]`` (no projector)."""
    if not spec.strip():
        return []
    try:
        dims = [int(s) for s in spec.split("-")]
    except ValueError:
        raise ConfigError(f"model.projector: {spec!r} must be widths joined by '-', e.g. 8192-8192-8192") from None
    if any(d < 1 for d in dims):
        raise ConfigError(f"model.projector: widths must be positive, got {spec!r}")
    return dims


# Keys that may change when resuming a run: they do not change what the model computes. The online probe never
# reaches the model, so it can be switched on (a fresh probe) or retuned for the rest of a run.
# What may change on resume: how, where and how visibly the same update is computed (execution strategies give the
# same update, tests/test_method.py and tests/test_pipeline.py).
RESUMABLE_KEYS = ("data.root", "data.num_workers", "data.pin_memory", "data.persistent_workers",
                  "train.progress", "train.device", "train.log_every", "train.loggers", "train.execution",
                  "train.stages", "train.in_flight", "train.dist_timeout_s", "online_probe.enabled",
                  "online_probe.every",
                  "online_probe.lr", "online_probe.momentum", "online_probe.weight_decay")


def resume_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A run's saved ``config.yaml`` with the overrides that do not change what is computed; others are an error."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a blockssl run directory?")
    saved = yaml.safe_load(path.read_text())
    values = saved
    for text in overrides:
        values = _merge(values, parse_override(text))
    cfg, original = from_dict(values), from_dict(saved)
    cfg.out = str(run_dir)
    conflicts = [line for line in diff_configs(original, cfg)
                 if line.split(":")[0] not in (*RESUMABLE_KEYS, "out")]
    if conflicts:
        raise ConfigError("--resume: these overrides conflict with the run's config.yaml:\n  " + "\n  ".join(conflicts)
                          + f"\nonly {', '.join(RESUMABLE_KEYS)} may change; start a new run for the others")
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], sections: tuple[str, ...]) -> Config:
    """``key=value`` overrides on a run's config, limited to ``sections`` (evaluation may not change training)."""
    for text in overrides:
        override = parse_override(text)
        if set(override) - set(sections):
            raise ConfigError(f"{text!r}: only {', '.join(s + '.*' for s in sections)} keys can be set here")
        _apply(cfg, override)
    validate(cfg)
    return cfg
