"""Export: the backbone loads into torchvision with strict key checking; heads are saved beside it."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from blockssl.export import export_run
from blockssl.runtime import checkpoint_model
from blockssl.train import pretrain
from tests.conftest import assert_same_tensors, tiny_config


def test_exported_backbone_loads_into_torchvision(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "model.width=1.0", "model.stem=imagenet", "train.epochs=1",
                               "data.image_size=32"))
    paths = export_run(run, tmp_path / "out")
    state = torch.load(paths[0], weights_only=True)
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()
    reference.load_state_dict(state)  # strict
    model, _, _ = checkpoint_model(run)
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model.backbone(x).mean(dim=(2, 3)))
    heads = torch.load(paths[1], weights_only=True)
    assert heads["blocks"] == [["stem", "layer1"], ["layer2"], ["layer3"], ["layer4"]]
    assert set(heads["heads"]) == {k.removeprefix("heads.") for k in model.state_dict() if k.startswith("heads.")}
    # backbone.pt of the run directory is the same state dict
    run_state = torch.load(run / "backbone.pt", weights_only=True)
    assert_same_tensors(run_state, state)
