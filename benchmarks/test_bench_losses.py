"""pytest-benchmark suite: forward+backward of every loss, per backend, at small sizes.

Not part of `make test` (that runs tests/). Run it with

    .venv/bin/python -m pytest benchmarks --benchmark-only
    .venv/bin/python -m pytest benchmarks --benchmark-only -k nt_xent --benchmark-group-by=group

It uses the GPU when torch sees one (and TRITON_INTERPRET is not 1), else the CPU. Backends
that cannot run here (not built, wrong device, op not added yet, Triton only interpreted) are
collected and skipped with the reason. The ops, inputs and backends are cl_fast.bench's, so
this suite and `python -m cl_fast bench` time the same calls; the bench command adds sizes,
peak memory and the comparison table.
"""
from __future__ import annotations

import os

import pytest
import torch

import bench  # benchmarks/bench.py (pytest puts this folder on sys.path)

DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
DIM = 128
# rows per op (nt_xent: 2N), small enough for the eager reference on a laptop CPU
ROWS = {"nt_xent": 1024, "info_nce": 512, "clip_loss": 512, "moco_loss": 256, "sinkhorn": 1024, "byol_loss": 1024}
QUEUE, PROTOTYPES = 4096, 3000


def _cases():
    for name, op in bench.OPS.items():
        for backend in op.backends:
            reason = bench.unavailable_reason(op, backend, DEVICE, explicit=False)
            marks = [pytest.mark.skip(reason=f"{name} on backend {backend!r}: {reason}")] if reason else []
            yield pytest.param(name, backend, marks=marks, id=f"{name}-{backend}")


@pytest.mark.parametrize("op_name,backend", list(_cases()))
def test_forward_backward(benchmark, op_name, backend):
    op = bench.OPS[op_name]
    shape = bench.Shape(ROWS[op_name], DIM, QUEUE, PROTOTYPES)
    step = bench.make_step(op, bench.loss_fn(op, backend, dynamic=False), shape, torch.float32, DEVICE)
    step()  # warm-up: torch.compile / Triton compilation stays out of the timings
    benchmark.group = f"{op_name} {op.label(shape)}{f' D={DIM}' if op.shows_dim else ''} fp32 {DEVICE.type}"
    benchmark.extra_info.update(op=op_name, backend=backend, rows=shape.rows, dim=DIM, device=str(DEVICE))
    benchmark(step)
