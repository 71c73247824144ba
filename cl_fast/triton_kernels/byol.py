"""BYOL's regression loss in Triton: loss_i = 2 - 2 cos(p_i, z_i) = 2 omc_i, omc = 1 - cos.

Row kernels over blocks of rows, looping over D (any D):
1. `_byol_fwd_kernel`, first loop: ||p_i||, ||z_i|| and p_i . z_i in one read of the rows, on the
   rows scaled by their running max |x| (so no square overflows for any finite input, as
   torch.linalg.vector_norm scales): with a = max_d |p_id| so far, the sum S = sum (p_id / a)^2 is
   rescaled by (a / a')^2 when a chunk raises the max to a'; likewise the cross sum by
   (a_p a_z) / (a_p' a_z'). ||p|| = a_p sqrt(S_p) and cos = S_pz (a_p r_p) (a_z r_z), a r <= 1.
   Second loop (the rows again, from L2), where both norms exceed eps: omc = ||u - v||^2 / 2 with
   u = (p / a_p) / sqrt(S_p), v likewise (no cancellation for nearly aligned rows, where
   1 - cos would keep only fp32's absolute precision ~1e-7 of a loss ~1e-4). Where a norm is
   clamped (n(x) = x / eps, ||n(x)|| < 1), omc = 1 - cos from the first loop: u.v <= ||n(x)|| < 1.
   Writes loss_i = 2 omc_i and stats_i = (||p_i||, ||z_i||, omc_i), the numbers the backward needs.
2. `_byol_bwd_kernel`, upstream g_i, r = 1 / max(||.||, eps), u = r_p p, v = r_z z, with
   v - cos u = (v - u) + omc u (any u, v):
       dp_i = -2 g_i r_p ((v_i - u_i) + omc_p u_i)   omc_p = omc_i, or 1 where ||p_i|| <= eps
       dz_i = -2 g_i r_z ((u_i - v_i) + omc_z v_i)   (a clamped norm makes n(x) = x / eps linear)
   u and v are formed first (r_p r_z alone can underflow for large rows); in the input dtype;
   dz only when NEED_DZ.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["byol_fwd", "byol_bwd", "MAX_DIM", "sm90_specs"]

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
    a_p = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running max |p|, |z|
    a_z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pp = tl.zeros((BLOCK_M,), dtype=tl.float32)   # sum (p / a_p)^2, (z / a_z)^2, (p / a_p)(z / a_z)
    zz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        p = tl.load(p_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        new_a_p = tl.maximum(a_p, tl.max(tl.abs(p), 1))
        new_a_z = tl.maximum(a_z, tl.max(tl.abs(z), 1))
        ratio_p = tl.where(new_a_p > 0, a_p / tl.where(new_a_p > 0, new_a_p, 1.0), 0.0)
        ratio_z = tl.where(new_a_z > 0, a_z / tl.where(new_a_z > 0, new_a_z, 1.0), 0.0)
        # divisions, not reciprocals: 1 / a overflows for a subnormal a
        p = p / tl.where(new_a_p > 0, new_a_p, 1.0)[:, None]
        z = z / tl.where(new_a_z > 0, new_a_z, 1.0)[:, None]
        pp = pp * ratio_p * ratio_p + tl.sum(p * p, 1)
        zz = zz * ratio_z * ratio_z + tl.sum(z * z, 1)
        pz = pz * ratio_p * ratio_z + tl.sum(p * z, 1)
        a_p = new_a_p
        a_z = new_a_z
    norm_p = a_p * tl.sqrt_rn(pp)
    norm_z = a_z * tl.sqrt_rn(zz)
    cos = pz * (a_p / tl.maximum(norm_p, _EPS)) * (a_z / tl.maximum(norm_z, _EPS))
    # u = (p / a_p) / sqrt(S_p) where ||p|| > eps: then a_p >= ||p|| / sqrt(D), so 1 / a_p is finite,
    # and neither factor under- or overflows for any finite row (1 / ||p|| would be subnormal past 2^126)
    unclamped_p = norm_p > _EPS
    unclamped_z = norm_z > _EPS
    inv_a_p = 1.0 / tl.where(unclamped_p, a_p, 1.0)
    inv_a_z = 1.0 / tl.where(unclamped_z, a_z, 1.0)
    inv_s_p = 1.0 / tl.where(unclamped_p, tl.sqrt_rn(pp), 1.0)
    inv_s_z = 1.0 / tl.where(unclamped_z, tl.sqrt_rn(zz), 1.0)
    dist = tl.zeros((BLOCK_M,), dtype=tl.float32)  # ||u - v||^2
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        p = tl.load(p_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        diff = (p * inv_a_p[:, None]) * inv_s_p[:, None] - (z * inv_a_z[:, None]) * inv_s_z[:, None]
        dist += tl.sum(diff * diff, 1)
    omc = tl.where(unclamped_p & unclamped_z, 0.5 * dist, 1.0 - cos)
    tl.store(loss_ptr + rows, 2.0 * omc, mask=row_mask)
    stat = rows.to(tl.int64) * 3
    tl.store(stats_ptr + stat, norm_p, mask=row_mask)
    tl.store(stats_ptr + stat + 1, norm_z, mask=row_mask)
    tl.store(stats_ptr + stat + 2, omc, mask=row_mask)


@triton.jit
def _byol_bwd_kernel(grad_ptr, p_ptr, z_ptr, stats_ptr, dp_ptr, dz_ptr, N, D: tl.constexpr,
                     NEED_DZ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    base = rows.to(tl.int64) * D
    stat = rows.to(tl.int64) * 3
    norm_p = tl.load(stats_ptr + stat, mask=row_mask, other=1.0)
    norm_z = tl.load(stats_ptr + stat + 1, mask=row_mask, other=1.0)
    omc = tl.load(stats_ptr + stat + 2, mask=row_mask, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    r_p = 1.0 / tl.maximum(norm_p, _EPS)
    r_z = 1.0 / tl.maximum(norm_z, _EPS)
    # dp = c_p ((v - u) + omc_p u), dz = c_z ((u - v) + omc_z v), omc_x = 1 where x's norm is clamped
    c_p = -2.0 * g * r_p
    c_z = -2.0 * g * r_z
    omc_p = tl.where(norm_p > _EPS, omc, 1.0)
    omc_z = tl.where(norm_z > _EPS, omc, 1.0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = base[:, None] + cols[None, :]
        u = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32) * r_p[:, None]
        v = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32) * r_z[:, None]
        dp = c_p[:, None] * ((v - u) + omc_p[:, None] * u)
        tl.store(dp_ptr + offs, dp.to(dp_ptr.dtype.element_ty), mask=mask)
        if NEED_DZ:
            dz = c_z[:, None] * ((u - v) + omc_z[:, None] * v)
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _blocks(D: int, forward: bool = False, interpret: bool = _INTERPRET):
    """(BLOCK_M, BLOCK_D) on a GPU (the interpreter: small blocks). The forward keeps its (p, z) tile live across its two loops over D (one
    chunk at D <= 256): 8 rows per program hold it to ~110 registers on sm_90 (16 rows: 255)."""
    if interpret:
        return 16, 32
    return (8 if forward else 16), min(256, max(16, triton.next_power_of_2(D)))


def byol_fwd(p: torch.Tensor, z: torch.Tensor):
    """-> (loss (N,), stats (N, 3) = [||p||, ||z||, omc = 1 - cos]), fp32."""
    p, z = p.contiguous(), z.contiguous()
    N, D = p.shape
    loss = torch.empty((N,), device=p.device, dtype=torch.float32)
    stats = torch.empty((N, 3), device=p.device, dtype=torch.float32)
    block_m, block_d = _blocks(D, forward=True)
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


def sm90_specs():
    """Offline sm_90 compile specs (benchmarks/ptx_table.py, tests/test_triton_sm90.py): the forward
    and the backward (with and without dz) at BYOL's projection width D = 256, bf16, the GPU block
    sizes of _blocks. Dicts with name, fn, signature, constexprs, num_warps, num_stages, config,
    no_atomics."""
    D = 256
    fwd_signature = {"p_ptr": "*bf16", "z_ptr": "*bf16", "loss_ptr": "*fp32", "stats_ptr": "*fp32", "N": "i32"}
    bwd_signature = {"grad_ptr": "*fp32", "p_ptr": "*bf16", "z_ptr": "*bf16", "stats_ptr": "*fp32",
                     "dp_ptr": "*bf16", "dz_ptr": "*bf16", "N": "i32"}

    def blocks(forward):
        block_m, block_d = _blocks(D, forward, interpret=False)
        return {"D": D, "BLOCK_M": block_m, "BLOCK_D": block_d}, f"BLOCK_M={block_m} BLOCK_D={block_d} w=4 s=3"

    fwd_blocks, fwd_config = blocks(True)
    bwd_blocks, config = blocks(False)
    specs = [("byol_fwd[bf16,D=256]", _byol_fwd_kernel, fwd_signature, fwd_blocks, fwd_config)]
    for need_dz in (False, True):
        specs.append(("byol_bwd[bf16,D=256]", _byol_bwd_kernel, bwd_signature, dict(bwd_blocks, NEED_DZ=need_dz),
                      f"NEED_DZ={need_dz} {config}"))
    return [
        dict(name=name, fn=fn, signature=dict(signature, **{key: "constexpr" for key in constexprs}),
             constexprs=constexprs, num_warps=4, num_stages=3, config=config, no_atomics=True)
        for name, fn, signature, constexprs, config in specs
    ]
