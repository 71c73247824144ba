"""MoCoQueue across two processes (gloo, torch.multiprocessing): every rank's keys are all-gathered
before the enqueue, so after each step every rank holds the queue (and pointer) that one process
holds after enqueueing the concatenated batch, wrap-around included."""
from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cl_fast.moco import MoCoQueue
from conftest import fused_backend_params

WORLD = 2
SIZE, DIM, LOCAL_BATCH, STEPS = 11, 6, 3, 4  # 2 * 3 = 6 keys per step into 11 rows: wraps twice


def _global_batches():
    generator = torch.Generator().manual_seed(1234)
    return [torch.randn(WORLD * LOCAL_BATCH, DIM, generator=generator) for _ in range(STEPS)]


def _worker(rank: int, init_file: str, backend: str, result_dir: str) -> None:
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),
        )
        bank = MoCoQueue(SIZE, DIM, backend=backend)
        single = MoCoQueue(SIZE, DIM, backend=backend, gather_distributed=False)  # the one-process run
        for step, batch in enumerate(_global_batches()):
            local = batch[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
            bank.enqueue(local.clone().requires_grad_())
            single.enqueue(batch)
            assert int(bank.ptr) == int(single.ptr) == (step + 1) * WORLD * LOCAL_BATCH % SIZE
            assert torch.equal(bank.queue, single.queue), f"rank {rank}, step {step}: queue differs"
        torch.save({"queue": bank.queue, "ptr": bank.ptr}, os.path.join(result_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch")] + fused_backend_params("moco"))
def test_distributed_queue_equals_single_process_on_concatenated_batch(backend, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    init_file = str(tmp_path / "init")
    try:
        mp.start_processes(
            _worker, args=(init_file, backend, str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn"
        )
    except mp.ProcessRaisedException as error:
        reports = [tmp_path / f"rank{r}.error" for r in range(WORLD)]
        details = "".join(report.read_text() for report in reports if report.exists())
        pytest.fail(f"a rank failed:\n{details or error}")

    # both ranks hold the same queue, and it is the single-process queue built here independently
    expected = MoCoQueue(SIZE, DIM, backend=backend)
    for batch in _global_batches():
        expected.enqueue(batch)
    for rank in range(WORLD):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(state["queue"], expected.queue), f"rank {rank}"
        assert int(state["ptr"]) == int(expected.ptr)
