"""The colour half of a view's augmentation (jitter, grayscale, blur, solarize), on the training device, batched.

With ``data.photometric=device`` the loader's workers crop and flip (``PIL``), draw the view's colour parameters
exactly as torchvision's transforms would (the same calls on the same per-image generator, so the same values),
and ship the crop as ``uint8`` with a row of parameters; the training process applies them to the whole batch on
its device. Per image it is the loader path's augmentation, computed in float instead of PIL's ``uint8`` after
every operation (tested against it), and the workers are left decoding, cropping and resizing.

The operations follow torchvision's tensor definitions: brightness, contrast (blend with the grayscale mean) and
saturation (blend with grayscale) clamp to [0, 1]; hue turns the HSV hue; grayscale is ITU-R 601-2 luma; blur is a
Gaussian of the drawn sigma on a fixed kernel with reflected borders; solarize inverts values of 128/255 and above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.functional import normalize, pil_to_tensor

# The row of parameters a view's image carries: whether the jitter applies, its order (a permutation of the four
# operations: brightness, contrast, saturation, hue), the four factors, grayscale, the blur's sigma (0: none) and
# solarize.
JITTER, ORDER, FACTORS, GRAY, SIGMA, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11
WIDTH = 12
NEUTRAL = (1.0, 1.0, 1.0, 0.0)  # the factors that change nothing
SOLARIZE_THRESHOLD = 128 / 255  # torchvision's RandomSolarize(128) on 8-bit images
BLUR_SIGMA = (0.1, 2.0)  # the presets' blur sigma range (SimCLR, Barlow Twins)


@dataclass(frozen=True)
class Photometric:
    """A view's colour augmentation: ``jitter`` (brightness, contrast, saturation, hue strengths as ColorJitter
    takes them; None leaves one out) applied with probability ``jitter_p``, grayscale with ``gray_p``, a Gaussian
    blur of sigma uniform in ``blur_sigma`` on a ``blur_kernel``-pixel kernel with ``blur_p``, solarize with
    ``solarize_p``, in that order (the presets' order)."""

    jitter: tuple[float | None, float | None, float | None, float | None]
    jitter_p: float
    gray_p: float
    blur_p: float
    blur_kernel: int
    solarize_p: float
    blur_sigma: tuple[float, float] = BLUR_SIGMA

    def ranges(self) -> list[tuple[float, float] | None]:
        """The factor ranges of ColorJitter: [1 - s, 1 + s] for the first three, [-s, s] for hue."""
        return [None if s is None else ((-s, s) if k == 3 else (max(0.0, 1 - s), 1 + s))
                for k, s in enumerate(self.jitter)]

    def sample(self) -> torch.Tensor:
        """The parameters of one image, drawn from the global generator in the order and with the calls of
        torchvision's RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur) and RandomSolarize."""
        row = torch.zeros(WIDTH)
        row[ORDER] = torch.arange(4, dtype=torch.float32)
        row[FACTORS] = torch.tensor(NEUTRAL)
        if self.jitter_p > 0 and not self.jitter_p < torch.rand(1):
            row[JITTER] = 1
            row[ORDER] = torch.randperm(4).float()
            for k, bounds in enumerate(self.ranges()):
                if bounds is not None:
                    row[FACTORS.start + k] = float(torch.empty(1).uniform_(*bounds))
        if self.gray_p > 0 and torch.rand(1) < self.gray_p:
            row[GRAY] = 1
        if self.blur_p > 0 and not self.blur_p < torch.rand(1):
            row[SIGMA] = torch.empty(1).uniform_(*self.blur_sigma).item()
        if self.solarize_p > 0 and torch.rand(1).item() < self.solarize_p:
            row[SOLARIZE] = 1
        return row

    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``images`` (N, C, H, W, uint8) with their ``params`` (N, WIDTH) -> float images in [0, 1]. Every
        operation runs on the whole batch and is selected per image (no host synchronisation)."""
        x = images.float() / 255
        params = params.to(x.device, torch.float32)

        def pick(flag: torch.Tensor, changed: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
            return torch.where(flag.view(-1, 1, 1, 1), changed, now)

        operations: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
            adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
        jittered = params[:, JITTER] > 0
        for position in range(4):
            for k, operation in enumerate(operations):
                if self.jitter[k] is not None:
                    chosen = jittered & (params[:, ORDER.start + position] == k)
                    x = pick(chosen, operation(x, params[:, FACTORS.start + k]), x)
        if self.gray_p > 0:
            x = pick(params[:, GRAY] > 0, grayscale(x).expand_as(x), x)
        if self.blur_p > 0:
            blurred = params[:, SIGMA] > 0
            x = pick(blurred, gaussian_blur(x, torch.where(blurred, params[:, SIGMA], 1.0), self.blur_kernel), x)
        if self.solarize_p > 0:
            x = pick(params[:, SOLARIZE] > 0, torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x), x)
        return x


class DeviceView:
    """A view split in two: ``__call__`` (in a loader worker) crops and flips a PIL image with ``geometry`` and draws
    its colour parameters; ``finish`` (in the training process) applies them to the batch on its device and
    normalises."""

    def __init__(self, geometry: Callable[[Image.Image], Image.Image], photometric: Photometric,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.geometry, self.photometric, self.mean, self.std = geometry, photometric, mean, std

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        crop = self.geometry(image)
        return pil_to_tensor(crop), self.photometric.sample()

    def finish(self, batch: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        images, params = (t.to(device, non_blocking=True) for t in batch)
        return normalize(self.photometric.apply(images, params), list(self.mean), list(self.std))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.geometry}, {self.photometric})"


def to_device(view: Callable, batch: torch.Tensor | list[torch.Tensor], device: torch.device,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A collated batch of ``view``'s outputs as normalised images on ``device``."""
    if isinstance(view, DeviceView):
        assert isinstance(batch, list | tuple)
        return view.finish(list(batch), device).contiguous(memory_format=memory_format)
    assert isinstance(batch, torch.Tensor)
    return batch.to(device, non_blocking=True, memory_format=memory_format)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma of RGB images (ITU-R 601-2, torchvision's weights); a 1-channel image is its own."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Turn the hue of RGB images by ``factor`` (in turns, per image), through HSV as torchvision and PIL do."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    equal = maxc == minc  # gray pixels: no hue, no saturation (and no division by zero)
    spread = maxc - minc
    ones = torch.ones_like(maxc)
    s = spread / torch.where(equal, ones, maxc)
    divisor = torch.where(equal, ones, spread)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + factor.view(-1, 1, 1), 1.0)
    # back to RGB, channel by channel: c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6 with n = 5, 3, 1
    # for R, G, B (the closed form of the sextant table, without a 6-fold temporary)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    return maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """A Gaussian blur of each image by its own ``sigma`` on a ``kernel``-pixel kernel (odd), borders reflected:
    torchvision's ``gaussian_blur``, separable, with one kernel per image."""
    n, c, h, w = x.shape
    offsets = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N * C, kernel)
    half = kernel // 2
    y = torch.nn.functional.pad(x.reshape(1, n * c, h, w), [half, half, half, half], mode="reflect")
    y = torch.nn.functional.conv2d(y, weights.view(n * c, 1, kernel, 1), groups=n * c)
    y = torch.nn.functional.conv2d(y, weights.view(n * c, 1, 1, kernel), groups=n * c)
    return y.view(n, c, h, w)
