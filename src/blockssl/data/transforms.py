"""Two-view augmentation presets (Barlow Twins, SimCLR, VICReg) and evaluation transforms.

ImageNet values are the papers'. RandomResizedCrop keeps areas from ``data.min_crop_scale`` (0.08, as Barlow Twins
and SimCLR on ImageNet and SimCLR on CIFAR) to 1 of the image; blur is skipped at 32 px and below unless
``data.blur=true`` (SimCLR's CIFAR recipe has none); on grayscale images the colour operations that need colour are
dropped. Evaluation resizes bilinearly, as the reference linear evaluation (torchvision's default).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from blockssl.data.datasets import DatasetInfo
from blockssl.data.photometric import BLUR_SIGMA, DeviceView, Photometric

AUGMENT_PRESETS = ("barlow_twins", "simclr", "vicreg")


class PILGaussianBlur:
    """Gaussian blur by PIL's ``ImageFilter.GaussianBlur(radius=sigma)``, sigma uniform in ``sigma`` drawn from torch's
    generator (seeded per image), as the Barlow Twins and VICReg reference code and the blockwise authors' code.
    PIL's blur is not truncated to a kernel and is about 20x faster than torchvision's 23-pixel kernel at 224 px."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def _view(info: DatasetInfo, *, jitter: tuple[float, float, float, float], blur_p: float, solarize_p: float,
          min_scale: float, blur: str, blur_impl: str, photometric: str) -> Callable:
    size = info.image_size
    geometry = T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ])
    gray = info.channels == 1
    blurred = blur_p > 0 and (blur == "true" or (blur == "auto" and size > 32))
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # about 10% of the side, odd (23 at 224 px, 3 at 28 px)
    colour = Photometric(jitter=(jitter[0], jitter[1], None, None) if gray else jitter, jitter_p=0.8,
                         gray_p=0.0 if gray else 0.2, blur_p=blur_p if blurred else 0.0,
                         # PIL's blur is not truncated: on the device, a kernel of +-3 sigma stands for it
                         blur_kernel=kernel if blur_impl == "torchvision" else 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1,
                         solarize_p=solarize_p)
    if photometric == "device":
        return DeviceView(geometry, colour, info.mean, info.std)
    ops: list[Callable] = [*geometry.transforms, T.RandomApply([T.ColorJitter(*colour.jitter[:2]) if gray
                                                                 else T.ColorJitter(*jitter)], p=colour.jitter_p)]
    if colour.gray_p:
        ops.append(T.RandomGrayscale(p=colour.gray_p))
    if colour.blur_p:
        blur_op = (PILGaussianBlur(colour.blur_sigma) if blur_impl == "pil"
                   else T.GaussianBlur(kernel, colour.blur_sigma))
        ops.append(T.RandomApply([blur_op], p=colour.blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=solarize_p))
    ops += [T.ToTensor(), T.Normalize(info.mean, info.std)]
    return T.Compose(ops)


def two_view_transforms(preset: str, info: DatasetInfo, min_scale: float = 0.08, blur: str = "auto",
                        blur_impl: str = "torchvision", photometric: str = "loader") -> tuple[Callable, Callable]:
    """The pair of view transforms of ``preset``.

    barlow_twins / vicreg: asymmetric (view 1 always blurred, view 2 blurred 10% and solarized 20%),
    jitter (0.4, 0.4, 0.2, 0.1). simclr: symmetric, jitter (0.8, 0.8, 0.8, 0.2), blur 50%. ``min_scale``: the
    smallest crop area; ``blur``: auto (none at 32 px and below), true or false; ``blur_impl``: torchvision's
    kernel of about 10% of the side (SimCLR's definition) or PIL's untruncated blur (``PILGaussianBlur``);
    ``photometric``: ``loader`` (all in the loader) or ``device`` (colour operations on the training device,
    ``blockssl.data.photometric``).
    """
    view = partial(_view, info, min_scale=min_scale, blur=blur, blur_impl=blur_impl, photometric=photometric)
    if preset in ("barlow_twins", "vicreg"):
        jitter = (0.4, 0.4, 0.2, 0.1)
        return (view(jitter=jitter, blur_p=1.0, solarize_p=0.0), view(jitter=jitter, blur_p=0.1, solarize_p=0.2))
    if preset == "simclr":
        symmetric = view(jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, solarize_p=0.0)
        return symmetric, symmetric
    raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(AUGMENT_PRESETS)}")


def eval_transform(info: DatasetInfo) -> Callable[[Image.Image], torch.Tensor]:
    """Resize + centre crop (256 -> 224 at ImageNet scale, the same ratio elsewhere; bilinear), then normalise."""
    size = info.image_size
    resize = round(size * 256 / 224) if size > 64 else size
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(info.mean, info.std)])


def pregenerated_transform(info: DatasetInfo) -> Callable[[Image.Image], torch.Tensor]:
    """Images already framed by ``eval_transform``'s resize and crop (ImageNet-C was made from Resize 256 +
    CenterCrop 224 of the validation set): only normalised, as Hendrycks' test.py (its CenterCrop leaves a 224 px
    image as it is; a larger one is cropped, never resized)."""
    return T.Compose([T.CenterCrop(info.image_size), T.ToTensor(), T.Normalize(info.mean, info.std)])


def probe_train_transform(info: DatasetInfo) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop (scale 0.08 to 1, bilinear) + flip: the reference linear evaluation's augmentation."""
    return T.Compose([T.RandomResizedCrop(info.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(info.mean, info.std)])
