"""The native backends, "cpu" and "cuda": the C++ / CUDA kernels of cl_fast._C (torch.ops.cl_fast_C).

One module serves both devices: the ops are defined once (csrc/ops.cpp) and the dispatcher picks
the CPU kernel (csrc/cpu/<family>.cpp) or the CUDA kernel (csrc/cuda/<family>.cu) from the
inputs' device. `has_kernels(family, device_type)` says whether the build registered that
family's kernels for the device (CUDA only where the extension was built with CUDA); _dispatch
lists a backend only where it does.

Importing this module loads cl_fast._C; it raises ImportError where the extension was not built.
Inputs are checked in csrc/ops.cpp (ValueError / TypeError naming the argument). `scale` is a 0-d
fp32 tensor on the inputs' device, passed through as it is. No limit on D (MAX_DIM = None).
"""
from __future__ import annotations

import torch

from cl_fast import _C  # noqa: F401  (loads the library: registers torch.ops.cl_fast_C.*)

MAX_DIM = None

_ops = torch.ops.cl_fast_C

# family -> one op of it, whose registration stands for the family's
_FAMILY_OP = {
    "infonce": "ntxent_fwd",
    "moco": "moco_fwd",
    "byol": "byol_fwd",
    "sinkhorn": "sinkhorn",
    "siglip": "siglip_fwd",
}
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernels(family: str, device_type: str) -> bool:
    """Whether cl_fast._C registered `family`'s kernels for `device_type` ("cpu" or "cuda")."""
    key = _DISPATCH_KEY.get(device_type)
    if key is None or family not in _FAMILY_OP:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cl_fast_C::{_FAMILY_OP[family]}", key)


# ---------------------------------------------------------------- InfoNCE family
def ntxent_fwd(z1, z2, scale):
    """-> (loss (2N,), lse (2N,)), fp32."""
    return _ops.ntxent_fwd(z1, z2, scale)


def ntxent_bwd(grad, z1, z2, scale, lse):
    """-> (dz1, dz2, dscale): gradients of sum(grad * loss); dscale is 0-d fp32 (dL/dscale)."""
    return _ops.ntxent_bwd(grad, z1, z2, scale, lse)


def cross_fwd(q, k, scale, both: bool, normalize: bool):
    """-> (row_loss (N,), col_loss (N,) or (0,), row_lse (N,), col_lse (N,) or (0,)), fp32."""
    return _ops.cross_fwd(q, k, scale, bool(both), bool(normalize))


def cross_bwd(grad_row, grad_col, q, k, scale, row_lse, col_lse, both: bool, normalize: bool):
    """-> (dq, dk, dscale): gradients of sum(grad_row * row_loss + grad_col * col_loss)."""
    return _ops.cross_bwd(grad_row, grad_col, q, k, scale, row_lse, col_lse, bool(both), bool(normalize))


def block_fwd(rows, cols, scale, diag: int, pairs: bool):
    """-> lse (M,) fp32: each row's log-sum-exp over the slice's columns (block piece, _ops/infonce.py)."""
    return _ops.infonce_block_fwd(rows, cols, scale, int(diag), bool(pairs))


def block_bwd(grad, rows, cols, scale, lse, diag: int, pairs: bool):
    """-> (drows, dcols, dscale) fp32: gradients of sum(grad * lse) through this slice's terms."""
    return _ops.infonce_block_bwd(grad, rows, cols, scale, lse, int(diag), bool(pairs))


# ---------------------------------------------------------------- MoCo, BYOL, SwAV Sinkhorn, SigLIP
def moco_fwd(q, k, queue, scale, need_grad: bool):
    """-> (loss (N,), e (N, D) or (0, D), c (N,) or (0,)), fp32; see cl_fast/_ops/moco.py."""
    return _ops.moco_fwd(q, k, queue, scale, bool(need_grad))


def queue_update_(queue, keys, ptr):
    """Writes n(keys) into queue rows ptr, ptr+1, ... (mod K) in place; advances the tensor ptr."""
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
    """Per-prototype (max, sum) of one log-domain half step; see cl_fast/_ops/sinkhorn.py."""
    return _ops.sinkhorn_col_lse(scores, float(inv_epsilon), f)


def sinkhorn_assign(scores, inv_epsilon: float, f):
    """The final (B, K) fp32 assignment from the prototype scaling f."""
    return _ops.sinkhorn_assign(scores, float(inv_epsilon), f)


def siglip_fwd(x, y, scale, bias):
    """-> row_loss (N,) fp32: sum_j softplus(-z_ij (s x_i.y_j + b)), z = 2I - 1."""
    return _ops.siglip_fwd(x, y, scale, bias)


def siglip_bwd(grad, x, y, scale, bias):
    """-> (dx, dy, dscale, dbias): gradients of sum(grad * row_loss)."""
    return _ops.siglip_bwd(grad, x, y, scale, bias)
