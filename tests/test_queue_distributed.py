"""MoCoQueue across 2 and 3 processes (gloo, torch.multiprocessing): every rank's keys are
all-gathered before the enqueue, so after each step every rank holds the queue (and pointer)
that one process holds after enqueueing the concatenated batch (the keys in rank order),
wrap-around included. One spawn per world size runs every backend (tests/distributed_jobs.py)."""
from __future__ import annotations

import pytest
import torch

from cl_fast.moco import MoCoQueue
from conftest import DEVICE, fused_backend_params

import distributed_jobs

SIZE, DIM, LOCAL_BATCH, STEPS = 11, 6, 3, 4  # 6 or 9 keys per step into 11 rows: wraps 2-3 times
BACKENDS = ["torch"] + [p.id for p in fused_backend_params("moco") if not p.marks]


def _global_batches(world: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234 + world)
    return [torch.randn(world * LOCAL_BATCH, DIM, generator=generator) for _ in range(STEPS)]


def rank_job(rank: int, world: int) -> dict:
    """Runs in every rank (distributed_jobs): the queue after each step, per backend."""
    results = {}
    for backend in BACKENDS:
        bank = MoCoQueue(SIZE, DIM, backend=backend, device=DEVICE)
        single = MoCoQueue(SIZE, DIM, backend=backend, device=DEVICE, gather_distributed=False)  # one process
        states = []
        for step, batch in enumerate(_global_batches(world)):
            batch = batch.to(DEVICE)
            local = batch[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
            bank.enqueue(local.clone().requires_grad_())
            single.enqueue(batch)
            states.append({"queue": bank.queue.cpu().clone(), "ptr": int(bank.ptr),
                           "single_queue": single.queue.cpu().clone(), "single_ptr": int(single.ptr)})
        results[backend] = states
    return results


@pytest.mark.parametrize("world", distributed_jobs.WORLD_SIZES)
@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch")] + fused_backend_params("moco"))
def test_distributed_queue_equals_single_process_on_concatenated_batch(backend, world):
    ranks = [r["queue"][backend] for r in distributed_jobs.run(world)]
    # the single-process queue, built here independently; then the gathered keys must sit in rank order
    expected = MoCoQueue(SIZE, DIM, backend="torch")
    for step, batch in enumerate(_global_batches(world)):
        expected.enqueue(batch)
        assert int(expected.ptr) == (step + 1) * world * LOCAL_BATCH % SIZE
        for rank, states in enumerate(ranks):
            state = states[step]
            assert state["ptr"] == state["single_ptr"] == int(expected.ptr), f"rank {rank}, step {step}"
            # the same queue on every rank, equal to the one-process queue of that rank's backend
            assert torch.equal(state["queue"], state["single_queue"]), f"rank {rank}, step {step}"
            assert torch.allclose(state["queue"], expected.queue, rtol=1e-6, atol=1e-6), f"rank {rank}, step {step}"
            assert torch.equal(state["queue"], ranks[0][step]["queue"]), f"rank {rank}, step {step}"


def test_rank_order_is_visible():
    """The check above would pass for a queue gathering in another order only if the order did not
    matter: with these batches it does (the queue of the reversed rank order differs)."""
    batch = _global_batches(3)[0]
    reordered = torch.cat(list(batch.split(LOCAL_BATCH))[::-1])
    a, b = MoCoQueue(SIZE, DIM, backend="torch"), MoCoQueue(SIZE, DIM, backend="torch")
    a.enqueue(batch)
    b.enqueue(reordered)
    assert not torch.allclose(a.queue, b.queue)
