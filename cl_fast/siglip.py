"""SigLIP: OpenCLIP's sigmoid loss (`siglip_loss`, `SigLipLoss`), fused on every backend.

loss = -sum_ij logsigmoid(z_ij (s x_i . y_j + b)) / N, z = 2 eye(N) - 1 (SPEC.md), features as
given (OpenCLIP's model normalises them). This is the loss whose N x N logits cost most memory in
OpenCLIP (one logits tensor, one labels tensor, the logsigmoid and its gradient: four N x N
buffers); the fused backends keep none: the forward sums each row's softplus terms tile by tile,
the backward recomputes the tiles (cl_fast/_ops/siglip.py, csrc/cpu/siglip.cpp,
cl_fast/triton_kernels/siglip.py). Gradients flow into both features, `logit_scale` and `logit_bias`.
"""
from __future__ import annotations


import torch
from torch import Tensor, nn

from . import _checks, _dispatch, reference
from ._ops import scale_tensor
from ._ops.siglip import siglip_fwd

__all__ = ["siglip_loss", "SigLipLoss"]

_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def siglip_loss(
    image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, *, backend: str = "auto"
) -> Tensor:
    """OpenCLIP's SigLipLoss on one process: -sum_ij logsigmoid(z_ij (s I_i . T_j + b)) / N.

    image_features, text_features: (N, D), used as given. logit_scale: the already-exponentiated
    scale s > 0; logit_bias: b (None means 0). Each is a float or a 0-d tensor; tensors that
    require grad receive their gradient. Returns the fp32 loss (float64 inputs: the reference).
    """
    _checks.check_pair("image_features", image_features, "text_features", text_features)
    device = image_features.device
    _checks.check_positive_scalar("logit_scale", logit_scale, device)
    _checks.check_finite_scalar("logit_bias", logit_bias, device)
    backend = _dispatch.resolve(backend, device, image_features.dtype, image_features.shape[1], op="siglip")
    if backend == "torch":
        return reference.siglip_loss(image_features, text_features, logit_scale, logit_bias)
    scale = scale_tensor(logit_scale, False, device)
    bias = scale_tensor(0.0 if logit_bias is None else logit_bias, False, device)
    return siglip_fwd(image_features, text_features, scale, bias, backend).sum() / image_features.shape[0]


class SigLipLoss(nn.Module):
    """Drop-in for OpenCLIP's SigLipLoss (one process): loss(image_features, text_features, logit_scale, logit_bias).

    Arguments in OpenCLIP's order. `cache_labels` is accepted and has nothing to cache (no labels
    tensor exists); `chunk_size` likewise (the fused kernels never build the logits).
    world_size > 1 needs the distributed exchange, not implemented yet: NotImplementedError.
    """

    def __init__(
        self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None,
        chunk_size: int = 0, *, backend: str = "auto",
    ):
        super().__init__()
        _checks.check_world("SigLipLoss", rank, world_size)
        if dist_impl is not None and dist_impl not in _DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {_DIST_IMPLS}, got {dist_impl!r}")
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = dist_impl or "bidir"
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, output_dict: bool = False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}"
