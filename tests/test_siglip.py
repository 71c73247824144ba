"""siglip_loss / SigLipLoss: every backend against a float64 evaluation of SPEC.md's formula.

Values and all four gradients (both features, logit_scale, logit_bias), ragged shapes, fp32 /
fp16 / bf16, saturated terms, bad input, no N x N allocation, torch.compile and opcheck.
"""
from __future__ import annotations

import math

import pytest
import torch

import cl_fast
from cl_fast import reference
from conftest import DEVICE, DTYPES, RTOL, fused_backend_params, randn, rel_err
from test_api_contract import AllocationRecorder, _largest_cpu_allocation

FUSED = fused_backend_params("siglip")
ALL = FUSED + ["torch"]
SHAPES = [(1, 3), (2, 1), (7, 5), (33, 40), (70, 130)]  # ragged: none a multiple of a tile


def _inputs(n, d, dtype, gen, scale=None, bias=None):
    x = randn(n, d, dtype=dtype, generator=gen)
    y = randn(n, d, dtype=dtype, generator=gen)
    if scale is None:  # fresh random scale and bias, of the size SigLIP trains with
        scale = 0.5 + 4.0 * float(torch.rand((), generator=gen))
        bias = -5.0 + 6.0 * float(torch.rand((), generator=gen))
    return x, y, scale, bias


def _leaves(x, y, scale, bias):
    """Tensors requiring grad for the tested call and their float64 twins."""
    tested = [x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_(),
              torch.tensor(scale, device=DEVICE, requires_grad=True), torch.tensor(bias, device=DEVICE, requires_grad=True)]
    exact = [t.detach().double().cpu().requires_grad_() for t in tested]
    return tested, exact


EPS32 = torch.finfo(torch.float32).eps
# dscale and dbias are sums over every (i, j) of signed terms, t_ij = dL/dl_ij (times x_i . y_j for
# dscale), positives against negatives: for a small batch they cancel to ~0 by chance (N = 2, D = 1:
# ~2e-3 of the draws had |dbias| so small that fp32 rounding alone gave rel_err > 1e-4; N = 1:
# dscale ~ x . y, ~3e-3 of the draws nearly orthogonal). From the
# exact inputs, fp32 rounds l_ij by ~eps32 (|s| |x_i| |y_j| + |b|), hence t_ij (|dt/dl| <= |t|) by
# ~eps32 |t_ij| (that + 1), and x_i . y_j by ~eps32 |x_i| |y_j|: scalar_grad_floors adds those
# per-term errors (plus one rounding of each term) as independent roundings. FLOOR_C = 4: measured
# errors reach 0.83 of the floor (N = 1..70, 300 draws each, torch / cpu / triton), while the floor
# stays below tol |want| for most draws (median 0.03..0.4 of it), so rel_err < tol still decides
# wherever the sum is well-conditioned.
FLOOR_C = 4.0


def scalar_grad_floors(x, y, scale, bias, weights):
    """(dscale floor, dbias floor): the per-term fp32 error bounds, in units of eps32, added as
    independent roundings (root of the sum of squares: the sum of their sizes would be N times too
    lenient for N^2 terms, and dominate tol for N = 70).
    `weights` (N,) are the rows' upstream gradients (1 / N for the mean)."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    n = x.shape[0]
    logits = scale * (x @ y.T) + bias
    signs = 2 * torch.eye(n, dtype=torch.float64) - 1
    terms = (weights.detach().double().cpu()[:, None] * torch.sigmoid(-signs * logits)).abs()
    norms = x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :]
    per_term = terms * (2 + abs(scale) * norms + abs(bias))
    return float((per_term * (1 + norms)).pow(2).sum().sqrt()), float(per_term.pow(2).sum().sqrt())


def assert_scalar_grad_close(got, want, floor, tol, name):
    """|got - want| <= tol |want| + FLOOR_C eps32 floor (rel_err < tol where the floor is negligible)."""
    err = abs(float(got) - float(want))
    bound = tol * abs(float(want)) + FLOOR_C * EPS32 * floor
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (want {float(want):.3g})"


def _formula_float64(x, y, scale, bias):
    """SPEC.md literally, in float64 (an independent evaluation: loops over the z signs)."""
    logits = scale * (x @ y.T) + bias
    n = logits.shape[0]
    zero = torch.zeros((), dtype=logits.dtype)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            # log(1 + e^v) exactly: F.softplus returns v itself past its threshold 20 (off by
            # e^-v ~ 2e-9, a 1e-11 relative error of the loss, over this test's 1e-12)
            total = total + torch.logaddexp(zero, -z * logits[i, j])
    return total / n


def test_reference_equals_the_formula(gen):
    x, y, scale, bias = _inputs(6, 4, torch.float64, gen)
    expected = _formula_float64(x.cpu(), y.cpu(), scale, bias)
    assert rel_err(reference.siglip_loss(x, y, scale, bias), expected) < 1e-12


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,d", SHAPES)
def test_value_and_all_gradients_match_float64(backend, dtype, n, d, gen):
    x, y, scale, bias = _inputs(n, d, dtype, gen)
    (xt, yt, st, bt), (x64, y64, s64, b64) = _leaves(x, y, scale, bias)
    loss = cl_fast.siglip_loss(xt, yt, st, bt, backend=backend)
    expected = reference.siglip_loss(x64, y64, s64, b64)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    expected.backward()
    tol = RTOL[dtype]
    assert rel_err(loss, expected) < tol
    for name, got, want in (("dx", xt.grad, x64.grad), ("dy", yt.grad, y64.grad)):
        assert got is not None, name
        assert rel_err(got, want) < tol, name
    floors = scalar_grad_floors(x64, y64, scale, bias, torch.full((n,), 1.0 / n))
    for name, got, want, floor in (("dscale", st.grad, s64.grad, floors[0]), ("dbias", bt.grad, b64.grad, floors[1])):
        assert got is not None, name
        assert_scalar_grad_close(got, want, floor, tol, name)
    assert xt.grad.dtype == dtype and yt.grad.dtype == dtype


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_per_row_losses_and_weighted_upstream(backend, dtype, gen):
    """The op's per-row losses, and a backward with a random weight per row (not just the mean)."""
    from cl_fast._ops.siglip import siglip_fwd

    x, y, scale, bias = _inputs(37, 24, dtype, gen)
    (xt, yt, st, bt), (x64, y64, s64, b64) = _leaves(x, y, scale, bias)
    rows = siglip_fwd(xt, yt, st.float(), bt.float(), backend)
    expected = reference.siglip_loss(x64, y64, s64, b64, reduction="none")
    assert rows.shape == (37,) and rows.dtype == torch.float32
    assert rel_err(rows, expected) < RTOL[dtype]
    weights = torch.rand(37, generator=gen, dtype=torch.float64) * 3 - 1  # mixed signs
    (rows * weights.to(rows.device, torch.float32)).sum().backward()
    (expected * weights).sum().backward()
    for got, want in ((xt.grad, x64.grad), (yt.grad, y64.grad)):
        assert rel_err(got, want) < RTOL[dtype]
    floors = scalar_grad_floors(x64, y64, scale, bias, weights)
    assert_scalar_grad_close(st.grad, s64.grad, floors[0], RTOL[dtype], "dscale")
    assert_scalar_grad_close(bt.grad, b64.grad, floors[1], RTOL[dtype], "dbias")


@pytest.mark.parametrize("backend", ALL)
def test_saturated_terms_keep_relative_precision(backend):
    """Orthonormal pairs, s = 50, b = -30: positives l = 20 (softplus(-20) ~ 2e-9), negatives
    l = -30 (~ 9e-14). A loss of ~2e-9 must come out to fp32 relative precision, not 0."""
    n = 12
    x = torch.eye(n, 16, device=DEVICE)
    y = torch.eye(n, 16, device=DEVICE)
    loss = cl_fast.siglip_loss(x, y, 50.0, -30.0, backend=backend)
    expected = reference.siglip_loss(x.double(), y.double(), 50.0, -30.0)
    assert 0 < float(loss) and rel_err(loss, expected) < 1e-4


@pytest.mark.parametrize("backend", ALL)
def test_large_logits_stay_finite(backend, gen):
    x, y, _, _ = _inputs(20, 8, torch.float32, gen)
    x, y = x * 30, y * 30  # |l| up to ~1e5: exp(|l|) would overflow
    loss = cl_fast.siglip_loss(x, y, 10.0, 3.0, backend=backend)
    expected = reference.siglip_loss(x.double(), y.double(), 10.0, 3.0)
    assert torch.isfinite(loss) and rel_err(loss, expected) < 1e-4


def test_logit_bias_none_is_zero(gen):
    x, y, scale, _ = _inputs(9, 6, torch.float32, gen)
    torch.testing.assert_close(cl_fast.siglip_loss(x, y, scale, None), cl_fast.siglip_loss(x, y, scale, 0.0))


# ---------------------------------------------------------------- module
def test_module_matches_function_and_output_dict(gen):
    x, y, scale, bias = _inputs(10, 8, torch.float32, gen)
    module = cl_fast.SigLipLoss()
    expected = cl_fast.siglip_loss(x, y, scale, bias)
    torch.testing.assert_close(module(x, y, scale, bias), expected)
    out = module(x, y, scale, bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], expected)


def test_module_more_than_one_process_is_not_implemented():
    with pytest.raises(NotImplementedError, match="world_size"):
        cl_fast.SigLipLoss(rank=0, world_size=2)


# ---------------------------------------------------------------- bad input
def _pair(n=4, d=8, dtype=torch.float32):
    return torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)


BAD_CALLS = [
    ("shape mismatch", lambda: cl_fast.siglip_loss(torch.randn(4, 8), torch.randn(5, 8), 1.0, 0.0), ValueError, "image_features and text_features"),
    ("1-D", lambda: cl_fast.siglip_loss(torch.randn(8), torch.randn(8), 1.0, 0.0), ValueError, "image_features must be 2-D"),
    ("zero rows", lambda: cl_fast.siglip_loss(*_pair(n=0), 1.0, 0.0), ValueError, "image_features"),
    ("integer dtype", lambda: cl_fast.siglip_loss(*_pair(dtype=torch.int32), 1.0, 0.0), TypeError, "image_features"),
    ("mixed dtypes", lambda: cl_fast.siglip_loss(torch.randn(4, 8), torch.randn(4, 8).half(), 1.0, 0.0), TypeError, "dtype"),
    ("zero scale", lambda: cl_fast.siglip_loss(*_pair(), 0.0, 0.0), ValueError, "logit_scale"),
    ("nan scale", lambda: cl_fast.siglip_loss(*_pair(), math.nan, 0.0), ValueError, "logit_scale"),
    ("tensor scale < 0", lambda: cl_fast.siglip_loss(*_pair(), torch.tensor(-2.0), 0.0), ValueError, "logit_scale"),
    ("string bias", lambda: cl_fast.siglip_loss(*_pair(), 1.0, "0"), TypeError, "logit_bias"),
    ("vector bias", lambda: cl_fast.siglip_loss(*_pair(), 1.0, torch.zeros(2)), ValueError, "logit_bias"),
    ("inf bias", lambda: cl_fast.siglip_loss(*_pair(), 1.0, math.inf), ValueError, "logit_bias"),
    ("bad backend", lambda: cl_fast.siglip_loss(*_pair(), 1.0, 0.0, backend="fast"), ValueError, "backend"),
    ("bad dist_impl", lambda: cl_fast.SigLipLoss(dist_impl="ring"), ValueError, "dist_impl"),
    ("bad rank", lambda: cl_fast.SigLipLoss(rank=1, world_size=1), ValueError, "rank"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_reject_float64(backend):
    with pytest.raises(TypeError, match="float64"):
        cl_fast.siglip_loss(*_pair(dtype=torch.float64), 1.0, 0.0, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_is_a_clear_error(backend, gen):
    x, y, scale, bias = _inputs(6, 4, torch.float32, gen)
    x.requires_grad_()
    loss = cl_fast.siglip_loss(x, y, scale, bias, backend=backend)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


# ---------------------------------------------------------------- no N x N tensor, compile, opcheck
@pytest.mark.parametrize("backend", FUSED)
def test_fused_path_allocates_no_square_matrix(backend, gen):
    n, d = 300, 8
    x = randn(n, d, generator=gen, requires_grad=True)
    y = randn(n, d, generator=gen, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)

    def forward_backward():
        cl_fast.siglip_loss(x, y, scale, bias, backend=backend).backward()

    with AllocationRecorder() as recorder:
        forward_backward()
    assert x.grad is not None and bias.grad is not None
    square_bytes = 4 * n * n
    assert recorder.largest < square_bytes // 4
    if DEVICE.type == "cpu":
        assert _largest_cpu_allocation(forward_backward) < square_bytes // 4


def test_recorder_sees_the_reference_square_matrix(gen):
    x, y = randn(150, 8, generator=gen, requires_grad=True), randn(150, 8, generator=gen, requires_grad=True)
    with AllocationRecorder() as recorder:
        cl_fast.siglip_loss(x, y, 2.0, -1.0, backend="torch").backward()
    assert recorder.largest >= 4 * 150 * 150


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph_no_graph_break(backend, gen):
    torch._dynamo.reset()

    def step(x, y, scale, bias):
        return cl_fast.siglip_loss(x, y, scale, bias, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, y, scale, bias = _inputs(12, 20, torch.float32, gen)
    (xt, yt, st, bt), _ = _leaves(x, y, scale, bias)
    (xr, yr, sr, br), _ = _leaves(x, y, scale, bias)
    loss = compiled(xt, yt, st, bt)
    loss.backward()
    expected = step(xr, yr, sr, br)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in ((xt.grad, xr.grad), (yt.grad, yr.grad), (st.grad, sr.grad), (bt.grad, br.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, gen):
    x = randn(10, 12, generator=gen, requires_grad=True)
    y = randn(10, 12, generator=gen, requires_grad=True)
    scale = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-1.0, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.cl_fast.siglip_fwd.default, (x, y, scale, bias, backend))
    grad = torch.rand(10, device=DEVICE)
    torch.library.opcheck(
        torch.ops.cl_fast.siglip_bwd.default, (grad, x.detach(), y.detach(), scale.detach(), bias.detach(), backend)
    )
