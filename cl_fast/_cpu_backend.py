"""CPU backend: the fused C++ kernels of csrc/cpu (torch.ops.cl_fast_C), DESIGN.md's interface.

Importing this module loads cl_fast._C, which registers the ops; it raises ImportError where
the extension was not built. Inputs are checked in csrc/bindings.cpp (ValueError / TypeError
naming the argument). No limit on the feature dimension D (MAX_DIM = None).
"""
from __future__ import annotations

import torch

from cl_fast import _C  # noqa: F401  (loads the library: registers torch.ops.cl_fast_C.*)

MAX_DIM = None

_ops = torch.ops.cl_fast_C


def ntxent_fwd(z1: torch.Tensor, z2: torch.Tensor, scale: float):
    """-> (loss (2N,), lse (2N,)), fp32."""
    return _ops.ntxent_fwd(z1, z2, float(scale))


def ntxent_bwd(grad: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, scale: float, lse: torch.Tensor):
    """-> (dz1, dz2, dscale): gradients of sum(grad * loss); dscale is 0-d fp32 (dL/dscale)."""
    return _ops.ntxent_bwd(grad, z1, z2, float(scale), lse)


def cross_fwd(q: torch.Tensor, k: torch.Tensor, scale: float, both: bool):
    """-> (row_loss (N,), col_loss (N,) or (0,), row_lse (N,), col_lse (N,) or (0,)), fp32."""
    return _ops.cross_fwd(q, k, float(scale), bool(both))


def cross_bwd(grad_row, grad_col, q, k, scale: float, row_lse, col_lse, both: bool):
    """-> (dq, dk, dscale): gradients of sum(grad_row * row_loss + grad_col * col_loss)."""
    return _ops.cross_bwd(grad_row, grad_col, q, k, float(scale), row_lse, col_lse, bool(both))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise x / max(||x||_2, 1e-12), fp32 compute, x's dtype (CPU; CUDA where built with it)."""
    return _ops.l2_normalize(x)


# ---------------------------------------------------------------- MoCo, BYOL, SwAV Sinkhorn
def moco_fwd(q, k, queue, scale: float, need_grad: bool):
    """-> (loss (N,), e (N, D) or (0, D), c (N,) or (0,)), fp32; see cl_fast/moco.py."""
    return _ops.moco_fwd(q, k, queue, float(scale), bool(need_grad))


def queue_update_(queue, keys, ptr):
    """Writes n(keys) into queue rows ptr, ptr+1, ... (mod K) in place; advances a tensor ptr."""
    return _ops.moco_queue_update_(queue, keys, ptr)


def byol_fwd(p, z):
    """-> (loss (N,), stats (N, 3)), fp32."""
    return _ops.byol_fwd(p, z)


def byol_bwd(grad, p, z, stats, need_dz: bool):
    """-> (dp, dz), dz is (0, D) unless need_dz."""
    return _ops.byol_bwd(grad, p, z, stats, bool(need_dz))


def sinkhorn(scores, inv_epsilon: float, iterations: int):
    """The fused single-process SwAV assignment, (B, K) fp32."""
    return _ops.sinkhorn(scores, float(inv_epsilon), int(iterations))


def sinkhorn_col_lse(scores, inv_epsilon: float, f):
    """Per-sample (max, sum) of one log-domain half step; see cl_fast/swav.py."""
    return _ops.sinkhorn_col_lse(scores, float(inv_epsilon), f)


def sinkhorn_assign(scores, inv_epsilon: float, f):
    """The final (B, K) fp32 assignment from the prototype scaling f."""
    return _ops.sinkhorn_assign(scores, float(inv_epsilon), f)


# ---------------------------------------------------------------- SigLIP
def siglip_fwd(x, y, scale, bias):
    """-> row_loss (N,) fp32; scale and bias are 0-d fp32 CPU tensors."""
    return _ops.siglip_fwd(x, y, scale, bias)


def siglip_bwd(grad, x, y, scale, bias):
    """-> (dx, dy, dscale, dbias): gradients of sum(grad * row_loss); dscale, dbias 0-d fp32."""
    return _ops.siglip_bwd(grad, x, y, scale, bias)
