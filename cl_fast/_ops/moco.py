"""MoCo custom ops: moco_fwd (loss against a key queue, with the gradient direction) and the
in-place ring-buffer enqueue queue_update_.

moco_fwd never builds the N x (1 + K) logits. When a gradient is wanted the forward also
accumulates o_i = sum_j P_ij w_j (flash attention's P @ V) and returns the gradient direction
e (N, D) and the temperature term c (N,) (cl_fast/triton_kernels/moco.py and csrc/cpu/moco.cpp hold the
math); the upstream gradient is one scalar per row, so the backward is the O(N D) scaling
dq = (g s)[:, None] * e, dL/ds = sum g c: no second pass over the queue. The queue is not saved
for backward, so enqueueing into it between the loss and its backward is fine (MoCo's order).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from . import define, fp32, no_double_backward


def _launchers(backend: str):
    return _dispatch.module(backend, "moco")


def _moco_fwd_impl(
    q: Tensor, k: Tensor, queue: Tensor, scale: Tensor, need_grad: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss (N,), e (N, D), c (N,)), fp32; e and c are empty ((0, D), (0,)) without need_grad."""
    return tuple(_launchers(backend).moco_fwd(q.contiguous(), k.contiguous(), queue.contiguous(), scale, need_grad))


moco_fwd = define("moco_fwd", _moco_fwd_impl)


@moco_fwd.register_fake
def _(q, k, queue, scale, need_grad, backend):
    rows = q.shape[0] if need_grad else 0
    return fp32((q.shape[0],), q), fp32((rows, q.shape[1]), q), fp32((rows,), q)


def _moco_setup(ctx, inputs, output):
    q, _k, _queue, scale, need_grad, _backend = inputs
    _, e, c = output
    ctx.save_for_backward(q, e, c, scale)
    ctx.need_grad = need_grad
    ctx.mark_non_differentiable(e, c)


def _moco_backward(ctx, grad_loss, _grad_e, _grad_c):
    if not ctx.need_grad:
        raise RuntimeError(
            "moco_loss ran its forward without gradient tracking (need_grad=False); "
            "call it with grad enabled and q (or the temperature) requiring grad"
        )
    q, e, c, scale = ctx.saved_tensors
    with torch.no_grad():
        g = grad_loss.to(torch.float32)
        dq = ((g * scale)[:, None] * e).to(q.dtype)
        dscale = (g * c).sum()
    dq, dscale = no_double_backward("moco_loss", (dq, dscale), (grad_loss, q, scale))
    return dq, None, None, dscale, None, None


moco_fwd.register_autograd(_moco_backward, setup_context=_moco_setup)


def _queue_update_impl(queue: Tensor, keys: Tensor, ptr: Tensor, backend: str) -> None:
    """queue[(ptr + b) % K] = n(keys_b) (queue's dtype); ptr <- (ptr + B) % K. Both in place."""
    _launchers(backend).queue_update_(queue, keys.contiguous(), ptr)


queue_update_ = define("queue_update_", _queue_update_impl, mutates_args=("queue", "ptr"))


@queue_update_.register_fake
def _(queue, keys, ptr, backend):
    return None
