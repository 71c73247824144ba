"""SigLIP custom ops: siglip_fwd (per-row sigmoid-loss sums) and siglip_bwd (all four gradients).

    siglip_fwd(x, y, scale, bias, backend) -> row_loss (N,) fp32
    siglip_bwd(grad, x, y, scale, bias, backend) -> (dx, dy, dscale, dbias)

row_loss_i = sum_j softplus(-z_ij (s x_i . y_j + b)), z_ij = +1 if i == j else -1 (SPEC.md);
scale s and bias b are 0-d fp32 tensors on the features' device (the kernels read them there).
Nothing but the inputs, s and b is saved: the backward recomputes the logits tiles.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from . import define, fp32, no_double_backward


def _launchers(backend: str):
    return _dispatch.module(backend, "siglip")


def _siglip_fwd_impl(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, backend: str) -> Tensor:
    """Per-row losses (N,), fp32."""
    return _launchers(backend).siglip_fwd(x.contiguous(), y.contiguous(), scale, bias)


siglip_fwd = define("siglip_fwd", _siglip_fwd_impl)


@siglip_fwd.register_fake
def _(x, y, scale, bias, backend):
    return fp32((x.shape[0],), x)


def _siglip_bwd_impl(
    grad: Tensor, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dL/dscale, dL/dbias) for upstream per-row grads `grad` (fp32)."""
    dx, dy, dscale, dbias = _launchers(backend).siglip_bwd(grad.contiguous(), x.contiguous(), y.contiguous(), scale, bias)
    return dx, dy, dscale, dbias


siglip_bwd = define("siglip_bwd", _siglip_bwd_impl)


@siglip_bwd.register_fake
def _(grad, x, y, scale, bias, backend):
    return torch.empty_like(x), torch.empty_like(y), fp32((), scale), fp32((), bias)


def _setup(ctx, inputs, output):
    x, y, scale, bias, backend = inputs
    ctx.save_for_backward(x, y, scale, bias)
    ctx.backend = backend


def _backward(ctx, grad_loss):
    x, y, scale, bias = ctx.saved_tensors
    with torch.no_grad():
        grad = torch.zeros_like(x[:, 0], dtype=torch.float32) if grad_loss is None else grad_loss.to(torch.float32)
        dx, dy, dscale, dbias = siglip_bwd(grad, x, y, scale, bias, ctx.backend)
    grads = (dx, dy, dscale.to(scale.dtype), dbias.to(bias.dtype))
    return (*no_double_backward("siglip_loss", grads, (grad_loss, x, y, scale, bias)), None)


siglip_fwd.register_autograd(_backward, setup_context=_setup)
