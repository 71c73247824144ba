"""Time the InfoNCE kernels one by one (forward, backward) on a GPU, with achieved TFLOP/s.

For every (op, 2N, D, dtype) cell and every implementation that runs here:
  - fused backends (`triton`, and `cuda` where cl_fast was built with it): the backend's own launchers
    (`_dispatch.module(backend).ntxent_fwd` / `ntxent_bwd`, `cross_fwd` / `cross_bwd`, PLAN.md's
    signatures, scale a 0-d device tensor) timed separately, plus the public op
    `cl_fast.<op>(..., backend=)` forward + backward;
  - `<backend>:block` (impl `block`, where the backend has them): the InfoNCE block pieces of the
    distributed losses (`block_fwd` / `block_bwd`) on one slice, as a single process runs them:
    nt_xent rows = cols = [n(z1); n(z2)] (diag 0, pairs), clip both directions n(q) x n(k) (diag 0);
    timed with the fused design's counts below (the block backward recomputes S twice, for the row
    and the column kernel);
  - `eager` (the PyTorch reference, `backend="torch"`), `compile` (torch.compile of the reference) and
    `inf-cl` (`inf_cl.cal_inf_loss`, where it imports; info_nce / clip only): forward alone, forward +
    backward, backward = the difference.
Printed per row: median time (ms), TFLOP/s against DESIGN.md's operation counts for the fused
design (the same count for every implementation: it is the useful work), and peak extra memory
(torch.cuda.max_memory_allocated over the call minus memory_allocated before it).

    python benchmarks/gpu_kernels.py                          # the default grid, < 8 min on an H100
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --device cpu --sizes 64 --dims 16 --repeats 1

Sizes are 2N for nt_xent and N for info_nce / clip (the side of the similarity matrix either way).
CL_FAST_AUTOTUNE=0 is the default here (one tile config per dtype: an autotune sweep over every
width, dtype and size bucket would spend the time budget compiling); pass --autotune to tune.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--autotune" not in sys.argv:
    os.environ.setdefault("CL_FAST_AUTOTUNE", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import cl_fast  # noqa: E402
from cl_fast import _dispatch, reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def flops(op, rows, dim, fixed=True):
    """DESIGN.md's counts (multiply-add = 2 flops) for the fused design: (forward, backward).

    nt_xent (M = 2N rows): forward = the full M x M square of dots, 2 M^2 D; backward = recompute
    S (2 M^2 D) + dU = W U (2 M^2 D), plus the statistics walk (2 M^2 D) in the running-max regime.
    clip / symmetric info_nce (N rows): forward = both directions, 2 N^2 entries, 4 N^2 D;
    backward 8 N^2 D (+ 4 N^2 D running max)."""
    if op == "nt_xent":
        m2 = rows * rows
        return 2 * m2 * dim, (4 if fixed else 6) * m2 * dim
    n2 = rows * rows
    return 4 * n2 * dim, (8 if fixed else 12) * n2 * dim


class Timer:
    def __init__(self, device, repeats, warmup):
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn):
        """(median seconds, peak extra bytes or None) of fn()."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        peak = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            self.sync()
            peak = torch.cuda.max_memory_allocated(self.device) - base
        times = []
        for _ in range(self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), peak


def _inputs(op, rows, dim, dtype, device, seed=0):
    n = rows // 2 if op == "nt_xent" else rows
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(n, dim, generator=gen).to(device, dtype)
    b = torch.randn(n, dim, generator=gen).to(device, dtype)
    return a, b


def _scale_value(op, temperature):
    return 1.0 / temperature


def fused_launchers(op, backend, a, b, scale):
    """(forward(), backward()) closures over the backend's launchers."""
    module = _dispatch.module(backend, "infonce")
    s = torch.tensor(scale, dtype=torch.float32, device=a.device)
    if op == "nt_xent":
        _, lse = module.ntxent_fwd(a, b, s)
        grad = torch.full((2 * a.shape[0],), 1.0 / (2 * a.shape[0]), device=a.device)
        return (lambda: module.ntxent_fwd(a, b, s)), (lambda: module.ntxent_bwd(grad, a, b, s, lse))
    _, _, row_lse, col_lse = module.cross_fwd(a, b, s, True, True)
    grad = torch.full((a.shape[0],), 0.5 / a.shape[0], device=a.device)
    return ((lambda: module.cross_fwd(a, b, s, True, True)),
            (lambda: module.cross_bwd(grad, grad, a, b, s, row_lse, col_lse, True, True)))


def block_launchers(op, backend, a, b, scale):
    """(forward(), backward()) closures over the backend's InfoNCE block pieces on one slice (diag 0):
    nt_xent: rows = cols = [n(a); n(b)], pairs; clip: n(a) against n(b) and n(b) against n(a)."""
    module = _dispatch.module(backend, "infonce")
    s = torch.tensor(scale, dtype=torch.float32, device=a.device)
    normalize = torch.nn.functional.normalize
    if op == "nt_xent":
        u = normalize(torch.cat([a, b]), dim=1)
        pieces = [(u, u, True)]
    else:
        qn, kn = normalize(a, dim=1), normalize(b, dim=1)
        pieces = [(qn, kn, False), (kn, qn, False)]
    lses = [module.block_fwd(rows, cols, s, 0, pairs) for rows, cols, pairs in pieces]
    grad = torch.full((pieces[0][0].shape[0],), 1.0 / pieces[0][0].shape[0], device=a.device)

    def forward():
        for rows, cols, pairs in pieces:
            module.block_fwd(rows, cols, s, 0, pairs)

    def backward():
        for (rows, cols, pairs), lse in zip(pieces, lses):
            module.block_bwd(grad, rows, cols, s, lse, 0, pairs)

    return forward, backward


def public_call(op, backend, temperature):
    if op == "nt_xent":
        return lambda a, b: cl_fast.nt_xent(a, b, temperature, backend=backend)
    return lambda a, b: cl_fast.clip_loss(a, b, 1.0 / temperature, backend=backend)


def reference_call(op, temperature):
    if op == "nt_xent":
        return lambda a, b: reference.nt_xent(a, b, temperature)
    return lambda a, b: reference.clip_loss(a, b, 1.0 / temperature)


def inf_cl_call(temperature):
    from inf_cl import cal_inf_loss  # optional package: ImportError -> not benchmarked

    def clip(a, b):
        qn, kn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        # Inf-CL's loss is one direction (rows of the first argument); CLIP averages both
        return 0.5 * (cal_inf_loss(qn, kn, scale=1.0 / temperature).mean()
                      + cal_inf_loss(kn, qn, scale=1.0 / temperature).mean())

    return clip


def time_autograd(timer, fn, a, b):
    """(forward s, backward s, peak forward+backward bytes) of loss = fn(a, b); backward = full - forward."""
    a_req, b_req = a.detach().requires_grad_(), b.detach().requires_grad_()

    def forward():
        with torch.no_grad():
            return fn(a, b)

    def full():
        a_req.grad = b_req.grad = None
        fn(a_req, b_req).backward()

    t_fwd, _ = timer(forward)
    t_full, peak = timer(full)
    return t_fwd, max(t_full - t_fwd, 0.0), peak


def fits(rows, dtype, device):
    """The eager reference keeps several rows x rows fp32 matrices: skip it where they cannot fit."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return 6 * rows * rows * 4 < 0.8 * free


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--ops", default="nt_xent,clip_loss")
    p.add_argument("--sizes", default="4096,16384,65536")
    p.add_argument("--dims", default="128,512")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--impls", default="fused,block,eager,compile,inf-cl")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; no new cell starts after it")
    p.add_argument("--compile-max-rows", type=int, default=16384)
    p.add_argument("--autotune", action="store_true", help="autotune the Triton tile configs (slow)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    timer = Timer(device, args.repeats, args.warmup)
    impls = args.impls.split(",")
    fused_here = [b for b in cl_fast.backends("infonce", device) if b in ("triton", "cuda")]
    fused = fused_here if "fused" in impls else []
    block = [b for b in fused_here if hasattr(_dispatch.module(b, "infonce"), "block_fwd")] if "block" in impls else []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# InfoNCE kernels on {name}; torch {torch.__version__}; fused backends here: {fused or 'none'}; "
          f"T = {args.temperature}; CL_FAST_AUTOTUNE={os.environ.get('CL_FAST_AUTOTUNE', '1')}")
    print(f"{'op':9} {'rows':>6} {'D':>4} {'dtype':5} {'impl':16} {'fwd ms':>9} {'TF/s':>6} "
          f"{'bwd ms':>9} {'TF/s':>6} {'peak MB':>9}  note")
    start = time.time()
    fixed = 2.0 / args.temperature <= 80.0
    compiled = {}
    for op in args.ops.split(","):
        for rows in (int(x) for x in args.sizes.split(",")):
            for dim in (int(x) for x in args.dims.split(",")):
                for dtype_name in args.dtypes.split(","):
                    dtype = DTYPES[dtype_name]
                    a, b = _inputs(op, rows, dim, dtype, device)
                    f_fwd, f_bwd = flops(op, rows, dim, fixed)
                    cells = [(f"{be}:kernels", "launch", be) for be in fused]
                    cells += [(f"{be}:op", "public", be) for be in fused]
                    cells += [(f"{be}:block", "block", be) for be in block]
                    if "eager" in impls:
                        cells.append(("eager", "eager", None))
                    if "compile" in impls:
                        cells.append(("compile", "compile", None))
                    if "inf-cl" in impls and op != "nt_xent":
                        cells.append(("inf-cl", "inf-cl", None))
                    for label, kind, backend in cells:
                        head = f"{op:9} {rows:>6} {dim:>4} {dtype_name:5} {label:16}"
                        if time.time() - start > args.time_budget:
                            print(f"{head} {'':>9} {'':>6} {'':>9} {'':>6} {'':>9}  not run: time budget spent")
                            continue
                        try:
                            if kind in ("launch", "block"):
                                launchers = fused_launchers if kind == "launch" else block_launchers
                                fwd, bwd = launchers(op, backend, a, b, 1.0 / args.temperature)
                                t_fwd, peak_f = timer(fwd)
                                t_bwd, peak_b = timer(bwd)
                                peak = None if peak_f is None else max(peak_f, peak_b)
                            else:
                                if kind in ("eager", "compile") and not fits(rows, dtype, device):
                                    raise MemoryError("the reference's rows x rows matrices do not fit")
                                if kind == "public":
                                    fn = public_call(op, backend, args.temperature)
                                elif kind == "eager":
                                    fn = reference_call(op, args.temperature)
                                elif kind == "compile":
                                    if rows > args.compile_max_rows:
                                        raise RuntimeError(f"skipped above --compile-max-rows {args.compile_max_rows}")
                                    fn = compiled.setdefault(op, torch.compile(reference_call(op, args.temperature)))
                                else:
                                    fn = inf_cl_call(args.temperature)
                                t_fwd, t_bwd, peak = time_autograd(timer, fn, a, b)
                            mb = "-" if peak is None else f"{peak / 2**20:.1f}"
                            print(f"{head} {t_fwd * 1e3:9.3f} {f_fwd / t_fwd / 1e12:6.1f} {t_bwd * 1e3:9.3f} "
                                  f"{(f_bwd / t_bwd / 1e12 if t_bwd > 0 else 0):6.1f} {mb:>9}")
                        except ImportError as exc:
                            print(f"{head} {'':>9} {'':>6} {'':>9} {'':>6} {'':>9}  not installed: {exc}")
                        except Exception as exc:  # one failing cell is a row, the run goes on
                            print(f"{head} {'':>9} {'':>6} {'':>9} {'':>6} {'':>9}  "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                        sys.stdout.flush()
    print(f"# done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
