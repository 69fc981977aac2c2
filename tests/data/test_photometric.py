"""Colour augmentation on the device: each operation against torchvision's tensor definition, a device view
against the loader view drawing the same parameters, and training with it."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as F
from torchvision import transforms as T

from blockssl.checkpoint import load_checkpoint
from blockssl.data import photometric as ph
from blockssl.data.photometric import DeviceView, to_device
from blockssl.data.transforms import two_view_transforms
from blockssl.train import pretrain
from tests.conftest import assert_same_tensors, run_metrics, tiny_config
from tests.data.test_datasets import INFOS, _random_image


def test_each_operation_is_torchvision_tensor_definition():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 12, 12)
    gray = torch.rand(5, 1, 12, 12)
    factors = torch.tensor([0.0, 0.6, 1.0, 1.3, 2.0])
    hues = torch.tensor([-0.5, -0.1, 0.0, 0.25, 0.5])
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    for i in range(5):
        f, h, s = float(factors[i]), float(hues[i]), float(sigmas[i])
        for ours, theirs, image in ((ph.adjust_brightness, F.adjust_brightness, x),
                                    (ph.adjust_contrast, F.adjust_contrast, x),
                                    (ph.adjust_saturation, F.adjust_saturation, x),
                                    (ph.adjust_brightness, F.adjust_brightness, gray),
                                    (ph.adjust_contrast, F.adjust_contrast, gray)):
            torch.testing.assert_close(ours(image, factors)[i], theirs(image[i], f), atol=1e-6, rtol=0)
        torch.testing.assert_close(ph.adjust_hue(x, hues)[i], F.adjust_hue(x[i], h), atol=1e-5, rtol=0)
        torch.testing.assert_close(ph.gaussian_blur(x, sigmas, 5)[i], F.gaussian_blur(x[i], [5, 5], [s, s]),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(ph.grayscale(x)[i], F.rgb_to_grayscale(x[i]), atol=1e-6, rtol=0)


def _on_tensors(view: T.Compose) -> tuple[list, list]:
    """The loader view's crop and flip (on PIL), and its colour operations made to run on float tensors (the
    solarize threshold of 8-bit images in [0, 1] units); the final ToTensor and Normalize are left out."""
    ops = list(view.transforms)
    colour = [T.RandomSolarize(128 / 255, p=op.p) if isinstance(op, T.RandomSolarize) else op for op in ops[2:-2]]
    return ops[:2], colour


@pytest.mark.parametrize("preset", ["barlow_twins", "simclr"])
@pytest.mark.parametrize("info_name", sorted(INFOS))
def test_a_device_view_is_the_loader_view_with_the_same_draws(preset, info_name):
    """With the same per-image seed, the device view draws what torchvision's transforms draw, in the same order
    and number (the generator ends in the same state), and computes the same image to float rounding."""
    info = INFOS[info_name]
    loader = two_view_transforms(preset, info, blur="true")
    device = two_view_transforms(preset, info, blur="true", photometric="device")
    image = _random_image(info.channels, info.image_size + 7)
    for view in (0, 1):
        geometry, colour = _on_tensors(loader[view])
        assert isinstance(device[view], DeviceView)
        expected, crops, params, after = [], [], [], []
        for seed in range(24):
            torch.manual_seed(seed)
            x = F.to_tensor(T.Compose(geometry)(image))
            for op in colour:
                x = op(x)
            expected.append(F.normalize(x, info.mean, info.std))
            after.append(torch.rand(1))
            torch.manual_seed(seed)
            crop, row = device[view](image)
            crops.append(crop)
            params.append(row)
            assert torch.equal(torch.rand(1), after[-1])
        assert crops[0].dtype == torch.uint8
        batch = torch.stack(params)
        assert batch[:, ph.JITTER].any() and not batch[:, ph.JITTER].all()  # both cases occur
        out = to_device(device[view], [torch.stack(crops), batch], torch.device("cpu"))
        torch.testing.assert_close(out, torch.stack(expected), atol=2e-5, rtol=0)


def test_the_loader_view_keeps_its_operations():
    """``data.photometric=loader`` (the default) is the torchvision pipeline it always was."""
    view, _ = two_view_transforms("barlow_twins", INFOS["rgb96"])
    names = [type(op).__name__ for op in view.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale", "RandomApply",
                     "ToTensor", "Normalize"]


def test_training_with_colour_on_the_device_is_deterministic(tmp_path):
    run = ["data.photometric=device", "data.blur=true", "train.epochs=1"]
    a = pretrain(tiny_config(tmp_path / "a", *run))
    b = pretrain(tiny_config(tmp_path / "b", *run))
    assert_same_tensors(load_checkpoint(a / "checkpoints/last.pt")["model"],
                        load_checkpoint(b / "checkpoints/last.pt")["model"])
    loader = pretrain(tiny_config(tmp_path / "loader", *run[1:]))
    first = [run_metrics(r)[0]["loss"] for r in (a, loader)]
    assert all(torch.isfinite(torch.tensor(first))) and first[0] != first[1]  # close, not equal: float vs 8-bit
