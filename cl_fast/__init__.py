"""cl_fast: fused, memory-lean contrastive losses for PyTorch.

The InfoNCE family (nt_xent, info_nce, clip_loss) is computed blockwise by fused kernels
(Triton on GPU, C++ on CPU) that never build the N x N similarity matrix; backend="torch"
is the pure-PyTorch reference. See SPEC.md for the exact semantics.
"""
from ._dispatch import backends
from .losses import ClipLoss, InfoNCELoss, NTXentLoss, clip_loss, info_nce, nt_xent

__all__ = ["backends", "nt_xent", "info_nce", "clip_loss", "NTXentLoss", "InfoNCELoss", "ClipLoss"]
__version__ = "0.1.0"
