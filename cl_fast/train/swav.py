"""SwAV (Caron et al. 2020): prototype scores of each crop; Sinkhorn codes of the high-resolution
crops (cl_fast.sinkhorn inside cl_fast.SwAVLoss) are predicted from every other crop.

The prototypes are a bias-free linear layer whose rows are L2-normalised before every step (so a
score is a cosine); they receive no update during the first `freeze_prototypes_steps` steps
(SwAV's trick against an early collapse of the assignment). Multi-crop is optional:
`small_crops` extra low-resolution crops (half the image size, small crop scale)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cl_fast

from .base import Method, MethodConfig
from .models import MLPHead


class SwAV(Method):
    name = "swav"
    description = "SwAV: cl_fast.SwAVLoss (Sinkhorn codes via cl_fast.sinkhorn), optional multi-crop"
    defaults = dict(epochs=30, batch_size=256, lr=2e-3, temperature=0.1, warmup_epochs=3)
    shape_keys = Method.shape_keys + ("prototypes",)
    small_scale = (0.1, 0.4)

    def __init__(self, config: MethodConfig, in_channels: int):
        super().__init__(config, in_channels)
        self.projector = MLPHead(self.encoder.out_dim, config.hidden_dim, config.feature_dim)
        self.network = nn.Sequential(self.encoder, self.projector)
        self.prototypes = nn.Linear(config.feature_dim, config.prototypes, bias=False)
        self.normalize_prototypes()
        self.criterion = cl_fast.SwAVLoss(
            temperature=config.temperature, sinkhorn_iterations=config.sinkhorn_iterations,
            sinkhorn_epsilon=config.sinkhorn_epsilon, sinkhorn_gather_distributed=True, backend=config.loss_backend,
        )

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def views(self, images, augment, image_size):
        views = super().views(images, augment, image_size)
        small = max(4, image_size // 2)
        return views + [augment(images, small, self.small_scale) for _ in range(self.config.small_crops)]

    def outputs(self, views):
        # crops of one resolution share a forward (and their BatchNorm statistics)
        high = self.encode_pair(self.network, views[:2])
        low = self.encode_pair(self.network, views[2:]) if len(views) > 2 else []
        scores = [self.prototypes(F.normalize(z, dim=1)) for z in high + low]
        return scores, {"high": 2}

    def loss(self, outputs: list[Tensor], context: dict) -> Tensor:
        n_high = context["high"]
        return self.criterion(outputs[:n_high], outputs[n_high:])

    def after_backward(self, step: int) -> None:
        if step < self.config.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

    def after_step(self, step: int, total_steps: int, context: dict) -> None:
        self.normalize_prototypes()
