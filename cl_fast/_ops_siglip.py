"""The fused SigLIP loss as torch.library custom ops (the pattern of cl_fast/_ops.py).

TODO(merge): this module becomes cl_fast/_ops/siglip.py once oplayer's `_ops` package lands
(same ops, its shared helpers instead of the local ones).

    siglip_fwd(x, y, scale, bias, backend) -> row_loss (N,) fp32
    siglip_bwd(grad, x, y, scale, bias, backend) -> (dx, dy, dscale, dbias)

row_loss_i = sum_j softplus(-z_ij (s x_i . y_j + b)), z_ij = +1 if i == j else -1 (SPEC.md);
scale s and bias b are 0-d fp32 tensors on the features' device (kernels read them there). The
backward recomputes the logits tiles from the inputs: nothing but the inputs, s and b is saved.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch
from ._ops import define


def _module(backend: str):
    return _dispatch.module(backend, "siglip")


def _siglip_fwd_impl(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, backend: str) -> Tensor:
    """Per-row losses (N,), fp32."""
    return _module(backend).siglip_fwd(x.contiguous(), y.contiguous(), scale, bias)


siglip_fwd = define("siglip_fwd", _siglip_fwd_impl)


@siglip_fwd.register_fake
def _(x, y, scale, bias, backend):
    return x.new_empty((x.shape[0],), dtype=torch.float32)


def _siglip_bwd_impl(
    grad: Tensor, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dL/dscale, dL/dbias) for upstream per-row grads `grad` (fp32)."""
    dx, dy, dscale, dbias = _module(backend).siglip_bwd(grad.contiguous(), x.contiguous(), y.contiguous(), scale, bias)
    return dx, dy, dscale.to(scale.device), dbias.to(bias.device)


siglip_bwd = define("siglip_bwd", _siglip_bwd_impl)


@siglip_bwd.register_fake
def _(grad, x, y, scale, bias, backend):
    f32 = dict(dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(y), scale.new_empty((), **f32), bias.new_empty((), **f32)


def _setup(ctx, inputs, output):
    x, y, scale, bias, backend = inputs
    ctx.save_for_backward(x, y, scale, bias)
    ctx.backend = backend


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the first-order gradients; differentiating them again raises a clear error
    (the backward kernels have no derivative of their own: a silent zero would be wrong)."""

    @staticmethod
    def forward(ctx, *grads):
        return tuple(g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "siglip_loss: double backward through the fused op is not supported (its gradients are not "
            "differentiable); use backend='torch' for higher-order gradients"
        )


def _backward(ctx, grad_loss):
    x, y, scale, bias = ctx.saved_tensors
    grad = torch.zeros_like(x[:, 0], dtype=torch.float32) if grad_loss is None else grad_loss.to(torch.float32)
    dx, dy, dscale, dbias = siglip_bwd(grad, x, y, scale, bias, ctx.backend)
    grads = (dx, dy, dscale.to(scale.dtype), dbias.to(bias.dtype))
    if torch.is_grad_enabled():  # create_graph=True: a second backward must not pass silently
        grads = _NoDoubleBackward.apply(*grads)
    return (*grads, None)


siglip_fwd.register_autograd(_backward, setup_context=_setup)
