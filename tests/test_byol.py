"""byol_loss / BYOLLoss: every backend against a float64 evaluation of SPEC.md (2 - 2 cos).

Values AND gradients (p, and z when it requires grad), ragged shapes, fp32/fp16/bf16, every
reduction, the clamped-norm branch, NaN propagation, bad inputs, torch.compile and opcheck.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import cl_fast
from cl_fast import byol, reference
from cl_fast.byol import BYOLLoss, byol_loss
from conftest import DEVICE, RTOL, backward_with_random_weights, fused_backend_params, randn, rel_err

FUSED = fused_backend_params("byol")
BACKENDS = [pytest.param("torch", id="torch")] + FUSED

SHAPES = [(1, 2), (2, 3), (17, 100), (64, 257), (129, 16)]  # D = 1: cos = +-1, the gradient is 0
CASES = [(torch.float32, n, d) for n, d in SHAPES] + [
    (dt, n, d) for dt in (torch.float16, torch.bfloat16) for n, d in [(2, 3), (17, 100), (64, 257)]
]
CASE_IDS = [f"{str(dt)[6:]}-N{n}-D{d}" for dt, n, d in CASES]

EPS32 = torch.finfo(torch.float32).eps
# The per-row loss 2 - 2 cos(theta) ~ theta^2 is ill-conditioned for nearly aligned rows: moving the
# normalised rows u, v by one fp32 rounding each (|du|, |dv| ~ eps32) moves theta by ~eps32 and the
# loss by ~2 theta eps32 = 2 eps32 sqrt(loss). No fp32 algorithm does better than that order (every
# backend rounds u and v, then forms ||u - v||^2: measured errors up to 1.3 eps32 sqrt(loss) over
# D in {2, 3, 8, 64, 300} and theta in 1e-5..1e-1, torch / cpu / triton). COND_C = 4 leaves a 3x
# margin over that, and 2 - 2 cos in fp32 (absolute error ~eps32 for any theta) still fails it once
# the loss is small: 8x at CI's failing draw (loss 3e-4), ~100x at theta = 1e-3.
COND_C = 4.0
# The gradient -2 g r_p (v - cos u) (norm 2 g r_p sin(theta)) is ill-conditioned the same way near
# theta = 0 and theta = pi: one rounding of u and v moves v - cos u by ~eps32, an absolute error
# ~eps32 * 2 g r_p however small sin(theta) is (relative ~eps32 / sin(theta)). Measured up to
# 1.9 eps32 * 2 g r_p for nearly aligned rows and 5.8 for nearly opposite ones (where (v - u) + omc u
# adds two terms of size ~2; D in {2, 3, 8, 64, 300}, every backend here). GRAD_C = 16 leaves a 3x
# margin; against tol * max |grad| the floor matters only where sin(theta) < GRAD_C eps32 / tol ~ 0.02.
GRAD_C = 16.0


def assert_loss_close(loss, expected, reduction, tol):
    """|loss - ref| <= tol |ref| + COND_C eps32 sqrt(ref), per row (reduced like the loss for
    "mean" / "sum": the reduction of the rows' bounds bounds the reduction's error)."""
    loss, expected = loss.detach().double().cpu(), expected.detach().double().cpu()
    rows = expected.clamp_min(0).sqrt() * (COND_C * EPS32)
    floor = rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows
    err, bound = (loss - expected).abs(), tol * expected.abs() + floor
    assert bool((err <= bound).all()), f"loss: error {err.max():.3g} > bound {bound[err.argmax()] if err.dim() else bound:.3g}"


def assert_grad_close(grad, expected, x, upstream, tol, what):
    """|grad - ref| <= tol max |ref| (rel_err < tol) + GRAD_C eps32 2 |g_i| / max(||x_i||, eps) on row i,
    g_i the upstream gradient of row i's loss: the conditioning floor of each row (see GRAD_C)."""
    grad, expected = grad.detach().double().cpu(), expected.detach().double().cpu()
    row_scale = 2 * upstream.abs() / x.detach().double().cpu().norm(dim=1).clamp_min(reference.NORM_EPS)
    err = (grad - expected).abs()
    bound = tol * expected.abs().max() + GRAD_C * EPS32 * row_scale[:, None]
    assert bool((err <= bound).all()), f"grad of {what}: error {err.max():.3g}, rel_err {rel_err(grad, expected):.3g}"


def check_against_float64(backend, p, z, reduction, z_grad, gen):
    dtype = p.dtype
    p = p.detach().requires_grad_()
    z = z.detach().requires_grad_(z_grad)
    loss = byol_loss(p, z, reduction=reduction, backend=backend)
    p64 = p.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_(z_grad)
    expected = reference.byol_loss(p64, z64, reduction=reduction)
    with torch.no_grad():  # the per-row losses, against the conditioning of each row
        rows = byol_loss(p, z, reduction="none", backend=backend)
        expected_rows = reference.byol_loss(p64, z64, reduction="none")
    # backward_with_random_weights, with the weights kept: g_i = d(sum w * loss) / d loss_i
    weights = torch.rand(expected.shape, generator=gen, dtype=torch.float64) + 0.5
    (loss * weights.to(loss.device, loss.dtype)).sum().backward()
    (expected * weights.to(expected.device)).sum().backward()
    n = p.shape[0]
    upstream = weights / n * torch.ones(n, dtype=torch.float64) if reduction == "mean" else weights * torch.ones(n, dtype=torch.float64)
    tol = RTOL[dtype]
    assert loss.dtype == torch.float32
    assert_loss_close(rows, expected_rows, "none", tol)
    assert_loss_close(loss, expected, reduction, tol)
    assert p.grad.dtype == dtype
    assert_grad_close(p.grad, p64.grad, p, upstream, tol, "p")
    if z_grad:
        assert z.grad.dtype == dtype
        assert_grad_close(z.grad, z64.grad, z, upstream, tol, "z")
    else:
        assert z.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,n,d", CASES, ids=CASE_IDS)
def test_byol_loss_matches_float64(backend, dtype, n, d, gen):
    p, z = randn(n, d, dtype=dtype, generator=gen), randn(n, d, dtype=dtype, generator=gen)
    check_against_float64(backend, p, z, "mean", False, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_byol_loss_reductions_and_target_gradient(backend, reduction, gen):
    p, z = randn(13, 40, generator=gen), randn(13, 40, generator=gen)
    check_against_float64(backend, p, z, reduction, True, gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_byol_loss_zero_and_tiny_rows_use_clamped_norm(backend, gen):
    p, z = randn(6, 10, generator=gen), randn(6, 10, generator=gen)
    p[1] = 0.0
    z[3] *= 1e-14
    check_against_float64(backend, p, z, "none", True, gen)


def aligned_pairs(n, d, angle, gen):
    """fp32 rows (p_i, z_i) at `angle` radians (before rounding to fp32), random directions and norms."""
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = torch.randn(n, d, generator=gen, dtype=torch.float64)
    a = a / a.norm(dim=1, keepdim=True)
    b = b - (b * a).sum(dim=1, keepdim=True) * a  # orthogonal to a
    b = b / b.norm(dim=1, keepdim=True)
    norms = 10.0 ** (2 * torch.rand(n, 2, generator=gen, dtype=torch.float64) - 1)  # in [0.1, 10]
    p = a * norms[:, :1]
    z = (math.cos(angle) * a + math.sin(angle) * b) * norms[:, 1:]
    return p.float().to(DEVICE), z.float().to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 64, 300])
def test_nearly_aligned_rows_keep_relative_precision(backend, d, gen):
    """Rows at 1e-2 rad: loss ~1e-4, which 2 - 2 cos in fp32 gets only to ~1e-3 relative (its
    absolute error ~eps32 is all of it); ||n(p) - n(z)||^2 keeps ~eps32 / angle ~1e-5. Per-row
    relative error of the loss < 1e-4 against float64 of the same fp32 inputs, and the gradients
    (both inputs) within the usual tolerance."""
    p, z = aligned_pairs(8, d, 1e-2, gen)
    p, z = p.requires_grad_(), z.requires_grad_()
    loss = byol_loss(p, z, reduction="none", backend=backend)
    p64 = p.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_()
    expected = reference.byol_loss(p64, z64, reduction="none")
    assert float(expected.detach().max()) < 2e-4  # the rows are nearly aligned
    backward_with_random_weights(loss, expected, gen)
    ref = expected.detach().cpu()
    row_rel = ((loss.detach().double().cpu() - ref).abs() / ref).max()
    assert float(row_rel) < RTOL[torch.float32], f"loss: per-row relative error {float(row_rel):.3g}"
    assert rel_err(p.grad, p64.grad) < RTOL[torch.float32], "grad of p"
    assert rel_err(z.grad, z64.grad) < RTOL[torch.float32], "grad of z"


@pytest.mark.parametrize("backend", FUSED)  # the fp32 reference (F.normalize) overflows here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("d", [40, 300])  # one D chunk, and several (the running max is rescaled)
def test_huge_rows_normalise_without_overflow(backend, dtype, d, gen):
    """Rows of |x| ~ 1e30 (their squares overflow fp32) give the loss of the unscaled rows and
    gradients scaled by 1e-30; one row grows along D so its max changes from chunk to chunk."""
    p, z = randn(7, d, generator=gen), randn(7, d, generator=gen)
    p[3] *= torch.linspace(0.01, 10.0, d, device=DEVICE)
    p_big = (p * 1e30).to(dtype).requires_grad_()
    z_big = (z * 1e30).to(dtype).requires_grad_()
    p_ref = (p_big.detach().double() * 1e-30).requires_grad_()
    z_ref = (z_big.detach().double() * 1e-30).requires_grad_()
    loss = byol_loss(p_big, z_big, reduction="none", backend=backend)
    expected = reference.byol_loss(p_ref, z_ref, reduction="none")
    backward_with_random_weights(loss, expected, gen)
    assert rel_err(loss, expected) < RTOL[dtype]
    assert rel_err(p_big.grad.double() * 1e30, p_ref.grad) < RTOL[dtype]
    assert rel_err(z_big.grad.double() * 1e30, z_ref.grad) < RTOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_byol_loss_check_values(backend, gen):
    """2 - 2 cos: 0 for parallel rows (any scale), 2 for orthogonal, 4 for opposite; and the
    reference equals ||n(p) - n(z)||^2 (SPEC.md)."""
    p = randn(3, 8, generator=gen)
    z = torch.stack([3.0 * p[0], p[1] - (p[1] @ p[2]) / (p[2] @ p[2]) * p[2], -0.5 * p[2]])
    p = torch.stack([p[0], p[2], p[2]])
    per_row = byol_loss(p, z, reduction="none", backend=backend)
    torch.testing.assert_close(per_row, torch.tensor([0.0, 2.0, 4.0], device=DEVICE), rtol=0, atol=1e-5)
    a, b = randn(9, 5, generator=gen).double(), randn(9, 5, generator=gen).double()
    squared_distance = (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(reference.byol_loss(a, b), squared_distance, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_byol_module(backend, gen):
    p, z = randn(7, 12, generator=gen), randn(7, 12, generator=gen)
    module = BYOLLoss(reduction="sum", backend=backend)
    torch.testing.assert_close(module(p, z), reference.byol_loss(p, z, reduction="sum"), rtol=1e-5, atol=1e-6)
    assert "sum" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend, gen):
    p, z = randn(4, 6, generator=gen), randn(4, 6, generator=gen)
    p[1, 2] = math.nan
    z[2, 0] = math.inf
    per_row = byol_loss(p, z, reduction="none", backend=backend)
    assert torch.isnan(per_row[1]) and torch.isnan(per_row[2])
    assert torch.isfinite(per_row[[0, 3]]).all()


BAD_CALLS = [
    ("shape mismatch", lambda: byol_loss(torch.randn(4, 8), torch.randn(5, 8)), ValueError, "p and z"),
    ("D mismatch", lambda: byol_loss(torch.randn(4, 8), torch.randn(4, 9)), ValueError, "p and z"),
    ("zero rows", lambda: byol_loss(torch.randn(0, 8), torch.randn(0, 8)), ValueError, "p"),
    ("1-D", lambda: byol_loss(torch.randn(8), torch.randn(8)), ValueError, "p must be 2-D"),
    ("integer", lambda: byol_loss(torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64)), TypeError, "p"),
    ("mixed dtypes", lambda: byol_loss(torch.randn(4, 8), torch.randn(4, 8).half()), TypeError, "dtype"),
    ("mixed devices", lambda: byol_loss(torch.randn(4, 8), torch.randn(4, 8, device="meta")), ValueError, "device"),
    ("not a tensor", lambda: byol_loss([[1.0]], torch.randn(1, 1)), TypeError, "p"),
    ("bad reduction", lambda: byol_loss(torch.randn(4, 8), torch.randn(4, 8), reduction="avg"), ValueError, "reduction"),
    ("bad backend", lambda: byol_loss(torch.randn(4, 8), torch.randn(4, 8), backend="fast"), ValueError, "backend"),
    ("cuda on cpu tensors", lambda: byol_loss(torch.randn(4, 8), torch.randn(4, 8), backend="cuda"), ValueError, "backend=.cuda."),
    ("module reduction", lambda: BYOLLoss(reduction="avg"), ValueError, "reduction"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_reject_float64(backend):
    with pytest.raises(TypeError, match="float64"):
        byol_loss(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), backend=backend)


def test_public_names():
    assert cl_fast.byol_loss is byol.byol_loss
    assert cl_fast.BYOLLoss is byol.BYOLLoss
    assert {"byol_loss", "BYOLLoss"} <= set(cl_fast.__all__)


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph_no_graph_break(backend, gen):
    torch._dynamo.reset()

    def step(p, z):
        return byol_loss(p, z, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    p, z = randn(10, 12, generator=gen, requires_grad=True), randn(10, 12, generator=gen)
    loss = compiled(p, z)
    loss.backward()
    p_ref = p.detach().clone().requires_grad_()
    expected = step(p_ref, z)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, gen):
    p = randn(6, 10, generator=gen, requires_grad=True)
    z = randn(6, 10, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.cl_fast.byol_fwd.default, (p, z, backend))
    with torch.no_grad():
        _, stats = torch.ops.cl_fast.byol_fwd(p, z, backend)
    grad = torch.rand(6, device=DEVICE)
    for need_dz in (True, False):
        torch.library.opcheck(torch.ops.cl_fast.byol_bwd.default, (grad, p.detach(), z.detach(), stats, need_dz, backend))
