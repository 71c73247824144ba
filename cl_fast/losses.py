"""Public InfoNCE-family losses: functional API and nn.Module wrappers.

Names and defaults follow SPEC.md (and the libraries users come from: lightly's NTXentLoss,
OpenCLIP's ClipLoss). Each function checks its inputs once, picks the backend through
_dispatch.resolve, and either evaluates the reference (backend "torch") or calls the fused
custom op, which owns the autograd.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _checks, _dispatch, reference
from ._ops import infonce as ops
from ._ops import reduce_loss, scale_tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature=0.5, *, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """SimCLR NT-Xent loss of two views (N, D): mean over the 2N rows of cat(z1, z2).

    Row i's positive is the other view of the same sample; its own similarity is excluded.
    `temperature` is a float or a 0-d tensor (a learnable one receives its gradient).
    """
    _checks.check_pair("z1", z1, "z2", z2, min_rows=2)
    _checks.check_positive_scalar("temperature", temperature, z1.device)
    _checks.check_reduction(reduction)
    backend = _dispatch.resolve(backend, z1.device, z1.dtype, z1.shape[1])
    if backend == "torch":
        return reference.nt_xent(z1, z2, temperature, reduction=reduction)
    losses, _ = ops.ntxent_fwd(z1, z2, scale_tensor(temperature, True, z1.device), backend)
    return reduce_loss(losses, reduction)


def _cross(query, key, scale, both, normalize, reduction, backend):
    row_loss, col_loss, _, _ = ops.cross_fwd(query, key, scale, both, normalize, backend)
    per_row = 0.5 * (row_loss + col_loss) if both else row_loss
    return reduce_loss(per_row, reduction)


def info_nce(
    query: Tensor, key: Tensor, temperature=0.1, *, symmetric: bool = False,
    reduction: str = "mean", backend: str = "auto",
) -> Tensor:
    """InfoNCE with positives on the diagonal: row i of `query` against all rows of `key`.

    symmetric=True averages the query->key and key->query directions (the CLIP loss with
    logit_scale = 1/temperature); reduction="none" then returns 0.5 * (row_i + col_i).
    """
    _checks.check_pair("query", query, "key", key, min_rows=2)
    _checks.check_positive_scalar("temperature", temperature, query.device)
    _checks.check_reduction(reduction)
    backend = _dispatch.resolve(backend, query.device, query.dtype, query.shape[1])
    if backend == "torch":
        return reference.info_nce(query, key, temperature, symmetric=symmetric, reduction=reduction)
    scale = scale_tensor(temperature, True, query.device)
    return _cross(query, key, scale, bool(symmetric), True, reduction, backend)


def clip_loss(
    image_features: Tensor, text_features: Tensor, logit_scale, *, normalize: bool = True,
    backend: str = "auto",
) -> Tensor:
    """OpenCLIP's contrastive loss; `logit_scale` is the already-exponentiated scale.

    normalize=False (features used as given, logits unbounded) is evaluated by the reference:
    the fused kernels rely on normalised rows to bound every logit.
    """
    _checks.check_pair("image_features", image_features, "text_features", text_features, min_rows=2)
    _checks.check_positive_scalar("logit_scale", logit_scale, image_features.device)
    if not normalize and backend not in ("auto", "torch"):
        raise ValueError(f"normalize=False is only computed by the reference; use backend='auto' or 'torch', got {backend!r}")
    backend = _dispatch.resolve(backend, image_features.device, image_features.dtype, image_features.shape[1])
    if not normalize:
        backend = "torch"
    if backend == "torch":
        return reference.clip_loss(image_features, text_features, logit_scale, normalize=normalize)
    scale = scale_tensor(logit_scale, False, image_features.device)
    return _cross(image_features, text_features, scale, True, normalize, "mean", backend)


class NTXentLoss(nn.Module):
    """Drop-in for lightly's NTXentLoss(temperature) (memory bank off): loss(z1, z2)."""

    def __init__(self, temperature: float = 0.5, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        _checks.check_positive_scalar("temperature", temperature, torch.device("cpu"))
        _checks.check_reduction(reduction)
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(z1, z2, self.temperature, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"


class InfoNCELoss(nn.Module):
    """loss(query, key) with positives on the diagonal; see info_nce."""

    def __init__(self, temperature: float = 0.1, symmetric: bool = False, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        _checks.check_positive_scalar("temperature", temperature, torch.device("cpu"))
        _checks.check_reduction(reduction)
        self.temperature, self.symmetric, self.reduction, self.backend = temperature, symmetric, reduction, backend

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return info_nce(query, key, self.temperature, symmetric=self.symmetric, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}, backend={self.backend!r}"


class ClipLoss(nn.Module):
    """Drop-in for OpenCLIP's ClipLoss on one process: loss(image_features, text_features, logit_scale)."""

    def __init__(self, normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.normalize, self.backend = normalize, backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, output_dict: bool = False):
        loss = clip_loss(image_features, text_features, logit_scale, normalize=self.normalize, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
