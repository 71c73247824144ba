"""Distributed InfoNCE, per rank: time and peak memory of cl_fast's nt_xent / clip_loss with
group=WORLD (dist_impl "gather" and "ring") against OpenCLIP-style gather-with-grad of the full
logits, on W spawned processes (gloo on CPU, NCCL on GPUs).

    python benchmarks/dist_bench.py                                   # W = 2, CPU, gloo, fp32, D = 128
    python benchmarks/dist_bench.py --sizes 2048,8192 --ops nt_xent --md out.md --csv out.csv
    python benchmarks/dist_bench.py --device cuda --world 8 --dtype bf16 --sizes 16384,65536,262144

What is compared (one table row per op, implementation and global batch N):
- "gather", "ring": cl_fast.nt_xent(z1, z2, 0.1, group=WORLD, dist_impl=...) and
  cl_fast.clip_loss(img, txt, scale, group=WORLD, dist_impl=...) on the fused backend
  (--backend; "auto" is the fastest one here). Per-rank memory O(global N * D).
- "openclip": what OpenCLIP's ClipLoss(local_loss=True, gather_with_grad=True) does:
  torch.distributed.nn.functional.all_gather of the features (its backward sums the gradients back
  to their owners), then the local rows' full logits against every rank's features and
  cl_fast.reference's cross-entropy (the softplus form SPEC.md defines) on them; for nt_xent the
  same with the self-similarity masked and the positive at the rank's offset (lightly's
  gather_distributed=True). Per-rank memory O(local rows * global N): the local x global logits,
  their softmax and gradient. Skipped where that estimate exceeds the memory this machine has free.

Sizes: N is the GLOBAL batch (pairs): each of the W ranks holds N / W. nt_xent's rows per rank are
2N / W against 2N columns; clip_loss's N / W images against N texts and back. Inputs: fresh
Gaussian features (clip_loss: unit rows, a learnable logit scale 1/0.07 that receives its
gradient; nt_xent: temperature 0.1), one seed per rank.

Time: each repeat starts after a barrier; each rank times its own forward + backward (CUDA:
bracketed by synchronize); a repeat's time is the slowest rank's; the table shows the median over
--repeats after --warmup calls (one repeat where the warm-up shows they would pass --call-seconds).
A cell whose call, extrapolated from the previous size (x N^2), would take longer than
--call-seconds is skipped and says so.

Peak memory per rank, over the last timed call: CUDA: torch.cuda.max_memory_allocated() minus
memory_allocated() before it. CPU: growth of the rank process's resident set over one call:
freed heap returned to the kernel (malloc_trim) and the kernel's high-water mark reset
(/proc/self/clear_refs = 5) before it, so VmHWM - VmRSS(before) is that call's own peak, inputs
excluded, input gradients and communication buffers included (benchmarks/bench.py's meter;
tracemalloc does not see torch's allocations). The table shows the largest rank's.

Each row also shows the loss (the mean over ranks, which equals the single-process loss on the
global batch) and its relative difference to the "gather" row: the three implementations agree.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

# this checkout's cl_fast (not an installed one), and benchmarks/bench.py's memory meters
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import bench as _bench  # noqa: E402

import cl_fast  # noqa: E402
from cl_fast import reference  # noqa: E402

OPS = ("nt_xent", "clip_loss")
IMPLS = ("gather", "ring", "openclip")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURE = 0.1
LOGIT_SCALE = 1 / 0.07
# live fp32 matrices of (local rows x global columns) the OpenCLIP-style path holds at its peak, per
# direction (the logits, the masked copy inside the cross-entropy, exp / softmax, their gradient)
REFERENCE_COPIES = 5


# --------------------------------------------------------------------------- the OpenCLIP-style path
def _gather_with_grad(x, group):
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of functional collectives; OpenCLIP still uses it
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x, group=group))


def openclip_nt_xent(z1, z2, temperature, group):
    """lightly's / OpenCLIP's way: gather every rank's features WITH grad, build this rank's rows
    of the full logit matrix, cross-entropy (cl_fast.reference) with the positive at the offset."""
    rank = dist.get_rank(group)
    n = z1.shape[0]
    u = torch.cat([reference.l2_normalize(z1), reference.l2_normalize(z2)]).to(z1.dtype)
    cols = _gather_with_grad(u, group)
    m = u.shape[0]
    logits = (u @ cols.T).float() / temperature
    i = torch.arange(m, device=u.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[i, m * rank + i] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    labels = m * rank + (i + n) % m
    return reference.cross_entropy(logits, labels).mean()


def openclip_clip(img, txt, scale, group):
    """OpenCLIP ClipLoss(local_loss=True, gather_with_grad=True): local rows against all columns."""
    rank = dist.get_rank(group)
    all_img, all_txt = _gather_with_grad(img, group), _gather_with_grad(txt, group)
    labels = torch.arange(img.shape[0], device=img.device) + img.shape[0] * rank
    per_image = scale * (img @ all_txt.T).float()
    per_text = scale * (txt @ all_img.T).float()
    return 0.5 * (reference.cross_entropy(per_image, labels).mean() + reference.cross_entropy(per_text, labels).mean())


# --------------------------------------------------------------------------- one rank
def _inputs(op, n_local, dim, dtype, device, rank, seed):
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    a, b = torch.randn(n_local, dim, generator=g), torch.randn(n_local, dim, generator=g)
    if op == "clip_loss":  # features as a CLIP model hands them over: unit rows
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    a = a.to(device=device, dtype=dtype).requires_grad_()
    b = b.to(device=device, dtype=dtype).requires_grad_()
    scale = torch.tensor(LOGIT_SCALE, device=device, requires_grad=True)
    return a, b, scale


def _step(op, impl, backend, a, b, scale, group):
    for t in (a, b, scale):
        t.grad = None
    if op == "nt_xent":
        if impl == "openclip":
            loss = openclip_nt_xent(a, b, TEMPERATURE, group)
        else:
            loss = cl_fast.nt_xent(a, b, TEMPERATURE, backend=backend, group=group, dist_impl=impl)
    else:
        if impl == "openclip":
            loss = openclip_clip(a, b, scale, group)
        else:
            loss = cl_fast.clip_loss(a, b, scale, backend=backend, group=group, dist_impl=impl)
    loss.backward()
    return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_bytes(device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _reference_bytes(op, n_global, world) -> int:
    if op == "nt_xent":
        return REFERENCE_COPIES * 4 * (2 * n_global // world) * (2 * n_global)
    return 2 * REFERENCE_COPIES * 4 * (n_global // world) * n_global


def _over_ranks(value: float, device, op=dist.ReduceOp.MAX) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t)


def _rank_main(rank, args, init_file, out_dir):
    try:
        device = torch.device("cpu")
        if args.device == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(args.threads)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=args.world, timeout=datetime.timedelta(seconds=300))
        group = dist.group.WORLD
        rows = _run_cells(rank, args, device, group)
        dist.barrier()
        torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run_cells(rank, args, device, group):
    world, dtype = args.world, DTYPES[args.dtype]
    meter = _bench.memory_meter(device)
    backend = cl_fast._dispatch.resolve(args.backend, device, dtype, op="infonce") if args.backend == "auto" else args.backend
    rows, last = [], {}
    for op in args.ops:
        for n_global in args.sizes:
            for impl in args.impls:
                row = dict(op=op, impl=impl, backend="torch (reference)" if impl == "openclip" else backend,
                           n_global=n_global, world=world, dim=args.dim, dtype=args.dtype, note="")
                rows.append(row)
                if n_global % world:
                    row["note"] = f"skipped: N = {n_global} is not a multiple of the world size {world}"
                    continue
                if impl == "openclip":
                    need = _reference_bytes(op, n_global, world)
                    free = _over_ranks(_free_bytes(device), device, dist.ReduceOp.MIN)  # the least free on any rank
                    budget = free * (0.8 if device.type == "cuda" else 0.6 / world)  # CPU: the ranks share RAM
                    if need > budget:
                        row["note"] = f"skipped: needs ~{need / 2**30:.1f} GiB per rank, {budget / 2**30:.1f} GiB allowed here"
                        continue
                previous = last.get((op, impl))
                if previous is not None:
                    n_prev, t_prev = previous
                    estimate = t_prev * (n_global / n_prev) ** 2
                    if estimate > args.call_seconds:
                        row["note"] = (f"skipped: ~{estimate:.0f} s per call, extrapolated from N = {n_prev} "
                                       f"(> --call-seconds {args.call_seconds:g})")
                        continue
                a, b, scale = _inputs(op, n_global // world, args.dim, dtype, device, rank, args.seed)
                try:
                    result = _measure(op, impl, backend, a, b, scale, group, device, meter, args)
                except Exception as error:  # noqa: BLE001 - becomes the row (the ranks fail together: same inputs)
                    row["note"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
                    continue
                finally:
                    del a, b, scale
                row.update(result)
                last[(op, impl)] = (n_global, result["seconds"])
    return rows


def _measure(op, impl, backend, a, b, scale, group, device, meter, args):
    first = None
    for _ in range(args.warmup):
        _sync(device)
        t0 = time.perf_counter()
        _step(op, impl, backend, a, b, scale, group)
        _sync(device)
        first = first or time.perf_counter() - t0
    repeats = args.repeats
    if first is not None and _over_ranks(first, device) * repeats > args.call_seconds:
        repeats = 1  # a slow cell: one timed call
    times, peak, loss = [], 0, None
    for i in range(repeats):
        last = i == repeats - 1
        dist.barrier()
        if last:  # the last repeat also meters the memory (the meter's own work stays outside the timing)
            meter.start()
        _sync(device)
        t0 = time.perf_counter()
        loss = _step(op, impl, backend, a, b, scale, group)
        _sync(device)
        seconds = time.perf_counter() - t0
        if last:
            peak = meter.stop()
        times.append(_over_ranks(seconds, device))
    peaks = [None] * dist.get_world_size(group)
    dist.all_gather_object(peaks, int(peak))
    mean_loss = loss.float().reshape(1).clone()
    dist.all_reduce(mean_loss)
    return dict(seconds=statistics.median(times), repeats=repeats, peak_mb_max=max(peaks) / 2**20,
                peak_mb_ranks=" ".join(f"{p / 2**20:.1f}" for p in peaks),
                loss=float(mean_loss) / dist.get_world_size(group))


# --------------------------------------------------------------------------- the tables
COLUMNS = ("op", "impl", "backend", "world", "n_global", "dim", "dtype", "seconds", "repeats", "peak_mb_max",
           "peak_mb_ranks", "loss", "rel_diff_vs_gather", "vs_openclip_time", "vs_openclip_memory", "note")


def _finish(rows):
    by_key = {(r["op"], r["n_global"], r["impl"]): r for r in rows}
    for r in rows:
        gather, ref = by_key.get((r["op"], r["n_global"], "gather")), by_key.get((r["op"], r["n_global"], "openclip"))
        if "loss" in r and gather is not None and "loss" in gather:
            r["rel_diff_vs_gather"] = abs(r["loss"] - gather["loss"]) / max(abs(gather["loss"]), 1e-30)
        if "seconds" in r and ref is not None and "seconds" in ref and r["impl"] != "openclip":
            r["vs_openclip_time"] = r["seconds"] / ref["seconds"]
            r["vs_openclip_memory"] = r["peak_mb_max"] / max(ref["peak_mb_max"], 1e-9)
    return rows


def _fmt(key, value):
    if value is None or value == "":
        return ""
    if key == "seconds":
        return f"{value:.3f}"
    if key == "peak_mb_max":
        return f"{value:.1f}"
    if key == "loss":
        return f"{value:.6f}"
    if key == "rel_diff_vs_gather":
        return f"{value:.1e}"
    if key.startswith("vs_openclip"):
        return f"{value:.2f}x"
    return str(value)


def write_tables(rows, header, md_path, csv_path):
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            for line in header:
                f.write(f"# {line}\n")
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    md_cols = ("op", "impl", "backend", "n_global", "seconds", "peak_mb_max", "peak_mb_ranks", "vs_openclip_time",
               "vs_openclip_memory", "loss", "rel_diff_vs_gather", "note")
    titles = {"n_global": "global N", "seconds": "time s (slowest rank, median)", "peak_mb_max": "peak MB (largest rank)",
              "peak_mb_ranks": "peak MB per rank", "vs_openclip_time": "time vs openclip",
              "vs_openclip_memory": "memory vs openclip", "rel_diff_vs_gather": "loss rel. diff vs gather"}
    lines = [f"{line}  " for line in header] + [""]
    lines.append("| " + " | ".join(titles.get(c, c) for c in md_cols) + " |")
    lines.append("|" + "---|" * len(md_cols))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c, r.get(c)) for c in md_cols) + " |")
    text = "\n".join(lines) + "\n"
    if md_path:
        with open(md_path, "w") as f:
            f.write(text)
    return text


def _load():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="processes (ranks), default 2")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--ops", default="nt_xent,clip_loss", help="comma-separated: nt_xent, clip_loss")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: gather, ring (cl_fast), openclip")
    p.add_argument("--sizes", default="2048,8192,16384", help="global batch sizes N (pairs), ascending")
    p.add_argument("--dim", type=int, default=128, help="feature dimension D (default 128)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--backend", default="auto", help="cl_fast's backend for gather/ring (default auto)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--call-seconds", type=float, default=60.0,
                   help="skip a cell (op, impl, N) whose forward+backward, extrapolated from the previous size (x N^2), "
                        "would take longer; time one repeat where the warm-up shows the repeats would (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--md", metavar="FILE.md")
    p.add_argument("--csv", metavar="FILE.csv")
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    args.impls = [i for i in args.impls.split(",") if i]
    args.sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    for o in args.ops:
        if o not in OPS:
            p.error(f"argument --ops: unknown op {o!r} (known: {', '.join(OPS)})")
    for i in args.impls:
        if i not in IMPLS:
            p.error(f"argument --impls: unknown implementation {i!r} (known: {', '.join(IMPLS)})")
    if args.world < 2:
        p.error("argument --world: at least 2 ranks")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        p.error(f"argument --world: {args.world} ranks need {args.world} GPUs, torch sees {torch.cuda.device_count()}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    load_before = _load()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cl_fast_dist_bench_") as out_dir:
        try:
            mp.start_processes(_rank_main, args=(args, os.path.join(out_dir, "init"), out_dir), nprocs=args.world,
                               join=True, start_method="spawn")
        except mp.ProcessRaisedException as error:
            reports = [os.path.join(out_dir, f"rank{r}.error") for r in range(args.world)]
            details = "".join(open(p).read() for p in reports if os.path.exists(p))
            print(f"a rank failed:\n{details or error}", file=sys.stderr)
            return 1
        rows = _finish(torch.load(os.path.join(out_dir, "rank0.pt")))
    if args.device == "cuda":
        where = f"{args.world} x {torch.cuda.get_device_name(0)}, NCCL"
        meter = _bench.CudaMeter.method
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo, {args.threads} thread(s) per rank"
        meter = "VmHWM after clear_refs reset" if _bench._can_reset_hwm() else "VmRSS sampled every 0.5 ms"
    header = [
        f"command: `{command}`",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {time.time() - started:.0f} s; {where}; "
        f"world size {args.world}; torch {torch.__version__}; D = {args.dim}, {args.dtype}",
        f"memory: per-rank peak over one forward+backward ({meter}); time: slowest rank, median of the repeats",
        f"load average {load_before} before, {_load()} after (other work on the cores skews the CPU times)",
    ]
    print(write_tables(rows, header, args.md, args.csv))
    return 1 if any(r["note"].startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
