"""Batched image augmentations written as torch ops: they run on the images' device, one call per batch.

Every view is a random resized crop (with an optional small rotation and horizontal flip) done by
one affine_grid + grid_sample, then intensity jitter (brightness, contrast; saturation and random
greyscale for colour images), a Gaussian blur of random width and additive noise. The per-sample
parameters are drawn from a CPU generator (a few numbers per image) and the noise from a generator
on the images' device; both generators are seeded and their states are checkpointed.

torchvision is deliberately not used: its PyPI wheel does not load against the CPU build of torch
used here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.35, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w/h
    rotate_degrees: float = 0.0  # uniform in [-d, d]
    flip: bool = False  # horizontal flips (natural images; not digits)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4  # colour images only
    grayscale_p: float = 0.2  # colour images only
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # in pixels of the output
    noise_std: float = 0.05  # per-image std drawn uniform in [0, noise_std]
    fill: str = "zeros"  # grid_sample padding outside the image: "zeros" (digits) or "border"

    @staticmethod
    def for_data(name: str, channels: int) -> "AugmentConfig":
        if name == "digits":  # strokes on black: no flips (a flipped 3 is not a 3), mild rotation
            return AugmentConfig(rotate_degrees=12.0, flip=False, fill="zeros")
        return AugmentConfig(flip=True, fill="border", blur_sigma=(0.1, 1.5), noise_std=0.03 if channels == 3 else 0.05)


class Augment:
    """views = augment(images, size, scale=None): one random view of every image, (B, C, size, size)."""

    def __init__(self, config: AugmentConfig, device: torch.device, seed: int):
        self.config = config
        self.device = torch.device(device)
        self.param_generator = torch.Generator().manual_seed(seed)
        if self.device.type == "cpu":
            self.noise_generator = self.param_generator
        else:
            self.noise_generator = torch.Generator(device=self.device).manual_seed(seed + 1)

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        state = {"param_generator": self.param_generator.get_state()}
        if self.noise_generator is not self.param_generator:
            state["noise_generator"] = self.noise_generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.param_generator.set_state(state["param_generator"])
        if "noise_generator" in state and self.noise_generator is not self.param_generator:
            self.noise_generator.set_state(state["noise_generator"])

    # ----------------------------------------------------------------- the ops
    def _uniform(self, n: int, low: float, high: float) -> Tensor:
        return (torch.rand(n, generator=self.param_generator) * (high - low) + low).to(self.device)

    def _bernoulli(self, n: int, p: float) -> Tensor:
        return (torch.rand(n, generator=self.param_generator) < p).to(self.device)

    def crop(self, images: Tensor, size: int, scale: tuple[float, float]) -> Tensor:
        """Random resized crop (+ rotation, flip): output pixel u in [-1, 1]^2 samples the input at
        R(theta) diag(w, h) u + c, with w, h the crop's half-extents relative to the image."""
        cfg, n = self.config, images.shape[0]
        area = self._uniform(n, *scale)
        log_ratio = self._uniform(n, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
        w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
        h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
        cx = (self._uniform(n, -1.0, 1.0)) * (1 - w)
        cy = (self._uniform(n, -1.0, 1.0)) * (1 - h)
        angle = self._uniform(n, -cfg.rotate_degrees, cfg.rotate_degrees) * (math.pi / 180)
        if cfg.flip:
            w = torch.where(self._bernoulli(n, 0.5), -w, w)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([cos * w, -sin * h, cx], dim=1),
            torch.stack([sin * w, cos * h, cy], dim=1),
        ], dim=1).to(images.dtype)
        grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode=cfg.fill, align_corners=False)

    def jitter(self, x: Tensor) -> Tensor:
        cfg, n = self.config, x.shape[0]
        apply = self._bernoulli(n, cfg.jitter_p).view(n, 1, 1, 1)
        brightness = self._uniform(n, 1 - cfg.brightness, 1 + cfg.brightness).view(n, 1, 1, 1)
        contrast = self._uniform(n, 1 - cfg.contrast, 1 + cfg.contrast).view(n, 1, 1, 1)
        out = x * brightness
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast + mean
        if x.shape[1] == 3:
            saturation = self._uniform(n, 1 - cfg.saturation, 1 + cfg.saturation).view(n, 1, 1, 1)
            grey = _luma(out)
            out = grey + (out - grey) * saturation
            to_grey = self._bernoulli(n, cfg.grayscale_p).view(n, 1, 1, 1)
            out = torch.where(to_grey, _luma(out).expand_as(out), out)
        return torch.where(apply, out, x).clamp(0, 1)

    def blur(self, x: Tensor) -> Tensor:
        """Separable Gaussian blur, a different sigma per image (a delta where the coin says no):
        a weighted sum of 2r+1 shifted copies along each axis (a per-image grouped conv2d is
        orders of magnitude slower on the CPU for these tiny kernels)."""
        cfg, n = self.config, x.shape[0]
        sigma = self._uniform(n, *cfg.blur_sigma)
        sigma = torch.where(self._bernoulli(n, cfg.blur_p), sigma, torch.full_like(sigma, 1e-3))
        radius = max(1, math.ceil(2 * cfg.blur_sigma[1]))
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).view(n, 1, 1, 1, -1)  # (n, 1, 1, 1, taps)
        height, width = x.shape[-2:]
        padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        rows = sum(kernel[..., t] * padded[..., :, t: t + width] for t in range(2 * radius + 1))
        return sum(kernel[..., t] * rows[..., t: t + height, :] for t in range(2 * radius + 1))

    def noise(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        std = self._uniform(n, 0.0, self.config.noise_std).view(n, 1, 1, 1).to(x.dtype)
        eps = torch.randn(x.shape, generator=self.noise_generator, device=x.device, dtype=x.dtype)
        return (x + std * eps).clamp(0, 1)

    def __call__(self, images: Tensor, size: int, scale: tuple[float, float] | None = None) -> Tensor:
        x = self.crop(images, size, scale or self.config.scale)
        return self.noise(self.blur(self.jitter(x)))


def _luma(x: Tensor) -> Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)
