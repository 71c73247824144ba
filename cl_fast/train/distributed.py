"""Running the trainers under torchrun (DDP): gloo on CPU, NCCL on GPUs.

    torchrun --nproc_per_node=2 -m cl_fast train simclr [flags]

Each rank trains on its own `--batch-size` slice of one global batch stream (global batch =
batch size x ranks), with its own augmentation generator; DistributedDataParallel averages the
gradients. What crosses ranks in the losses: MoCoQueue all-gathers the keys (every rank holds the
same queue), SwAVLoss's Sinkhorn normalises over the global batch, SimCLR's nt_xent scores each
rank's rows against the negatives of the whole global batch (`group=`; SPEC's distributed
convention, so with DDP's gradient average a step equals the single-process step on the global
batch), and byol_loss is per sample (nothing to exchange). `--sync-bn` makes BatchNorm use the
global batch's statistics too (models.GlobalBatchNorm; SimCLR's "global BN"); without it each rank
normalises its own slice, as plain DDP does. The logged loss is the global batch's (the mean over
ranks). Rank 0 logs, evaluates and writes the checkpoint, which holds every rank's generator states.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module initialised the process group (and tears it down)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> tuple[Ranks, torch.device]:
    """The ranks (from torchrun's environment) and this rank's device; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        return Ranks(), dev
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
        owns = True
    return Ranks(rank, world, local_rank, owns), dev


def teardown(ranks: Ranks, finished: bool = False) -> None:
    """Destroys the process group this module made. After a run that finished on every rank,
    the ranks first meet at a barrier (rank 0 evaluates alone at the end), so that no rank tears
    its connections down while another still uses the group."""
    if ranks.owns_group and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def group():
    """The process group the trainers' losses reduce over under torchrun (the world)."""
    return dist.group.WORLD


def mean_and_any(ranks: Ranks, value: torch.Tensor, flag: bool) -> tuple[float, bool]:
    """(mean over the ranks of the 0-d `value`, whether `flag` is true on any rank), the same on
    every rank, from ONE all-reduce: the loss the trainer logs is the global batch's (each rank's
    loss is the mean over its own rows), and a NaN on one rank stops every rank together."""
    if not ranks.enabled:
        return float(value), flag
    t = torch.stack([value.float().reshape(()), torch.tensor(1.0 if flag else 0.0, device=value.device)])
    dist.all_reduce(t)
    mean, flags = t.tolist()
    return mean / ranks.world, flags > 0


def gather(ranks: Ranks, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one without torchrun)."""
    if not ranks.enabled:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out
