"""The C++ CPU kernels give the same numbers whatever the thread count, tile size or tile product."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


# Settings are read once when cl_fast._C loads, so each runs in a fresh interpreter.
_CHECK = textwrap.dedent("""
    import torch, cl_fast
    from cl_fast import reference
    g = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    for n, d in [(2, 3), (50, 37), (129, 100)]:
        a = torch.randn(n, d, generator=g, requires_grad=True)
        b = torch.randn(n, d, generator=g, requires_grad=True)
        for name in ["nt_xent", "clip_loss"]:
            a.grad = b.grad = None
            fused = cl_fast.nt_xent(a, b, 0.2, backend="cpu") if name == "nt_xent" else cl_fast.clip_loss(a, b, 5.0, backend="cpu")
            fused.backward()
            a64 = a.detach().double().requires_grad_(); b64 = b.detach().double().requires_grad_()
            expected = reference.nt_xent(a64, b64, 0.2) if name == "nt_xent" else reference.clip_loss(a64, b64, 5.0)
            expected.backward()
            for got, want in [(fused, expected), (a.grad, a64.grad), (b.grad, b64.grad)]:
                err = float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))
                assert err < 1e-4, (name, n, d, err)
    print("ok")
""")


@pytest.mark.parametrize(
    "settings",
    [{"CL_FAST_CPU_GEMM": "vec"}, {"CL_FAST_CPU_TILE": "32"}, {"CL_FAST_CPU_GEMM": "vec", "CL_FAST_CPU_TILE": "32"}],
    ids=["vec-tile-product", "tile-32", "vec-tile-32"],
)
def test_kernel_settings_match_float64(settings):
    env = dict(os.environ, **settings)
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
