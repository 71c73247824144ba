"""BYOL's regression loss: `byol_loss(p, z)` = 2 - 2 cos(p_i, z_i) (= ||n(p_i) - n(z_i)||^2), and `BYOLLoss`.

Every backend evaluates omc_i = 1 - cos_i without cancellation: with u = n(p), v = n(z),
r = 1 / max(||.||, eps), omc = ||u - v||^2 / 2 where both norms exceed eps (2 - 2 cos formed as a
difference of numbers near 2 keeps only fp32's absolute precision, ~1e-7, which is all of the loss
of nearly aligned rows), and 1 - u.v where a norm is clamped (n(x) = x / eps, ||n(x)|| < 1).
loss_i = 2 omc_i. The fused backends take the norms in one read of each row pair and omc in a
second (cached) one, and keep three fp32 per row for the backward, which reads the rows once more
and writes, using v - cos u = (v - u) + omc u,
    dp_i = -2 g_i r_p ((v_i - u_i) + omc_p u_i),  dz_i = -2 g_i r_z ((u_i - v_i) + omc_z v_i)
(omc_x = omc_i, or 1 where x's norm is clamped: n(x) = x / eps is linear and the projection term
drops). No normalised copy of p or z is ever made. z is expected detached (BYOL's target
branch); if it does require grad, it gets its gradient too.

Backends: "torch" (reference.byol_loss), "cpu" / "cuda" (cl_fast._C ops cl_fast_C::byol_fwd /
byol_bwd through cl_fast._native, "cuda" where built), "triton" (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1). The custom ops and their autograd: cl_fast/_ops/byol.py.
Every fused backend provides

    byol_fwd(p, z) -> (loss (N,) fp32, stats (N, 3) fp32 = [||p_i||, ||z_i||, omc_i = 1 - cos_i])
    byol_bwd(grad (N,) fp32, p, z, stats, need_dz: bool) -> (dp, dz or (0, D)), in p's dtype
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, _dispatch, reference
from ._ops import byol as ops
from ._ops import reduce_loss

__all__ = ["byol_loss", "BYOLLoss", "NegativeCosineSimilarity"]


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
    loss, _ = ops.byol_fwd(p, z, backend)
    return reduce_loss(loss, reduction)


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
