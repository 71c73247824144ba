"""The cuda backend (csrc/cuda) on a GPU: values and gradients against a float64 evaluation of the
reference, every op, ragged shapes, fp32/fp16/bf16, the tiny-temperature fallback, saturated rows,
bit-identical repeated calls, CUDA-graph capture, compute-sanitizer memcheck, torch.compile
(fullgraph) and opcheck on CUDA tensors. Skipped without a CUDA GPU and the CUDA build of
cl_fast._C (issue 8 part 4).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import cl_fast
from cl_fast import reference

from conftest import RTOL, backward_with_random_weights, rel_err


def _cuda_kernels_built() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cl_fast._C  # noqa: F401
    except ImportError:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("cl_fast_C::ntxent_fwd", "CUDA")


pytestmark = pytest.mark.skipif(not _cuda_kernels_built(), reason="needs a CUDA GPU and the CUDA build of cl_fast._C")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# N rows per view x D features: ragged against the 32-row halves, 64-column tiles, 128-byte D chunks
# and 128-feature gradient slices.
SHAPES = [(2, 3), (5, 16), (37, 77), (64, 128), (100, 200), (129, 300)]
DEV = torch.device("cuda")


def _inputs(gen, *shapes, dtype):
    """Fresh random CUDA inputs of `dtype` (leaf, requires grad) and their float64 CPU copies."""
    out = []
    for shape in shapes:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        fused = x.to(DEV, dtype).requires_grad_(True)
        ref = fused.detach().cpu().double().requires_grad_(True)  # the rounded input, in float64
        out.append((fused, ref))
    return out


def _check(loss, expected, dtype, gen, pairs):
    assert torch.isfinite(loss).all()
    assert rel_err(loss, expected) < RTOL[dtype], (loss, expected)
    backward_with_random_weights(loss, expected, gen)
    for fused, ref in pairs:
        assert fused.grad is not None and fused.grad.dtype == fused.dtype
        assert rel_err(fused.grad, ref.grad) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 0.07, 0.01])  # 0.01: 2/T = 200 > 80, the running-max path
def test_nt_xent(gen, n, d, dtype, temperature):
    (z1, r1), (z2, r2) = _inputs(gen, (n, d), (n, d), dtype=dtype)
    loss = cl_fast.nt_xent(z1, z2, temperature, reduction="none", backend="cuda")
    expected = reference.nt_xent(r1, r2, temperature, reduction="none")
    _check(loss, expected, dtype, gen, [(z1, r1), (z2, r2)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(37, 77), (129, 300)])
def test_nt_xent_temperature_gradient(gen, n, d, dtype):
    (z1, r1), (z2, r2) = _inputs(gen, (n, d), (n, d), dtype=dtype)
    temperature = torch.tensor(0.2, device=DEV, requires_grad=True)
    temperature_ref = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    cl_fast.nt_xent(z1, z2, temperature, backend="cuda").backward()
    reference.nt_xent(r1, r2, temperature_ref).backward()
    assert rel_err(temperature.grad, temperature_ref.grad) < RTOL[dtype]
    assert rel_err(z1.grad, r1.grad) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("temperature", [0.1, 0.01])
def test_info_nce(gen, n, d, dtype, symmetric, temperature):
    (q, rq), (k, rk) = _inputs(gen, (n, d), (n, d), dtype=dtype)
    loss = cl_fast.info_nce(q, k, temperature, symmetric=symmetric, reduction="none", backend="cuda")
    expected = reference.info_nce(rq, rk, temperature, symmetric=symmetric, reduction="none")
    _check(loss, expected, dtype, gen, [(q, rq), (k, rk)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
def test_clip_loss(gen, n, d, dtype):
    (img, ri), (txt, rt) = _inputs(gen, (n, d), (n, d), dtype=dtype)
    scale = torch.tensor(14.0, device=DEV, requires_grad=True)
    scale_ref = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    loss = cl_fast.clip_loss(img, txt, scale, normalize=True, backend="cuda")
    expected = reference.clip_loss(ri, rt, scale_ref, normalize=True)
    assert rel_err(loss, expected) < RTOL[dtype]
    loss.backward()
    expected.backward()
    for fused, ref in [(img, ri), (txt, rt), (scale, scale_ref)]:
        assert rel_err(fused.grad, ref.grad) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("both", [True, False])
def test_cross_ops_features_as_given(gen, n, d, dtype, both):
    """cross_fwd / cross_bwd with normalize=False (OpenCLIP: logits s q.k, not bounded by s, the
    running-max path) against autograd of the float64 per-row cross-entropies."""
    q = (torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.3).to(DEV, dtype)
    k = (torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.3).to(DEV, dtype)
    rq, rk = (t.cpu().double().requires_grad_(True) for t in (q, k))
    rs = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    logits = rs * rq @ rk.T
    labels = torch.arange(n)
    ce = torch.nn.functional.cross_entropy
    exp_row, exp_col = ce(logits, labels, reduction="none"), ce(logits.T, labels, reduction="none")
    scale = torch.tensor(14.0, device=DEV)
    row_loss, col_loss, row_lse, col_lse = torch.ops.cl_fast_C.cross_fwd(q, k, scale, both, False)
    assert rel_err(row_loss, exp_row) < RTOL[dtype]
    assert (row_loss >= 0).all()
    if both:
        assert rel_err(col_loss, exp_col) < RTOL[dtype]
    else:
        assert col_loss.numel() == 0
    g_row = torch.rand(n, generator=gen, dtype=torch.float64)
    g_col = torch.rand(n, generator=gen, dtype=torch.float64) if both else torch.zeros(n, dtype=torch.float64)
    ((exp_row * g_row).sum() + (exp_col * g_col).sum()).backward()
    dq, dk, dscale = torch.ops.cl_fast_C.cross_bwd(
        g_row.to(DEV, torch.float32), g_col.to(DEV, torch.float32) if both else torch.empty(0, device=DEV),
        q, k, scale, row_lse, col_lse, both, False)
    for fused, ref in [(dq, rq.grad), (dk, rk.grad), (dscale, rs.grad)]:
        assert rel_err(fused, ref) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturated_rows_keep_relative_precision(gen, dtype):
    """Positives far above every negative: loss ~ e^-(gap), computed as log1p, never negative."""
    (z1, r1), = _inputs(gen, (64, 128), dtype=dtype)
    z2 = z1.detach().clone().requires_grad_(True)
    loss = cl_fast.nt_xent(z1, z2, 0.02, reduction="none", backend="cuda")
    expected = reference.nt_xent(r1, z2.detach().cpu().double(), 0.02, reduction="none")
    assert (loss >= 0).all()
    tiny = expected > 0
    assert (((loss.double().cpu() - expected).abs() / expected.clamp_min(1e-300))[tiny] < 50 * RTOL[dtype]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # fp16 tops out at 65504
@pytest.mark.parametrize("family", ["nt_xent", "info_nce"])
def test_huge_rows_stay_finite_and_exact(gen, dtype, family):
    """Rows scaled by 2^k up to 2^126: raw dot products would overflow fp32 (beyond ~1e19); the
    kernels scale such rows by an exact power of two, so the normalised loss equals the loss of the
    unscaled rows and grad(2^k x) = grad(x) / 2^k."""
    n, d = 70, 150
    exponents = torch.tensor([0, 45, 70, 100, -30], dtype=torch.float64)
    row_scale = [torch.exp2(exponents[torch.randint(0, 5, (n,), generator=gen)]).unsqueeze(1) for _ in range(2)]
    pairs = _inputs(gen, (n, d), (n, d), dtype=dtype)
    base = [ref for _, ref in pairs]
    # 2^k times a dtype-rounded value is exact in fp32 / bf16 (no overflow, no subnormal)
    fused = [(ref.detach() * sc).to(DEV, dtype).requires_grad_(True) for ref, sc in zip(base, row_scale)]

    def run(a, b):
        if family == "nt_xent":
            return cl_fast.nt_xent(a, b, 0.1, reduction="none", backend="cuda")
        return cl_fast.info_nce(a, b, 0.1, symmetric=True, reduction="none", backend="cuda")

    def expect(a, b):
        if family == "nt_xent":
            return reference.nt_xent(a, b, 0.1, reduction="none")
        return reference.info_nce(a, b, 0.1, symmetric=True, reduction="none")

    loss = run(*fused)
    expected = expect(*base)
    assert torch.isfinite(loss).all()
    assert rel_err(loss, expected) < RTOL[dtype]
    weights = torch.rand(loss.shape, generator=gen, dtype=torch.float64)
    (loss * weights.to(DEV)).sum().backward()
    (expected * weights).sum().backward()
    for x, ref, sc in zip(fused, base, row_scale):
        assert torch.isfinite(x.grad).all()
        assert rel_err(x.grad.cpu().double() * sc, ref.grad) < RTOL[dtype]

    # rows at the top of the range (max |x| = 2^127 in every row): still finite and right
    top = [(ref.detach() / ref.detach().abs().amax(1, keepdim=True) * 2.0**127).to(DEV, dtype).requires_grad_(True)
           for ref in base]
    top_loss = run(*top)
    assert torch.isfinite(top_loss).all()
    assert rel_err(top_loss, expect(*[x.detach().cpu().double() for x in top])) < RTOL[dtype]
    top_loss.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in top)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_calls_are_bit_identical(gen, dtype):
    (z1, _), (z2, _) = _inputs(gen, (300, 130), (300, 130), dtype=dtype)
    temperature = torch.tensor(0.1, device=DEV, requires_grad=True)
    results = []
    for _ in range(3):
        for x in (z1, z2, temperature):
            x.grad = None
        loss = cl_fast.nt_xent(z1, z2, temperature, backend="cuda")
        loss.backward()
        results.append([loss.detach().clone(), z1.grad.clone(), z2.grad.clone(), temperature.grad.clone()])
    (q, _), (k, _) = _inputs(gen, (300, 130), (300, 130), dtype=dtype)
    for _ in range(2):
        q.grad = k.grad = None
        loss = cl_fast.info_nce(q, k, 0.1, symmetric=True, backend="cuda")
        loss.backward()
        results.append([loss.detach().clone(), q.grad.clone(), k.grad.clone()])
    for a, b in [(results[0], results[1]), (results[0], results[2]), (results[3], results[4])]:
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# d = 1500: rows past a warp's registers take the streamed kernels
@pytest.mark.parametrize("n,d,size", [(5, 16, 7), (64, 128, 1000), (33, 200, 4099), (9, 1500, 300)])
def test_moco_loss(gen, n, d, size, dtype):
    (q, rq), (k, rk) = _inputs(gen, (n, d), (n, d), dtype=dtype)
    queue = torch.nn.functional.normalize(torch.randn(size, d, generator=gen, dtype=torch.float64), dim=1)
    loss = cl_fast.moco_loss(q, k, queue.to(DEV, dtype), 0.07, reduction="none", backend="cuda")
    expected = reference.moco_loss(rq, rk, queue.to(dtype).double(), 0.07, reduction="none")
    _check(loss, expected, dtype, gen, [(q, rq)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("start", [0, 5, 11])
@pytest.mark.parametrize("d", [40, 1100])
def test_queue_update_wraps_and_moves_ptr_on_device(gen, dtype, start, d):
    size = 13
    queue = torch.randn(size, d, generator=gen).to(DEV, dtype)
    keys = torch.randn(6, d, generator=gen).to(DEV, dtype)
    expected = queue.detach().cpu().double().clone()
    ptr = torch.tensor(start, device=DEV)
    ptr_ref = reference.queue_update_(expected, keys.cpu().double(), start)
    cl_fast.queue_update_(queue, keys, ptr, backend="cuda")
    assert int(ptr) == ptr_ref
    assert rel_err(queue, expected.to(dtype)) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 3), (37, 77), (129, 1000), (7, 1500)])
def test_byol_loss(gen, n, d, dtype):
    (p, rp), (z, rz) = _inputs(gen, (n, d), (n, d), dtype=dtype)
    loss = cl_fast.byol_loss(p, z, reduction="none", backend="cuda")
    expected = reference.byol_loss(rp, rz, reduction="none")
    _check(loss, expected, dtype, gen, [(p, rp), (z, rz)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,k", [(1, 3), (37, 77), (300, 1000)])
@pytest.mark.parametrize("epsilon", [0.05, 0.001])  # 0.001: scores / eps far past fp32's exp range
def test_sinkhorn(gen, b, k, dtype, epsilon):
    scores = torch.randn(b, k, generator=gen, dtype=torch.float64)
    out = cl_fast.sinkhorn(scores.to(DEV, dtype), iterations=3, epsilon=epsilon, backend="cuda")
    expected = reference.sinkhorn(scores.to(dtype).double(), epsilon=epsilon, iterations=3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, expected) < (1e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES)
def test_siglip_ops(gen, n, d, dtype):
    """siglip_fwd / siglip_bwd (the raw ops) against autograd of the float64 formula."""
    (x, rx), (y, ry) = _inputs(gen, (n, d), (n, d), dtype=dtype)
    with torch.no_grad():  # unit-norm-ish features, as a model gives
        x.mul_(d ** -0.5)
        y.mul_(d ** -0.5)
    rx, ry = (t.detach().cpu().double().requires_grad_(True) for t in (x, y))
    scale, bias = torch.tensor(10.0, device=DEV), torch.tensor(-10.0, device=DEV)
    rs = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    rb = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    z = 2 * torch.eye(n, dtype=torch.float64) - 1
    expected = -torch.nn.functional.logsigmoid(z * (rs * rx @ ry.T + rb)).sum(dim=1)
    row_loss = torch.ops.cl_fast_C.siglip_fwd(x.detach(), y.detach(), scale, bias)
    assert rel_err(row_loss, expected) < RTOL[dtype]
    grad = torch.rand(n, generator=gen, dtype=torch.float64)
    (expected * grad).sum().backward()
    dx, dy, dscale, dbias = torch.ops.cl_fast_C.siglip_bwd(grad.to(DEV, torch.float32), x.detach(), y.detach(), scale,
                                                           bias)
    for fused, ref in [(dx, rx.grad), (dy, ry.grad), (dscale, rs.grad), (dbias, rb.grad)]:
        assert rel_err(fused, ref) < RTOL[dtype]


# InfoNCE block pieces (rows against one column slice; the distributed losses): (m, c, d, diag),
# ragged against the 64-row / 64-column tiles, the 128-byte D chunks and the 128-feature slices.
# diag: 0 (one slice), a ring slice's offset (exclusions inside the slice, or partly before it),
# offsets past the slice (nothing excluded); (2, 2, 5, 0) with pairs leaves both rows empty.
# Few row blocks against several column tiles take the column splits (forward, drows), few column
# blocks against several row tiles the row splits (dcols): partials merged in a fixed order.
# (66, 17000, 40, 3000) gives two column tiles per split on a 132-SM GPU, (17000, 66, 40, -3000)
# three row tiles per split; (130, 64, ...) has one column tile (no column split).
BLOCK_CASES = [(2, 2, 5, 0), (2, 3, 5, 0), (38, 130, 77, 0), (64, 200, 128, 64), (130, 64, 300, -40),
               (70, 150, 40, 150), (66, 17000, 40, 3000), (17000, 66, 40, -3000)]


def _block_inputs(gen, m, c, d, dtype, norm=3.0):
    """rows (m, d), cols (c, d) of `dtype` with row norms ~ norm (features as given, not unit), and
    their float64 copies."""
    rows = (torch.randn(m, d, generator=gen, dtype=torch.float64) * (norm / d ** 0.5)).to(dtype)
    cols = (torch.randn(c, d, generator=gen, dtype=torch.float64) * (norm / d ** 0.5)).to(dtype)
    return rows.to(DEV), cols.to(DEV), rows.double(), cols.double()


def _merged_lse(gen, lse):
    """A merged lse over this slice and others, log(e^lse + e^other) >= lse (finite), with one row
    at -inf (no column anywhere: its terms must vanish)."""
    other = torch.randn(lse.shape, generator=gen, dtype=torch.float64) * 2 + 3
    merged = torch.logaddexp(lse, other).float()
    if merged.numel():
        merged[merged.numel() // 2] = float("-inf")
    return merged


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,c,d,diag", BLOCK_CASES)
@pytest.mark.parametrize("pairs", [False, True])
def test_infonce_block_pieces(gen, m, c, d, diag, pairs, dtype):
    """infonce_block_fwd / infonce_block_bwd (the raw ops) against the float64 reference: lse (with
    -inf exactly where a row keeps no column), drows, dcols, dscale."""
    rows, cols, rr, rc = _block_inputs(gen, m, c, d, dtype)
    scale_value = 3.0
    scale = torch.tensor(scale_value, device=DEV)
    ops = torch.ops.cl_fast_C
    lse = ops.infonce_block_fwd(rows, cols, scale, diag, pairs)
    expected = reference.infonce_block_lse(rr, rc, scale_value, diag, pairs)
    assert lse.dtype == torch.float32 and lse.shape == (m,)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(lse).cpu(), finite)
    assert (lse.cpu()[~finite] == float("-inf")).all()
    if finite.any():
        assert rel_err(lse.cpu()[finite], expected[finite]) < RTOL[dtype]

    merged = _merged_lse(gen, expected)
    grad = (torch.rand(m, generator=gen, dtype=torch.float64) + 0.5).float()
    drows, dcols, dscale = ops.infonce_block_bwd(grad.to(DEV), rows, cols, scale, merged.to(DEV), diag, pairs)
    e_rows, e_cols, e_scale = reference.infonce_block_grad(grad.double(), rr, rc, scale_value, merged.double(), diag,
                                                           pairs)
    for got, want in [(drows, e_rows), (dcols, e_cols), (dscale, e_scale)]:
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < RTOL[dtype]
    if m:
        assert (drows[m // 2] == 0).all()  # the row with lse = -inf


@pytest.mark.parametrize("m,c", [(0, 5), (4, 0)])
def test_infonce_block_pieces_empty(gen, m, c):
    """No rows: empty lse and drows, zero dcols and dscale. No columns: lse = -inf, zero gradients."""
    rows, cols, _, _ = _block_inputs(gen, m, c, 7, torch.float32)
    scale = torch.tensor(2.0, device=DEV)
    ops = torch.ops.cl_fast_C
    lse = ops.infonce_block_fwd(rows, cols, scale, 0, True)
    assert lse.shape == (m,) and (lse == float("-inf")).all()
    drows, dcols, dscale = ops.infonce_block_bwd(torch.rand(m, device=DEV), rows, cols, scale,
                                                 torch.zeros(m, device=DEV), 0, True)
    assert drows.shape == (m, 7) and dcols.shape == (c, 7)
    assert (drows == 0).all() and (dcols == 0).all() and float(dscale) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pairs", [False, True])
def test_infonce_block_large_logits_and_repeats(gen, dtype, pairs):
    """Features far from unit norm (|S| up to ~1000: only a running row max keeps exp in range),
    against float64; then repeated calls are bit-identical (no atomics). An S error of delta moves P
    by a relative delta, and fp32 S of magnitude ~1000 carries delta ~ 1e-4 from its rounding alone:
    fp32 gets 1e-3 here."""
    m, c, d = 96, 200, 64
    rows, cols, rr, rc = _block_inputs(gen, m, c, d, dtype, norm=30.0)
    scale_value = 1.0
    scale = torch.tensor(scale_value, device=DEV)
    tol = 1e-3 if dtype == torch.float32 else RTOL[dtype]
    ops = torch.ops.cl_fast_C
    lse = ops.infonce_block_fwd(rows, cols, scale, 5, pairs)
    expected = reference.infonce_block_lse(rr, rc, scale_value, 5, pairs)
    assert expected.abs().max() > 200
    assert rel_err(lse, expected) < RTOL[dtype]
    grad = torch.rand(m, generator=gen)
    merged = lse.detach().cpu()  # one slice: the merged lse is this slice's
    outs = [ops.infonce_block_bwd(grad.to(DEV), rows, cols, scale, merged.to(DEV), 5, pairs) for _ in range(2)]
    want = reference.infonce_block_grad(grad.double(), rr, rc, scale_value, merged.double(), 5, pairs)
    for got, w in zip(outs[0], want):
        assert rel_err(got, w) < tol
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.equal(lse, ops.infonce_block_fwd(rows, cols, scale, 5, pairs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # fp16 tops out at 65504
@pytest.mark.parametrize("pairs", [False, True])
def test_infonce_block_huge_rows(gen, dtype, pairs):
    """Rows scaled by 2^70 (or 2^35, or 1) against columns scaled by 2^60 (or 1), scale 2^-125: raw
    dots up to ~2^130 leave fp32's range while S stays O(10); the kernels scale rows with max |x|
    >= 2^40 by exact powers of two. dscale = sum dS rows.cols is itself past fp32 here: inf."""
    m, c, d = 70, 150, 40
    rows, cols, rr, rc = _block_inputs(gen, m, c, d, dtype, norm=1.0)
    row_exp = torch.tensor([70.0, 35.0, 0.0])[torch.randint(0, 3, (m, 1), generator=gen)]
    col_exp = torch.tensor([60.0, 0.0])[torch.randint(0, 2, (c, 1), generator=gen)]
    rr, rc = rr * torch.exp2(row_exp), rc * torch.exp2(col_exp)  # exact in fp32 / bf16
    rows, cols = rr.to(DEV, dtype), rc.to(DEV, dtype)
    scale_value = 2.0 ** -125
    scale = torch.tensor(scale_value, device=DEV)
    ops = torch.ops.cl_fast_C
    lse = ops.infonce_block_fwd(rows, cols, scale, 3, pairs)
    expected = reference.infonce_block_lse(rr, rc, scale_value, 3, pairs)
    assert torch.isfinite(lse).all()
    assert rel_err(lse, expected) < RTOL[dtype]
    grad = torch.rand(m, generator=gen)
    drows, dcols, dscale = ops.infonce_block_bwd(grad.to(DEV), rows, cols, scale, lse, 3, pairs)
    e_rows, e_cols, e_scale = reference.infonce_block_grad(grad.double(), rr, rc, scale_value,
                                                           lse.cpu().double(), 3, pairs)
    assert rel_err(drows, e_rows) < RTOL[dtype]
    assert rel_err(dcols, e_cols) < RTOL[dtype]
    assert e_scale.abs() > torch.finfo(torch.float32).max
    assert float(dscale) == float("inf") * float(e_scale.sign())


def test_cuda_graph_capture_forward_backward(gen):
    (z1, _), (z2, _) = _inputs(gen, (256, 128), (256, 128), dtype=torch.bfloat16)
    temperature = torch.tensor(0.1, device=DEV, requires_grad=True)

    def step():
        loss = cl_fast.nt_xent(z1, z2, temperature, backend="cuda")
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    z1.grad = z2.grad = temperature.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    z1.grad = z2.grad = temperature.grad = None
    eager = step()
    assert torch.equal(captured, eager)


def _opcheck_cases(gen):
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(DEV, dtype)

    scale = torch.tensor(10.0, device=DEV)
    ops = torch.ops.cl_fast_C
    z1, z2 = t(37, 77), t(37, 77)
    loss, lse = ops.ntxent_fwd(z1, z2, scale)
    row_loss, col_loss, row_lse, col_lse = ops.cross_fwd(z1, z2, scale, True, True)
    queue = t(50, 77)
    p, z = t(9, 33), t(9, 33)
    _, stats = ops.byol_fwd(p, z)
    scores = t(20, 30)
    return [
        (ops.ntxent_fwd, (z1, z2, scale)),
        (ops.ntxent_bwd, (torch.rand(74, device=DEV), z1, z2, scale, lse)),
        (ops.cross_fwd, (z1, z2, scale, True, False)),
        (ops.cross_bwd, (torch.rand(37, device=DEV), torch.rand(37, device=DEV), z1, z2, scale, row_lse, col_lse, True,
                         True)),
        (ops.moco_fwd, (z1, z2, queue, scale, True, 0)),
        (ops.moco_queue_update_, (queue.clone(), t(5, 77), torch.tensor(3, device=DEV))),
        (ops.byol_fwd, (p, z)),
        (ops.byol_bwd, (torch.rand(9, device=DEV), p, z, stats, True)),
        (ops.sinkhorn, (scores, 20.0, 3)),
        (ops.sinkhorn_col_lse, (scores, 20.0, torch.zeros(30, device=DEV))),
        (ops.sinkhorn_assign, (scores, 20.0, torch.zeros(30, device=DEV))),
        (ops.siglip_fwd, (z1, z2, scale, torch.tensor(-5.0, device=DEV))),
        (ops.siglip_bwd, (torch.rand(37, device=DEV), z1, z2, scale, torch.tensor(-5.0, device=DEV))),
        (ops.infonce_block_fwd, (z1, queue, scale, 3, False)),
        (ops.infonce_block_bwd, (torch.rand(37, device=DEV), z1, queue, scale, torch.full((37,), 5.0, device=DEV), 3,
                                 False)),
    ]


def test_opcheck_on_cuda_tensors(gen):
    from torch.library import opcheck

    for op, args in _opcheck_cases(gen):
        opcheck(op, args)


def test_torch_compile_fullgraph(gen):
    (z1, _), (z2, _) = _inputs(gen, (64, 128), (64, 128), dtype=torch.bfloat16)
    (q, _), (k, _) = _inputs(gen, (64, 128), (64, 128), dtype=torch.bfloat16)
    temperature = torch.tensor(0.1, device=DEV, requires_grad=True)

    def losses(z1, z2, q, k, temperature):
        return (cl_fast.nt_xent(z1, z2, temperature, backend="cuda")
                + cl_fast.info_nce(q, k, 0.1, symmetric=True, backend="cuda")
                + cl_fast.byol_loss(q, k.detach(), backend="cuda"))

    compiled = torch.compile(losses, fullgraph=True)
    out = compiled(z1, z2, q, k, temperature)
    eager = losses(z1, z2, q, k, temperature)
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    out.backward()


SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, cl_fast
    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        z1 = torch.randn(37, 77, device=dev, dtype=dtype, requires_grad=True)
        z2 = torch.randn(37, 77, device=dev, dtype=dtype, requires_grad=True)
        for T in (0.1, 0.01):
            cl_fast.nt_xent(z1, z2, T, backend="cuda").backward()
            cl_fast.info_nce(z1, z2, T, symmetric=True, backend="cuda").backward()
            cl_fast.info_nce(z1, z2, T, backend="cuda").backward()
        scale = torch.tensor(3.0, device=dev, requires_grad=True)
        ops = torch.ops.cl_fast_C
        _, _, row_lse, col_lse = ops.cross_fwd(z1.detach(), z2.detach(), scale.detach(), True, False)
        g = torch.rand(37, device=dev)
        ops.cross_bwd(g, g, z1.detach(), z2.detach(), scale.detach(), row_lse, col_lse, True, False)
        cl_fast.clip_loss(torch.randn(5, 300, device=dev, dtype=dtype), torch.randn(5, 300, device=dev, dtype=dtype),
                          scale, backend="cuda").backward()
        queue = torch.randn(50, 77, device=dev, dtype=dtype)
        cl_fast.moco_loss(z1, z2, queue, backend="cuda").backward()
        cl_fast.queue_update_(queue, torch.randn(9, 77, device=dev, dtype=dtype), torch.tensor(45, device=dev),
                              backend="cuda")
        cl_fast.byol_loss(z1, z2, backend="cuda").backward()
        cl_fast.sinkhorn(torch.randn(21, 33, device=dev, dtype=dtype), iterations=3, epsilon=0.05, backend="cuda")
        s, b = torch.tensor(10.0, device=dev), torch.tensor(-10.0, device=dev)
        torch.ops.cl_fast_C.siglip_fwd(z1.detach(), z2.detach(), s, b)
        torch.ops.cl_fast_C.siglip_bwd(torch.rand(37, device=dev), z1.detach(), z2.detach(), s, b)
        u = torch.cat([z1.detach(), z2.detach()])
        block_lse = torch.ops.cl_fast_C.infonce_block_fwd(u, queue, s, -7, True)
        torch.ops.cl_fast_C.infonce_block_bwd(torch.rand(74, device=dev), u, queue, s, block_lse, -7, True)
    torch.cuda.synchronize()
    print("ok")
""")


def test_compute_sanitizer_memcheck(tmp_path):
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer is not installed")
    script = tmp_path / "cases.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    for check in (["--tool", "memcheck"], ["--tool", "racecheck"], ["--tool", "synccheck"]):
        proc = subprocess.run([tool, *check, "--error-exitcode", "1", sys.executable, str(script)], capture_output=True,
                              text=True, env=env, timeout=900)
        assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
