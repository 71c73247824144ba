"""BYOL (Grill et al. 2020): an online network (encoder, projector, predictor) regresses the
projection of an EMA target network (cl_fast.byol_loss), in both directions; the target's rate
follows the cosine schedule tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2."""
from __future__ import annotations

import torch
from torch import Tensor, nn

import cl_fast

from .base import Method, MethodConfig
from .models import MLPHead, ema_update_, frozen_copy
from .schedule import cosine_tau


class BYOL(Method):
    name = "byol"
    description = "BYOL: cl_fast.byol_loss between the online prediction and the EMA target's projection"
    defaults = dict(epochs=60, batch_size=256, lr=2e-3, temperature=None, warmup_epochs=3)

    def __init__(self, config: MethodConfig, in_channels: int):
        super().__init__(config, in_channels)
        self.projector = MLPHead(self.encoder.out_dim, config.hidden_dim, config.feature_dim)
        self.predictor = MLPHead(config.feature_dim, config.hidden_dim, config.feature_dim)
        self.online_network = nn.Sequential(self.encoder, self.projector)
        self.target_network = frozen_copy(self.online_network)

    def outputs(self, views):
        p1, p2 = self.encode_pair(nn.Sequential(self.online_network, self.predictor), views)
        with torch.no_grad():
            z1, z2 = self.encode_pair(self.target_network, views)
        return [p1, p2], {"targets": (z1, z2)}

    def loss(self, outputs: list[Tensor], context: dict) -> Tensor:
        (p1, p2), (z1, z2) = outputs, context["targets"]
        backend = self.config.loss_backend
        # symmetric: each view's prediction regresses the other view's target projection
        return cl_fast.byol_loss(p1, z2, backend=backend) + cl_fast.byol_loss(p2, z1, backend=backend)

    def after_step(self, step: int, total_steps: int, context: dict) -> None:
        tau = cosine_tau(self.config.momentum, step, total_steps)
        ema_update_(self.target_network, self.online_network, tau)
