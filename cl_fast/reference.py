"""Pure-PyTorch reference: SPEC.md's formulas, evaluated literally.

This is the ``backend="torch"`` path and the ground truth every fused backend is tested
against. It materialises the full similarity matrix (O(N^2) memory) on purpose: it is the
readable definition, not the fast path. It computes in float32 (float64 stays float64), so a
float64 call of these functions is the float64 evaluation the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """n(x) = x / max(||x||_2, eps), row-wise, computed in fp32 (float64 stays float64)."""
    return F.normalize(x.to(_compute_dtype(x)), dim=1, eps=NORM_EPS)


def reduce_loss(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def nt_xent(z1, z2, temperature=0.5, *, reduction="mean"):
    """SimCLR NT-Xent over the M = 2N rows of cat(n(z1), n(z2)); self-similarity excluded."""
    n = z1.shape[0]
    z = torch.cat([l2_normalize(z1), l2_normalize(z2)])
    logits = z @ z.T / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    positives = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return reduce_loss(F.cross_entropy(logits, positives, reduction="none"), reduction)


def _cross_logits(query, key, scale, normalize=True):
    if normalize:
        query, key = l2_normalize(query), l2_normalize(key)
    else:
        query, key = query.to(_compute_dtype(query)), key.to(_compute_dtype(key))
    return (query @ key.T) * scale


def info_nce(query, key, temperature=0.1, *, symmetric=False, reduction="mean"):
    """InfoNCE q->k with positives on the diagonal; symmetric=True averages q->k and k->q."""
    logits = _cross_logits(query, key, 1.0 / temperature)
    labels = torch.arange(logits.shape[0], device=logits.device)
    per_row = F.cross_entropy(logits, labels, reduction="none")
    if symmetric:
        per_row = 0.5 * (per_row + F.cross_entropy(logits.T, labels, reduction="none"))
    return reduce_loss(per_row, reduction)


def clip_loss(image_features, text_features, logit_scale, *, normalize=True):
    """OpenCLIP ClipLoss: 0.5 * (CE(S, arange) + CE(S^T, arange)), S = s * n(I) n(T)^T."""
    logits = _cross_logits(image_features, text_features, logit_scale, normalize)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
