"""Policy: the cross-field checks of a configuration, each naming the key and the fix, and the parsers of its
structured strings (block groupings, projector widths). The scheme's own switches are checked by resolving them
(``blockssl.config.plan``), after these checks, wherever a configuration is loaded."""

from __future__ import annotations

import warnings

from blockssl.config.schema import Config, ConfigError, ModelConfig


def parse_blocks(spec: str, stages: tuple[str, ...] | None = None) -> list[list[str]]:
    """``"stem+layer1,layer2,layer3,layer4"`` -> ``[["stem", "layer1"], ["layer2"], ...]``; with ``stages`` (the
    backbone's, in order) a run ``first-last`` stands for the stages from first to last (``"0-2,3-5"`` ->
    ``[["0", "1", "2"], ["3", "4", "5"]]``), a layer whose units are the stages for its units (``layer2`` ->
    ``layer2.0, ..., layer2.3`` under ``model.granularity=unit``), and the grouping is checked: every stage exactly
    once and in network order, since block k+1 reads block k's output. Without them only the number of blocks is
    meaningful."""
    if spec == "auto":
        raise ConfigError("model.blocks=auto is resolved to the backbone's grouping when a configuration is loaded "
                          "(blockssl.config.load_config); resolve it before parsing")
    blocks = [[s.strip() for s in group.split("+") if s.strip()] for group in spec.split(",")]
    if stages is not None:
        blocks = [[s for part in group for s in _run(part, stages)] for group in blocks]
    flat = [s for b in blocks for s in b]
    if any(not b for b in blocks) or (stages is not None and flat != list(stages)):
        example = ",".join(stages or ("stem+layer1", "layer2", "layer3", "layer4"))
        raise ConfigError(
            f"model.blocks: {spec!r} must list each stage of {'+'.join(stages or ('...',))} exactly once, in order, "
            f"grouped into blocks by ',' and '+' (e.g. {example!r})")
    return blocks


def _run(part: str, stages: tuple[str, ...]) -> list[str]:
    """A stage name; a name whose units are stages (``layer3`` for ``layer3.0``, ``layer3.1``, ...): those units; or
    ``first-last``: the stages from first to last (a name that is itself a stage wins)."""
    if part in stages:
        return [part]
    units = [s for s in stages if s.startswith(part + ".")]
    if units:
        return units
    first, dash, last = part.partition("-")
    if not dash:
        return [part]
    a, b = _run(first, stages), _run(last, stages)
    if a[0] not in stages or b[-1] not in stages:
        return [part]
    i, j = stages.index(a[0]), stages.index(b[-1])
    return list(stages[i:j + 1]) if i <= j else [part]


def _resolve_blocks(m: ModelConfig) -> list[list[str]]:
    """``model.blocks`` parsed and checked against the backbone's stages, ``auto`` replaced by its family's grouping,
    and the family's options checked: another family's must keep their defaults."""
    # imported here: importing blockssl.config stays free of torch
    from blockssl.models.backbone import FAMILIES, BackboneOptions, family_of

    try:
        family = family_of(m.arch)
        stages = family.stages(m.arch, BackboneOptions.of(m))
    except (KeyError, ValueError) as e:
        raise ConfigError(str(e.args[0])) from None
    default = ModelConfig()
    others = {key for f in FAMILIES.values() for key in f.options} - set(family.options)
    changed = sorted(f"model.{key}={getattr(m, key)}" for key in others if getattr(m, key) != getattr(default, key))
    if changed:
        raise ConfigError(f"{', '.join(changed)}: not read by model.arch={m.arch}'s backbone family; remove "
                          f"{'it' if len(changed) == 1 else 'them'} (its settings: "
                          f"{', '.join(f'model.{k}' for k in family.options)})")
    if m.blocks == "auto":
        m.blocks = family.default_blocks(stages)
    return parse_blocks(m.blocks, stages)


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
    t, m, d = cfg.train, cfg.model, cfg.data
    n = len(_resolve_blocks(m))
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
                       "model.in_channels": m.in_channels, "model.patch_size": m.patch_size, "model.depth": m.depth,
                       "model.embed_dim": m.embed_dim, "model.num_heads": m.num_heads}.items():
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
    if not 0 <= m.drop_path < 1:
        raise ConfigError(f"model.drop_path: must lie in [0, 1), got {m.drop_path}")
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
