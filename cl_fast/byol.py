"""BYOL's regression loss: `byol_loss(p, z)` = 2 - 2 cos(p_i, z_i) (= ||n(p_i) - n(z_i)||^2), and `BYOLLoss`.

The fused backends read each row pair once in the forward (||p_i||, ||z_i||, p_i . z_i) and keep
three fp32 per row for the backward, which reads the rows once more and writes
    dp_i = -2 g_i r_p (v_i - u_i cos_i),  dz_i = -2 g_i r_z (u_i - v_i cos_i)
(u = n(p), v = n(z), r = 1 / max(||.||, eps); where a norm is clamped, n(x) = x / eps is linear
and the projection term drops). No normalised copy of p or z is ever made. z is expected
detached (BYOL's target branch); if it does require grad, it gets its gradient too.

Backends: "torch" (reference.byol_loss), "cpu" (cl_fast._C ops cl_fast_C::byol_fwd / byol_bwd),
"triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); "auto" on a GPU runs "triton".
Every fused backend provides

    byol_fwd(p, z) -> (loss (N,) fp32, stats (N, 3) fp32 = [||p_i||, ||z_i||, cos_i])
    byol_bwd(grad (N,) fp32, p, z, stats, need_dz: bool) -> (dp, dz or (0, D)), in p's dtype
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, _dispatch, _ops, reference

__all__ = ["byol_loss", "BYOLLoss", "NegativeCosineSimilarity"]


# ------------------------------------------------------------------------------ custom ops
def _byol_fwd_impl(p: Tensor, z: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(loss (N,), stats (N, 3)), fp32."""
    return tuple(_dispatch.module(backend, "byol").byol_fwd(p.contiguous(), z.contiguous()))


byol_fwd = _ops.define("byol_fwd", _byol_fwd_impl)


@byol_fwd.register_fake
def _(p, z, backend):
    return p.new_empty((p.shape[0],), dtype=torch.float32), p.new_empty((p.shape[0], 3), dtype=torch.float32)


def _byol_bwd_impl(grad: Tensor, p: Tensor, z: Tensor, stats: Tensor, need_dz: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(dp, dz) in p's dtype; dz is (0, D) unless need_dz."""
    return tuple(
        _dispatch.module(backend, "byol").byol_bwd(grad.contiguous(), p.contiguous(), z.contiguous(), stats.contiguous(), need_dz)
    )


byol_bwd = _ops.define("byol_bwd", _byol_bwd_impl)


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
    grad = grad_loss.to(torch.float32) if grad_loss is not None else torch.zeros_like(stats[:, 0])
    dp, dz = byol_bwd(grad, p, z, stats, need_dz, ctx.backend)
    return dp, (dz if need_dz else None), None


byol_fwd.register_autograd(_byol_backward, setup_context=_byol_setup)


# ------------------------------------------------------------------------------ public API
def byol_loss(p: Tensor, z: Tensor, *, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """BYOL's loss 2 - 2 cos(p_i, z_i), mean over the batch (fp32).

    p: the online network's prediction (N, D); z: the target projection (N, D), expected detached.
    reduction: "mean" (BYOL), "sum" or "none" (per-row losses).
    """
    _checks.check_pair("p", p, "z", z)
    _checks.check_reduction(reduction)
    backend = _dispatch.resolve(backend, p.device, p.dtype, op="byol")
    if backend == "torch":
        return reference.byol_loss(p, z, reduction=reduction)
    loss, _ = byol_fwd(p, z, backend)
    return reference.reduce_loss(loss, reduction)


class BYOLLoss(nn.Module):
    """loss(p, z) = mean_i (2 - 2 cos(p_i, z_i)); see byol_loss. For BYOL's symmetric loss, call it
    twice with the views swapped: loss(p1, z2.detach()) + loss(p2, z1.detach())."""

    def __init__(self, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        _checks.check_reduction(reduction)
        self.reduction, self.backend = reduction, backend

    def forward(self, p: Tensor, z: Tensor) -> Tensor:
        return byol_loss(p, z, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"


class NegativeCosineSimilarity(nn.Module):
    """Drop-in for lightly's NegativeCosineSimilarity (SimSiam): -mean_i cos(x0_i, x1_i).

    For 2-D (N, D) inputs compared along dim 1 it is byol_loss / 2 - 1 (the fused BYOL kernels;
    gradients into both inputs). Rows are normalised as n(x) = x / max(||x||, 1e-12) there; other
    shapes or dims use torch's cosine_similarity with `eps` (which bounds the product of the norms).
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8, *, backend: str = "auto"):
        super().__init__()
        self.dim, self.eps, self.backend = dim, eps, backend

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        if isinstance(x0, Tensor) and x0.dim() == 2 and self.dim in (1, -1):
            return byol_loss(x0, x1, backend=self.backend) / 2 - 1
        return -F.cosine_similarity(x0, x1, self.dim, self.eps).mean()
