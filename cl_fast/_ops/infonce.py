"""InfoNCE-family custom ops: nt_xent (ntxent_fwd / ntxent_bwd) and the cross losses info_nce /
clip_loss (cross_fwd / cross_bwd), with their fake implementations and autograd.

The backward recomputes the similarity tiles from the inputs and the stored fp32 log-sum-exp
(DESIGN.md); nothing of size N x N is kept. `scale` is the 0-d fp32 device tensor of
_ops.scale_tensor and is handed to the backend as it is.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from . import as_fp32, define, fp32, no_double_backward


def _launchers(backend: str):
    return _dispatch.module(backend, "infonce")


# ---------------------------------------------------------------- nt_xent (symmetric, 2N rows)
def _ntxent_fwd_impl(z1: Tensor, z2: Tensor, scale: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Per-row losses (2N,) and row log-sum-exp (2N,), both fp32."""
    return tuple(_launchers(backend).ntxent_fwd(z1.contiguous(), z2.contiguous(), scale))


ntxent_fwd = define("ntxent_fwd", _ntxent_fwd_impl)


@ntxent_fwd.register_fake
def _(z1, z2, scale, backend):
    rows = 2 * z1.shape[0]
    return fp32((rows,), z1), fp32((rows,), z1)


def _ntxent_bwd_impl(
    grad: Tensor, z1: Tensor, z2: Tensor, scale: Tensor, lse: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dz1, dz2, dL/dscale) for upstream per-row grads `grad`."""
    return tuple(
        _launchers(backend).ntxent_bwd(grad.contiguous(), z1.contiguous(), z2.contiguous(), scale, lse.contiguous())
    )


ntxent_bwd = define("ntxent_bwd", _ntxent_bwd_impl)


@ntxent_bwd.register_fake
def _(grad, z1, z2, scale, lse, backend):
    return torch.empty_like(z1), torch.empty_like(z2), fp32((), scale)


def _ntxent_setup(ctx, inputs, output):
    z1, z2, scale, backend = inputs
    ctx.save_for_backward(z1, z2, scale, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _ntxent_backward(ctx, grad_loss, _grad_lse):
    z1, z2, scale, lse = ctx.saved_tensors
    with torch.no_grad():
        dz1, dz2, dscale = ntxent_bwd(as_fp32(grad_loss, lse), z1, z2, scale, lse, ctx.backend)
    dz1, dz2, dscale = no_double_backward("nt_xent", (dz1, dz2, dscale), (grad_loss, z1, z2, scale))
    return dz1, dz2, dscale, None


ntxent_fwd.register_autograd(_ntxent_backward, setup_context=_ntxent_setup)


# ----------------------------------------------- info_nce / clip (cross, N x N, diagonal positives)
def _cross_fwd_impl(
    q: Tensor, k: Tensor, scale: Tensor, both: bool, normalize: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_loss, col_loss, row_lse, col_lse), fp32; the col_* are empty (0,) when not `both`.
    normalize=False uses the rows as given (OpenCLIP's ClipLoss) instead of n(q), n(k)."""
    return tuple(_launchers(backend).cross_fwd(q.contiguous(), k.contiguous(), scale, both, normalize))


cross_fwd = define("cross_fwd", _cross_fwd_impl)


@cross_fwd.register_fake
def _(q, k, scale, both, normalize, backend):
    cols = q.shape[0] if both else 0
    return fp32((q.shape[0],), q), fp32((cols,), q), fp32((q.shape[0],), q), fp32((cols,), q)


def _cross_bwd_impl(
    grad_row: Tensor, grad_col: Tensor, q: Tensor, k: Tensor, scale: Tensor,
    row_lse: Tensor, col_lse: Tensor, both: bool, normalize: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dL/dscale)."""
    return tuple(_launchers(backend).cross_bwd(
        grad_row.contiguous(), grad_col.contiguous(), q.contiguous(), k.contiguous(),
        scale, row_lse.contiguous(), col_lse.contiguous(), both, normalize,
    ))


cross_bwd = define("cross_bwd", _cross_bwd_impl)


@cross_bwd.register_fake
def _(grad_row, grad_col, q, k, scale, row_lse, col_lse, both, normalize, backend):
    return torch.empty_like(q), torch.empty_like(k), fp32((), scale)


def _cross_setup(ctx, inputs, output):
    q, k, scale, both, normalize, backend = inputs
    ctx.save_for_backward(q, k, scale, output[2], output[3])
    ctx.both, ctx.normalize, ctx.backend = both, normalize, backend
    ctx.mark_non_differentiable(output[2], output[3])


def _cross_backward(ctx, grad_row, grad_col, _grad_row_lse, _grad_col_lse):
    q, k, scale, row_lse, col_lse = ctx.saved_tensors
    with torch.no_grad():
        dq, dk, dscale = cross_bwd(
            as_fp32(grad_row, row_lse), as_fp32(grad_col, col_lse), q, k, scale,
            row_lse, col_lse, ctx.both, ctx.normalize, ctx.backend,
        )
    dq, dk, dscale = no_double_backward(
        "info_nce / clip_loss", (dq, dk, dscale), (grad_row, grad_col, q, k, scale)
    )
    return dq, dk, dscale, None, None, None


cross_fwd.register_autograd(_cross_backward, setup_context=_cross_setup)


# ------------------------------------- block pieces: rows against one slice of columns (distributed)
# S = scale * rows cols^T on the features AS GIVEN (the caller normalises), row i's self / positive
# columns excluded as reference.infonce_block_excluded says (diag, pairs). The forward gives each
# row's log-sum-exp over the slice; slices merge with torch.logaddexp. The backward takes the
# merged lse and the upstream gradient of it and returns fp32 (drows, dcols, dscale) of this slice.
# No autograd here: cl_fast/distributed.py composes the pieces and owns the gradient.
def _block_fwd_impl(rows: Tensor, cols: Tensor, scale: Tensor, diag: int, pairs: bool, backend: str) -> Tensor:
    """(M,) fp32 log-sum-exp of each row over the slice's columns that are not excluded."""
    return _launchers(backend).block_fwd(rows.contiguous(), cols.contiguous(), scale, int(diag), bool(pairs))


infonce_block_fwd = define("infonce_block_fwd", _block_fwd_impl)


@infonce_block_fwd.register_fake
def _(rows, cols, scale, diag, pairs, backend):
    return fp32((rows.shape[0],), rows)


def _block_bwd_impl(
    grad: Tensor, rows: Tensor, cols: Tensor, scale: Tensor, lse: Tensor, diag: int, pairs: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(drows (M, D), dcols (C, D), dscale ()) fp32: gradients of sum_i grad_i lse_i through this slice."""
    return tuple(_launchers(backend).block_bwd(
        grad.contiguous(), rows.contiguous(), cols.contiguous(), scale, lse.contiguous(), int(diag), bool(pairs)
    ))


infonce_block_bwd = define("infonce_block_bwd", _block_bwd_impl)


@infonce_block_bwd.register_fake
def _(grad, rows, cols, scale, lse, diag, pairs, backend):
    return fp32(tuple(rows.shape), rows), fp32(tuple(cols.shape), cols), fp32((), scale)
