"""Running the trainers under torchrun (DDP): gloo on CPU, NCCL on GPUs.

    torchrun --nproc_per_node=2 -m cl_fast train simclr [flags]

Each rank trains on its own `--batch-size` slice of one global batch stream (global batch =
batch size x ranks), with its own augmentation generator; DistributedDataParallel averages the
gradients. What crosses ranks in the losses: MoCoQueue all-gathers the keys (every rank holds the
same queue), SwAVLoss's Sinkhorn normalises over the global batch; nt_xent and byol_loss use
the rank's own rows (their negatives are local, as lightly's gather_distributed=False). Rank 0
logs, evaluates and writes the checkpoint, which holds every rank's generator states.
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


def teardown(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(ranks: Ranks, flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (Ctrl-C on one rank stops them all together)."""
    if not ranks.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(ranks: Ranks, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one without torchrun)."""
    if not ranks.enabled:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out
