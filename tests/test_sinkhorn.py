"""sinkhorn: every backend against a float64 log-domain evaluation of SPEC.md's SwAV Sinkhorn.

Values (no gradient: the codes are targets), ragged shapes (B and K not multiples of any block or
chunk), fp32/fp16/bf16 scores, row and prototype marginals, agreement with SwAV's plain formula
where that is finite, scores / eps far past fp32's exp range, NaN/Inf, bad arguments, the custom
ops under torch.library.opcheck.
"""
from __future__ import annotations

import math

import pytest
import torch

import cl_fast
from cl_fast import _dispatch, reference, swav
from cl_fast._ops import sinkhorn as sinkhorn_ops
from conftest import DEVICE, DTYPES, RTOL, fused_backend_params, randn, rel_err


BACKENDS = [pytest.param("torch", id="torch")] + fused_backend_params("sinkhorn")
FUSED = fused_backend_params("sinkhorn")


def only(*names):
    return [param for param in BACKENDS if param.id in names]

# (B, K): 1 x 1, odd sizes below one tile, and sizes crossing the Triton tiles (8 rows x 32
# prototypes under the interpreter) and the CPU row chunk (128) and vector width (8).
SHAPES = [(1, 1), (2, 3), (7, 5), (37, 19), (130, 67)]
ITERATIONS = [1, 2, 3, 5]


def float64_codes(scores, epsilon, iterations):
    """The float64 log-domain evaluation of SPEC.md on the very same (rounded) input values."""
    return reference.sinkhorn(scores.detach().double(), epsilon, iterations)


def fp32_tolerance(scores, epsilon):
    """Error bound of an fp32 log-domain evaluation against float64: RTOL[fp32], or, when scores /
    eps is large, a few ulps of it (x = scores / eps itself is rounded to fp32 and every exp
    inherits that absolute error in its argument)."""
    x_max = float((scores.detach().double() / epsilon).abs().max())
    return max(RTOL[torch.float32], 4 * x_max * 2.0**-24)


# ------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-K{k}" for b, k in SHAPES])
@pytest.mark.parametrize("iterations", ITERATIONS)
def test_matches_float64(backend, shape, iterations, gen):
    scores = randn(*shape, generator=gen)
    out = swav.sinkhorn(scores, epsilon=0.05, iterations=iterations, backend=backend)
    assert out.dtype == torch.float32 and out.shape == shape and out.device == scores.device
    assert not out.requires_grad
    assert rel_err(out, float64_codes(scores, 0.05, iterations)) < RTOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(dt)[6:] for dt in DTYPES])
@pytest.mark.parametrize("shape", [(37, 19), (130, 67)], ids=["B37-K19", "B130-K67"])
def test_input_dtypes(backend, dtype, shape, gen):
    """fp16/bf16 scores are read as they are and computed in fp32: against float64 on the same
    rounded values, every dtype keeps fp32 accuracy; the result is fp32."""
    scores = randn(*shape, dtype=dtype, generator=gen)
    out = swav.sinkhorn(scores, epsilon=0.05, iterations=3, backend=backend)
    assert out.dtype == torch.float32
    assert rel_err(out, float64_codes(scores, 0.05, 3)) < RTOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_agrees_with_plain_swav_formula(backend, iterations, gen):
    """Where SwAV's own formula is finite, the result is the same (iterations=0 included: B times
    the global softmax, computed by the reference)."""
    scores = randn(45, 23, generator=gen) * 0.5
    plain = reference.sinkhorn_plain(scores.double(), 0.05, iterations)
    assert torch.isfinite(plain).all()
    out = swav.sinkhorn(scores, epsilon=0.05, iterations=iterations, backend=backend)
    assert rel_err(out, plain) < RTOL[torch.float32]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-K{k}" for b, k in SHAPES])
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_reference_log_domain_equals_plain_formula(shape, iterations, gen):
    """The reference's log-domain recurrence is SwAV's formula: float64, where that is finite."""
    scores = randn(*shape, dtype=torch.float64, generator=gen)
    log_domain = reference.sinkhorn(scores, 0.05, iterations)
    plain = reference.sinkhorn_plain(scores, 0.05, iterations)
    assert torch.isfinite(plain).all()
    torch.testing.assert_close(log_domain, plain, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- marginals
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iterations", [1, 3])
def test_marginals(backend, iterations, gen):
    """Each row sums to 1 (the last step normalises samples), and the prototype marginals are
    the float64 evaluation's (balanced only as the iterations converge: see the next test)."""
    scores = randn(70, 29, generator=gen)
    out = swav.sinkhorn(scores, epsilon=0.05, iterations=iterations, backend=backend)
    torch.testing.assert_close(out.sum(1).double().cpu(), torch.ones(70, dtype=torch.float64), rtol=0, atol=1e-5)
    expected = float64_codes(scores, 0.05, iterations).sum(0)
    assert rel_err(out.sum(0), expected) < RTOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_marginals_converge_to_equipartition(backend, gen):
    """With enough iterations the codes split the batch equally: each prototype gets B / K."""
    batch, protos = 60, 12
    scores = randn(batch, protos, generator=gen) * 0.1
    out = swav.sinkhorn(scores, epsilon=0.05, iterations=30, backend=backend).double().cpu()
    torch.testing.assert_close(out.sum(1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-5)
    equal_share = torch.full((protos,), batch / protos, dtype=torch.float64)
    torch.testing.assert_close(out.sum(0), equal_share, rtol=1e-4, atol=0)


# ------------------------------------------------------------------------- beyond exp's range
def spread_scores(batch, protos, gen, row_spread, col_spread, noise):
    """Scores with per-row and per-prototype offsets: scores / eps far past 88, and rows whose
    entries all sit far below the global max (a global shift would underflow them to zero)."""
    base = torch.randn(batch, protos, generator=gen) * noise
    rows = torch.randn(batch, 1, generator=gen) * row_spread
    cols = torch.randn(1, protos, generator=gen) * col_spread
    return (base + rows + cols).to(DEVICE)


SPREADS = [(0.0, 0.0, 8.0), (30.0, 0.0, 1.0), (0.0, 30.0, 2.0), (20.0, 20.0, 10.0), (40.0, 5.0, 0.2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", SPREADS, ids=[f"rows{r:g}-cols{c:g}-noise{n:g}" for r, c, n in SPREADS])
@pytest.mark.parametrize("iterations", [1, 3, 6])
def test_finite_far_beyond_exp_range(backend, spread, iterations, gen):
    epsilon = 0.02
    scores = spread_scores(41, 27, gen, *spread)
    assert float(scores.abs().max()) / epsilon > 10 * 88  # the plain formula overflows here ...
    assert not torch.isfinite(reference.sinkhorn_plain(scores, epsilon, iterations)).all()
    out = swav.sinkhorn(scores, epsilon=epsilon, iterations=iterations, backend=backend)  # ... and this does not
    assert torch.isfinite(out).all()
    assert rel_err(out, float64_codes(scores, epsilon, iterations)) < fp32_tolerance(scores, epsilon)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_scores_give_nan(backend, bad, gen):
    """NaN or +Inf in the scores propagates as NaN (as in the plain formula), never a hang or a
    silently finite answer."""
    scores = randn(20, 11, generator=gen)
    scores[3, 4] = bad
    assert torch.isnan(reference.sinkhorn_plain(scores, 0.05, 3)).all()
    assert torch.isnan(swav.sinkhorn(scores, epsilon=0.05, iterations=3, backend=backend)).all()


# ---------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("backend", FUSED)
def test_detached_from_autograd(backend, gen):
    scores = randn(9, 7, generator=gen, requires_grad=True)
    out = swav.sinkhorn(scores, backend=backend)
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("backend", only("cpu"))
def test_cpu_result_independent_of_thread_count(backend, gen):
    """Rows are split into fixed chunks, not per thread: the same bits with 1 or 2 threads."""
    scores = randn(300, 41, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = swav.sinkhorn(scores, backend=backend)
        torch.set_num_threads(2)
        two = swav.sinkhorn(scores, backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_auto_backend_choice():
    fused = [b for b in cl_fast.backends("sinkhorn", DEVICE) if b != "torch"]
    chosen = _dispatch.resolve("auto", DEVICE, torch.float32, op="sinkhorn")
    preference = ("cuda", "triton") if DEVICE.type == "cuda" else ("cpu",)
    assert chosen == next((name for name in preference if name in fused), "torch")
    assert _dispatch.resolve("auto", DEVICE, torch.float64, op="sinkhorn") == "torch"


@pytest.mark.parametrize("backend", FUSED)
def test_custom_ops_opcheck(backend, gen):
    scores = randn(13, 10, generator=gen)
    f = randn(10, generator=gen)
    torch.library.opcheck(sinkhorn_ops.sinkhorn, (scores, 0.05, 3, backend))
    torch.library.opcheck(sinkhorn_ops.sinkhorn_col_lse, (scores, 0.05, None, backend))
    torch.library.opcheck(sinkhorn_ops.sinkhorn_col_lse, (scores, 0.05, f, backend))
    torch.library.opcheck(sinkhorn_ops.sinkhorn_assign, (scores, 0.05, f, backend))


def _cpu_allocations(fn):
    """Sizes in bytes of every CPU-allocator allocation while fn runs (sees inside C++ ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted((e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), reverse=True)


@pytest.mark.parametrize("backend", only("torch", "cpu"))
def test_no_batch_by_prototype_intermediate_on_cpu(backend, gen):
    """The fused kernel's only (B, K) allocation is its output; the reference makes several."""
    batch, protos = 300, 257
    scores = torch.randn(batch, protos, generator=gen)
    out_bytes = batch * protos * 4
    sizes = _cpu_allocations(lambda: swav.sinkhorn(scores, epsilon=0.05, iterations=3, backend=backend))
    assert sizes[0] >= out_bytes
    if backend == "torch":
        assert sizes[1] >= out_bytes  # the eager reference: a (K, B) log Q per step
    else:
        assert sizes[0] == out_bytes and (len(sizes) == 1 or sizes[1] < out_bytes // 4)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="measures CUDA memory; needs a GPU")
@pytest.mark.parametrize("backend", only("triton"))
def test_no_batch_by_prototype_intermediate_on_gpu(backend, gen):
    batch, protos = 4096, 3000
    scores = randn(batch, protos, generator=gen)
    swav.sinkhorn(scores, backend=backend)  # autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = swav.sinkhorn(scores, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= out.numel() * 4 * 1.5  # the output plus per-row-block column partials (B/16 x K x 2)


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph_no_graph_break(backend, gen):
    torch._dynamo.reset()
    compiled = torch.compile(lambda s: swav.sinkhorn(s, epsilon=0.05, iterations=3, backend=backend), fullgraph=True, backend="aot_eager")
    scores = randn(20, 9, generator=gen)
    torch.testing.assert_close(compiled(scores), swav.sinkhorn(scores, epsilon=0.05, iterations=3, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_step_ops_compose_to_fused(backend, gen):
    """The per-step ops the distributed path runs give the fused op's result on one process."""
    scores = randn(37, 19, generator=gen)
    f = None
    for _ in range(3):
        col_max, col_sum = sinkhorn_ops.sinkhorn_col_lse(scores, 0.05, f, backend)
        f = -(torch.where(col_max == float("-inf"), 0.0, col_max) + col_sum.log())
    stepped = sinkhorn_ops.sinkhorn_assign(scores, 0.05, f, backend)
    assert rel_err(stepped, sinkhorn_ops.sinkhorn(scores, 0.05, 3, backend)) < RTOL[torch.float32]


# ---------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scores=[[1.0, 2.0]]), TypeError, "scores"),
        (dict(scores=torch.zeros(3)), ValueError, "scores"),
        (dict(scores=torch.zeros(2, 3, 4)), ValueError, "scores"),
        (dict(scores=torch.zeros(4, 3, dtype=torch.int64)), TypeError, "scores"),
        (dict(scores=torch.zeros(0, 3)), ValueError, "scores"),
        (dict(scores=torch.zeros(3, 0)), ValueError, "scores"),
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(epsilon=-0.1), ValueError, "epsilon"),
        (dict(epsilon=float("nan")), ValueError, "epsilon"),
        (dict(epsilon=float("inf")), ValueError, "epsilon"),
        (dict(epsilon="0.05"), TypeError, "epsilon"),
        (dict(iterations=-1), ValueError, "iterations"),
        (dict(iterations=2.5), TypeError, "iterations"),
        (dict(iterations=True), TypeError, "iterations"),
        (dict(backend="numpy"), ValueError, "backend"),
        (dict(backend="cuda"), ValueError, "backend='cuda'"),
        (dict(group="world"), ValueError, "group"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(scores=torch.randn(5, 4), epsilon=0.05, iterations=3)
    args.update(kwargs)
    scores = args.pop("scores")
    with pytest.raises(error, match=match):
        swav.sinkhorn(scores, **args)


@pytest.mark.parametrize("backend", FUSED)
def test_float64_needs_the_reference(backend):
    with pytest.raises(TypeError, match="float64"):
        swav.sinkhorn(torch.randn(4, 3, dtype=torch.float64, device=DEVICE), backend=backend)


def test_float64_auto_is_exact(gen):
    scores = randn(11, 6, dtype=torch.float64, generator=gen) * 100  # scores / eps = 2000
    out = swav.sinkhorn(scores, epsilon=0.05, iterations=3)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(1), torch.ones(11, dtype=torch.float64, device=out.device))


def test_iterations_change_the_result(gen):
    """A guard on the tests above: the iteration count matters for these inputs."""
    scores = randn(30, 10, generator=gen)
    one, three = (reference.sinkhorn(scores.double(), 0.05, t) for t in (1, 3))
    assert float((one - three).abs().max()) > math.sqrt(RTOL[torch.float32])
