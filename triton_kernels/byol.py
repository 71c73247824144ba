"""BYOL's regression loss in Triton: loss_i = 2 - 2 cos(p_i, z_i) = ||n(p_i) - n(z_i)||^2.

Row kernels over blocks of rows, looping over D (any D):
1. `_byol_fwd_kernel`: ||p_i||, ||z_i|| and p_i . z_i in one read of the rows (fp32 sums);
   writes loss_i and stats_i = (||p_i||, ||z_i||, cos_i), the three numbers the backward needs.
2. `_byol_bwd_kernel`, upstream g_i, r = 1 / max(||.||, eps):
       dp_i = -2 g_i r_p (r_z z_i - cos_i r_p p_i)      (the second term only when ||p_i|| > eps:
       dz_i = -2 g_i r_z (r_p p_i - cos_i r_z z_i)       a clamped norm makes n(x) = x / eps linear)
   in the input dtype; dz only when NEED_DZ.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["byol_fwd", "byol_bwd", "MAX_DIM"]

MAX_DIM = None  # the D loop has no limit

# D is a tl.constexpr: the interpreter cannot use a runtime int as a range() bound (numpy >= 2.4
# refuses int() of the 1-element array it stores); on a GPU, one compile per feature width.

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_EPS = tl.constexpr(1e-12)


@triton.jit
def _byol_fwd_kernel(p_ptr, z_ptr, loss_ptr, stats_ptr, N, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    base = rows.to(tl.int64) * D
    pp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        p = tl.load(p_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        pp += tl.sum(p * p, 1)
        zz += tl.sum(z * z, 1)
        pz += tl.sum(p * z, 1)
    norm_p = tl.sqrt_rn(pp)
    norm_z = tl.sqrt_rn(zz)
    cos = pz / (tl.maximum(norm_p, _EPS) * tl.maximum(norm_z, _EPS))
    tl.store(loss_ptr + rows, 2.0 - 2.0 * cos, mask=row_mask)
    stat = rows.to(tl.int64) * 3
    tl.store(stats_ptr + stat, norm_p, mask=row_mask)
    tl.store(stats_ptr + stat + 1, norm_z, mask=row_mask)
    tl.store(stats_ptr + stat + 2, cos, mask=row_mask)


@triton.jit
def _byol_bwd_kernel(grad_ptr, p_ptr, z_ptr, stats_ptr, dp_ptr, dz_ptr, N, D: tl.constexpr,
                     NEED_DZ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    base = rows.to(tl.int64) * D
    stat = rows.to(tl.int64) * 3
    norm_p = tl.load(stats_ptr + stat, mask=row_mask, other=1.0)
    norm_z = tl.load(stats_ptr + stat + 1, mask=row_mask, other=1.0)
    cos = tl.load(stats_ptr + stat + 2, mask=row_mask, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    r_p = 1.0 / tl.maximum(norm_p, _EPS)
    r_z = 1.0 / tl.maximum(norm_z, _EPS)
    # dp = a_p z + b_p p, dz = a_z p + b_z z
    a = -2.0 * g * r_p * r_z
    b_p = tl.where(norm_p > _EPS, 2.0 * g * cos * r_p * r_p, 0.0)
    b_z = tl.where(norm_z > _EPS, 2.0 * g * cos * r_z * r_z, 0.0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = base[:, None] + cols[None, :]
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dp = a[:, None] * z + b_p[:, None] * p
        tl.store(dp_ptr + offs, dp.to(dp_ptr.dtype.element_ty), mask=mask)
        if NEED_DZ:
            dz = a[:, None] * p + b_z[:, None] * z
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _blocks(D: int):
    if _INTERPRET:
        return 16, 32
    return 16, min(256, max(16, triton.next_power_of_2(D)))


def byol_fwd(p: torch.Tensor, z: torch.Tensor):
    """-> (loss (N,), stats (N, 3) = [||p||, ||z||, cos]), fp32."""
    p, z = p.contiguous(), z.contiguous()
    N, D = p.shape
    loss = torch.empty((N,), device=p.device, dtype=torch.float32)
    stats = torch.empty((N, 3), device=p.device, dtype=torch.float32)
    block_m, block_d = _blocks(D)
    _byol_fwd_kernel[(triton.cdiv(N, block_m),)](p, z, loss, stats, N, D=D, BLOCK_M=block_m, BLOCK_D=block_d)
    return loss, stats


def byol_bwd(grad: torch.Tensor, p: torch.Tensor, z: torch.Tensor, stats: torch.Tensor, need_dz: bool):
    """-> (dp, dz or an empty (0, D)), in p's dtype: gradients of sum(grad * loss)."""
    p, z = p.contiguous(), z.contiguous()
    N, D = p.shape
    dp = torch.empty_like(p)
    dz = torch.empty_like(z) if need_dz else z.new_empty((0, D))
    block_m, block_d = _blocks(D)
    _byol_bwd_kernel[(triton.cdiv(N, block_m),)](
        grad.contiguous(), p, z, stats.contiguous(), dp, dz if need_dz else dp, N, D=D,
        NEED_DZ=bool(need_dz), BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return dp, dz
