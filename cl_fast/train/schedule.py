"""Schedules: learning rate with linear warm-up then cosine decay; BYOL's cosine EMA rate."""
from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, final_fraction: float = 0.0):
    """LambdaLR: lr * (step+1)/warmup for the first `warmup_steps`, then a cosine from lr down to
    lr * final_fraction at `total_steps`. Its state (the step count) is checkpointed."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(progress, 1.0)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_tau(base_tau: float, step: int, total_steps: int) -> float:
    """BYOL's target rate: tau = 1 - (1 - base_tau) (cos(pi step / total) + 1) / 2, base_tau -> 1."""
    progress = min(step / max(1, total_steps), 1.0)
    return 1 - (1 - base_tau) * (math.cos(math.pi * progress) + 1) / 2
