"""Second derivatives through the fused ops raise a clear error naming double backward.

The fused backwards are not themselves differentiable (they recompute from saved rows, or, for
MoCo, scale a direction the forward stored), so a gradient of their gradient would be silently
wrong (before this check, moco_loss gave a zero Hessian). First-order gradients taken with
create_graph=True stay exactly the plain ones; only differentiating them again raises.
"""
from __future__ import annotations

import pytest
import torch

import cl_fast
from conftest import DEVICE, fused_backend_params, randn

N, D = 6, 10

# family -> [(name, loss(x, y, temperature tensor, queue, backend))]; x gets the second derivatives
LOSSES = {
    "infonce": [
        ("nt_xent", lambda x, y, t, queue, backend: cl_fast.nt_xent(x, y, t, backend=backend)),
        ("info_nce", lambda x, y, t, queue, backend: cl_fast.info_nce(x, y, t, symmetric=True, backend=backend)),
        ("clip_loss", lambda x, y, t, queue, backend: cl_fast.clip_loss(x, y, 1 / t, normalize=True, backend=backend)),
    ],
    "moco": [("moco_loss", lambda x, y, t, queue, backend: cl_fast.moco_loss(x, y, queue, t, backend=backend))],
    "byol": [("byol_loss", lambda x, y, t, queue, backend: cl_fast.byol_loss(x, y, backend=backend))],
    "siglip": [("siglip_loss", lambda x, y, t, queue, backend: cl_fast.siglip_loss(x, y, 1 / t, -t, backend=backend))],
}
CASES = [
    pytest.param(name, loss, backend.values[0], marks=backend.marks, id=f"{name}-{backend.values[0]}")
    for family, losses in LOSSES.items()
    for name, loss in losses
    for backend in fused_backend_params(family)
]


def _inputs(gen):
    x = randn(N, D, generator=gen, requires_grad=True)
    y = randn(N, D, generator=gen)
    t = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    queue = torch.nn.functional.normalize(randn(15, D, generator=gen), dim=1)
    return x, y, t, queue


@pytest.mark.parametrize("name,loss_fn,backend", CASES)
def test_double_backward_raises(name, loss_fn, backend, gen):
    x, y, t, queue = _inputs(gen)
    (grad_x,) = torch.autograd.grad(loss_fn(x, y, t, queue, backend), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{name}.*double backward"):
        grad_x.square().sum().backward()


@pytest.mark.parametrize("name,loss_fn,backend", CASES)
def test_double_backward_raises_next_to_other_terms(name, loss_fn, backend, gen):
    """The report's moco_loss case: beside another differentiable term, a missing second
    derivative would pass as zero instead of failing (here through the temperature too)."""
    x, y, t, queue = _inputs(gen)
    loss = loss_fn(x, y, t, queue, backend) + (x**3).sum() + t**2
    grads = torch.autograd.grad(loss, (x, t), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        sum(g.square().sum() for g in grads).backward()


@pytest.mark.parametrize("name,loss_fn,backend", CASES)
def test_create_graph_alone_keeps_first_order_gradients(name, loss_fn, backend, gen):
    x, y, t, queue = _inputs(gen)
    with_graph = torch.autograd.grad(loss_fn(x, y, t, queue, backend), (x, t), create_graph=True, allow_unused=True)
    plain = torch.autograd.grad(loss_fn(x, y, t, queue, backend), (x, t), allow_unused=True)
    for g_graph, g_plain in zip(with_graph, plain):
        assert (g_graph is None) == (g_plain is None)
        if g_graph is not None:
            assert torch.equal(g_graph.detach(), g_plain)
