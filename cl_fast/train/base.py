"""What every method (SimCLR, MoCo, BYOL, SwAV) provides to the shared training loop.

A method is one nn.Module holding everything that is checkpointed with the model: the encoder
(the representation that is evaluated), its heads, momentum/EMA targets, queues, prototypes.
The loop calls, per step:

    views = method.views(images, augment, image_size)         # augmented crops of one batch
    outputs, context = method.outputs(views)                   # network outputs fed to the loss
    loss = method.loss(outputs, context)                       # the cl_fast loss, backend=...
    ... backward, method.after_backward(step), optimiser step, method.after_step(step, total, context)

`outputs` are the tensors the loss differentiates; the loop feeds the loss detached copies of them
so it can time the loss's forward and backward on their own (the "loss share" of the step), then
continues the backward through the networks with their gradients: the same gradients as one
backward of the whole graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .augment import Augment
from .models import SmallCNN


@dataclass
class MethodConfig:
    """The method's hyper-parameters (CLI flags); `shape_keys` of a method must match on --resume."""

    temperature: float = 0.1  # SimCLR, MoCo, SwAV
    loss_backend: str = "auto"
    width: int = 32
    hidden_dim: int = 256
    feature_dim: int = 64
    momentum: float = 0.99  # MoCo key encoder / BYOL base tau
    queue_size: int = 4096  # MoCo
    prototypes: int = 30  # SwAV
    freeze_prototypes_steps: int = 20  # SwAV
    small_crops: int = 0  # SwAV multi-crop: extra low-resolution crops
    sinkhorn_iterations: int = 3
    sinkhorn_epsilon: float = 0.05
    dist_impl: str = "gather"  # SimCLR under torchrun: nt_xent's exchange of the columns (gather or ring)
    sync_bn: bool = False  # under torchrun: BatchNorm statistics of the global batch (SimCLR, BYOL, SwAV)


class Method(nn.Module):
    name = ""
    description = ""
    # defaults of the shared flags for this method (the CLI shows them in --help)
    defaults: dict = {}
    # MethodConfig fields that fix parameter/buffer shapes: a checkpoint must agree on them
    shape_keys: tuple = ("width", "hidden_dim", "feature_dim")
    # the process group the losses reduce over (set by the loop under torchrun; None: one process)
    group = None

    def __init__(self, config: MethodConfig, in_channels: int):
        super().__init__()
        self.config = config
        self.encoder = SmallCNN(in_channels, config.width)

    def views(self, images: Tensor, augment: Augment, image_size: int) -> list[Tensor]:
        """Two augmented views at full resolution."""
        return [augment(images, image_size), augment(images, image_size)]

    def outputs(self, views: list[Tensor]) -> tuple[list[Tensor], dict]:
        raise NotImplementedError

    def forward(self, views: list[Tensor]) -> tuple[list[Tensor], dict]:
        return self.outputs(views)  # DistributedDataParallel wraps the method and calls this

    def loss(self, outputs: list[Tensor], context: dict) -> Tensor:
        raise NotImplementedError

    def after_backward(self, step: int) -> None:
        """Between backward and the optimiser step (SwAV: no prototype update while frozen)."""

    def after_step(self, step: int, total_steps: int, context: dict) -> None:
        """After the optimiser step (momentum/EMA targets, queues, prototype normalisation)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def encode_pair(self, network: nn.Module, views: list[Tensor]) -> list[Tensor]:
        """network applied to the views in ONE batch (BatchNorm statistics over all of them), split back."""
        sizes = [v.shape[0] for v in views]
        return list(network(torch.cat(views)).split(sizes))
