"""moco_loss, queue_update_ and MoCoQueue: every backend against a float64 evaluation of SPEC.md.

Values AND gradients (q and a tensor temperature; none into k or the queue), ragged shapes
(N, D, K not multiples of any block), fp32/fp16/bf16 inputs and queues of their own dtype, the
queue's wrap-around (K not a multiple of B, B == K, B > K an error), a checkpoint round-trip of
MoCoQueue, NaN propagation and bad inputs. The two-process test is test_queue_distributed.py.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import cl_fast
from cl_fast import moco, reference
from cl_fast.moco import MoCoQueue, moco_loss, queue_update_
from conftest import DEVICE, RTOL, backward_with_random_weights, fused_backend_params, randn, rel_err

FUSED = fused_backend_params("moco")
BACKENDS = [pytest.param("torch", id="torch")] + FUSED

# (N, D, K): one row, ragged everything, K below / above the tile widths. (A single row against a
# handful of keys can have a loss ~1e-4 << 1/T, which the fp32 reference only gets to ~1e-3 relative.)
SHAPES = [(1, 3, 40), (5, 16, 7), (17, 40, 100), (37, 3, 33), (64, 65, 300)]
SHAPES_HALF = [(5, 16, 7), (17, 40, 100), (33, 64, 129)]
CASES = [(torch.float32, torch.float32, *s) for s in SHAPES] + [
    (dt, qdt, *s)
    for dt in (torch.float16, torch.bfloat16)
    for qdt in (dt, torch.float32)  # the queue in the input dtype, or fp32 under autocast
    for s in SHAPES_HALF
]
CASE_IDS = [f"{str(dt)[6:]}-queue_{str(qdt)[6:]}-N{n}-D{d}-K{k}" for dt, qdt, n, d, k in CASES]


def unit_queue(size, dim, dtype=torch.float32, generator=None):
    """A queue of stored keys as MoCo keeps them: unit rows."""
    return F.normalize(randn(size, dim, generator=generator), dim=1).to(dtype)


def float64_reference(q, k, queue, temperature, reduction="mean"):
    """moco_loss in float64 with autograd to q and the temperature."""
    q64 = q.detach().double().requires_grad_()
    t64 = torch.tensor(float(temperature), dtype=torch.float64, requires_grad=True)
    loss = reference.moco_loss(q64, k.detach().double(), queue.detach().double(), t64, reduction=reduction)
    return loss, q64, t64


EPS32 = torch.finfo(torch.float32).eps
# dL/dT = -(1/T) sum_i g_i sum_j (P_ij - [j = 0]) l_ij is a sum of signed terms (the softmax mean of
# the logits against the positive's) that cancels to ~0 by chance for one row (N = 1, K = 40: 1 to 3
# draws in 1000 failed rel_err < 1e-4). From the exact inputs fp32 rounds each cosine by ~eps32, so
# l_ij by ~eps32 / T, P_ij by ~eps32 P_ij 2 / T, and each product once more:
# temperature_grad_floor adds those per-term errors as independent roundings. TEMP_FLOOR_C = 4:
# measured errors reach 0.4 of the floor at N = 1 and 1.1 at N = 64 (400 draws per shape of SHAPES,
# torch / cpu / triton), and the floor stays a small fraction of tol |dL/dT| (median 0.09 at N = 1,
# < 0.01 at N = 64) unless the sum has cancelled.
TEMP_FLOOR_C = 4.0


def temperature_grad_floor(q, k, queue, temperature, upstream):
    """The per-term fp32 error bounds of dL/dT in units of eps32 (root of the sum of squares);
    `upstream` (N,) are the rows' upstream gradients."""
    u = F.normalize(q.detach().double().cpu(), dim=1)
    v = F.normalize(k.detach().double().cpu(), dim=1)
    logits = torch.cat([(u * v).sum(1, keepdim=True), u @ queue.detach().double().cpu().T], dim=1) / temperature
    probs = logits.softmax(dim=1)
    coef = probs.clone()
    coef[:, 0] -= 1
    per_term = coef.abs() * (1 / temperature + logits.abs()) + probs * logits.abs() * 2 / temperature
    per_term = per_term * upstream.double().cpu().abs()[:, None] / temperature
    return float(per_term.pow(2).sum().sqrt())


def check_against_float64(backend, q, k, queue, temperature, reduction, gen):
    dtype = q.dtype
    q = q.detach().requires_grad_()
    t = torch.tensor(temperature, device=DEVICE, requires_grad=True)
    loss = moco_loss(q, k, queue, t, reduction=reduction, backend=backend)
    expected, q64, t64 = float64_reference(q, k, queue, temperature, reduction)
    # backward_with_random_weights, with the weights kept for the temperature's floor
    weights = torch.rand(expected.shape, generator=gen, dtype=torch.float64) + 0.5
    (loss * weights.to(loss.device, loss.dtype)).sum().backward()
    (expected * weights).sum().backward()
    n = q.shape[0]
    upstream = (weights / n if reduction == "mean" else weights) * torch.ones(n, dtype=torch.float64)
    tol = RTOL[dtype]
    assert loss.dtype == torch.float32
    assert rel_err(loss, expected) < tol, "loss"
    assert q.grad.dtype == dtype
    assert rel_err(q.grad, q64.grad) < tol, "grad of q"
    err, want = abs(float(t.grad) - float(t64.grad)), abs(float(t64.grad))
    bound = tol * want + TEMP_FLOOR_C * EPS32 * temperature_grad_floor(q, k, queue, temperature, upstream)
    assert err <= bound, f"grad of temperature: error {err:.3g} > bound {bound:.3g} (want {want:.3g})"


# ------------------------------------------------------------------------ moco_loss values, gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,queue_dtype,n,d,size", CASES, ids=CASE_IDS)
def test_moco_loss_matches_float64(backend, dtype, queue_dtype, n, d, size, gen):
    q = randn(n, d, dtype=dtype, generator=gen)
    k = randn(n, d, dtype=dtype, generator=gen)
    queue = unit_queue(size, d, queue_dtype, gen)
    check_against_float64(backend, q, k, queue, 0.07, "mean", gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_moco_loss_reductions(backend, reduction, gen):
    q, k = randn(9, 20, generator=gen), randn(9, 20, generator=gen)
    check_against_float64(backend, q, k, unit_queue(45, 20, generator=gen), 0.2, reduction, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,queue_norm", [(0.01, 1.0), (0.07, 30.0), (5.0, 1.0)])
def test_moco_loss_extreme_logits(backend, temperature, queue_norm, gen):
    """T = 0.01 (logits up to 100) and a queue that is NOT unit-norm (logits up to 30 / 0.07):
    the queue is used as stored, so the kernels cannot rely on a fixed bound 1/T."""
    q, k = randn(12, 24, generator=gen), randn(12, 24, generator=gen)
    queue = unit_queue(70, 24, generator=gen) * queue_norm
    queue[5] = F.normalize(q[3:4], dim=1)[0] * queue_norm  # one negative right on top of a query
    check_against_float64(backend, q, k, queue, temperature, "none", gen)


@pytest.mark.parametrize("backend", FUSED)
def test_tiny_loss_keeps_relative_precision(backend, gen):
    """The positive far above every negative: loss ~ 1e-7 while lse ~ l0 ~ 1/T. The fused kernels
    form lse - l0 as log1p(sum_j exp(l_j - l0)) (and P0 - 1 likewise), so the loss and its
    gradient keep fp32's relative precision where lse - l0 in fp32 would keep none."""
    direction = F.normalize(randn(1, 16, generator=gen), dim=1)
    q = direction + 0.05 * randn(4, 16, generator=gen)
    k = q + 0.01 * randn(4, 16, generator=gen)
    queue = F.normalize(-direction + 0.2 * randn(40, 16, generator=gen), dim=1)
    expected, _, _ = float64_reference(q, k, queue, 0.1, "none")
    assert expected.max() < 1e-5
    check_against_float64(backend, q, k, queue, 0.1, "none", gen)


@pytest.mark.parametrize("backend", FUSED)  # the fp32 reference (F.normalize) overflows here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_huge_rows_normalise_without_overflow(backend, dtype, gen):
    """Rows of |x| ~ 1e30 (their squares overflow fp32) give the loss of the unscaled rows, and the
    gradient of q scaled by 1e-30: the norms are taken on the rows divided by their max |x|."""
    q, k = randn(9, 40, generator=gen), randn(9, 40, generator=gen)
    queue = unit_queue(33, 40, generator=gen)
    q_big = (q * 1e30).to(dtype).requires_grad_()
    q_ref = (q_big.detach().double() * 1e-30).requires_grad_()  # the same rows, exactly, unscaled
    loss = moco_loss(q_big, (k * 1e30).to(dtype), queue, 0.2, backend=backend)
    expected = reference.moco_loss(q_ref, k.double(), queue.double(), 0.2)
    loss.backward()
    expected.backward()
    assert rel_err(loss, expected) < RTOL[dtype]
    assert rel_err(q_big.grad.double() * 1e30, q_ref.grad) < RTOL[dtype]


@pytest.mark.parametrize("backend", FUSED)
def test_moco_loss_zero_query_row_uses_clamped_norm(backend, gen):
    """A zero (or tiny) query has n(q) = q / eps: the gradient takes the clamped branch."""
    q, k = randn(6, 10, generator=gen), randn(6, 10, generator=gen)
    q[2] = 0.0
    q[4] *= 1e-14
    check_against_float64(backend, q, k, unit_queue(20, 10, generator=gen), 0.1, "mean", gen)


@pytest.mark.parametrize(
    "splits,block_d,n,d,size", [(3, 16, 19, 40, 70), (5, 16, 7, 33, 200), (2, None, 20, 130, 50), (4, None, 3, 8, 3)]
)
def test_triton_split_merge_and_d_chunks(splits, block_d, n, d, size, gen):
    """The multi-split merge and the D-chunked (wide feature) path of the Triton forward, at small sizes."""
    if "triton" not in cl_fast.backends():
        pytest.skip("backend 'triton' needs triton with a CUDA GPU or TRITON_INTERPRET=1")
    from cl_fast.triton_kernels import moco as triton_moco

    q, k, queue = randn(n, d, generator=gen), randn(n, d, generator=gen), unit_queue(size, d, generator=gen)
    loss, e, c = triton_moco.moco_fwd(q, k, queue, torch.tensor(1 / 0.3, device=q.device), True, splits=splits, block_d=block_d)
    _check_directions(q, k, queue, 0.3, loss, e, c)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_cpu_split_merge(splits, gen):
    if "cpu" not in cl_fast.backends() or DEVICE.type != "cpu":
        pytest.skip("backend 'cpu' needs cl_fast._C built and CPU tensors")
    q, k, queue = randn(150, 24, generator=gen), randn(150, 24, generator=gen), unit_queue(1500, 24, generator=gen)
    loss, e, c = torch.ops.cl_fast_C.moco_fwd(q, k, queue, torch.tensor(1 / 0.3), True, splits)
    _check_directions(q, k, queue, 0.3, loss, e, c)


def _check_directions(q, k, queue, temperature, loss, e, c):
    """The forward's outputs against autograd of the float64 reference, per row:
    e_i = dL_i/dq_i * T and c_i = dL_i/ds (s = 1/T), taken with L = sum_i loss_i."""
    expected, q64, t64 = float64_reference(q, k, queue, temperature, "sum")
    scale = torch.tensor(1 / temperature, dtype=torch.float64, requires_grad=True)
    per_row = reference.moco_loss(q64, k.double(), queue.double(), 1 / scale, reduction="none")
    per_row.sum().backward()
    assert rel_err(loss, per_row) < 1e-4
    assert rel_err(e / temperature, q64.grad) < 1e-4
    assert rel_err(c.sum(), scale.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_into_key_or_queue(backend, gen):
    q = randn(6, 12, generator=gen, requires_grad=True)
    k = randn(6, 12, generator=gen, requires_grad=True)
    queue = unit_queue(20, 12, generator=gen).requires_grad_()
    moco_loss(q, k, queue, backend=backend).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_without_grad_equals_loss_with_grad(backend, gen):
    q, k, queue = randn(7, 12, generator=gen), randn(7, 12, generator=gen), unit_queue(30, 12, generator=gen)
    with torch.no_grad():
        no_grad = moco_loss(q, k, queue, reduction="none", backend=backend)
    with_grad = moco_loss(q.clone().requires_grad_(), k, queue, reduction="none", backend=backend)
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_enqueue_between_loss_and_backward(backend, gen):
    """MoCo's order: loss, enqueue the keys, then backward. The fused backends do not keep the
    queue for backward, so the gradient is the one of the queue as it was at the forward."""
    q, k = randn(8, 16, generator=gen), randn(8, 16, generator=gen)
    bank = MoCoQueue(24, 16, backend=backend).to(DEVICE)
    q1 = q.clone().requires_grad_()
    moco_loss(q1, k, bank.negatives().clone(), backend=backend).backward()
    q2 = q.clone().requires_grad_()
    loss = moco_loss(q2, k, bank.negatives(), backend=backend)
    bank.enqueue(k)
    loss.backward()
    torch.testing.assert_close(q2.grad, q1.grad, rtol=0, atol=0)


def test_reference_matches_moco_code(gen):
    """reference.moco_loss against MoCo's own formulation (moco/builder.py: einsum, (D, K) queue)."""
    q, k, queue_dk = randn(10, 32, generator=gen), randn(10, 32, generator=gen), randn(32, 50, generator=gen)
    queue_dk = F.normalize(queue_dk, dim=0)
    qn, kn = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    l_pos = torch.einsum("nc,nc->n", qn, kn).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", qn, queue_dk.double())
    logits = torch.cat([l_pos, l_neg], dim=1) / 0.07
    expected = F.cross_entropy(logits, torch.zeros(10, dtype=torch.long, device=logits.device))
    actual = reference.moco_loss(q.double(), k.double(), queue_dk.T.double(), 0.07)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend, gen):
    q, k, queue = randn(5, 8, generator=gen), randn(5, 8, generator=gen), unit_queue(20, 8, generator=gen)
    q[1, 3] = math.nan
    k[3, 0] = math.inf
    per_row = moco_loss(q, k, queue, reduction="none", backend=backend)
    assert torch.isnan(per_row[1]) and torch.isnan(per_row[3])
    assert torch.isfinite(per_row[[0, 2, 4]]).all()
    queue[7, 2] = math.nan  # a corrupt queue row poisons every row's loss
    assert torch.isnan(moco_loss(q, k, queue, reduction="none", backend=backend)).all()


# ------------------------------------------------------------------------ bad inputs
def _qkq(n=4, d=8, size=10, dtype=torch.float32):
    return torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype), F.normalize(torch.randn(size, d), dim=1)


BAD_LOSS_CALLS = [
    ("q k shape", lambda: moco_loss(torch.randn(4, 8), torch.randn(5, 8), torch.randn(10, 8)), ValueError, "q and k"),
    ("queue D", lambda: moco_loss(*_qkq()[:2], torch.randn(10, 9)), ValueError, "queue"),
    ("queue 1-D", lambda: moco_loss(*_qkq()[:2], torch.randn(10)), ValueError, "queue must be 2-D"),
    ("empty queue", lambda: moco_loss(*_qkq()[:2], torch.randn(0, 8)), ValueError, "queue"),
    ("zero rows", lambda: moco_loss(*_qkq(n=0)), ValueError, "q"),
    ("3-D q", lambda: moco_loss(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(10, 8)), ValueError, "q must be 2-D"),
    ("integer q", lambda: moco_loss(*_qkq(dtype=torch.int64)), TypeError, "q"),
    ("integer queue", lambda: moco_loss(*_qkq()[:2], torch.ones(10, 8, dtype=torch.int32)), TypeError, "queue"),
    ("mixed q k dtype", lambda: moco_loss(torch.randn(4, 8), torch.randn(4, 8).half(), torch.randn(10, 8)), TypeError, "dtype"),
    ("queue device", lambda: moco_loss(*_qkq()[:2], torch.randn(10, 8, device="meta")), ValueError, "queue"),
    ("not a tensor", lambda: moco_loss([[1.0]], torch.randn(1, 1), torch.randn(3, 1)), TypeError, "q"),
    ("zero temperature", lambda: moco_loss(*_qkq(), 0.0), ValueError, "temperature"),
    ("nan temperature", lambda: moco_loss(*_qkq(), math.nan), ValueError, "temperature"),
    ("string temperature", lambda: moco_loss(*_qkq(), "0.07"), TypeError, "temperature"),
    ("bad reduction", lambda: moco_loss(*_qkq(), reduction="avg"), ValueError, "reduction"),
    ("bad backend", lambda: moco_loss(*_qkq(), backend="fast"), ValueError, "backend"),
    ("cuda on cpu tensors", lambda: moco_loss(*_qkq(), backend="cuda"), ValueError, "backend=.cuda."),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_LOSS_CALLS], ids=[c[0] for c in BAD_LOSS_CALLS])
def test_moco_loss_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_reject_float64(backend):
    q, k, queue = _qkq(dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        moco_loss(q, k, queue, backend=backend)
    with pytest.raises(TypeError, match="float64"):
        moco_loss(q.float(), k.float(), queue.double(), backend=backend)


# ------------------------------------------------------------------------ queue_update_
def _ring_model(queue, keys, ptr):
    """The enqueue written as a Python loop over rows (independent of reference.queue_update_)."""
    out = queue.clone()
    for b in range(keys.shape[0]):
        out[(ptr + b) % queue.shape[0]] = F.normalize(keys[b : b + 1].float(), dim=1)[0].to(queue.dtype)
    return out, (ptr + keys.shape[0]) % queue.shape[0]


QUEUE_CASES = [  # (K, B, ptr): no wrap, wrap, B == K (whole queue), end exactly at K, K not a multiple of B
    (10, 3, 0), (10, 3, 8), (7, 7, 3), (12, 4, 8), (10, 4, 9), (5, 1, 4),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("ptr_kind", ["int", "tensor"])
@pytest.mark.parametrize("size,batch,start", QUEUE_CASES, ids=[f"K{k}-B{b}-ptr{p}" for k, b, p in QUEUE_CASES])
def test_queue_update_writes_normalised_keys_with_wraparound(backend, queue_dtype, ptr_kind, size, batch, start, gen):
    d = 19
    queue = unit_queue(size, d, queue_dtype, gen)
    keys = randn(batch, d, generator=gen) * 3.0
    expected, expected_ptr = _ring_model(queue, keys, start)
    ptr = start if ptr_kind == "int" else torch.tensor(start, device=DEVICE)
    returned = queue_update_(queue, keys, ptr, backend=backend)
    if ptr_kind == "int":
        assert returned == expected_ptr and isinstance(returned, int)
    else:
        assert returned is ptr and int(ptr) == expected_ptr and ptr.dtype == torch.int64
    written = torch.zeros(size, dtype=torch.bool)
    written[[(start + b) % size for b in range(batch)]] = True
    written = written.to(DEVICE)
    assert torch.equal(queue[~written], expected[~written]), "rows outside the batch changed"
    # one rounding step of the queue's dtype between the kernels and the loop above
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[queue_dtype]
    torch.testing.assert_close(queue.float(), expected.float(), rtol=0, atol=ulp)


# (K, B, first key row, ptr): keys = queue[first : first + B], written at ptr (overlapping the keys)
ALIAS_CASES = [(40, 40, 0, 5), (40, 32, 0, 16), (40, 16, 3, 0), (10, 7, 2, 6), (12, 5, 4, 6)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,batch,first,start", ALIAS_CASES, ids=[f"K{k}-B{b}-keys{f}-ptr{p}" for k, b, f, p in ALIAS_CASES])
def test_queue_update_keys_viewing_the_queue(backend, size, batch, first, start, gen):
    """keys a view of queue rows the enqueue overwrites: the result is as if every key was read
    first (issue 11: Triton wrote 16 of 40 rows wrong at B = 40)."""
    queue = randn(size, 19, generator=gen) * 3.0  # not unit rows, so a re-normalised row is visible
    keys = queue[first : first + batch]
    expected, expected_ptr = _ring_model(queue.clone(), keys.clone(), start)
    ptr = torch.tensor(start, device=DEVICE)
    queue_update_(queue, keys, ptr, backend=backend)
    assert int(ptr) == expected_ptr
    torch.testing.assert_close(queue, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_update_sequence_of_batches(backend, gen):
    """Five enqueues of B=3 into K=10 with a device pointer: every wrap lands where the ring puts it."""
    size, d = 10, 6
    queue = unit_queue(size, d, generator=gen)
    expected, expected_ptr = queue.clone(), 0
    ptr = torch.zeros((), dtype=torch.int64, device=DEVICE)
    for _ in range(5):
        keys = randn(3, d, generator=gen)
        queue_update_(queue, keys, ptr, backend=backend)
        expected, expected_ptr = _ring_model(expected, keys, expected_ptr)
        assert int(ptr) == expected_ptr
    torch.testing.assert_close(queue, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_update_int32_pointer_and_keys_dtype(backend, gen):
    queue = unit_queue(9, 5, generator=gen)
    keys = randn(4, 5, dtype=torch.bfloat16, generator=gen)
    ptr = torch.tensor(7, dtype=torch.int32, device=DEVICE)
    expected, expected_ptr = _ring_model(queue, keys, 7)
    queue_update_(queue, keys, ptr, backend=backend)
    assert ptr.dtype == torch.int32 and int(ptr) == expected_ptr
    torch.testing.assert_close(queue, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_update_nan_key_is_visible_not_silent(backend, gen):
    """A NaN key becomes a NaN queue row (which every later loss reports), nothing else changes."""
    queue = unit_queue(8, 4, generator=gen)
    before = queue.clone()
    keys = randn(3, 4, generator=gen)
    keys[1, 2] = math.nan
    assert queue_update_(queue, keys, 6, backend=backend) == 1
    assert torch.isnan(queue[7]).all()
    assert torch.isfinite(queue[[0, 6]]).all()
    assert torch.equal(queue[1:6], before[1:6])


def _queue_and_keys(size=10, batch=3, d=8):
    return torch.randn(size, d), torch.randn(batch, d)


BAD_QUEUE_CALLS = [
    ("B > K", lambda: queue_update_(*_queue_and_keys(size=4, batch=5), 0), ValueError, "B=5"),
    ("keys D", lambda: queue_update_(torch.randn(10, 8), torch.randn(3, 7), 0), ValueError, "keys"),
    ("keys 1-D", lambda: queue_update_(torch.randn(10, 8), torch.randn(8), 0), ValueError, "keys must be 2-D"),
    ("keys integer", lambda: queue_update_(torch.randn(10, 8), torch.ones(3, 8, dtype=torch.int64), 0), TypeError, "keys"),
    ("queue integer", lambda: queue_update_(torch.ones(10, 8, dtype=torch.int64), torch.randn(3, 8), 0), TypeError, "queue"),
    ("keys device", lambda: queue_update_(torch.randn(10, 8), torch.randn(3, 8, device="meta"), 0), ValueError, "keys"),
    ("ptr too large", lambda: queue_update_(*_queue_and_keys(), 10), ValueError, "ptr"),
    ("ptr negative", lambda: queue_update_(*_queue_and_keys(), -1), ValueError, "ptr"),
    ("ptr float", lambda: queue_update_(*_queue_and_keys(), 1.0), TypeError, "ptr"),
    ("ptr bool", lambda: queue_update_(*_queue_and_keys(), True), TypeError, "ptr"),
    ("ptr float tensor", lambda: queue_update_(*_queue_and_keys(), torch.tensor(1.0)), TypeError, "ptr"),
    ("ptr 1-D tensor", lambda: queue_update_(*_queue_and_keys(), torch.tensor([1])), ValueError, "ptr"),
    ("ptr device", lambda: queue_update_(*_queue_and_keys(), torch.tensor(1, device="meta")), ValueError, "ptr"),
    ("queue requires grad", lambda: queue_update_(torch.randn(10, 8, requires_grad=True), torch.randn(3, 8), 0), ValueError, "queue"),
    ("queue not contiguous", lambda: queue_update_(torch.randn(8, 10).T, torch.randn(3, 8), 0), ValueError, "contiguous"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_QUEUE_CALLS], ids=[c[0] for c in BAD_QUEUE_CALLS])
def test_queue_update_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_update_batch_larger_than_queue_leaves_it_untouched(backend, gen):
    queue = unit_queue(4, 3, generator=gen)
    before = queue.clone()
    ptr = torch.tensor(1, device=DEVICE)
    with pytest.raises(ValueError, match="B=6"):
        queue_update_(queue, randn(6, 3, generator=gen), ptr, backend=backend)
    assert torch.equal(queue, before) and int(ptr) == 1


# ------------------------------------------------------------------------ MoCoQueue
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_moco_queue_enqueue_and_negatives(backend, dtype, gen):
    bank = MoCoQueue(10, 6, dtype=dtype, backend=backend).to(DEVICE)
    assert bank.queue.shape == (10, 6) and bank.queue.dtype == dtype and int(bank.ptr) == 0
    torch.testing.assert_close(bank.queue.float().norm(dim=1), torch.ones(10, device=DEVICE), rtol=0, atol=1e-2)
    expected, expected_ptr = bank.queue.clone(), 0
    for batch in (4, 4, 4, 10):  # wraps at 12 -> 2, then B == K
        keys = randn(batch, 6, generator=gen, requires_grad=True)
        bank.enqueue(keys)
        expected, expected_ptr = _ring_model(expected, keys.detach(), expected_ptr)
        assert int(bank.ptr) == expected_ptr
    negatives = bank.negatives()
    assert not negatives.requires_grad and negatives.data_ptr() == bank.queue.data_ptr()
    torch.testing.assert_close(negatives.float(), expected.float(), rtol=0, atol=8e-3 if dtype != torch.float32 else 1e-6)
    with pytest.raises(ValueError, match="B=11"):
        bank.enqueue(randn(11, 6, generator=gen))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moco_queue_checkpoint_round_trip(backend, gen):
    bank = MoCoQueue(13, 5, backend=backend).to(DEVICE)
    for _ in range(3):
        bank.enqueue(randn(4, 5, generator=gen))
    assert set(bank.state_dict()) == {"queue", "ptr"}
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = MoCoQueue(13, 5, seed=123, backend=backend).to(DEVICE)
    assert not torch.equal(restored.queue, bank.queue)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.queue, bank.queue) and int(restored.ptr) == int(bank.ptr) == 12
    keys = randn(4, 5, generator=gen)  # and they go on identically, across the wrap
    bank.enqueue(keys)
    restored.enqueue(keys)
    assert torch.equal(restored.queue, bank.queue) and int(restored.ptr) == int(bank.ptr) == 3


def test_moco_queue_seeded_init_is_identical():
    assert torch.equal(MoCoQueue(16, 4).queue, MoCoQueue(16, 4).queue)
    assert not torch.equal(MoCoQueue(16, 4).queue, MoCoQueue(16, 4, seed=1).queue)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(size=0, dim=4), ValueError, "size"),
        (dict(size=8, dim=0), ValueError, "dim"),
        (dict(size=8.0, dim=4), TypeError, "size"),
        (dict(size=8, dim=4, dtype=torch.int64), TypeError, "dtype"),
        (dict(size=8, dim=4, backend="fast"), ValueError, "backend"),
    ],
)
def test_moco_queue_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MoCoQueue(**kwargs)


def test_moco_queue_enqueue_bad_keys():
    bank = MoCoQueue(8, 4)
    with pytest.raises(ValueError, match="keys"):
        bank.enqueue(torch.randn(2, 5))


# ------------------------------------------------------------------------ public API, compile, opcheck
def test_public_names():
    assert cl_fast.moco_loss is moco.moco_loss
    assert cl_fast.queue_update_ is moco.queue_update_
    assert cl_fast.MoCoQueue is moco.MoCoQueue
    assert {"moco_loss", "queue_update_", "MoCoQueue"} <= set(cl_fast.__all__)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_path_allocates_no_n_by_k_matrix(backend, gen):
    from test_api_contract import AllocationRecorder, _largest_cpu_allocation

    # n * size is far above every O((n + size) * d) buffer (and the Triton interpreter's byte
    # copies of the queue, 4 * size * d)
    n, d, size = 256, 4, 1000
    q = randn(n, d, generator=gen, requires_grad=True)
    k, queue = randn(n, d, generator=gen), unit_queue(size, d, generator=gen)
    temperature = torch.tensor(0.2, requires_grad=True)

    def forward_backward():
        moco_loss(q, k, queue, temperature, backend=backend).backward()

    with AllocationRecorder() as recorder:
        forward_backward()
    assert q.grad is not None and temperature.grad is not None
    assert recorder.largest < n * size // 4
    if DEVICE.type == "cpu":
        assert _largest_cpu_allocation(forward_backward) < 4 * n * size // 4


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph_no_graph_break(backend, gen):
    torch._dynamo.reset()

    def step(q, k, queue, temperature):
        return moco_loss(q, k, queue, temperature, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q = randn(10, 12, generator=gen, requires_grad=True)
    k, queue = randn(10, 12, generator=gen), unit_queue(40, 12, generator=gen)
    temperature = torch.tensor(0.3, requires_grad=True)
    loss = compiled(q, k, queue, temperature)
    loss.backward()
    q_ref, t_ref = q.detach().clone().requires_grad_(), temperature.detach().clone().requires_grad_()
    expected = step(q_ref, k, queue, t_ref)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(temperature.grad, t_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_compile_enqueue_with_device_pointer(backend, gen):
    torch._dynamo.reset()
    queue, keys, ptr = unit_queue(9, 4, generator=gen), randn(3, 4, generator=gen), torch.tensor(7, device=DEVICE)
    expected, _ = _ring_model(queue, keys, 7)
    def step(queue, keys, ptr):
        return queue_update_(queue, keys, ptr, backend=backend)

    torch.compile(step, fullgraph=True, backend="aot_eager")(queue, keys, ptr)
    assert int(ptr) == 1
    torch.testing.assert_close(queue, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, gen):
    q = randn(6, 10, generator=gen, requires_grad=True)
    k, queue = randn(6, 10, generator=gen), unit_queue(20, 10, generator=gen)
    scale = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    for need_grad in (True, False):
        args = (q if need_grad else q.detach(), k, queue, scale if need_grad else scale.detach(), need_grad, backend)
        torch.library.opcheck(torch.ops.cl_fast.moco_fwd.default, args)
    ptr = torch.tensor(15, device=DEVICE)
    torch.library.opcheck(torch.ops.cl_fast.queue_update_.default, (queue.clone(), k, ptr, backend))
