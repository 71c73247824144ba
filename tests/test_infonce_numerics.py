"""The Triton InfoNCE launchers (cl_fast.triton_kernels.infonce) against a float64 evaluation.

Called directly with PLAN.md's signatures (scale a 0-d fp32 device tensor, normalize for the cross
ops): values AND gradients (inputs and scale) for ragged N and D, fp32/fp16/bf16, both cross
directions, normalize False/True; the running-max regime at tiny temperatures against the fp32
reference's own error; saturated rows (relative precision, never negative); rows of huge and tiny
norm; bit-identical repeated calls; no host read of the scale.
"""
from __future__ import annotations

import pytest
import torch

from cl_fast import _dispatch, reference
from conftest import DEVICE, RTOL, rel_err

if "triton" not in _dispatch.backends("infonce", DEVICE):
    pytest.skip("needs triton with a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from cl_fast.triton_kernels import infonce as K  # noqa: E402


def _rand(n, d, gen, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)


def _scale(value):
    return torch.tensor(value, dtype=torch.float32).to(DEVICE)


# ------------------------------------------------------------------ float64 evaluation
def _nt_xent_rows64(z1, z2, s):
    """Per-row nt_xent losses in float64 as log(1 + sum_neg exp(S_ij - S_ip)) (exact for saturated rows)."""
    N = z1.shape[0]
    Z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    S = s * Z @ Z.T
    idx = torch.arange(2 * N, device=Z.device)
    partner = (idx + N) % (2 * N)
    s_pos = S[idx, partner]
    excluded = torch.eye(2 * N, dtype=torch.bool, device=Z.device)
    excluded[idx, partner] = True
    rel = (S - s_pos[:, None]).masked_fill(excluded, float("-inf"))
    return _log1p_sum_exp(rel)


def _log1p_sum_exp(rel):
    """log(1 + sum_j exp(rel_j)) per row, without overflow and exact when the sum is tiny."""
    return torch.logaddexp(torch.zeros_like(rel[:, 0]), torch.logsumexp(rel, 1))


def _cross_rows64(q, k, s, normalize):
    if normalize:
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    S = s * q @ k.T
    eye = torch.eye(q.shape[0], dtype=torch.bool, device=q.device)

    def rows(L):
        return _log1p_sum_exp((L - L.diagonal()[:, None]).masked_fill(eye, float("-inf")))

    return rows(S), rows(S.T)


def _grads64(fn, inputs, s, weights):
    """Values and gradients (inputs, s) of sum(weights * fn(inputs, s)) in float64."""
    xs = [x.detach().double().cpu().requires_grad_() for x in inputs]
    s64 = torch.tensor(float(s), dtype=torch.float64, requires_grad=True)
    rows = fn(*xs, s64)
    rows = torch.cat(rows) if isinstance(rows, tuple) else rows
    (rows * weights.double().cpu()).sum().backward()
    return rows.detach(), [x.grad for x in xs], s64.grad


def _run_ntxent(z1, z2, s, weights):
    loss, lse = K.ntxent_fwd(z1, z2, _scale(s))
    dz1, dz2, ds = K.ntxent_bwd(weights.to(DEVICE), z1, z2, _scale(s), lse)
    return loss, lse, [dz1, dz2], ds


def _run_cross(q, k, s, weights, both, normalize):
    N = q.shape[0]
    row_loss, col_loss, row_lse, col_lse = K.cross_fwd(q, k, _scale(s), both, normalize)
    g = weights.to(DEVICE)
    grad_col = g[N:] if both else torch.zeros(0, device=DEVICE)
    dq, dk, ds = K.cross_bwd(g[:N], grad_col, q, k, _scale(s), row_lse, col_lse, both, normalize)
    loss = torch.cat([row_loss, col_loss]) if both else row_loss
    return loss, (row_lse, col_lse), [dq, dk], ds


EPS32 = torch.finfo(torch.float32).eps
# dL/ds = sum_i w_i (sum_j P_ij cos_ij - cos_i,pos) is a sum of signed terms that cancels to ~0 by
# chance for a small batch (nt_xent, N = 2, D = 3: |ds| below the fp32 error / 1e-4 in ~3e-4..3e-3
# of the draws). From the exact inputs fp32 rounds each cos_ij by ~eps32 and each P_ij by
# ~2 s eps32 P_ij: _ntxent_ds_floor adds those per-term errors as independent roundings.
# DS_FLOOR_C = 8: measured errors reach 1.35 of the floor at N = 2 (600 draws), 0.9 at N = 17; the
# floor is ~0.02..0.05 of tol |ds| for a typical draw (median, times DS_FLOOR_C / 4), so rel_err < tol
# still decides unless the sum has cancelled.
DS_FLOOR_C = 8.0


def _ntxent_ds_floor(z1, z2, s, weights):
    """The per-term fp32 error bounds of nt_xent's dL/ds in units of eps32 (root of the sum of squares)."""
    n = z1.shape[0]
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double().cpu(), dim=1)
    cos = z @ z.T
    eye = torch.eye(2 * n, dtype=torch.bool)
    probs = (s * cos).masked_fill(eye, float("-inf")).softmax(dim=1)
    idx = torch.arange(2 * n)
    coef = probs.clone()
    coef[idx, (idx + n) % (2 * n)] -= 1
    per_term = weights.double().cpu()[:, None] * (coef.abs() + 2 * s * probs * cos.abs())
    return float(per_term.pow(2).sum().sqrt())


def _check(loss, grads, ds, expected, expected_grads, expected_ds, dtype, what="", ds_floor=0.0):
    tol = RTOL[dtype]
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert rel_err(loss, expected) < tol, f"loss {what}"
    assert bool((loss >= 0).all()), f"negative per-row loss {what}"
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert g.dtype == dtype, f"grad {i} dtype"
        assert rel_err(g, e) < tol, f"grad of input {i} {what}"
    assert ds.dim() == 0 and ds.dtype == torch.float32
    ds_err, want = abs(float(ds) - float(expected_ds)), abs(float(expected_ds))
    assert ds_err <= tol * want + DS_FLOOR_C * EPS32 * ds_floor, f"grad of scale {what}: error {ds_err:.3g}, want {want:.3g}"


SHAPES = [(2, 3), (17, 20), (33, 70), (40, 129)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_ntxent_matches_float64(n, d, dtype, gen):
    z1, z2 = _rand(n, d, gen, dtype), _rand(n, d, gen, dtype)
    s = 2.0 if d != 70 else 45.0  # 45: past the fixed-shift limit, the running-max regime
    weights = torch.rand(2 * n, generator=gen) + 0.5
    loss, _, grads, ds = _run_ntxent(z1, z2, s, weights)
    exp, exp_grads, exp_ds = _grads64(_nt_xent_rows64, [z1, z2], s, weights)
    _check(loss, grads, ds, exp, exp_grads, exp_ds, dtype, ds_floor=_ntxent_ds_floor(z1, z2, s, weights))


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("both", [True, False], ids=["both", "one"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n,d", SHAPES[1:])
def test_cross_matches_float64(n, d, dtype, both, normalize, gen):
    q, k = _rand(n, d, gen, dtype), _rand(n, d, gen, dtype)
    # raw features: logits up to ~ s * D, far beyond any fixed shift
    s = (3.0 if normalize else 0.5) if d != 70 else 60.0
    weights = torch.rand(2 * n if both else n, generator=gen) + 0.5
    loss, _, grads, ds = _run_cross(q, k, s, weights, both, normalize)

    def rows64(a, b, s64):
        r, c = _cross_rows64(a, b, s64, normalize)
        return (r, c) if both else r

    exp, exp_grads, exp_ds = _grads64(rows64, [q, k], s, weights)
    _check(loss, grads, ds, exp, exp_grads, exp_ds, dtype, f"both={both} normalize={normalize}")


def test_lse_is_the_row_log_sum_exp(gen):
    z1, z2 = _rand(19, 24, gen), _rand(19, 24, gen)
    _, lse = K.ntxent_fwd(z1, z2, _scale(3.0))
    Z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    S = (3.0 * Z @ Z.T).fill_diagonal_(float("-inf"))
    assert rel_err(lse, torch.logsumexp(S, 1)) < 1e-6
    _, _, row_lse, col_lse = K.cross_fwd(z1, z2, _scale(3.0), True, False)
    S = 3.0 * z1.double() @ z2.double().T
    assert rel_err(row_lse, torch.logsumexp(S, 1)) < 1e-6
    assert rel_err(col_lse, torch.logsumexp(S, 0)) < 1e-6


# ------------------------------------------------------------------ numerics (issue 11)
@pytest.mark.parametrize("temperature", [1e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("op", ["nt_xent", "clip"])
def test_tiny_temperature_within_10x_of_fp32_reference(op, temperature, gen):
    """The running-max regime: error against float64 within 10x of the fp32 PyTorch reference's."""
    n, d = 24, 16
    a, b = _rand(n, d, gen), _rand(n, d, gen)
    s = 1.0 / temperature
    weights = torch.rand(2 * n, generator=gen) + 0.5
    if op == "nt_xent":
        loss, _, grads, _ = _run_ntxent(a, b, s, weights)
        exp, exp_grads, _ = _grads64(_nt_xent_rows64, [a, b], s, weights)
        a32, b32 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        ref = reference.nt_xent(a32, b32, temperature, reduction="none")
    else:
        loss, _, grads, _ = _run_cross(a, b, s, weights, True, True)
        exp, exp_grads, _ = _grads64(lambda x, y, s64: _cross_rows64(x, y, s64, True), [a, b], s, weights)
        a32, b32 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        qn, kn = torch.nn.functional.normalize(a32, dim=1), torch.nn.functional.normalize(b32, dim=1)
        S = s * qn @ kn.T
        labels = torch.arange(n, device=DEVICE)
        ref = torch.cat([torch.nn.functional.cross_entropy(S, labels, reduction="none"),
                         torch.nn.functional.cross_entropy(S.T, labels, reduction="none")])
    (ref * weights.to(DEVICE)).sum().backward()
    floor = 1e-7
    assert rel_err(loss, exp) <= 10 * max(rel_err(ref, exp), floor)
    for g, g32, e in zip(grads, (a32.grad, b32.grad), exp_grads):
        assert rel_err(g, e) <= 10 * max(rel_err(g32, e), floor)


@pytest.mark.parametrize("s", [10.0, 50.0])
def test_saturated_rows_keep_relative_precision(s, gen):
    """Positives almost equal to their anchors: per-row losses ~ e^-s, far below lse's rounding."""
    n, d = 20, 32
    z1 = _rand(n, d, gen)
    z2 = z1 + 1e-3 * _rand(n, d, gen)
    weights = torch.rand(2 * n, generator=gen) + 0.5
    loss, _, grads, ds = _run_ntxent(z1, z2, s, weights)
    exp, exp_grads, exp_ds = _grads64(_nt_xent_rows64, [z1, z2], s, weights)
    assert bool((loss > 0).all())
    # per-row RELATIVE error (rel_err is relative to the largest entry; here each row counts)
    per_row = ((loss.double().cpu() - exp) / exp).abs().max().item()
    assert per_row < 1e-4, per_row
    for g, e in zip(grads, exp_grads):
        assert rel_err(g, e) < 1e-4
    assert rel_err(ds, exp_ds) < 1e-4
    row_loss, _, _, _ = K.cross_fwd(z1, z2, _scale(s), False, True)
    exp_row, _ = _cross_rows64(z1.double().cpu(), z2.double().cpu(), s, True)
    assert bool((row_loss > 0).all())
    assert ((row_loss.double().cpu() - exp_row) / exp_row).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_and_tiny_norm_rows(dtype, gen):
    """Row norms without overflow or underflow (||x||^2 of a 1e30 row is 1e60): finite, and equal to
    the float64 evaluation of n(x) = x / max(||x||, eps) (a 1e-30 row is below eps: x / eps)."""
    n, d = 12, 24
    factors = torch.ones(n, 1, dtype=torch.float64)
    factors[0], factors[3], factors[5], factors[8] = 1e30, 1e-30, 1e35, 1e-10
    z1 = (_rand(n, d, gen).double().cpu() * factors).to(DEVICE, dtype)
    z2 = _rand(n, d, gen, dtype)
    weights = torch.rand(2 * n, generator=gen) + 0.5
    loss, _, grads, ds = _run_ntxent(z1, z2, 2.0, weights)
    exp, exp_grads, exp_ds = _grads64(_nt_xent_rows64, [z1, z2], 2.0, weights)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    tol = RTOL[dtype]
    assert rel_err(loss, exp) < tol
    # d/dx of a function of n(x) scales with 1 / max(||x||, eps): compare every row at unit scale
    norms = z1.double().cpu().norm(dim=1, keepdim=True).clamp_min(1e-12)
    assert rel_err(grads[0].double().cpu() * norms, exp_grads[0] * norms) < tol
    assert rel_err(grads[1], exp_grads[1]) < tol
    assert rel_err(ds, exp_ds) < tol
    row_loss, col_loss, _, _ = K.cross_fwd(z1, z2, _scale(2.0), True, True)
    exp_r, exp_c = _cross_rows64(z1.double().cpu(), z2.double().cpu(), 2.0, True)
    assert rel_err(row_loss, exp_r) < tol and rel_err(col_loss, exp_c) < tol


def test_zero_row_is_finite(gen):
    z1, z2 = _rand(9, 10, gen), _rand(9, 10, gen)
    z1[4] = 0.0
    weights = torch.rand(18, generator=gen) + 0.5
    loss, _, grads, ds = _run_ntxent(z1, z2, 2.0, weights)
    exp, exp_grads, exp_ds = _grads64(_nt_xent_rows64, [z1, z2], 2.0, weights)
    assert rel_err(loss, exp) < 1e-4
    assert rel_err(grads[1], exp_grads[1]) < 1e-4
    assert torch.isfinite(grads[0]).all()


# ------------------------------------------------------------------ determinism, no host syncs
def test_repeated_calls_are_bit_identical(gen):
    z1, z2 = _rand(37, 40, gen, torch.bfloat16), _rand(37, 40, gen, torch.bfloat16)
    g = torch.rand(74, generator=gen).to(DEVICE)
    first = _run_ntxent(z1, z2, 3.0, g)
    second = _run_ntxent(z1, z2, 3.0, g)
    for x, y in zip((first[0], first[1], *first[2], first[3]), (second[0], second[1], *second[2], second[3])):
        assert torch.equal(x, y)
    first = _run_cross(z1, z2, 60.0, g, True, True)
    second = _run_cross(z1, z2, 60.0, g, True, True)
    for x, y in zip((first[0], *first[1], *first[2], first[3]), (second[0], *second[1], *second[2], second[3])):
        assert torch.equal(x, y)


def test_scale_is_never_read_on_the_host(gen, monkeypatch):
    """The launchers pass the scale tensor to the kernels: no float()/item()/bool() of any tensor."""
    z1, z2 = _rand(10, 12, gen), _rand(10, 12, gen)
    scale = _scale(2.0)
    g = torch.rand(20, generator=gen).to(DEVICE)

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor value")

    if DEVICE.type == "cpu":  # the interpreter itself reads kernel arguments through numpy, not these
        for name in ("item", "__float__", "__bool__", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
    loss, lse = K.ntxent_fwd(z1, z2, scale)
    K.ntxent_bwd(g, z1, z2, scale, lse)
    _, _, row_lse, col_lse = K.cross_fwd(z1, z2, scale, True, False)
    K.cross_bwd(g[:10], g[10:], z1, z2, scale, row_lse, col_lse, True, False)
    monkeypatch.undo()
    assert torch.isfinite(loss).all()


def test_scale_must_be_a_device_tensor(gen):
    z1, z2 = _rand(4, 5, gen), _rand(4, 5, gen)
    with pytest.raises(TypeError, match="scale"):
        K.ntxent_fwd(z1, z2, 2.0)
    with pytest.raises(TypeError, match="scale"):
        K.cross_fwd(z1, z2, torch.tensor(2.0, dtype=torch.float64, device=DEVICE), True, True)
