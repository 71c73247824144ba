"""MoCo v2 (Chen et al. 2020): a query encoder trained against keys from a momentum encoder, with
a queue of past keys as negatives (cl_fast.moco_loss + cl_fast.MoCoQueue), symmetrised over the
two views (each view is once the query, once the key).

One process has no "shuffle BN" across GPUs; its single-device equivalent is used: the key batch
is shuffled and run through the key encoder in `bn_splits` chunks, so the BatchNorm statistics of
a key never come from the chunk holding its own query's sample (that leak lets the model cheat).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import cl_fast

from .base import Method, MethodConfig
from .models import MLPHead, ema_update_, frozen_copy


class MoCo(Method):
    name = "moco"
    description = "MoCo v2: cl_fast.moco_loss against a cl_fast.MoCoQueue of momentum-encoder keys"
    defaults = dict(epochs=30, batch_size=256, lr=2e-3, temperature=0.2, warmup_epochs=3)
    shape_keys = Method.shape_keys + ("queue_size",)
    bn_splits = 4

    def __init__(self, config: MethodConfig, in_channels: int):
        super().__init__(config, in_channels)
        self.projector = MLPHead(self.encoder.out_dim, config.hidden_dim, config.feature_dim)
        self.query_network = nn.Sequential(self.encoder, self.projector)
        self.key_network = frozen_copy(self.query_network)
        self.queue = cl_fast.MoCoQueue(
            size=config.queue_size, dim=config.feature_dim, gather_distributed=True, backend=config.loss_backend,
        )

    @torch.no_grad()
    def _keys(self, views: list[Tensor]) -> list[Tensor]:
        batch = torch.cat(views)
        order = torch.randperm(batch.shape[0], device=batch.device)
        chunks = [self.key_network(chunk) for chunk in batch[order].chunk(self.bn_splits)]
        keys = torch.empty_like(torch.cat(chunks))
        keys[order] = torch.cat(chunks)
        return list(keys.split([v.shape[0] for v in views]))

    def outputs(self, views):
        q1, q2 = self.encode_pair(self.query_network, views)
        k1, k2 = self._keys(views)
        return [q1, q2], {"keys": (k1, k2)}

    def loss(self, outputs: list[Tensor], context: dict) -> Tensor:
        (q1, q2), (k1, k2) = outputs, context["keys"]
        negatives = self.queue.negatives()
        kw = dict(temperature=self.config.temperature, backend=self.config.loss_backend)
        return 0.5 * (cl_fast.moco_loss(q1, k2, negatives, **kw) + cl_fast.moco_loss(q2, k1, negatives, **kw))

    def after_step(self, step: int, total_steps: int, context: dict) -> None:
        ema_update_(self.key_network, self.query_network, self.config.momentum)
        self.queue.enqueue(torch.cat(context["keys"]).float())
