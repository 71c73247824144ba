"""BYOL custom ops: byol_fwd (per-row 2 - 2 cos and three fp32 stats per row) and byol_bwd.

The forward keeps (||p_i||, ||z_i||, omc_i = 1 - cos_i, computed without cancellation: see
cl_fast/byol.py); the backward reads the rows once more and writes dp (and dz where z requires
grad). No normalised copy is ever made.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from . import define, fp32, no_double_backward


def _launchers(backend: str):
    return _dispatch.module(backend, "byol")


def _byol_fwd_impl(p: Tensor, z: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(loss (N,), stats (N, 3)), fp32."""
    return tuple(_launchers(backend).byol_fwd(p.contiguous(), z.contiguous()))


byol_fwd = define("byol_fwd", _byol_fwd_impl)


@byol_fwd.register_fake
def _(p, z, backend):
    return fp32((p.shape[0],), p), fp32((p.shape[0], 3), p)


def _byol_bwd_impl(grad: Tensor, p: Tensor, z: Tensor, stats: Tensor, need_dz: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(dp, dz) in p's dtype; dz is (0, D) unless need_dz."""
    return tuple(
        _launchers(backend).byol_bwd(grad.contiguous(), p.contiguous(), z.contiguous(), stats.contiguous(), need_dz)
    )


byol_bwd = define("byol_bwd", _byol_bwd_impl)


@byol_bwd.register_fake
def _(grad, p, z, stats, need_dz, backend):
    return torch.empty_like(p), z.new_empty((z.shape[0] if need_dz else 0, z.shape[1]))


def _byol_setup(ctx, inputs, output):
    p, z, backend = inputs
    ctx.save_for_backward(p, z, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _byol_backward(ctx, grad_loss, _grad_stats):
    p, z, stats = ctx.saved_tensors
    need_dz = ctx.needs_input_grad[1]
    with torch.no_grad():
        grad = grad_loss.to(torch.float32) if grad_loss is not None else torch.zeros_like(stats[:, 0])
        dp, dz = byol_bwd(grad, p, z, stats, need_dz, ctx.backend)
    dp, dz = no_double_backward("byol_loss", (dp, dz if need_dz else None), (grad_loss, p, z))
    return dp, dz, None


byol_fwd.register_autograd(_byol_backward, setup_context=_byol_setup)
