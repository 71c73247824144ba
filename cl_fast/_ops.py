"""The fused losses as torch.library custom ops.

Each op takes the concrete backend name as a string argument and forwards to that backend's
module (see _dispatch.py), so there is one op per computation whatever runs it. Every op has a
fake implementation (shapes only) for torch.compile, and the forward ops carry their autograd
formula: the backward is itself a custom op that recomputes the similarity tiles from the
inputs and the stored fp32 log-sum-exp.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch


# op name -> its plain Python implementation (tests run it inline to see every allocation)
IMPLEMENTATIONS = {}


def define(name: str, impl):
    """Register `impl` (fully type-annotated, no mutation) as the custom op cl_fast::<name>."""
    qualname = f"cl_fast::{name}"
    IMPLEMENTATIONS[qualname] = impl
    return torch.library.custom_op(qualname, impl, mutates_args=())


def _scale_value(scale: Tensor) -> float:
    return float(scale.detach())


def _fp32(shape, like: Tensor) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


def _as_fp32(grad: Tensor | None, like: Tensor) -> Tensor:
    if grad is None:
        return torch.zeros_like(like, dtype=torch.float32)
    return grad.to(torch.float32).contiguous()


# ---------------------------------------------------------------- nt_xent (symmetric, 2N rows)
def _ntxent_fwd_impl(z1: Tensor, z2: Tensor, scale: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Per-row losses (2N,) and row log-sum-exp (2N,), both fp32."""
    return _dispatch.module(backend).ntxent_fwd(z1.contiguous(), z2.contiguous(), _scale_value(scale))


ntxent_fwd = define("ntxent_fwd", _ntxent_fwd_impl)


@ntxent_fwd.register_fake
def _(z1, z2, scale, backend):
    rows = 2 * z1.shape[0]
    return _fp32((rows,), z1), _fp32((rows,), z1)


def _ntxent_bwd_impl(
    grad: Tensor, z1: Tensor, z2: Tensor, scale: Tensor, lse: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dz1, dz2, dL/dscale) for upstream per-row grads `grad`."""
    dz1, dz2, dscale = _dispatch.module(backend).ntxent_bwd(
        grad.contiguous(), z1.contiguous(), z2.contiguous(), _scale_value(scale), lse.contiguous()
    )
    return dz1, dz2, dscale.to(scale.device)


ntxent_bwd = define("ntxent_bwd", _ntxent_bwd_impl)


@ntxent_bwd.register_fake
def _(grad, z1, z2, scale, lse, backend):
    return torch.empty_like(z1), torch.empty_like(z2), _fp32((), scale)


def _ntxent_setup(ctx, inputs, output):
    z1, z2, scale, backend = inputs
    ctx.save_for_backward(z1, z2, scale, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _ntxent_backward(ctx, grad_loss, _grad_lse):
    z1, z2, scale, lse = ctx.saved_tensors
    dz1, dz2, dscale = ntxent_bwd(_as_fp32(grad_loss, lse), z1, z2, scale, lse, ctx.backend)
    return dz1, dz2, dscale.to(scale.dtype), None


ntxent_fwd.register_autograd(_ntxent_backward, setup_context=_ntxent_setup)


# ----------------------------------------------- info_nce / clip (cross, N x N, diagonal positives)
def _cross_fwd_impl(
    q: Tensor, k: Tensor, scale: Tensor, both: bool, normalize: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_loss, col_loss, row_lse, col_lse), fp32; the col_* are empty (0,) when not `both`.
    normalize=False uses the rows as given (clip_loss's OpenCLIP convention)."""
    # TODO(merge): oplayer's op layer passes `normalize` always; today's launchers predate it, so
    # it is passed only when False (the launchers of the triton / cpufix branches take it).
    extra = () if normalize else (False,)
    return _dispatch.module(backend).cross_fwd(q.contiguous(), k.contiguous(), _scale_value(scale), both, *extra)


cross_fwd = define("cross_fwd", _cross_fwd_impl)


@cross_fwd.register_fake
def _(q, k, scale, both, normalize, backend):
    cols = q.shape[0] if both else 0
    return _fp32((q.shape[0],), q), _fp32((cols,), q), _fp32((q.shape[0],), q), _fp32((cols,), q)


def _cross_bwd_impl(
    grad_row: Tensor, grad_col: Tensor, q: Tensor, k: Tensor, scale: Tensor,
    row_lse: Tensor, col_lse: Tensor, both: bool, normalize: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dL/dscale)."""
    dq, dk, dscale = _dispatch.module(backend).cross_bwd(
        grad_row.contiguous(), grad_col.contiguous(), q.contiguous(), k.contiguous(),
        _scale_value(scale), row_lse.contiguous(), col_lse.contiguous(), both, *(() if normalize else (False,)),
    )
    return dq, dk, dscale.to(scale.device)


cross_bwd = define("cross_bwd", _cross_bwd_impl)


@cross_bwd.register_fake
def _(grad_row, grad_col, q, k, scale, row_lse, col_lse, both, normalize, backend):
    return torch.empty_like(q), torch.empty_like(k), _fp32((), scale)


def _cross_setup(ctx, inputs, output):
    q, k, scale, both, normalize, backend = inputs
    ctx.save_for_backward(q, k, scale, output[2], output[3])
    ctx.both, ctx.normalize, ctx.backend = both, normalize, backend
    ctx.mark_non_differentiable(output[2], output[3])


def _cross_backward(ctx, grad_row, grad_col, _grad_row_lse, _grad_col_lse):
    q, k, scale, row_lse, col_lse = ctx.saved_tensors
    dq, dk, dscale = cross_bwd(
        _as_fp32(grad_row, row_lse), _as_fp32(grad_col, col_lse), q, k, scale,
        row_lse, col_lse, ctx.both, ctx.normalize, ctx.backend,
    )
    return dq, dk, dscale.to(scale.dtype), None, None, None


cross_fwd.register_autograd(_cross_backward, setup_context=_cross_setup)
