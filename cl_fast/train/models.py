"""The networks the trainers share: a small CNN encoder and MLP heads."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU blocks (width, 2w, 4w, 4w channels; two of them stride 2), global
    average pooling: a (B, 4w) representation for images of any size >= 4. Inputs in [0, 1]."""

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        self.out_dim = 4 * width
        self.layers = nn.Sequential(
            _conv_bn_relu(in_channels, width, 1),
            _conv_bn_relu(width, 2 * width, 2),
            _conv_bn_relu(2 * width, 4 * width, 2),
            _conv_bn_relu(4 * width, 4 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images * 2 - 1)


class MLPHead(nn.Module):
    """Linear-BN-ReLU-Linear: SimCLR/MoCo v2 projection, BYOL projector and predictor, SwAV head."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A momentum/EMA target: same weights, no gradients."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, parameters only (the target's BatchNorm
    statistics come from its own forward passes, as in MoCo and BYOL)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - tau)
