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


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of `group`; backward: the sum over the ranks of the gradients (every
    rank's loss depends on the sum)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the GLOBAL batch (all ranks of `group`,
    default: the world): SimCLR's "global BN", for gloo (CPU) as well as NCCL, where
    torch.nn.SyncBatchNorm runs on GPUs only. The per-channel sums are all-reduced with a
    differentiable all_reduce (two passes: the mean, then the centred squares), so the backward
    returns each rank the gradient from every rank's loss: SPEC's
    distributed convention, which DDP's gradient average turns into the single-process gradient
    on the global batch. Uneven local batches are fine (the counts are reduced too).

    Without an initialised process group of more than one rank, or in eval mode, it is the plain
    BatchNorm it replaces (same parameters and buffers, same state_dict)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.group = group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1
        if not (self.training and distributed):
            return super().forward(input)
        self._check_input_dim(input)
        group = self.group if self.group is not None else dist.group.WORLD
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = x.new_full((1,), float(input.numel() // input.shape[1]))
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(input.dtype)


def convert_global_bn(module: nn.Module, group=None) -> nn.Module:
    """Replaces every BatchNorm1d/2d/3d inside `module` (in place; returned) by a GlobalBatchNorm
    holding the same parameters and running statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            like = next(iter(list(child.parameters()) + list(child.buffers())))
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats, group=group, device=like.device)
            bn.load_state_dict(child.state_dict())
            bn.train(child.training)
            if child.affine:
                bn.weight.requires_grad_(child.weight.requires_grad)
                bn.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, bn)
        else:
            convert_global_bn(child, group)
    return module
