"""SimCLR (Chen et al. 2020): two views, one encoder + projection head, NT-Xent over the 2N rows.

Under torchrun the negatives are those of the global batch (nt_xent(..., group=WORLD)); add
--sync-bn for the paper's global BatchNorm."""
from __future__ import annotations

from torch import Tensor, nn

import cl_fast

from .base import Method, MethodConfig
from .models import MLPHead


class SimCLR(Method):
    name = "simclr"
    description = "SimCLR: NT-Xent (cl_fast.nt_xent) between two augmented views"
    defaults = dict(epochs=30, batch_size=256, lr=2e-3, temperature=0.2, warmup_epochs=3)

    def __init__(self, config: MethodConfig, in_channels: int):
        super().__init__(config, in_channels)
        self.projector = MLPHead(self.encoder.out_dim, config.hidden_dim, config.feature_dim)
        self.network = nn.Sequential(self.encoder, self.projector)

    def outputs(self, views):
        z1, z2 = self.encode_pair(self.network, views)
        return [z1, z2], {}

    def loss(self, outputs: list[Tensor], context: dict) -> Tensor:
        z1, z2 = outputs
        # under torchrun: this rank's rows against the negatives of ALL ranks (the global batch)
        return cl_fast.nt_xent(z1, z2, temperature=self.config.temperature, backend=self.config.loss_backend,
                               group=self.group, dist_impl=self.config.dist_impl)
