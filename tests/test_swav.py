"""SwAVLoss: every backend against lightly's SwaVLoss written out in float64 (reference.swav_loss).

Values AND gradients for several crop layouts (two high-resolution crops alone, with low-
resolution crops, a single high-resolution crop, three of them, a queue), ragged (B, K),
fp32/fp16/bf16 crops, the module API, bad inputs.
"""
from __future__ import annotations

import pytest
import torch

from cl_fast import reference, swav
from conftest import DTYPES, RTOL, randn, rel_err
from test_sinkhorn import BACKENDS, FUSED

# (high-resolution crops, low-resolution crops, B, K)
LAYOUTS = [(2, 0, 16, 10), (2, 4, 19, 37), (1, 2, 8, 5), (3, 1, 33, 70)]
LAYOUT_IDS = [f"high{h}-low{lo}-B{b}-K{k}" for h, lo, b, k in LAYOUTS]


def make_crops(n_high, n_low, batch, protos, dtype, gen, scale=1.0):
    """Fresh (B, K) prototype scores per crop, leaves of `dtype` (drawn in fp32, then cast)."""
    def crop():
        return (randn(batch, protos, dtype=torch.float32, generator=gen) * scale).to(dtype).requires_grad_()

    return [crop() for _ in range(n_high)], [crop() for _ in range(n_low)]


def float64_loss(high, low, queue=None, **kwargs):
    """reference.swav_loss on float64 leaf copies; returns (loss, grads in crop order)."""
    high64 = [c.detach().double().requires_grad_() for c in high]
    low64 = [c.detach().double().requires_grad_() for c in low]
    queue64 = None if queue is None else [q.detach().double() for q in queue]
    loss = reference.swav_loss(high64, low64, queue64, **kwargs)
    loss.backward()
    return loss, [c.grad for c in high64 + low64]


def check_against_float64(backend, high, low, queue=None, tol=RTOL[torch.float32], **kwargs):
    loss = swav.swav_loss(high, low, queue, backend=backend, **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    expected, expected_grads = float64_loss(high, low, queue, **kwargs)
    assert rel_err(loss, expected) < tol
    for crop, grad in zip(high + low, expected_grads):
        if grad is None:  # a lone high-resolution crop only provides codes (computed without grad)
            assert crop.grad is None
            continue
        assert crop.grad.dtype == crop.dtype
        assert rel_err(crop.grad, grad) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_matches_float64(backend, layout, gen):
    high, low = make_crops(*layout, torch.float32, gen)
    check_against_float64(backend, high, low)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(dt)[6:] for dt in DTYPES])
def test_input_dtypes(backend, dtype, gen):
    high, low = make_crops(2, 3, 21, 13, dtype, gen)
    check_against_float64(backend, high, low, tol=RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hyperparameters(backend, gen):
    high, low = make_crops(2, 2, 12, 9, torch.float32, gen)
    check_against_float64(backend, high, low, temperature=0.25, sinkhorn_iterations=5, sinkhorn_epsilon=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_outputs(backend, gen):
    """lightly's queue: the anchor's rows and its queue's rows get their codes together (the queue
    changes the codes of the batch), and only the batch's codes are used."""
    high, low = make_crops(2, 2, 10, 9, torch.float32, gen)
    queue = [randn(23, 9, generator=gen) for _ in high]
    check_against_float64(backend, high, low, queue)
    # the queue is not ignored: it changes every crop's gradient (through the codes). Not the loss
    # value: a scalar that moves by chance as little as 6e-4 (1 draw in 1000 failed |change| > 1e-3);
    # each crop's whole gradient moved by >= 14% in 1000 draws.
    _, without = float64_loss(high, low)
    _, with_queue = float64_loss(high, low, queue)
    assert min(rel_err(a, b) for a, b in zip(with_queue, without)) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores(backend, gen):
    """Prototype scores far past fp32's exp range for the Sinkhorn (scores / eps ~ 1000): finite."""
    high, low = make_crops(2, 2, 14, 11, torch.float32, gen, scale=15.0)
    x_max = max(float(c.detach().abs().max()) for c in high) / 0.05
    check_against_float64(backend, high, low, tol=max(RTOL[torch.float32], 4 * x_max * 2.0**-24))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_is_lightly_drop_in(backend, gen):
    high, low = make_crops(2, 3, 11, 7, torch.float32, gen)
    criterion = swav.SwAVLoss(temperature=0.2, sinkhorn_iterations=4, sinkhorn_epsilon=0.08, backend=backend)
    loss = criterion(high, low)
    expected, _ = float64_loss(high, low, temperature=0.2, sinkhorn_iterations=4, sinkhorn_epsilon=0.08)
    assert rel_err(loss, expected) < RTOL[torch.float32]
    assert swav.SwaVLoss is swav.SwAVLoss
    assert "temperature=0.2" in repr(criterion)


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph_no_graph_break(backend, gen):
    torch._dynamo.reset()
    criterion = swav.SwAVLoss(backend=backend)
    compiled = torch.compile(lambda h, lo: criterion(h, lo), fullgraph=True, backend="aot_eager")
    high, low = make_crops(2, 1, 12, 8, torch.float32, gen)
    loss = compiled(high, low)
    loss.backward()
    high_ref = [c.detach().clone().requires_grad_() for c in high]
    low_ref = [c.detach().clone().requires_grad_() for c in low]
    expected = criterion(high_ref, low_ref)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for crop, ref in zip(high + low, high_ref + low_ref):
        torch.testing.assert_close(crop.grad, ref.grad, rtol=1e-6, atol=1e-7)


def test_codes_carry_no_gradient(gen):
    """Only the predictions are differentiated: the codes are computed under no_grad (SwAV). A
    crop that only provides codes (the single high-resolution crop) receives no gradient at all."""
    high, low = make_crops(1, 2, 9, 6, torch.float32, gen)
    swav.swav_loss(high, low, backend="torch").backward()
    assert high[0].grad is None
    assert all(c.grad is not None for c in low)


@pytest.mark.parametrize("backend", FUSED)
def test_single_anchor_gets_no_gradient_fused(backend, gen):
    high, low = make_crops(1, 2, 9, 6, torch.float32, gen)
    swav.swav_loss(high, low, backend=backend).backward()
    assert high[0].grad is None
    assert all(c.grad is not None for c in low)


# ---------------------------------------------------------------------------------- bad inputs
def _crops(*shapes, dtype=torch.float32):
    return [torch.randn(*s).to(dtype) for s in shapes]


@pytest.mark.parametrize(
    "high, low, queue, error, match",
    [
        (torch.randn(4, 3), _crops((4, 3)), None, TypeError, "high_resolution_outputs"),
        (_crops((4, 3)), torch.randn(4, 3), None, TypeError, "low_resolution_outputs"),
        ([], _crops((4, 3), (4, 3)), None, ValueError, "high_resolution_outputs"),
        (_crops((4, 3)), [], None, ValueError, "two crops"),
        (_crops((4, 3), (5, 3)), [], None, ValueError, r"high_resolution_outputs\[1\]"),
        (_crops((4, 3), (4, 3)), _crops((4, 2)), None, ValueError, r"low_resolution_outputs\[0\]"),
        (_crops((4, 3), (4,)), [], None, ValueError, r"high_resolution_outputs\[1\]"),
        (_crops((4, 3)) + _crops((4, 3), dtype=torch.float16), [], None, TypeError, r"high_resolution_outputs\[1\]"),
        ([torch.zeros(4, 3, dtype=torch.int32)] * 2, [], None, TypeError, r"high_resolution_outputs\[0\]"),
        (_crops((4, 3), (4, 3)), [], _crops((6, 3)), ValueError, "queue_outputs"),
        (_crops((4, 3), (4, 3)), [], _crops((6, 3), (6, 4)), ValueError, r"queue_outputs\[1\]"),
    ],
)
def test_bad_crops(high, low, queue, error, match):
    with pytest.raises(error, match=match):
        swav.swav_loss(high, low, queue)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(sinkhorn_epsilon=-1.0), ValueError, "sinkhorn_epsilon"),
        (dict(sinkhorn_iterations=-2), ValueError, "iterations"),
        (dict(sinkhorn_iterations=1.5), TypeError, "iterations"),
        (dict(backend="jax"), ValueError, "backend"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        swav.SwAVLoss(**kwargs)
    high, low = _crops((4, 3), (4, 3)), []
    with pytest.raises(error, match=match):
        swav.swav_loss(high, low, **kwargs)
