"""Shared test helpers: which fused backends run here, tolerances, fresh random inputs."""
from __future__ import annotations

import os

import pytest
import torch

import cl_fast
from cl_fast import _dispatch

# Triton runs through its interpreter on CPU tensors unless a GPU is present.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")

# Relative error bounds against a float64 evaluation (values and gradients).
RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def fused_backend_params(op="infonce"):
    """pytest params for `op`'s fused backends; those that cannot run here are skipped with the reason."""
    params = []
    for name in _dispatch._MODULES[op]:
        marks = []
        if name not in cl_fast.backends(op, DEVICE):
            why = {
                "triton": "needs triton with a CUDA GPU or TRITON_INTERPRET=1",
                "cpu": "needs cl_fast._C built and CPU tensors",
                "cuda": "needs a CUDA GPU and the CUDA build of cl_fast._C",
            }[name]
            marks.append(pytest.mark.skip(reason=f"{op} backend {name!r} {why}"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(max |e|, tiny): one number per tensor, robust to tiny entries."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)


def backward_with_random_weights(loss, expected, gen):
    """Backpropagate sum(w * loss) through the tested loss and its float64 reference, w a fresh
    random positive weight per element: exercises per-row upstream gradients, not just the mean."""
    upstream = torch.rand(expected.shape, generator=gen, dtype=torch.float64) + 0.5
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    (expected * upstream).sum().backward()


def randn(*shape, dtype=torch.float32, generator=None, requires_grad=False):
    x = torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=DEVICE, dtype=dtype)
    return x.requires_grad_(requires_grad)


@pytest.fixture
def gen(request):
    """A fresh, reproducible-per-test generator (seeded from the test id, logged on failure)."""
    seed = (hash(request.node.nodeid) ^ int.from_bytes(os.urandom(4), "little")) & 0x7FFFFFFF
    request.node.user_properties.append(("seed", seed))
    g = torch.Generator().manual_seed(seed)
    return g
