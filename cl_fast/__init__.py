"""cl_fast: fused, memory-lean contrastive losses for PyTorch.

The InfoNCE family (nt_xent, info_nce, clip_loss) and the SigLIP sigmoid loss are computed
blockwise by fused kernels (Triton on GPU, C++ on CPU) that never build the N x N similarity
matrix; backend="torch" is the pure-PyTorch reference. Also MoCo (moco_loss, a ring-buffer
queue), BYOL and the SwAV Sinkhorn assignment. See SPEC.md for the exact semantics.
"""
from ._dispatch import backends
from .byol import BYOLLoss, NegativeCosineSimilarity, byol_loss
from .losses import ClipLoss, InfoNCELoss, NTXentLoss, clip_loss, info_nce, nt_xent
from .moco import MoCoQueue, moco_loss, queue_update_
from .siglip import SigLipLoss, siglip_loss
from .swav import SwAVLoss, SwaVLoss, sinkhorn, swav_loss

__all__ = [
    "backends",
    "nt_xent", "info_nce", "clip_loss", "NTXentLoss", "InfoNCELoss", "ClipLoss",
    "siglip_loss", "SigLipLoss",
    "moco_loss", "queue_update_", "MoCoQueue",
    "byol_loss", "BYOLLoss", "NegativeCosineSimilarity",
    "sinkhorn", "swav_loss", "SwAVLoss", "SwaVLoss",
]
__version__ = "0.1.0"
