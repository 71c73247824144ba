"""The C++ CPU kernels give the same numbers whatever the thread count."""
from __future__ import annotations

import pytest
import torch

import cl_fast
from conftest import randn

pytestmark = pytest.mark.skipif("cpu" not in cl_fast.backends(), reason="needs cl_fast._C built (the cpu backend)")


def _loss_and_grads(name, threads, a, b):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        if name == "nt_xent":
            loss = cl_fast.nt_xent(a, b, 0.2, backend="cpu")
        else:
            loss = cl_fast.clip_loss(a, b, 8.0, backend="cpu")
        loss.backward()
        return loss.detach(), a.grad, b.grad
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ["nt_xent", "clip_loss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_and_two_threads_agree(name, dtype, gen):
    # big enough for several tiles per thread (the CPU tile is 256 rows), ragged D
    a = randn(700, 45, dtype=dtype, generator=gen)
    b = randn(700, 45, dtype=dtype, generator=gen)
    single = _loss_and_grads(name, 1, a, b)
    double = _loss_and_grads(name, 2, a, b)
    for one, two in zip(single, double):
        torch.testing.assert_close(one.float(), two.float(), rtol=1e-6, atol=1e-6)
