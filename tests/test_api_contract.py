"""The contract around the kernels: bad inputs, dispatch, no N x N allocation, torch.compile, opcheck."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cl_fast
from cl_fast import _dispatch, _ops
from conftest import DEVICE, fused_backend_params, randn

FUSED = fused_backend_params()


# ------------------------------------------------------------------ bad input -> a clear error
def _pair(n=4, d=8, dtype=torch.float32):
    return torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)


BAD_CALLS = [
    ("shape mismatch", lambda: cl_fast.nt_xent(torch.randn(4, 8), torch.randn(5, 8)), ValueError, "z1 and z2"),
    ("D mismatch", lambda: cl_fast.info_nce(torch.randn(4, 8), torch.randn(4, 9)), ValueError, "query and key"),
    ("zero rows", lambda: cl_fast.clip_loss(*_pair(n=0), 2.0), ValueError, "image_features"),
    ("1-D input", lambda: cl_fast.nt_xent(torch.randn(8), torch.randn(8)), ValueError, "z1 must be 2-D"),
    ("3-D input", lambda: cl_fast.info_nce(torch.randn(2, 4, 8), torch.randn(2, 4, 8)), ValueError, "query must be 2-D"),
    ("integer dtype", lambda: cl_fast.nt_xent(*_pair(dtype=torch.int64)), TypeError, "z1"),
    ("mixed dtypes", lambda: cl_fast.nt_xent(torch.randn(4, 8), torch.randn(4, 8).half()), TypeError, "dtype"),
    ("not a tensor", lambda: cl_fast.nt_xent([[1.0]], torch.randn(4, 8)), TypeError, "z1"),
    ("mixed devices", lambda: cl_fast.nt_xent(torch.randn(4, 8), torch.randn(4, 8, device="meta")), ValueError, "device"),
    ("zero temperature", lambda: cl_fast.nt_xent(*_pair(), 0.0), ValueError, "temperature"),
    ("negative temperature", lambda: cl_fast.info_nce(*_pair(), -0.1), ValueError, "temperature"),
    ("nan temperature", lambda: cl_fast.nt_xent(*_pair(), math.nan), ValueError, "temperature"),
    ("inf temperature", lambda: cl_fast.nt_xent(*_pair(), math.inf), ValueError, "temperature"),
    ("tensor temperature <= 0", lambda: cl_fast.nt_xent(*_pair(), torch.tensor(-1.0)), ValueError, "temperature"),
    ("vector temperature", lambda: cl_fast.nt_xent(*_pair(), torch.ones(2)), ValueError, "temperature"),
    ("string temperature", lambda: cl_fast.nt_xent(*_pair(), "0.5"), TypeError, "temperature"),
    ("zero logit_scale", lambda: cl_fast.clip_loss(*_pair(), 0.0), ValueError, "logit_scale"),
    ("bad reduction", lambda: cl_fast.nt_xent(*_pair(), reduction="avg"), ValueError, "reduction"),
    ("bad backend", lambda: cl_fast.nt_xent(*_pair(), backend="fast"), ValueError, "backend"),
    ("module bad temperature", lambda: cl_fast.NTXentLoss(temperature=0), ValueError, "temperature"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_backend_on_wrong_device_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error case needs CPU-only")
    with pytest.raises(ValueError, match="'cuda'"):
        cl_fast.nt_xent(*_pair(), backend="cuda")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        cl_fast.nt_xent(*_pair(), backend="triton")


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_reject_float64(backend):
    a, b = _pair(dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        cl_fast.nt_xent(a, b, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
def test_too_large_dim_raises_or_falls_back(backend):
    limit = _dispatch.max_dim(backend)
    if limit is None:
        pytest.skip(f"backend {backend!r} has no D limit")
    a, b = randn(3, limit + 1), randn(3, limit + 1)
    with pytest.raises(ValueError, match=f"D={limit + 1}"):
        cl_fast.nt_xent(a, b, backend=backend)


def test_backends_lists_reference_and_env_override(monkeypatch):
    assert "torch" in cl_fast.backends()
    assert set(cl_fast.backends()) <= set(_dispatch.BACKENDS)
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert _dispatch.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv(_dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        _dispatch.resolve("auto", torch.device("cpu"), torch.float32)


def test_auto_prefers_a_fused_backend_for_the_device():
    preference = ("cuda", "triton") if DEVICE.type == "cuda" else ("cpu",)
    fused_here = [name for name in preference if name in cl_fast.backends()]
    assert _dispatch.resolve("auto", DEVICE, torch.float32) == (fused_here[0] if fused_here else "torch")
    assert _dispatch.resolve("auto", DEVICE, torch.float64) == "torch"


# ---------------------------------------------------------------- no N x N tensor, ever
class AllocationRecorder(TorchDispatchMode):
    """Records the bytes of every tensor any op produces, looking inside cl_fast's ops.

    Bytes, not elements: Triton's interpreter moves buffers around as uint8 copies.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = _ops.IMPLEMENTATIONS.get(func.name())
        if impl is not None:  # run the op's Python body under this mode to see its allocations
            with self:
                out = impl(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _largest_cpu_allocation(fn):
    """Bytes of the largest single CPU-allocator allocation while fn runs (sees inside C++ ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    return max(sizes, default=0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", ["nt_xent", "info_nce_sym", "clip_loss"])
def test_fused_path_allocates_no_square_matrix(name, backend, gen):
    n, d = 300, 8  # an fp32 rows x rows matrix is far above every O(rows * D) buffer
    rows = 2 * n if name == "nt_xent" else n
    a = randn(n, d, generator=gen, requires_grad=True)
    b = randn(n, d, generator=gen, requires_grad=True)
    temperature = torch.tensor(0.3, requires_grad=True)

    def forward_backward():
        if name == "nt_xent":
            loss = cl_fast.nt_xent(a, b, temperature, backend=backend)
        elif name == "info_nce_sym":
            loss = cl_fast.info_nce(a, b, temperature, symmetric=True, backend=backend)
        else:
            loss = cl_fast.clip_loss(a, b, 1.0 / temperature, backend=backend)
        loss.backward()

    with AllocationRecorder() as recorder:
        forward_backward()
    assert a.grad is not None and temperature.grad is not None
    square_bytes = 4 * rows * rows
    assert recorder.largest < square_bytes // 4
    if DEVICE.type == "cpu":
        assert _largest_cpu_allocation(forward_backward) < square_bytes // 4


def test_recorder_sees_the_reference_square_matrix(gen):
    a, b = randn(150, 8, generator=gen, requires_grad=True), randn(150, 8, generator=gen, requires_grad=True)
    with AllocationRecorder() as recorder:
        cl_fast.nt_xent(a, b, backend="torch").backward()
    assert recorder.largest >= 4 * 300 * 300
    assert _largest_cpu_allocation(lambda: cl_fast.nt_xent(a, b, backend="torch")) >= 4 * 300 * 300


# ---------------------------------------------------------------- torch.compile and opcheck
@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph_no_graph_break(backend, gen):
    torch._dynamo.reset()

    def step(a, b, temperature):
        return cl_fast.nt_xent(a, b, temperature, backend=backend) + cl_fast.clip_loss(a, b, 1.0 / temperature, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = randn(12, 20, generator=gen, requires_grad=True)
    b = randn(12, 20, generator=gen, requires_grad=True)
    temperature = torch.tensor(0.4, requires_grad=True)
    loss = compiled(a, b, temperature)
    loss.backward()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    t_ref = temperature.detach().clone().requires_grad_()
    expected = step(a_ref, b_ref, t_ref)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(temperature.grad, t_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, gen):
    a = randn(10, 12, generator=gen, requires_grad=True)
    b = randn(10, 12, generator=gen, requires_grad=True)
    scale = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.cl_fast.ntxent_fwd.default, (a, b, scale, backend))
    for both in (False, True):
        torch.library.opcheck(torch.ops.cl_fast.cross_fwd.default, (a, b, scale, both, True, backend))
    with torch.no_grad():
        _, lse = torch.ops.cl_fast.ntxent_fwd(a, b, scale, backend)
        _, _, row_lse, col_lse = torch.ops.cl_fast.cross_fwd(a, b, scale, True, True, backend)
    grad = torch.rand(20, device=DEVICE)
    torch.library.opcheck(torch.ops.cl_fast.ntxent_bwd.default, (grad, a.detach(), b.detach(), scale.detach(), lse, backend))
    g = torch.rand(10, device=DEVICE)
    torch.library.opcheck(
        torch.ops.cl_fast.cross_bwd.default, (g, g, a.detach(), b.detach(), scale.detach(), row_lse, col_lse, True, True, backend)
    )


# ---------------------------------------------------------------- the C++ op layer (cl_fast_C)
def _native():
    native = _dispatch.module("cpu", "infonce")
    if native is None:
        pytest.skip("needs cl_fast._C built")
    return native


def test_cuda_listed_only_where_built():
    native = _native()
    for family in _dispatch._MODULES:
        built = torch.cuda.is_available() and native.has_kernels(family, "cuda")
        assert ("cuda" in cl_fast.backends(family)) == built, family


def _native_cases(gen):
    """(op, args) for every cl_fast_C op, on small CPU tensors."""
    n, d = 7, 12
    a, b = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    scale = torch.tensor(2.5)
    ops = torch.ops.cl_fast_C
    _, lse = ops.ntxent_fwd(a, b, scale)
    _, _, row_lse, col_lse = ops.cross_fwd(a, b, scale, True, True)
    queue = torch.nn.functional.normalize(torch.randn(9, d, generator=gen), dim=1)
    _, stats = ops.byol_fwd(a, b)
    scores = torch.randn(n, 5, generator=gen)
    f = torch.randn(5, generator=gen)
    grad = torch.rand(n, generator=gen)
    return [
        (ops.ntxent_fwd.default, (a, b, scale)),
        (ops.ntxent_bwd.default, (torch.rand(2 * n, generator=gen), a, b, scale, lse)),
        (ops.cross_fwd.default, (a, b, scale, True, True)),
        (ops.cross_fwd.default, (a, b, scale, False, True)),
        (ops.cross_bwd.default, (grad, grad, a, b, scale, row_lse, col_lse, True, True)),
        (ops.moco_fwd.default, (a, b, queue, scale, True, 2)),
        (ops.moco_fwd.default, (a, b, queue, scale, False, 0)),
        (ops.moco_queue_update_.default, (queue.clone(), a[:4], torch.tensor(7))),
        (ops.byol_fwd.default, (a, b)),
        (ops.byol_bwd.default, (grad, a, b, stats, True)),
        (ops.byol_bwd.default, (grad, a, b, stats, False)),
        (ops.sinkhorn.default, (scores, 20.0, 3)),
        (ops.sinkhorn_col_lse.default, (scores, 20.0, None)),
        (ops.sinkhorn_col_lse.default, (scores, 20.0, f)),
        (ops.sinkhorn_assign.default, (scores, 20.0, f)),
    ]


def test_native_ops_opcheck(gen):
    """Every cl_fast_C op with a CPU kernel: schema, Meta kernel and fake tensors agree (opcheck)."""
    _native()
    for op, args in _native_cases(gen):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


NATIVE_BAD_SCALES = [
    (torch.tensor([2.0]), ValueError, "scale .* 0-d"),
    (torch.tensor(2.0, dtype=torch.float64), TypeError, "scale .* float32"),
    (torch.tensor(-2.0), ValueError, "scale .* > 0"),
    (torch.tensor(math.nan), ValueError, "scale .* finite"),
    (torch.tensor(2.0, device="meta"), ValueError, "scale .* device"),
]


@pytest.mark.parametrize("scale,error,match", NATIVE_BAD_SCALES, ids=["1-d", "float64", "negative", "nan", "device"])
def test_native_checks_name_the_scale(scale, error, match, gen):
    _native()
    a, b = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    with pytest.raises(error, match=match):
        torch.ops.cl_fast_C.ntxent_fwd(a, b, scale)
    with pytest.raises(error, match=match):
        torch.ops.cl_fast_C.moco_fwd(a, b, b, scale, False)


def test_native_checks_name_the_argument(gen):
    _native()
    ops = torch.ops.cl_fast_C
    a = torch.randn(4, 8, generator=gen)
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match="k \\(key / text features\\) must have the same"):
        ops.cross_fwd(a, torch.randn(5, 8, generator=gen), s, True, True)
    with pytest.raises(ValueError, match="queue must hold keys of D=8"):
        ops.moco_fwd(a, a, torch.randn(3, 9, generator=gen), s, False)
    with pytest.raises(TypeError, match="ptr must be an integer"):
        ops.moco_queue_update_(a.clone(), a[:2], torch.tensor(1.0))
    with pytest.raises(ValueError, match="stats .* shape"):
        ops.byol_bwd(torch.rand(4), a, a, torch.rand(4, 2), False)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        ops.sinkhorn(a, 20.0, 0)
    with pytest.raises(ValueError, match="f \\(the per-prototype log scaling\\)"):
        ops.sinkhorn_assign(a, 20.0, torch.zeros(3))
