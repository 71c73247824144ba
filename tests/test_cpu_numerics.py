"""The C++ CPU kernels at their numerical edges (issue 11 part 4), each against a float64 evaluation
of the same (rounded) inputs, values and gradients:

- saturated rows (the positive far above every negative, T in {1e-2, 1e-3, 1e-4}): per-row losses
  keep relative precision and are never negative; gradients within 10x of the error of a plain
  fp32 PyTorch evaluation (`F.normalize` + matmul + `cross_entropy`);
- huge-norm rows (|x| up to 3e37): row norms without overflow in every kernel that normalises
  (info_nce / clip, nt_xent, moco and its queue update, byol);
- normalize=False (OpenCLIP's ClipLoss: features as given, logits unbounded, losses ~1e3);
- sinkhorn at large |scores / eps| (finite, error within 10x of an fp32 log-domain evaluation);
- the portable build: the CPU sources compile without the x86 flags (at::vec's DEFAULT path).

The cross ops are called through `torch.ops.cl_fast_C` (`fused_cross`), which takes the scale as
a float or as a 0-d tensor, whichever the built schema has; `fused_clip_mean` goes through the
public `cl_fast.clip_loss(..., normalize=False, backend="cpu")` once that routes to the kernels.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import cl_fast
from cl_fast import reference
from conftest import rel_err

OPS = torch.ops.cl_fast_C
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ fused helpers
def _scale_arg(op, value: float):
    """`scale` as the built schema takes it: a Python float, or a 0-d fp32 CPU tensor."""
    scale_type = str(op.default._schema.arguments[[a.name for a in op.default._schema.arguments].index("scale")].type)
    return torch.tensor(float(value), dtype=torch.float32) if scale_type == "Tensor" else float(value)


class _FusedCross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, both, normalize):
        row, col, row_lse, col_lse = OPS.cross_fwd(q, k, _scale_arg(OPS.cross_fwd, float(scale)), both, normalize)
        ctx.save_for_backward(q, k, scale, row_lse, col_lse)
        ctx.both, ctx.normalize = both, normalize
        return row, col

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        q, k, scale, row_lse, col_lse = ctx.saved_tensors
        grad_col = grad_col.float().contiguous() if ctx.both else torch.zeros(0)
        dq, dk, dscale = OPS.cross_bwd(grad_row.float().contiguous(), grad_col, q, k,
                                       _scale_arg(OPS.cross_bwd, float(scale)), row_lse, col_lse, ctx.both,
                                       ctx.normalize)
        return dq, dk, dscale.to(scale.dtype), None, None


def fused_cross(q, k, scale, *, both=True, normalize=True):
    """(row_loss, col_loss) per row from the CPU kernels; differentiable in q, k and scale (0-d)."""
    return _FusedCross.apply(q, k, scale, both, normalize)


def _public_clip_runs_fused() -> bool:
    try:
        x = torch.randn(3, 4)
        cl_fast.clip_loss(x, x, torch.tensor(1.0), normalize=False, backend="cpu")
        return True
    except ValueError:  # before the drop-in lands: normalize=False runs on the reference only
        return False


def fused_clip_mean(image, text, logit_scale, *, normalize):
    """clip_loss's mean: the public API where it runs normalize=False fused, else the ops."""
    if _public_clip_runs_fused():
        return cl_fast.clip_loss(image, text, logit_scale, normalize=normalize, backend="cpu")
    row, col = fused_cross(image, text, logit_scale, both=True, normalize=normalize)
    return 0.5 * (row.mean() + col.mean())


class _FusedNtXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, z2, scale):
        loss, lse = OPS.ntxent_fwd(z1, z2, _scale_arg(OPS.ntxent_fwd, float(scale)))
        ctx.save_for_backward(z1, z2, scale, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):
        z1, z2, scale, lse = ctx.saved_tensors
        dz1, dz2, dscale = OPS.ntxent_bwd(grad.float().contiguous(), z1, z2,
                                          _scale_arg(OPS.ntxent_bwd, float(scale)), lse)
        return dz1, dz2, dscale.to(scale.dtype)


# --------------------------------------------------------------------------------- references
def _normalized(x, normalize):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else x


def _row_losses(logits, positive):
    """loss_i = log(1 + sum_{j != p(i)} exp(S_ij - S_ip)) = softplus(lse_{j != p} (S_ij - S_ip)),
    masked entries (-inf) excluded: no cancellation, relative precision for tiny losses."""
    rows = torch.arange(logits.shape[0])
    pos = logits[rows, positive]
    off = logits - pos[:, None]
    off = off.masked_fill(F.one_hot(positive, logits.shape[1]).bool(), -math.inf)
    return F.softplus(torch.logsumexp(off, dim=1))


def reference_cross(q, k, scale, *, normalize):
    """(row, col) per-row losses of clip / symmetric info_nce, float64."""
    logits = scale * _normalized(q, normalize) @ _normalized(k, normalize).T
    diag = torch.arange(q.shape[0])
    return _row_losses(logits, diag), _row_losses(logits.T, diag)


def naive_fp32_cross(q, k, scale, *, normalize):
    """What a user writes in fp32: normalise, matmul, cross_entropy (the yardstick)."""
    u, v = (F.normalize(q, dim=1), F.normalize(k, dim=1)) if normalize else (q, k)
    logits = scale * u @ v.T
    target = torch.arange(q.shape[0])
    return F.cross_entropy(logits, target, reduction="none"), F.cross_entropy(logits.T, target, reduction="none")


def reference_ntxent(z1, z2, scale):
    z = _normalized(torch.cat([z1, z2]), True)
    logits = (scale * z @ z.T).fill_diagonal_(-math.inf)
    n = z1.shape[0]
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return _row_losses(logits, positive)


def gradients(fn, inputs, weights):
    """d(sum_i w_i loss_i)/d inputs for fn(*inputs) -> tuple of per-row loss vectors."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    losses = fn(*leaves)
    losses = losses if isinstance(losses, tuple) else (losses,)
    total = sum((loss * w.to(loss.dtype)).sum() for loss, w in zip(losses, weights))
    return [g.detach() for g in torch.autograd.grad(total, leaves)], [loss.detach() for loss in losses]


def frobenius_rel(actual, expected):
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def row_rel(actual, expected):
    """max over rows of ||a_i - e_i|| / ||e_i||: every row judged on its own scale (huge rows have
    gradients ~1 / ||x||)."""
    actual, expected = actual.double(), expected.double()
    return float(((actual - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-300)).max())


# ---------------------------------------------------------------------------- saturated rows
def saturated_pairs(n, d, scale, gen, spread=(8.0, 16.0)):
    """q, k (fp32) whose logits S_ij = scale cos(q_i, k_j) put the positive ~8-16 above every
    negative at ANY scale: q_i = b_i + a_i w (b orthonormal, w a common direction orthogonal to
    them), so 1 - cos(q_i, q_j) ~ (g_i + g_j) / (2 scale) for a_i^2 = scale / g_i - 1; k_i = q_i
    plus noise that lowers the positive by ~0.1 at most. Losses ~ n e^-12: 1e-4 .. 1e-2."""
    basis = torch.linalg.qr(torch.randn(d, n + 1, generator=gen, dtype=torch.float64))[0].T
    b, w = basis[:n], basis[n]
    g = torch.empty(n, dtype=torch.float64).uniform_(*spread, generator=gen)
    a = (scale / g - 1).clamp_min(0).sqrt()
    q = b + a[:, None] * w
    noise = torch.randn(n, d, generator=gen, dtype=torch.float64)
    noise -= (noise * q).sum(1, keepdim=True) * q / (q * q).sum(1, keepdim=True)  # orthogonal to q_i
    k = q + noise / noise.norm(dim=1, keepdim=True) * q.norm(dim=1, keepdim=True) * math.sqrt(0.05 / scale)
    return q.float(), k.float()


@pytest.mark.parametrize("temperature", [1e-2, 1e-3, 1e-4])
def test_saturated_rows_cross(temperature, gen):
    scale = 1.0 / temperature
    q, k = saturated_pairs(40, 64, scale, gen)
    s = torch.tensor(scale, dtype=torch.float32)
    weights = [torch.rand(40, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2)]
    exact_grads, exact = gradients(lambda a, b, c: reference_cross(a, b, c, normalize=True),
                                   [q.double(), k.double(), s.double()], weights)
    fused_grads, fused = gradients(lambda a, b, c: fused_cross(a, b, c), [q, k, s], weights)
    naive_grads, naive = gradients(lambda a, b, c: naive_fp32_cross(a, b, c, normalize=True), [q, k, s], weights)
    assert 1e-7 < float(exact[0].min()) and float(exact[0].max()) < 0.1  # saturated, not solved to 0
    for got, want in zip(fused, exact):
        assert bool((got >= 0).all())
        # relative per row: bounded by the rounding of the logits (~3 ulp of scale), not by
        # lse - S_pos's cancellation (absolute ulp(scale) on a loss of 1e-4)
        per_row = float(((got.double() - want) / want).abs().max())
        assert per_row < 32 * scale * 2.0**-24 + 1e-5, per_row
    for name, got, yardstick, want in zip(("dq", "dk", "dscale"), fused_grads, naive_grads, exact_grads):
        err, naive_err = frobenius_rel(got, want), frobenius_rel(yardstick, want)
        assert err <= 10 * naive_err + 1e-6, (name, err, naive_err)


@pytest.mark.parametrize("temperature", [1e-2, 1e-3, 1e-4])
def test_saturated_rows_ntxent(temperature, gen):
    scale = 1.0 / temperature
    z1, z2 = saturated_pairs(24, 64, scale, gen)
    s = torch.tensor(scale, dtype=torch.float32)
    weights = [torch.rand(48, generator=gen, dtype=torch.float64) + 0.5]
    exact_grads, (exact,) = gradients(reference_ntxent, [z1.double(), z2.double(), s.double()], weights)
    fused_grads, (fused,) = gradients(_FusedNtXent.apply, [z1, z2, s], weights)

    def naive(a, b, c):
        z = F.normalize(torch.cat([a, b]), dim=1)
        logits = (c * z @ z.T).fill_diagonal_(-math.inf)
        return F.cross_entropy(logits, torch.cat([torch.arange(24, 48), torch.arange(24)]), reduction="none")

    naive_grads, _ = gradients(naive, [z1, z2, s], weights)
    assert bool((fused >= 0).all())
    per_row = float(((fused.double() - exact) / exact).abs().max())
    assert per_row < 32 * scale * 2.0**-24 + 1e-5, per_row
    for name, got, yardstick, want in zip(("dz1", "dz2", "dscale"), fused_grads, naive_grads, exact_grads):
        err, naive_err = frobenius_rel(got, want), frobenius_rel(yardstick, want)
        assert err <= 10 * naive_err + 1e-6, (name, err, naive_err)


# --------------------------------------------------------------------------- huge-norm rows
HUGE = [1e20, 1e30, 3e37]


def with_huge_rows(x, gen):
    """x with every third row multiplied by 1e20, 1e30 or 3e37 / max|x_i| (|x| up to 3e37)."""
    x = x.clone()
    for i in range(0, x.shape[0], 3):
        factor = HUGE[(i // 3) % len(HUGE)]
        x[i] *= factor / max(1.0, float(x[i].abs().max())) if factor > 1e36 else factor
    assert torch.isfinite(x).all()
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_norm_rows_cross(dtype, gen):
    q = with_huge_rows(torch.randn(37, 40, generator=gen), gen).to(dtype)
    k = with_huge_rows(torch.randn(37, 40, generator=gen), gen).to(dtype)
    s = torch.tensor(7.0)
    weights = [torch.rand(37, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2)]
    exact_grads, exact = gradients(lambda a, b, c: reference_cross(a, b, c, normalize=True),
                                   [q.double(), k.double(), s.double()], weights)
    fused_grads, fused = gradients(lambda a, b, c: fused_cross(a, b, c), [q, k, s], weights)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(fused, exact):
        assert rel_err(got, want) < tol
    for got, want in zip(fused_grads[:2], exact_grads[:2]):
        assert torch.isfinite(got).all() and row_rel(got, want) < tol
    assert rel_err(fused_grads[2], exact_grads[2]) < tol


def test_huge_norm_rows_ntxent(gen):
    z1 = with_huge_rows(torch.randn(21, 33, generator=gen), gen)
    z2 = with_huge_rows(torch.randn(21, 33, generator=gen), gen)
    s = torch.tensor(2.0)
    weights = [torch.rand(42, generator=gen, dtype=torch.float64) + 0.5]
    exact_grads, (exact,) = gradients(reference_ntxent, [z1.double(), z2.double(), s.double()], weights)
    fused_grads, (fused,) = gradients(_FusedNtXent.apply, [z1, z2, s], weights)
    assert rel_err(fused, exact) < 1e-4
    for got, want in zip(fused_grads[:2], exact_grads[:2]):
        assert torch.isfinite(got).all() and row_rel(got, want) < 1e-4
    assert rel_err(fused_grads[2], exact_grads[2]) < 1e-4


def test_huge_norm_rows_moco(gen):
    q = with_huge_rows(torch.randn(20, 32, generator=gen), gen).requires_grad_(True)
    k = with_huge_rows(torch.randn(20, 32, generator=gen), gen)
    queue = F.normalize(torch.randn(300, 32, generator=gen), dim=1)
    loss = cl_fast.moco_loss(q, k, queue, 0.2, reduction="none", backend="cpu")
    q64 = q.detach().double().requires_grad_(True)
    exact = reference.moco_loss(q64, k.double(), queue.double(), 0.2, reduction="none")
    assert rel_err(loss, exact) < 1e-4  # was log(1 + K) for the huge rows: their norm overflowed
    weights = torch.rand(20, generator=gen, dtype=torch.float64) + 0.5
    (loss * weights.float()).sum().backward()
    (exact * weights).sum().backward()
    assert torch.isfinite(q.grad).all() and row_rel(q.grad, q64.grad) < 1e-4


def test_huge_norm_rows_queue_update(gen):
    keys = with_huge_rows(torch.randn(10, 16, generator=gen), gen)
    queue, ptr = torch.zeros(12, 16), torch.tensor(5)
    cl_fast.queue_update_(queue, keys, ptr, backend="cpu")
    expected = F.normalize(keys.double(), dim=1)
    rows = [(5 + b) % 12 for b in range(10)]
    assert rel_err(queue[rows], expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_norm_rows_byol(dtype, gen):
    p = with_huge_rows(torch.randn(19, 24, generator=gen), gen).to(dtype).requires_grad_(True)
    z = with_huge_rows(torch.randn(19, 24, generator=gen).flip(0), gen).to(dtype).requires_grad_(True)
    loss = cl_fast.byol_loss(p, z, reduction="none", backend="cpu")
    p64 = p.detach().double().requires_grad_(True)
    z64 = z.detach().double().requires_grad_(True)
    exact = reference.byol_loss(p64, z64, reduction="none")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(loss, exact) < tol
    weights = torch.rand(19, generator=gen, dtype=torch.float64) + 0.5
    (loss * weights.float()).sum().backward()
    (exact * weights).sum().backward()
    for got, want in ((p.grad, p64.grad), (z.grad, z64.grad)):
        assert torch.isfinite(got).all() and row_rel(got, want) < tol


# ----------------------------------------------------------- normalize=False (OpenCLIP's way)
# (row norms, logit_scale): OpenCLIP-like unnormalised features (norms ~10-30, scale 100: logits
# ~1e4, losses ~1e3), a wide spread of norms, and small features whose bound 2 s max||q|| max||k||
# <= 80 takes the fixed-shift path.
UNNORMALISED = [("openclip", 100.0), ("spread", 10.0), ("small", 5.0)]


def unnormalised_features(kind, n, d, gen):
    x = torch.randn(n, d, generator=gen)
    if kind == "openclip":
        return x * 3.0
    if kind == "spread":
        return x * torch.logspace(-3, 2, n)[torch.randperm(n, generator=gen)][:, None]
    return x * 0.1 / math.sqrt(d)


@pytest.mark.parametrize("kind,logit_scale", UNNORMALISED, ids=[u[0] for u in UNNORMALISED])
@pytest.mark.parametrize("both", [True, False], ids=["clip", "info_nce"])
def test_normalize_false(kind, logit_scale, both, gen):
    n, d = 45, 36
    image, text = unnormalised_features(kind, n, d, gen), unnormalised_features(kind, n, d, gen)
    s = torch.tensor(logit_scale)
    weights = [torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2 if both else 1)]

    def exact_fn(a, b, c):
        row, col = reference_cross(a, b, c, normalize=False)
        return (row, col) if both else row

    def fused_fn(a, b, c):
        row, col = fused_cross(a, b, c, both=both, normalize=False)
        return (row, col) if both else row

    def naive_fn(a, b, c):
        row, col = naive_fp32_cross(a, b, c, normalize=False)
        return (row, col) if both else row

    exact_grads, exact = gradients(exact_fn, [image.double(), text.double(), s.double()], weights)
    fused_grads, fused = gradients(fused_fn, [image, text, s], weights)
    naive_grads, _ = gradients(naive_fn, [image, text, s], weights)
    if kind == "openclip":
        assert float(exact[0].mean()) > 100  # the regime the issue reports (OpenCLIP: ~1e3)
    for got, want in zip(fused, exact):
        assert bool((got >= 0).all()) and rel_err(got, want) < 1e-4
    for got, yardstick, want in zip(fused_grads, naive_grads, exact_grads):
        assert frobenius_rel(got, want) <= max(10 * frobenius_rel(yardstick, want), 1e-5)


def test_normalize_false_clip_mean_matches_reference(gen):
    """clip_loss's mean with unnormalised features, through the public API where it runs fused."""
    image, text = torch.randn(30, 20, generator=gen) * 3, torch.randn(30, 20, generator=gen) * 3
    got = fused_clip_mean(image, text, torch.tensor(100.0), normalize=False)
    expected = reference.clip_loss(image.double(), text.double(), torch.tensor(100.0, dtype=torch.float64),
                                   normalize=False)
    assert float(expected) > 100 and rel_err(got, expected) < 1e-5


# ----------------------------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("score_scale", [1.0, 1e2, 5e2, 1e4, 1e7, 1e9])
def test_sinkhorn_large_scores_over_epsilon(score_scale, gen):
    """|scores / eps| from ~80 to ~1e11: finite, and within 10x of an fp32 log-domain evaluation
    (reference.sinkhorn in fp32) where |scores / eps| <= 1e4. Beyond, the potentials' float pair
    (f_hi + f_lo) leaves each exp argument an absolute error ~|x| 2^-48 (1.5e-5 at 8e10)."""
    epsilon = 0.05
    scores = torch.randn(150, 70, generator=gen) * score_scale
    out = OPS.sinkhorn(scores, 1.0 / epsilon, 3)
    assert torch.isfinite(out).all()
    exact = reference.sinkhorn(scores.double(), epsilon, 3)
    fp32_err = rel_err(reference.sinkhorn(scores, epsilon, 3), exact)
    bound = 10 * max(fp32_err, 2.0**-23)
    x_max = float((scores.double() / epsilon).abs().max())
    if x_max > 1e4:  # the fp32 reference is exact for near one-hot codes
        bound = max(bound, 1e-5, 4 * x_max * 2.0**-48)
    assert rel_err(out, exact) < bound, (rel_err(out, exact), fp32_err)


# ----------------------------------------------------------------------------- portable build
def _portable_compiler():
    """(compiler, flags): an aarch64 cross compiler where installed (the real non-x86 path), else
    the host g++ with the x86 vector extensions switched off (cpu_vec.h's DEFAULT path)."""
    cross = shutil.which("aarch64-linux-gnu-g++")
    if cross:
        return cross, []
    host = shutil.which(os.environ.get("CXX", "g++"))
    return host, ["-mno-avx", "-mno-avx2", "-mno-fma", "-mno-f16c", "-mno-avx512f"]


def test_cpu_sources_compile_without_x86_flags():
    """The CPU sources compile with no x86 vector flags (setup.py passes none off x86-64): one
    translation unit, the one with x86 intrinsics (sinkhorn), or every CPU source with
    CL_FAST_PORTABLE_CHECK_ALL=1. Cached by content hash under build/portable_check/.
    Reproduce by hand: aarch64-linux-gnu-g++ -std=c++17 -O1 -fopenmp -I<torch includes> -c csrc/cpu/X.cpp"""
    compiler, flags = _portable_compiler()
    if compiler is None:
        pytest.skip("needs a C++ compiler (g++ or aarch64-linux-gnu-g++)")
    from torch.utils.cpp_extension import include_paths

    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if os.environ.get("CL_FAST_PORTABLE_CHECK_ALL") != "1":
        sources = [p for p in sources if os.path.basename(p).startswith("sinkhorn")]
    assert sources
    headers = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True))
    cache = os.path.join(ROOT, "build", "portable_check")
    os.makedirs(cache, exist_ok=True)
    for source in sources:
        command = [compiler, "-std=c++17", "-O1", "-fopenmp", *flags, *(f"-I{p}" for p in include_paths()),
                   "-c", source, "-o", os.devnull]
        digest = hashlib.sha256(" ".join(command[:4 + len(flags)]).encode() + torch.__version__.encode())
        for path in [source, *headers]:
            with open(path, "rb") as f:
                digest.update(f.read())
        stamp = os.path.join(cache, digest.hexdigest())
        if os.path.exists(stamp):
            continue
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        open(stamp, "w").close()
