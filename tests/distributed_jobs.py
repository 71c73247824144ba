"""One gloo job per world size for the MoCo queue and Sinkhorn tests (test_queue_distributed.py,
test_sinkhorn_distributed.py): spawning processes and importing torch in them costs seconds, so
every rank runs both files' workloads for every backend in ONE spawn, saves its results, and the
tests compare them (a session cache: the second file reuses the first file's run).

Not a test module (pytest collects test_*.py only); the workloads live next to their tests.
"""
from __future__ import annotations

import datetime
import functools
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZES = (2, 3)


def _worker(rank: int, world: int, init_file: str, out_dir: str, jobs) -> None:
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60),  # a rank that dies ends the others' waits
        )
        results = {name: job(rank, world) for name, job in jobs}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _jobs():
    # imported here so each test module stays importable on its own (and the children find them)
    import test_queue_distributed
    import test_sinkhorn_distributed

    return (("queue", test_queue_distributed.rank_job), ("sinkhorn", test_sinkhorn_distributed.rank_job))


@functools.lru_cache(maxsize=None)
def run(world: int) -> list[dict]:
    """Every rank's {job name: results} of one `world`-process gloo run (spawned once per session)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    out_dir = tempfile.mkdtemp(prefix=f"cl_fast_dist_w{world}_")
    try:
        mp.start_processes(
            _worker, args=(world, os.path.join(out_dir, "init"), out_dir, _jobs()), nprocs=world, join=True,
            start_method="spawn",
        )
    except mp.ProcessRaisedException as error:
        reports = [os.path.join(out_dir, f"rank{r}.error") for r in range(world)]
        details = "".join(open(p).read() for p in reports if os.path.exists(p))
        pytest.fail(f"a rank of the {world}-process job failed:\n{details or error}")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
