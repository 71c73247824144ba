"""sinkhorn and SwAVLoss on 2 and 3 gloo processes (torch.multiprocessing) against one process.

Each rank holds its slice of one global batch. Distributed sinkhorn (group=WORLD) must return,
on every rank, that rank's rows of the single-process result on the concatenated batch (with
B = the global batch: the marginals are global). group=None must not communicate. For SwAVLoss
with sinkhorn_gather_distributed=True, SPEC's convention: the mean over ranks of the losses is
the single-process loss, and each rank's gradient is W times its slice of the single-process one.
One spawn per world size runs every backend (tests/distributed_jobs.py); the tests compare.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import cl_fast
from cl_fast import _dispatch, reference, swav
from conftest import RTOL, rel_err

import distributed_jobs

LOCAL_B, K = 13, 17
ITERATIONS = (0, 1, 3)
CANDIDATES = ("torch", "cpu", "triton")


def _device_for(backend: str) -> torch.device:
    if backend == "triton" and not _dispatch.triton_interpreted():
        return torch.device("cuda")
    return torch.device("cpu")


def _runnable(backend: str) -> str | None:
    """None if the backend can run in the workers here, else why not."""
    if backend == "torch":
        return None
    if backend == "triton" and not (_dispatch.triton_interpreted() or torch.cuda.is_available()):
        return "needs triton with a CUDA GPU or TRITON_INTERPRET=1"
    if backend not in cl_fast.backends("sinkhorn", _device_for(backend)):
        return "is not available here" if backend == "triton" else "needs cl_fast._C built with csrc/cpu/sinkhorn.cpp"
    return None


def _inputs(world, device):
    """The global batch, identical on every rank (fixed seed), and SwAV crops (2 high, 2 low)."""
    g = torch.Generator().manual_seed(20240607 + world)
    global_b = world * LOCAL_B
    scores = torch.randn(global_b, K, generator=g)
    # Far beyond fp32's exp range, with rows far apart: scores / eps up to ~3000.
    extreme = torch.randn(global_b, K, generator=g) * 5 + torch.randn(global_b, 1, generator=g) * 15
    crops = [torch.randn(global_b, K, generator=g) for _ in range(4)]
    return scores.to(device), extreme.to(device), [c.to(device) for c in crops]


def rank_job(rank: int, world: int) -> dict:
    """Runs in every rank (distributed_jobs): {backend: results}."""
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    results = {}
    for backend in (b for b in CANDIDATES if _runnable(b) is None):
        device = _device_for(backend)
        scores, extreme, crops = _inputs(world, device)
        res = {}
        for it in ITERATIONS:
            res[f"dist{it}"] = swav.sinkhorn(scores[rows], epsilon=0.05, iterations=it, group=dist.group.WORLD, backend=backend)
            res[f"single{it}"] = swav.sinkhorn(scores, epsilon=0.05, iterations=it, backend=backend)
        res["local"] = swav.sinkhorn(scores[rows], epsilon=0.05, iterations=3, backend=backend)  # group=None: no all-reduce
        res["extreme"] = swav.sinkhorn(extreme[rows], epsilon=0.02, iterations=3, group=dist.group.WORLD, backend=backend)
        leaves = [c[rows].clone().requires_grad_() for c in crops]
        criterion = swav.SwAVLoss(sinkhorn_gather_distributed=True, backend=backend)
        loss = criterion(leaves[:2], leaves[2:])
        loss.backward()
        res["loss"] = loss.detach()
        res["grads"] = [leaf.grad for leaf in leaves]
        results[backend] = {k: v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v] for k, v in res.items()}
    return results


def _params():
    params = []
    for name in CANDIDATES:
        why = _runnable(name)
        marks = [pytest.mark.skip(reason=f"sinkhorn backend {name!r} {why}")] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _ranks(world, backend):
    return [r["sinkhorn"][backend] for r in distributed_jobs.run(world)]


WORLDS = pytest.mark.parametrize("world", distributed_jobs.WORLD_SIZES)


@WORLDS
@pytest.mark.parametrize("backend", _params())
@pytest.mark.parametrize("iterations", ITERATIONS)
def test_distributed_equals_single_process(backend, iterations, world):
    ranks = _ranks(world, backend)
    gathered = torch.cat([r[f"dist{iterations}"] for r in ranks])
    single = ranks[0][f"single{iterations}"]
    assert rel_err(gathered, single) < RTOL[torch.float32]
    scores = _inputs(world, torch.device("cpu"))[0]
    expected = reference.sinkhorn(scores.double(), 0.05, iterations)
    assert rel_err(gathered, expected) < RTOL[torch.float32]


@WORLDS
@pytest.mark.parametrize("backend", _params())
def test_group_none_does_not_communicate(backend, world):
    """group=None: each rank normalises over its own rows only (differs from the global result)."""
    ranks = _ranks(world, backend)
    scores = _inputs(world, torch.device("cpu"))[0]
    for rank, res in enumerate(ranks):
        local_scores = scores[rank * LOCAL_B : (rank + 1) * LOCAL_B].double()
        assert rel_err(res["local"], reference.sinkhorn(local_scores, 0.05, 3)) < RTOL[torch.float32]
        assert rel_err(res["local"], res["dist3"]) > 1e-3


@WORLDS
@pytest.mark.parametrize("backend", _params())
def test_distributed_extreme_scores(backend, world):
    ranks = _ranks(world, backend)
    extreme = _inputs(world, torch.device("cpu"))[1]
    gathered = torch.cat([r["extreme"] for r in ranks])
    assert torch.isfinite(gathered).all()
    x_max = float(extreme.abs().max()) / 0.02
    assert x_max > 10 * 88
    tolerance = max(RTOL[torch.float32], 4 * x_max * 2.0**-24)
    assert rel_err(gathered, reference.sinkhorn(extreme.double(), 0.02, 3)) < tolerance


@WORLDS
@pytest.mark.parametrize("backend", _params())
def test_distributed_swav_loss(backend, world):
    ranks = _ranks(world, backend)
    crops = [c.double().requires_grad_() for c in _inputs(world, torch.device("cpu"))[2]]
    expected = reference.swav_loss(crops[:2], crops[2:])
    expected.backward()
    mean_loss = sum(r["loss"] for r in ranks) / world
    assert rel_err(mean_loss, expected) < RTOL[torch.float32]
    for rank, res in enumerate(ranks):
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        for grad, crop in zip(res["grads"], crops):
            assert rel_err(grad, world * crop.grad[rows]) < RTOL[torch.float32]
