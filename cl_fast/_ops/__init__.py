"""The fused losses as torch.library custom ops: one module per op family, shared helpers here.

Every family module (infonce, moco, byol, sinkhorn, and siglip) follows one pattern:

- a custom op per computation (`define`), taking the concrete backend name ("cpu", "cuda",
  "triton") as its last argument and forwarding to that backend's launchers
  (`_dispatch.module(backend, family)`: cl_fast._native for cpu/cuda, cl_fast.triton_kernels.<family>);
- a fake implementation (shapes only) per op, so torch.compile traces them without graph breaks;
- the autograd formula on the forward op: its backward is itself a custom op (or, for MoCo, an
  O(N D) scaling of what the forward stored), and a second derivative raises (`no_double_backward`).

The public modules (cl_fast/losses.py, moco.py, byol.py, swav.py, siglip.py) check the inputs,
resolve the backend, and call these ops; nothing here checks user input again.

The scale s (1/temperature, or clip's logit_scale) reaches every op as a 0-d fp32 tensor on the
inputs' device (`scale_tensor`), and no op reads its value on the host: the kernels load it on
their device, so a step never waits for the device and can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import reduce_loss  # noqa: F401  (the one reduction; the reference shares it)

# op name ("cl_fast::<name>") -> its plain Python implementation (tests run it inline, under a
# TorchDispatchMode, to see every allocation it makes)
IMPLEMENTATIONS = {}


def define(name: str, impl, mutates_args=()):
    """Register `impl` (fully type-annotated) as the custom op cl_fast::<name>."""
    qualname = f"cl_fast::{name}"
    IMPLEMENTATIONS[qualname] = impl
    return torch.library.custom_op(qualname, impl, mutates_args=mutates_args)


def scale_tensor(value, reciprocal: bool, device: torch.device) -> Tensor:
    """The scale s the kernels multiply by, as a 0-d fp32 tensor on `device`.

    `value` is a Python number or a 0-d tensor (a learnable temperature keeps its autograd link
    to s); `reciprocal` gives s = 1 / value. A number becomes a device-side fill (no host-to-device
    copy); a tensor is converted with tensor ops only, never read on the host.
    """
    if isinstance(value, Tensor):
        scale = value.reshape(()).to(device=device, dtype=torch.float32)
        return torch.reciprocal(scale) if reciprocal else scale
    return torch.full((), 1.0 / value if reciprocal else value, dtype=torch.float32, device=device)


def fp32(shape, like: Tensor) -> Tensor:
    """An uninitialised fp32 tensor of `shape` on like's device (fake implementations)."""
    return like.new_empty(shape, dtype=torch.float32)


def as_fp32(grad: Tensor | None, like: Tensor) -> Tensor:
    """An upstream gradient as a contiguous fp32 tensor (zeros where autograd passed None)."""
    if grad is None:
        return torch.zeros_like(like, dtype=torch.float32)
    return grad.to(torch.float32).contiguous()


class _DoubleBackwardError(torch.autograd.Function):
    """Passes first-order gradients through; differentiating them again raises.

    The fused backwards are not themselves differentiable (they recompute from saved rows, or
    scale a direction the forward stored), so a gradient of the gradient would be silently wrong.
    """

    @staticmethod
    def forward(ctx, op_name, num_grads, *tensors):
        ctx.op_name = op_name
        return tuple(t.clone() for t in tensors[:num_grads])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"{ctx.op_name}: double backward (differentiating its gradient, e.g. after "
            "torch.autograd.grad(..., create_graph=True)) is not supported by the fused kernels; "
            "use backend='torch' for higher-order derivatives"
        )


def no_double_backward(op_name: str, grads: tuple, inputs: tuple) -> tuple:
    """The gradients `grads` (None entries allowed) of a fused backward, guarded against a second
    differentiation. Only when the backward runs with create_graph=True (grad mode on): the
    gradients are then tied to the differentiable `inputs`, so any use of their own gradient
    reaches _DoubleBackwardError and raises, instead of a silent zero or a wrong number.
    """
    if not torch.is_grad_enabled():
        return grads
    anchors = tuple(t for t in inputs if isinstance(t, Tensor) and t.requires_grad)
    present = [i for i, g in enumerate(grads) if g is not None]
    if not anchors or not present:
        return grads
    guarded = _DoubleBackwardError.apply(op_name, len(present), *(grads[i] for i in present), *anchors)
    out = list(grads)
    for i, g in zip(present, guarded):
        out[i] = g
    return tuple(out)
