"""The InfoNCE block pieces (rows against one slice of columns, the distributed losses' building
block): every backend against a float64 evaluation of cl_fast.reference.infonce_block_lse / _grad.

lse and the three gradients (drows, dcols, dscale), ragged M / C / D, both pairs modes, diag
inside / negative / partly and fully outside the slice, fp32 / fp16 / bf16, non-normalised rows of
large norm, rows with nothing left (-inf lse, zero gradients), NaN, merging column slices with
logaddexp, bit-identical repeats, bad input, and no M x C allocation on the fused CPU path.
"""
from __future__ import annotations

import math

import pytest
import torch

from cl_fast import _ops, reference
from conftest import DEVICE, RTOL, fused_backend_params, rel_err
from test_api_contract import AllocationRecorder, _largest_cpu_allocation

BACKENDS = [pytest.param("torch", id="torch")] + fused_backend_params("infonce")
FUSED = fused_backend_params("infonce")


# ------------------------------------------------------------------------------ helpers
def block_fwd(rows, cols, scale, diag, pairs, backend):
    if backend == "torch":
        return reference.infonce_block_lse(rows, cols, scale, diag, pairs)
    return _ops.infonce.infonce_block_fwd(rows, cols, scale, diag, pairs, backend)


def block_bwd(grad, rows, cols, scale, lse, diag, pairs, backend):
    if backend == "torch":
        return reference.infonce_block_grad(grad, rows, cols, scale, lse, diag, pairs)
    return _ops.infonce.infonce_block_bwd(grad, rows, cols, scale, lse, diag, pairs, backend)


def features(n, d, dtype, gen, norm=None):
    """(n, d) random rows on DEVICE in dtype; rows rescaled to about `norm` where given."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if norm is not None:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm
        x = x * (0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64))  # norms in [norm/2, 3norm/2)
    return x.to(device=DEVICE, dtype=dtype)


def scale_tensor(value):
    return torch.tensor(float(value), dtype=torch.float32, device=DEVICE)


def upstream(m, gen):
    """A fresh per-row upstream gradient (signed: the losses pass both signs through merges)."""
    return (torch.rand(m, generator=gen, dtype=torch.float64) * 2 - 0.5).float().to(DEVICE)


def float64_expected(grad, rows, cols, scale, diag, pairs, lse=None):
    """(lse, drows, dcols, dscale) in float64 on the same (rounded) inputs."""
    r, c, s = rows.double().cpu(), cols.double().cpu(), scale.double().cpu()
    lse64 = reference.infonce_block_lse(r, c, s, diag, pairs)
    grads = reference.infonce_block_grad(grad.double().cpu(), r, c, s, lse64 if lse is None else lse, diag, pairs)
    return (lse64, *grads)


def assert_close_rel(actual, expected, tol, what):
    """rel_err on the finite entries; -inf / NaN must sit exactly where float64 has them."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN pattern"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{what}: inf pattern"
    if torch.isinf(expected).any():
        assert torch.equal(actual[torch.isinf(expected)], expected[torch.isinf(expected)]), f"{what}: inf sign"
    finite = torch.isfinite(expected)
    if finite.any():
        err = rel_err(actual[finite], expected[finite])
        assert err < tol, f"{what}: rel err {err:.3g} >= {tol:.3g}"


def check_block(backend, m, c, d, dtype, diag, pairs, gen, scale=2.0, norm=None, tol=None):
    rows = features(m, d, dtype, gen, norm)
    cols = features(c, d, dtype, gen, norm)
    s = scale_tensor(scale)
    grad = upstream(m, gen)
    lse = block_fwd(rows, cols, s, diag, pairs, backend)
    assert lse.dtype == torch.float32 or backend == "torch"
    assert lse.shape == (m,)
    drows, dcols, dscale = block_bwd(grad, rows, cols, s, lse.float(), diag, pairs, backend)
    assert drows.shape == (m, d) and dcols.shape == (c, d) and dscale.shape == ()
    if backend != "torch":
        assert drows.dtype == dcols.dtype == dscale.dtype == torch.float32
    lse64, drows64, dcols64, dscale64 = float64_expected(grad, rows, cols, s, diag, pairs)
    tol = RTOL[dtype] if tol is None else tol
    assert_close_rel(lse, lse64, tol, "lse")
    assert_close_rel(drows, drows64, tol, "drows")
    assert_close_rel(dcols, dcols64, tol, "dcols")
    assert_close_rel(dscale, dscale64, tol, "dscale")
    return lse, drows, dcols, dscale


def small_shapes(backend, shapes):
    """The triton interpreter runs every program in Python: small shapes only there."""
    return shapes if backend != "triton" else [s for s in shapes if s[0] * s[1] <= 34 * 70]


# ------------------------------------------------------------------------- values and gradients
SHAPES = [(6, 9, 5), (2, 1, 3), (2, 7, 8), (34, 70, 33), (64, 130, 128), (130, 64, 17)]


def diag_cases(m, c):
    """diag inside the slice, negative (rows above it), partly and fully outside either side."""
    return sorted({0, min(3, c - 1), -2, -(m // 2), c - m // 2, c - 1, c, c + 5, -m - 3, -m - c - 7})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
@pytest.mark.parametrize("m,c,d", SHAPES, ids=[f"M{m}-C{c}-D{d}" for m, c, d in SHAPES])
def test_matches_float64_fp32(backend, m, c, d, pairs, gen):
    if backend == "triton" and (m * c > 64 * 130 or m > c > 1):
        pytest.skip("triton interpreter: small shapes only (M > C runs on the other backends)")
    diags = diag_cases(m, c)
    if backend == "triton":  # the interpreter's budget: inside, negative, partly and fully outside
        diags = sorted({0, -(m // 2), c - m // 2, c + 5})
    for diag in diags:
        check_block(backend, m, c, d, torch.float32, diag, pairs, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_matches_float64_half(backend, dtype, pairs, gen):
    for m, c, d in small_shapes(backend, [(6, 9, 5), (34, 70, 33), (64, 130, 128)]):
        for diag in (0, -3, c - m // 2, c + 1):
            check_block(backend, m, c, d, dtype, diag, pairs, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_large_norm_rows(backend, dtype, pairs, gen):
    """Features as given (not normalised): scale 20 on rows of norm ~10 puts |S| near 3000, far
    past exp's fp32 range, so only a running max per row keeps lse finite. fp32 S itself carries
    an absolute error ~ eps32 * |S|, which the exponentials turn into a relative one: the fp32
    tolerance is widened by that (bf16's already covers it)."""
    m, c, d = (34, 70, 33) if backend != "triton" else (10, 24, 9)
    max_logit = 20.0 * 15 * 15  # scale * the largest |row| * |col|
    tol = RTOL[dtype] + (2 * 6e-8 * max_logit if dtype == torch.float32 else 0.0)
    for diag in (0, 5, -4):
        lse, *_ = check_block(backend, m, c, d, dtype, diag, pairs, gen, scale=20.0, norm=10.0, tol=tol)
        assert lse.abs().max() > 100  # the test reaches far past exp's range


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_do_not_overflow(backend, gen):
    """|S| ~ 1e30: lse equals the row's top logit to fp32 precision; no inf, no NaN."""
    m, c, d = 6, 9, 5
    rows = features(m, d, torch.float32, gen, norm=1e15)
    cols = features(c, d, torch.float32, gen, norm=1e15)
    s = scale_tensor(1.0)
    lse = block_fwd(rows, cols, s, 1, False, backend)
    lse64 = float64_expected(upstream(m, gen), rows, cols, s, 1, False)[0]
    assert torch.isfinite(lse).all()
    assert_close_rel(lse, lse64, 1e-4, "lse")


@pytest.mark.parametrize("backend", FUSED)
def test_dot_beyond_fp32_range(backend, gen):
    """|rows_i . cols_j| ~ 1e44 (past FLT_MAX) with scale 1e-20: S ~ 1e24 is an fp32 number, and
    the fused kernels must not form the overflowing dot (a plain fp32 matmul gives inf; the
    "torch" reference is therefore not run here). Gradients against float64 as well."""
    m, c, d = 6, 9, 5
    rows = features(m, d, torch.float32, gen, norm=1e22)
    cols = features(c, d, torch.float32, gen, norm=1e22)
    rows[1] *= 1e-22  # a row of ordinary size next to the huge ones keeps its precision
    s = scale_tensor(1e-20)
    grad = upstream(m, gen)
    lse = block_fwd(rows, cols, s, 2, True, backend)
    assert torch.isfinite(lse).all()
    expected = float64_expected(grad, rows, cols, s, 2, True)
    assert_close_rel(lse, expected[0], 1e-4, "lse")
    assert_close_rel(lse[1], expected[0][1], 1e-4, "lse of the ordinary row")
    drows, dcols, dscale = block_bwd(grad, rows, cols, s, lse, 2, True, backend)
    assert_close_rel(drows, expected[1], 1e-4, "drows")
    assert_close_rel(dcols, expected[2], 1e-4, "dcols")
    if expected[3].abs() <= torch.finfo(torch.float32).max:
        assert_close_rel(dscale, expected[3], 1e-4, "dscale")
    else:  # sum dS <rows, cols> ~ 1e44 itself has no fp32 value: inf, or NaN where partial sums
        # of both signs overflowed (inf - inf); never a finite wrong number
        assert not torch.isfinite(dscale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_rows_with_nothing_left(backend, pairs, gen):
    """A row whose every column of the slice is excluded: lse = -inf; with that lse the backward
    gives it zero gradients (and its columns get nothing from it); C = 0 likewise."""
    m, d = 4, 5
    c = 1  # diag 0: row 0 excludes column 0 (pairs: rows 0 and 2 both exclude it), the others keep it
    rows, cols = features(m, d, torch.float32, gen), features(c, d, torch.float32, gen)
    s = scale_tensor(1.5)
    grad = upstream(m, gen)
    diag = 0
    excluded = reference.infonce_block_excluded(m, c, diag, pairs)
    empty = excluded.all(dim=1)
    assert empty.any() and not empty.all()
    lse = block_fwd(rows, cols, s, diag, pairs, backend)
    assert torch.equal(torch.isneginf(lse).cpu(), empty)
    drows, dcols, dscale = block_bwd(grad, rows, cols, s, lse.float(), diag, pairs, backend)
    assert (drows[empty.to(DEVICE)] == 0).all()
    lse64, drows64, dcols64, dscale64 = float64_expected(grad, rows, cols, s, diag, pairs)
    for got, want, what in ((lse, lse64, "lse"), (drows, drows64, "drows"), (dcols, dcols64, "dcols"),
                            (dscale, dscale64, "dscale")):
        assert_close_rel(got, want, 1e-4, what)

    # every row empty (M = C = 2, pairs: self and positive are the only columns; or C = 0), and M = 0
    for m2, c2, pairs2 in ((2, 2, True), (3, 0, False), (0, 3, True)):
        r2, c2t = features(m2, d, torch.float32, gen), features(c2, d, torch.float32, gen)
        lse2 = block_fwd(r2, c2t, s, 0, pairs2, backend)
        assert torch.isneginf(lse2).all()
        g2 = block_bwd(upstream(m2, gen), r2, c2t, s, lse2.float(), 0, pairs2, backend)
        assert all((g == 0).all() for g in g2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_upstream_gradient_rows_contribute_nothing(backend, gen):
    m, c, d = 10, 13, 7
    rows, cols = features(m, d, torch.float32, gen), features(c, d, torch.float32, gen)
    s = scale_tensor(3.0)
    lse = block_fwd(rows, cols, s, 2, True, backend).float()
    grad = upstream(m, gen)
    grad[::2] = 0
    drows, dcols, dscale = block_bwd(grad, rows, cols, s, lse, 2, True, backend)
    assert (drows[::2] == 0).all()
    # the same as dropping those rows (dcols, dscale): rows with grad 0 add exactly nothing
    keep = torch.arange(1, m, 2)
    expected = float64_expected(grad, rows, cols, s, 2, True)
    assert_close_rel(dcols, expected[2], 1e-4, "dcols")
    assert_close_rel(dscale, expected[3], 1e-4, "dscale")
    assert_close_rel(drows[keep], expected[1][keep], 1e-4, "drows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend, gen):
    m, c, d = 8, 11, 6
    rows, cols = features(m, d, torch.float32, gen), features(c, d, torch.float32, gen)
    s = scale_tensor(2.0)
    rows[3, 2] = float("nan")
    lse = block_fwd(rows, cols, s, 0, False, backend)
    assert torch.isnan(lse[3])
    assert torch.isfinite(lse[torch.arange(m, device=DEVICE) != 3]).all()
    cols[5, 1] = float("nan")  # column 5 is row 5's excluded positive (diag 0): no NaN there
    lse = block_fwd(rows, cols, s, 0, False, backend)
    assert torch.isnan(lse[torch.arange(m, device=DEVICE) != 5]).all()
    assert not torch.isnan(lse[5])


# --------------------------------------------------------------------------- merging slices
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_column_slices_merge(backend, pairs, dtype, gen):
    """Splitting the columns into slices (diag shifted by each slice's start), merging the lses
    with logaddexp and passing the merged lse to each slice's backward: summed drows / dscale and
    concatenated dcols equal the one-slice result."""
    m, c, d = (34, 70, 33) if backend != "triton" else (10, 23, 9)
    rows, cols = features(m, d, dtype, gen), features(c, d, dtype, gen)
    s = scale_tensor(2.5)
    grad = upstream(m, gen)
    for diag, cuts in ((0, [c // 3, c // 2]), (c - m // 2, [c // 2]), (-5, [1, c - 1])):
        bounds = [0, *cuts, c]
        lses = [block_fwd(rows, cols[a:b], s, diag - a, pairs, backend) for a, b in zip(bounds, bounds[1:])]
        merged = lses[0]
        for part in lses[1:]:
            merged = torch.logaddexp(merged, part)
        whole = block_fwd(rows, cols, s, diag, pairs, backend)
        assert_close_rel(merged, whole, 1e-5, "merged lse")
        pieces = [block_bwd(grad, rows, cols[a:b], s, merged.float(), diag - a, pairs, backend)
                  for a, b in zip(bounds, bounds[1:])]
        drows_w, dcols_w, dscale_w = block_bwd(grad, rows, cols, s, whole.float(), diag, pairs, backend)
        assert_close_rel(sum(p[0] for p in pieces), drows_w, 1e-5, "drows")
        assert_close_rel(torch.cat([p[1] for p in pieces]), dcols_w, 1e-5, "dcols")
        assert_close_rel(sum(p[2] for p in pieces), dscale_w, 1e-5, "dscale")
        expected = float64_expected(grad, rows, cols, s, diag, pairs)
        assert_close_rel(merged, expected[0], RTOL[dtype], "merged lse vs float64")
        assert_close_rel(sum(p[0] for p in pieces), expected[1], RTOL[dtype], "drows vs float64")


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_repeated_calls_bit_identical(backend, pairs, gen):
    m, c, d = (300, 260, 40) if backend != "triton" else (34, 40, 9)
    rows, cols = features(m, d, torch.float32, gen), features(c, d, torch.float32, gen)
    s = scale_tensor(4.0)
    grad = upstream(m, gen)
    first = block_fwd(rows, cols, s, 7, pairs, backend)
    out1 = block_bwd(grad, rows, cols, s, first, 7, pairs, backend)
    for _ in range(2):
        assert torch.equal(block_fwd(rows, cols, s, 7, pairs, backend), first)
        for a, b in zip(block_bwd(grad, rows, cols, s, first, 7, pairs, backend), out1):
            assert torch.equal(a, b)


CPU_BUILT = any(param.values[0] == "cpu" and not param.marks for param in FUSED)


@pytest.mark.skipif(not CPU_BUILT, reason="needs cl_fast._C built with the CPU kernels")
@pytest.mark.parametrize("schedule", ["partial", "rounds"])
def test_cpu_backward_schedules(schedule, monkeypatch, gen):
    """The C++ backward's two dcols schedules (csrc/cpu/infonce_block.cpp: per-thread partial
    buffers, the default up to 9 threads; the rounds schedule beyond): both against float64 and
    bit-identical on repeats. 16 x 16 blocks here, so `rounds` runs all of its 16 rounds."""
    monkeypatch.setenv("CL_FAST_BLOCK_BWD", schedule)
    m, c, d = 300, 260, 40
    lse, *grads = check_block("cpu", m, c, d, torch.float32, 7, True, gen, scale=3.0)
    check_block("cpu", m, c, d, torch.bfloat16, -150, False, gen)
    rows, cols = features(m, d, torch.float32, gen), features(c, d, torch.float32, gen)
    s, grad = scale_tensor(2.0), upstream(m, gen)
    lse = block_fwd(rows, cols, s, 3, True, "cpu")
    first = block_bwd(grad, rows, cols, s, lse, 3, True, "cpu")
    for a, b in zip(block_bwd(grad, rows, cols, s, lse, 3, True, "cpu"), first):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ bad input
def _inputs(m=4, c=5, d=3, dtype=torch.float32):
    return (torch.randn(m, d).to(DEVICE, dtype), torch.randn(c, d).to(DEVICE, dtype), scale_tensor(2.0))


BAD_FWD = [
    ("D mismatch", lambda r, c, s: (r, c[:, :2], s, 0, False), ValueError, "cols"),
    ("dtype mismatch", lambda r, c, s: (r, c.half(), s, 0, False), TypeError, "dtype"),
    ("integer rows", lambda r, c, s: (r.long(), c.long(), s, 0, False), TypeError, "rows"),
    ("1-D rows", lambda r, c, s: (r[0], c, s, 0, False), ValueError, "rows"),
    ("odd M with pairs", lambda r, c, s: (r[:3], c, s, 0, True), ValueError, "rows"),
    ("scale not 0-d", lambda r, c, s: (r, c, s.reshape(1), 0, False), ValueError, "scale"),
    ("scale float64", lambda r, c, s: (r, c, s.double(), 0, False), TypeError, "scale"),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD_FWD], ids=[b[0] for b in BAD_FWD])
def test_bad_input_fwd(backend, make, error, match):
    with pytest.raises(error, match=match):
        block_fwd(*make(*_inputs()), backend)


BAD_BWD = [
    ("grad length", lambda g, r, c, s, l: (g[:3], r, c, s, l), ValueError, "grad"),
    ("lse length", lambda g, r, c, s, l: (g, r, c, s, l[:3]), ValueError, "lse"),
    ("lse dtype", lambda g, r, c, s, l: (g, r, c, s, l.double()), TypeError, "lse"),
    ("D mismatch", lambda g, r, c, s, l: (g, r, c[:, :2], s, l), ValueError, "cols"),
    ("scale not 0-d", lambda g, r, c, s, l: (g, r, c, s.reshape(1, 1), l), ValueError, "scale"),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD_BWD], ids=[b[0] for b in BAD_BWD])
def test_bad_input_bwd(backend, make, error, match):
    r, c, s = _inputs()
    g, lse = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    with pytest.raises(error, match=match):
        block_bwd(*make(g, r, c, s, lse), 0, False, backend)


def test_bad_pairs_odd_rows_bwd():
    for param in FUSED:
        if param.marks:
            continue
        r, c, s = _inputs(m=3)
        with pytest.raises(ValueError, match="rows"):
            block_bwd(torch.ones(3, device=DEVICE), r, c, s, torch.zeros(3, device=DEVICE), 0, True, param.values[0])


# ------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("backend", FUSED)
def test_fused_cpu_allocates_no_m_by_c_matrix(backend, gen):
    if DEVICE.type != "cpu" or backend != "cpu":
        pytest.skip("the allocation check of the C++ CPU kernels")
    m = c = 512
    d = 8
    rows, cols = features(m, d, torch.float32, gen), features(c, d, torch.float32, gen)
    s = scale_tensor(3.0)
    grad = upstream(m, gen)

    def fwd_bwd():
        lse = block_fwd(rows, cols, s, 0, True, backend)
        return block_bwd(grad, rows, cols, s, lse, 0, True, backend)

    with AllocationRecorder() as recorder:
        fwd_bwd()
    limit = m * c * 4  # bytes of an fp32 M x C matrix: nothing that size or larger
    assert recorder.largest < limit
    assert _largest_cpu_allocation(fwd_bwd) < limit


def test_recorder_sees_the_reference_matrix(gen):
    rows, cols = features(64, 8, torch.float32, gen), features(64, 8, torch.float32, gen)
    with AllocationRecorder() as recorder:
        block_fwd(rows, cols, scale_tensor(1.0), 0, False, "torch")
    assert recorder.largest >= 4 * 64 * 64
    assert math.isfinite(float(recorder.largest))
