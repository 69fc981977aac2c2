"""Export a run: a backbone state dict its family's library loads (torchvision for ResNets), and the per-block heads
and projectors beside it."""

from __future__ import annotations

from pathlib import Path

import yaml

from blockssl.checkpoint import atomic_save
from blockssl.config import dump_config, from_dict
from blockssl.data.datasets import dataset_info
from blockssl.models.backbone import BackboneOptions, family_of, library_state_dict
from blockssl.runtime import checkpoint_model, require_out_dir, require_run_dir


def export_run(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``backbone.pt``, ``heads.pt`` and ``config.yaml`` into ``out_dir`` from the run's last checkpoint.

    The backbone loads into what its family names (``blockssl.models.backbone.Family.loads_into``, printed by
    ``blockssl export``), with strict key checking: for a ResNet with the standard stem, ``m =
    torchvision.models.<arch>(); m.fc = torch.nn.Identity(); m.load_state_dict(torch.load("backbone.pt"))``; for a
    ViT, ``timm.create_model(<arch>, num_classes=0, img_size=..., ...)`` with the run's image size and overrides.
    """
    run_dir = require_run_dir(run_dir, "blockssl export runs/demo exported/")
    out = require_out_dir(out_dir, "OUT_DIR")
    model, cfg, _ = checkpoint_model(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = {
        "blocks": model.block_stages,
        "heads": model.heads.state_dict(),
        "projectors": model.projectors.state_dict(),
    }
    paths = [out / "backbone.pt", out / "heads.pt", out / "config.yaml"]
    atomic_save(library_state_dict(cfg.model.arch, model.backbone.state_dict()), paths[0])
    atomic_save(heads, paths[1])
    paths[2].write_text(dump_config(cfg))
    return paths


def loads_into(run_dir: str | Path) -> str:
    """What the exported ``backbone.pt`` of a run loads into."""
    cfg = from_dict(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
    info = dataset_info(cfg.data)
    return family_of(cfg.model.arch).loads_into(cfg.model.arch, BackboneOptions.of(cfg.model, info.channels,
                                                                                  info.image_size))
