"""`python -m cl_fast bench` (or `python benchmarks/bench.py`): forward+backward time and peak extra memory of each loss, per backend.

Backends compared: every fused backend of the op that runs on the device, the eager reference
("torch": `backend="torch"`, which materialises the similarity matrix), torch.compile of that
reference ("compile") and, for sinkhorn, SwAV's own eager code ("swav"). One table row per op,
backend, size and dtype; benchmarks/README.md shows the common command lines.

Sizes ("rows"): the side of the similarity matrix. nt_xent: 2N (the rows of cat(z1, z2));
info_nce, clip_loss, siglip_loss, byol_loss: N; moco_loss: N queries scored against a queue of K rows;
sinkhorn: B rows of K prototype scores, forward only (it has no backward).

Time: median over the repeats, after warm-up calls (the first includes compilation/autotuning);
on CUDA every call is bracketed by torch.cuda.synchronize().

Peak extra memory, the memory one call needs beyond its inputs (input gradients included):
- CUDA: torch.cuda.max_memory_allocated() over the call minus memory_allocated() before it.
- CPU: growth of the process's peak resident set over the call. Each (op, backend, size, dtype)
  runs in a fresh child process; before each timed call the child returns freed heap pages to
  the kernel (malloc_trim) and resets the kernel's high-water mark (writing "5" to
  /proc/self/clear_refs), so VmHWM - VmRSS(before) is that call's own peak, not the warm-up's or
  the import's. Where clear_refs cannot be written, a thread samples VmRSS every 0.5 ms instead
  (approximate; the header says which method ran).

Isolation: cells run in child processes (this file run with `--child`): one per cell on CPU,
one for all cells on CUDA (restarted after a crash). An exception, segfault, out-of-memory kill,
hang or lost CUDA context becomes that row's error; the run goes on.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import faulthandler
import functools
import gc
import json
import os
import platform
import re
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

import cl_fast
from cl_fast import _dispatch, reference

FUSED = ("cuda", "triton", "cpu")
REFERENCES = ("torch", "compile")
BACKEND_ORDER = FUSED + REFERENCES + ("swav",)  # table order; "swav" is sinkhorn's upstream eager code
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Row counts per device and mode, for the ops whose size is the batch (--sizes overrides).
DEFAULT_ROWS = {
    ("cpu", "quick"): [256, 1024],
    ("cpu", "default"): [1024, 4096, 8192],
    ("cpu", "full"): [1024, 4096, 8192, 16384, 65536],
    ("cuda", "quick"): [1024, 4096],
    ("cuda", "default"): [1024, 4096, 16384, 65536],
    ("cuda", "full"): [1024, 4096, 16384, 32768, 65536],
}
# torch.compile on CPU costs 5-25 s of compilation per shape: by default only up to this many rows.
CPU_COMPILE_MAX_ROWS = 4096
RESULT_MARKER = "@@cl_fast.bench@@ "  # a child's result lines on stdout start with this
CUDA_CONTEXT_LOST = 3  # a child's exit status after an error that left the CUDA context unusable


# ------------------------------------------------------------------------------------- the ops
@dataclass(frozen=True)
class Shape:
    """One benchmark size of one op: `rows` as on the command line plus the op's fixed extents."""

    rows: int
    dim: int
    queue: int  # moco_loss: K queue rows
    prototypes: int  # sinkhorn: K prototypes


@dataclass(frozen=True)
class Op:
    """How to benchmark one loss: inputs, the positional call, and its O(rows^2) footprint."""

    name: str
    make_inputs: Callable  # (Shape, dtype, device, generator) -> (args, leaves needing .grad = None)
    label: Callable[[Shape], str]  # the "rows" column
    matrix_elems: Callable[[Shape], int]  # elements of the similarity/score matrix the reference builds
    backward: bool = True
    fixed_rows: tuple[int, ...] | None = None  # default sizes when the op's size is not the batch
    shows_dim: bool = True
    family: str = "infonce"  # the op family in cl_fast._dispatch (which fused backends have kernels)
    # eager baselines besides the reference: table name -> function in cl_fast.reference
    upstream: tuple[tuple[str, str], ...] = ()

    @property
    def fused(self) -> tuple[str, ...]:
        """The fused backends this op has kernels for."""
        return tuple(_dispatch._MODULES[self.family])

    @property
    def backends(self) -> tuple[str, ...]:
        """Every backend this op can be timed on, in table order."""
        return tuple(b for b in FUSED if b in self.fused) + REFERENCES + tuple(name for name, _ in self.upstream)


def _randn(rows, cols, dtype, device, gen, grad):
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return x.requires_grad_(grad)


def _pair(shape, dtype, device, gen, grad_second=True):
    a = _randn(shape.rows, shape.dim, dtype, device, gen, True)
    b = _randn(shape.rows, shape.dim, dtype, device, gen, grad_second)
    return a, b


def _ntxent_inputs(shape, dtype, device, gen):
    if shape.rows % 2:
        raise ValueError(f"nt_xent rows are 2N and must be even, got {shape.rows}")
    half = Shape(shape.rows // 2, shape.dim, shape.queue, shape.prototypes)
    z1, z2 = _pair(half, dtype, device, gen)
    return (z1, z2, 0.5), [z1, z2]


def _info_nce_inputs(shape, dtype, device, gen):
    q, k = _pair(shape, dtype, device, gen)
    return (q, k, 0.1), [q, k]


def _clip_inputs(shape, dtype, device, gen):
    image, text = _pair(shape, dtype, device, gen)
    logit_scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)  # OpenCLIP's learnable scale
    return (image, text, logit_scale), [image, text, logit_scale]


def _siglip_inputs(shape, dtype, device, gen):
    image, text = _pair(shape, dtype, device, gen)
    # OpenCLIP's SigLIP initialisation: logit_scale = exp(log 10), logit_bias = -10, both learnable
    logit_scale = torch.tensor(10.0, device=device, requires_grad=True)
    logit_bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return (image, text, logit_scale, logit_bias), [image, text, logit_scale, logit_bias]


def _moco_inputs(shape, dtype, device, gen):
    q, k = _pair(shape, dtype, device, gen, grad_second=False)
    stored_keys = _randn(shape.queue, shape.dim, dtype, device, gen, False)
    queue = reference.l2_normalize(stored_keys).to(dtype)  # MoCo enqueues normalised keys
    return (q, k, queue, 0.07), [q]


def _sinkhorn_inputs(shape, dtype, device, gen):
    scores = _randn(shape.rows, shape.prototypes, dtype, device, gen, False)
    return (scores, 0.05, 3), []


def _byol_inputs(shape, dtype, device, gen):
    p, z = _pair(shape, dtype, device, gen, grad_second=False)
    return (p, z), [p]


OPS = {
    op.name: op
    for op in (
        Op("nt_xent", _ntxent_inputs, lambda s: f"2N={s.rows}", lambda s: s.rows**2),
        Op("info_nce", _info_nce_inputs, lambda s: f"N={s.rows}", lambda s: s.rows**2),
        Op("clip_loss", _clip_inputs, lambda s: f"N={s.rows}", lambda s: s.rows**2),
        # "torch" is OpenCLIP's eager SigLipLoss computation (reference.siglip_loss: logits, labels, logsigmoid)
        Op("siglip_loss", _siglip_inputs, lambda s: f"N={s.rows}", lambda s: s.rows**2, family="siglip"),
        Op("moco_loss", _moco_inputs, lambda s: f"N={s.rows} K={s.queue}", lambda s: s.rows * (s.queue + 1),
           fixed_rows=(256,), family="moco"),
        Op("sinkhorn", _sinkhorn_inputs, lambda s: f"B={s.rows} K={s.prototypes}", lambda s: s.rows * s.prototypes,
           backward=False, fixed_rows=(4096,), shows_dim=False, family="sinkhorn",
           upstream=(("swav", "sinkhorn_plain"),)),  # facebookresearch/swav's formula, as written there
        Op("byol_loss", _byol_inputs, lambda s: f"N={s.rows}", lambda s: s.rows * s.dim, family="byol"),
    )
}
# Bytes the reference needs per matrix element, measured at 2N = 4096..8192 (fp32 logits, their
# masked copy, softmax and its gradient); used to skip sizes that cannot fit instead of crashing.
REFERENCE_BYTES_PER_ELEM = {"torch": 20, "compile": 8, "swav": 12}


def _op_backends_here(op: Op, device: torch.device) -> list[str]:
    """The fused backends of `op` importable here (cl_fast.backends of its op family)."""
    return [b for b in cl_fast.backends(op.family, device) if b in op.fused]


_RUNS_ON = {
    "cuda": "CUDA tensors",
    "triton": "CUDA tensors; CPU ones only under TRITON_INTERPRET=1",
    "cpu": "CPU tensors",
}


def unavailable_reason(op: Op, backend: str, device: torch.device, explicit: bool) -> str | None:
    """Why `backend` cannot run `op` on `device`, or None when it can (checked without running it)."""
    if backend in ("torch", "compile") or backend in dict(op.upstream):
        return None
    if backend not in op.fused:
        return f"not available ({op.name} has no {backend} kernel)"
    if not _dispatch._runs_on(backend, device):
        return f"not available on {device.type} (runs on {_RUNS_ON[backend]})"
    here = _op_backends_here(op, device)
    if backend not in here:
        return f"not available (not built or not importable here; {op.name} here: {', '.join(here + ['torch'])})"
    if backend == "triton" and device.type == "cpu" and not explicit:
        return "skipped (Triton interpreter on CPU is for tests; name it in --backends to time it)"
    return None


def loss_fn(op: Op, backend: str, dynamic: bool):
    """The callable that runs `op` on `backend`, taking the op's positional inputs."""
    if backend in dict(op.upstream):
        return getattr(reference, dict(op.upstream)[backend])
    if backend == "compile":
        return torch.compile(getattr(reference, op.name), dynamic=dynamic)
    return functools.partial(getattr(cl_fast, op.name), backend=backend)


# --------------------------------------------------------------------------- memory measurement
def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kb("VmHWM")
        return True
    except OSError:
        return False


class CudaMeter:
    method = "torch.cuda.max_memory_allocated"

    def __init__(self, device):
        self.device = device

    def start(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


class RssMeter:
    """Peak RSS growth over a call: VmHWM after minus VmRSS before, the HWM reset just before."""

    method = "VmHWM after clear_refs reset"

    def start(self):
        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _proc_status_kb("VmRSS")

    def stop(self) -> int:
        return max(0, _proc_status_kb("VmHWM") - self.base) * 1024


class SampledRssMeter:
    """Fallback when the HWM cannot be reset: sample the RSS every 0.5 ms while the call runs."""

    method = "VmRSS sampled every 0.5 ms (approximate)"

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._done.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.0005)

    def start(self):
        gc.collect()
        _malloc_trim()
        self.base = self.peak = _proc_status_kb("VmRSS") * 1024
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(0, self.peak - self.base)


def memory_meter(device: torch.device):
    if device.type == "cuda":
        return CudaMeter(device)
    return RssMeter() if _can_reset_hwm() else SampledRssMeter()


# ------------------------------------------------------------------------------- one measurement
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cell: dict, compiled: dict | None = None) -> dict:
    """Time and peak extra memory of one (op, backend, shape, dtype); errors become the result.

    `compiled` caches torch.compile wrappers across calls in one process (compiled with dynamic
    shapes, so one compilation serves every size); None compiles this shape alone (static).
    """
    device = torch.device(cell["device"])
    try:
        result = _measure(cell, device, compiled)
    except torch.OutOfMemoryError:
        result = {"status": "error", "note": "out of memory"}
    except Exception as e:  # a failing backend is a row of the table, not the end of the run
        message = " ".join(str(e).split())
        result = {"status": "error", "note": f"{type(e).__name__}: {message}"[:500]}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def make_step(op: Op, fn, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A no-argument callable: one forward (+ backward) of `fn` on fixed random inputs, synchronised."""
    args, leaves = op.make_inputs(shape, dtype, device, torch.Generator().manual_seed(seed))

    def step():
        for leaf in leaves:
            leaf.grad = None
        out = fn(*args)
        if op.backward:
            out.backward()
        _sync(device)

    return step


def _measure(cell, device, compiled):
    op, backend, dtype = OPS[cell["op"]], cell["backend"], DTYPES[cell["dtype"]]
    shape = Shape(cell["rows"], cell["dim"], cell["queue"], cell["prototypes"])
    if compiled is not None and backend == "compile":
        fn = compiled.setdefault(op.name, loss_fn(op, backend, dynamic=True))
    else:
        fn = loss_fn(op, backend, dynamic=False)
    step = make_step(op, fn, shape, dtype, device, cell.get("seed", 0))
    for _ in range(max(1, cell["warmup"])):
        step()
    times = []
    # `repeats` timed calls, fewer once they add up to `cell_seconds` (a slow call is timed once or twice)
    while len(times) < max(1, cell["repeats"]) and sum(times) < cell["cell_seconds"]:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    # the memory is metered on one more call, so the meter's own work (heap trim, RSS reset or
    # sampling thread) never lands in the timings
    meter = memory_meter(device)
    meter.start()
    step()
    peak = meter.stop()
    return {
        "status": "ok",
        "ms": statistics.median(times) * 1e3,
        "peak_mb": peak / 2**20,
        "repeats": len(times),
        "mem_method": meter.method,
    }


def _child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cl_fast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _cuda_context_alive(device) -> bool:
    """After an error: can the CUDA context still run work (an illegal address kills it for good)?"""
    try:
        torch.ones(1, device=device).add_(1).item()
        torch.cuda.synchronize(device)
        return True
    except Exception:
        return False


def _child_main() -> int:
    """Measure the cells read from stdin (JSON list), one result line per cell on stdout."""
    faulthandler.enable()  # a segfault prints where it happened; the parent quotes that line
    job = json.loads(sys.stdin.read())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    compiled = {} if job["compile_dynamic"] else None
    for index, cell in enumerate(job["cells"]):
        if job.get("deadline") is not None and time.time() > job["deadline"]:
            result = {"status": "skipped", "note": job["budget_note"]}
        else:
            result = measure(cell, compiled)
        print(RESULT_MARKER + json.dumps({"index": index, "result": result}), flush=True)
        device = torch.device(cell["device"])
        if result["status"] == "error" and device.type == "cuda" and not _cuda_context_alive(device):
            return CUDA_CONTEXT_LOST  # the parent starts a fresh process for the cells left
    return 0


class _ChildRunner:
    """Runs cells in child processes: `per_process` cells each (None: all), a new one after a crash.

    One cell per process gives each CPU measurement a clean peak-RSS baseline; one process for all
    cells (CUDA) pays the CUDA/Triton start-up once. Either way a segfault, an out-of-memory kill, a
    hang (`cell_timeout`) or a dead CUDA context costs that cell only: its row gets the error and a
    fresh process takes the cells after it.
    """

    def __init__(self, per_process, threads, cell_timeout, compile_dynamic, deadline, budget_note, on_result):
        self.per_process, self.threads, self.cell_timeout = per_process, threads, cell_timeout
        self.compile_dynamic, self.deadline, self.budget_note = compile_dynamic, deadline, budget_note
        self.on_result = on_result

    def run(self, cells):
        pending = list(cells)
        while pending:
            if self.deadline is not None and time.time() > self.deadline:
                for cell in pending:  # no process started just to report these
                    self.on_result(cell, {"status": "skipped", "note": self.budget_note})
                return
            batch = pending[: self.per_process] if self.per_process else pending
            done = self._run_batch(batch)
            pending = pending[done:]

    def _run_batch(self, batch) -> int:
        """Run `batch` in one child; returns how many cells got a result (at least one)."""
        job = {"cells": batch, "threads": self.threads, "compile_dynamic": self.compile_dynamic,
               "deadline": self.deadline, "budget_note": self.budget_note}
        with tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"], env=_child_env(self.threads),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
            try:
                proc.stdin.write(json.dumps(job).encode())
                proc.stdin.close()
                done, failure = self._collect(proc, batch)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            lost_context = proc.returncode == CUDA_CONTEXT_LOST and done > 0
            if done < len(batch) and failure is None and not lost_context:
                failure = self._crash_note(proc.returncode, stderr)
        if failure is not None:
            self.on_result(batch[done], {"status": "error", "note": failure})
            done += 1
        return done

    def _collect(self, proc, batch):
        """Read result lines until the child ends; (cells done, a timeout note or None)."""
        done, buffer = 0, b""
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        fd = proc.stdout.fileno()
        while True:
            while b"\n" not in buffer:
                if not selector.select(self.cell_timeout):
                    return done, f"timed out after {self.cell_timeout:.0f} s"
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return done, None
                buffer += chunk
            line, buffer = buffer.split(b"\n", 1)
            text = line.decode(errors="replace")
            if text.startswith(RESULT_MARKER):
                message = json.loads(text[len(RESULT_MARKER):])
                self.on_result(batch[message["index"]], message["result"])
                done = message["index"] + 1

    @staticmethod
    def _crash_note(returncode, stderr) -> str:
        stderr.seek(0)
        lines = [line.strip() for line in stderr.read().decode(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
        if fatal is not None:  # faulthandler: the error, then the frames, innermost first
            frames = [line for line in lines[fatal:] if line.startswith("File ")]
            ours = [f for f in frames if "site-packages" not in f and "<frozen" not in f]
            frame = (ours or frames or [""])[0]
            match = re.match(r'File "(.*)", line (\d+) in (\S+)', frame)
            where = f"{os.path.relpath(match[1])}:{match[2]} in {match[3]}" if match else frame
            last = f"{lines[fatal].removeprefix('Fatal Python error: ')} at {where}"
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name
            why = " (out of memory?)" if returncode == -signal.SIGKILL else ""
            return f"process killed by {name}{why}; {last}"[:500]
        return f"process exited with {returncode}: {last}"[:500]


# ---------------------------------------------------------------------------------- the run plan
def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m cl_fast bench",
        description="Forward+backward time and peak extra memory of the cl_fast losses, per backend.",
        epilog="rows: nt_xent 2N; info_nce, clip_loss, siglip_loss, byol_loss N; moco_loss N (queue K = --queue); "
        "sinkhorn B (K = --prototypes, forward only).",
    )
    p.add_argument("--ops", default="nt_xent", help=f"comma list of {', '.join(OPS)}, or 'all' (default nt_xent)")
    p.add_argument("--sizes", action="append", default=[], metavar="ROWS[,ROWS..] | OP=ROWS[,..]",
                   help="rows per size (nt_xent: 2N); 'OP=...' sets one op's sizes (moco_loss defaults to 256, "
                        "sinkhorn to 4096); repeatable")
    p.add_argument("--dim", default="128", help="feature dimension D (comma list allowed; default 128)")
    p.add_argument("--dtype", default="fp32", help="comma list of fp32, bf16, fp16 (default fp32)")
    p.add_argument("--backends", default=None,
                   help="comma list of cuda, triton, cpu, torch (eager reference; with it sinkhorn also gets "
                        "swav, SwAV's own eager code), compile (torch.compile of the reference); 'fused' = the "
                        "fused backends for the device (default fused,torch,compile)")
    p.add_argument("--compile-ops", default=None, help="ops that get the 'compile' backend (default: all of --ops)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 3 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1 CPU, 2 CUDA)")
    p.add_argument("--cell-seconds", type=float, default=None,
                   help="stop repeating once the timed calls of a cell add up to this (default 8 s CPU, 2 s CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2 on CPU)")
    p.add_argument("--queue", type=int, default=65536, help="moco_loss queue rows K (default 65536)")
    p.add_argument("--prototypes", type=int, default=3000, help="sinkhorn prototypes K (default 3000)")
    p.add_argument("--quick", action="store_true", help="small sizes, no torch.compile unless named: a smoke run")
    p.add_argument("--full", action="store_true",
                   help="large sizes (2N up to 65536) and torch.compile at every size; the reference is "
                        "skipped where it cannot fit in memory")
    p.add_argument("--isolate", choices=("cell", "run", "none"), default=None,
                   help="where cells run: 'cell' a fresh child process each (CPU default: a clean peak-RSS "
                        "baseline), 'run' one child for all cells, replaced after a crash (CUDA default), 'none' "
                        "this process (no crash isolation)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop starting new cells after this many seconds; the rest are reported as skipped")
    p.add_argument("--cell-timeout", type=float, default=None,
                   help="a cell still running after this many seconds is stopped and becomes an error row "
                        "(default 900 CPU, 120 CUDA)")
    p.add_argument("--csv", metavar="FILE", help="also write the rows (with the device name) to FILE")
    p.add_argument("--md", metavar="FILE", help="also write the table as markdown to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="log-log time and memory vs rows, one line per backend")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _parse_sizes(entries, ops, device_type, mode):
    default = DEFAULT_ROWS[(device_type, mode)]
    common, per_op = None, {}
    for entry in entries:
        if "=" in entry:
            name, _, rows = entry.partition("=")
            if name.strip() not in OPS:
                raise SystemExit(f"--sizes: unknown op {name.strip()!r}")
            per_op[name.strip()] = [int(r) for r in _csv_list(rows)]
        else:
            common = [int(r) for r in _csv_list(entry)]
    sizes = {}
    for name in ops:
        op = OPS[name]
        if name in per_op:
            sizes[name] = per_op[name]
        elif op.fixed_rows is not None:
            sizes[name] = list(op.fixed_rows)
        else:
            sizes[name] = common or default
    return sizes


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":  # the card's memory, read without creating a CUDA context in this process
        return int(0.95 * torch.cuda.get_device_properties(device).total_memory)
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # a container's cgroup limit, where there is one
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read())
        if limit != "max":
            available = min(available or 1 << 62, int(limit) - current)
    except (OSError, ValueError):
        pass
    return available or 1 << 62


def _device_name(device: torch.device, threads: int | None) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {threads or torch.get_num_threads()} threads"


def plan(args, device):
    """Every cell of the table, as dicts: runnable ones (no status yet) and ones decided up front."""
    mode = "quick" if args.quick else "full" if args.full else "default"
    ops = list(OPS) if args.ops == "all" else _csv_list(args.ops)
    for name in ops:
        if name not in OPS:
            raise SystemExit(f"--ops: unknown op {name!r}; known: {', '.join(OPS)}")
    dtypes = []
    for name in _csv_list(args.dtype):
        if name not in DTYPES:
            raise SystemExit(f"--dtype: unknown dtype {name!r}; use fp32, bf16 or fp16")
        dtypes.append(DTYPE_NAMES[DTYPES[name]])
    dims = [int(d) for d in _csv_list(args.dim)]
    requested = _csv_list(args.backends or "fused,torch,compile")
    named = set(requested) if args.backends else set()  # what the user asked for by name
    for name in requested:
        if name not in BACKEND_ORDER + ("fused",):
            raise SystemExit(f"--backends: unknown backend {name!r}; known: fused, {', '.join(BACKEND_ORDER)}")
    compile_ops = set(_csv_list(args.compile_ops)) if args.compile_ops else set(ops)
    sizes = _parse_sizes(args.sizes, ops, device.type, mode)
    available = _available_bytes(device)

    cells = []
    for name in ops:
        op = OPS[name]
        for backend in op.backends:
            wanted = (backend in requested or (backend in FUSED and "fused" in requested)
                      or (backend in dict(op.upstream) and "torch" in requested))  # upstream code goes with torch
            if not wanted or (backend == "compile" and name not in compile_ops):
                continue
            if backend in FUSED and backend not in named and not _dispatch._runs_on(backend, device):
                continue  # 'fused' means those for this device: no cuda rows on a CPU, no cpu rows on a GPU
            reason = unavailable_reason(op, backend, device, explicit=backend in named)
            base = {"op": name, "backend": backend, "device": str(device)}
            if reason is not None:  # one row for the (op, backend), not one per size
                cells.append({**base, "rows": None, "dim": None, "dtype": "-", "status": "n/a", "note": reason})
                continue
            for dtype in dtypes:
                for dim in dims if op.shows_dim else dims[:1]:
                    for rows in sizes[name]:
                        shape = Shape(rows, dim, args.queue, args.prototypes)
                        cell = {**base, "rows": rows, "dim": dim, "dtype": dtype, "queue": args.queue,
                                "prototypes": args.prototypes, "label": op.label(shape)}
                        skip = _skip_reason(op, backend, shape, device, available, args, "compile" in named)
                        if skip:
                            cell.update(status="skipped", note=skip)
                        cells.append(cell)
    return cells


def _skip_reason(op, backend, shape, device, available, args, compile_named):
    if backend in REFERENCE_BYTES_PER_ELEM:
        need = REFERENCE_BYTES_PER_ELEM[backend] * op.matrix_elems(shape)
        if need > 0.85 * available:
            return f"skipped (needs > {need / 1e9:.0f} GB, {available / 1e9:.0f} GB available)"
    if backend != "compile" or device.type != "cpu" or args.full or compile_named:
        return None
    # torch.compile on CPU spends 5-25 s compiling each shape: only small batch sizes by default.
    if args.quick:
        return "skipped (--quick: name compile in --backends to time it)"
    if op.fixed_rows is None and shape.rows > CPU_COMPILE_MAX_ROWS:
        return f"skipped (torch.compile on CPU above {CPU_COMPILE_MAX_ROWS} rows: --full runs it)"
    return None


# --------------------------------------------------------------------------------------- output
COLUMNS = ("op", "backend", "rows", "D", "dtype", "fwd+bwd ms", "peak extra MB", "vs eager", "mem vs eager")


def _sort_key(cell):
    return (list(OPS).index(cell["op"]), cell["dtype"], cell["dim"] or 0, cell["rows"] or 0,
            BACKEND_ORDER.index(cell["backend"]))


def _eager(cells):
    return {(c["op"], c["dtype"], c["dim"], c["rows"]): c for c in cells
            if c["backend"] == "torch" and c.get("status") == "ok"}


def _ratios(cell, eager):
    """(time speedup, memory ratio) of `cell` relative to the eager reference at the same size."""
    ref = eager.get((cell["op"], cell["dtype"], cell["dim"], cell["rows"]))
    if ref is None or cell.get("status") != "ok":
        return None, None
    speedup = ref["ms"] / cell["ms"] if cell["ms"] > 0 else None
    mem = ref["peak_mb"] / cell["peak_mb"] if cell["peak_mb"] >= 0.01 else None
    return speedup, mem


def _mem_ratio_text(ratio):
    if not ratio:
        return "-"
    if ratio >= 1.05:
        return f"{ratio:.1f}x less"
    if ratio <= 0.95:
        return f"{1 / ratio:.1f}x more"
    return "same"


def table_rows(cells):
    """The table as lists of strings, sorted by op, dtype, D, rows, backend."""
    eager = _eager(cells)
    rows = []
    for c in sorted(cells, key=_sort_key):
        op = OPS[c["op"]]
        name = c["op"] + ("" if op.backward else " (fwd)")
        dim = str(c["dim"]) if c["dim"] and op.shows_dim else "-"
        head = [name, c["backend"], c.get("label", "-"), dim, c["dtype"]]
        if c.get("status") == "ok":
            speedup, mem = _ratios(c, eager)
            rows.append(head + [
                f"{c['ms']:.3f}" if c["ms"] < 10 else f"{c['ms']:.1f}",
                f"{c['peak_mb']:.1f}",
                f"{speedup:.2f}x" if speedup else "-",
                _mem_ratio_text(mem),
            ])
        else:
            status = c.get("status") or "not run"
            note = c.get("note", "")
            text = note if note.startswith(("skipped", "not available", "not run")) else f"{status}: {note}"
            rows.append(head + [text[:160], "", "", ""])
    return rows


def format_table(cells) -> str:
    rows = table_rows(cells)
    widths = [max([len(h)] + [len(r[i]) for r in rows if r[i] and not _spans(r, i)]) for i, h in enumerate(COLUMNS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        if _spans(r, 5):
            lines.append(("  ".join(v.ljust(w) for v, w in zip(r[:5], widths[:5])) + "  " + r[5]).rstrip())
        else:
            padded = (v.rjust(w) if i >= 5 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
            lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _spans(row, i):
    """A skipped/error row: its message runs from the time column on."""
    return i >= 5 and row[6] == "" and row[5] != ""


def format_markdown(cells) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * 4) + "|"]
    for r in table_rows(cells):
        lines.append("| " + " | ".join(v.replace("|", "/") for v in r) + " |")
    return "\n".join(lines)


def _load_text() -> str | None:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def header_lines(device, device_name, threads, mem_method, compile_note, load) -> list[str]:
    return [
        f"device: {device_name} ({device.type}); torch {torch.__version__}; cl_fast {cl_fast.__version__}; "
        f"backends here: {', '.join(cl_fast.backends())}" + (f"; {load}" if load else ""),
        f"time: median fwd+bwd per call after warm-up (sinkhorn: forward only); threads: {threads}; "
        f"torch.compile: {compile_note}",
        f"peak extra MB: {mem_method} (inputs excluded, input gradients included)",
        "rows: nt_xent 2N (similarity matrix 2N x 2N); info_nce, clip_loss, siglip_loss, byol_loss N; moco_loss N queries "
        "x K queue rows; sinkhorn B x K scores",
        "vs eager: eager time / this time; mem vs eager: eager peak / this peak (same op, dtype, size)",
    ]


CSV_FIELDS = ("device", "op", "backend", "rows", "label", "dim", "dtype", "ms", "peak_extra_mb", "speedup_vs_eager",
              "mem_ratio_vs_eager", "repeats", "status", "note", "mem_method", "threads", "torch")


def write_csv(path, cells, device_name, threads):
    eager = _eager(cells)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for c in sorted(cells, key=_sort_key):
            speedup, mem = _ratios(c, eager)
            writer.writerow({
                "device": device_name, "op": c["op"], "backend": c["backend"], "rows": c["rows"] or "",
                "label": c.get("label", ""), "dim": c["dim"] or "", "dtype": c["dtype"],
                "ms": f"{c['ms']:.4f}" if "ms" in c else "",
                "peak_extra_mb": f"{c['peak_mb']:.3f}" if "peak_mb" in c else "",
                "speedup_vs_eager": f"{speedup:.3f}" if speedup else "",
                "mem_ratio_vs_eager": f"{mem:.2f}" if mem else "",
                "repeats": c.get("repeats", ""), "status": c.get("status") or "not run", "note": c.get("note", ""),
                "mem_method": c.get("mem_method", ""), "threads": threads, "torch": torch.__version__,
            })


def write_plot(path, cells, device_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for c in cells:
        if c.get("status") == "ok" and c["rows"]:
            groups.setdefault((c["op"], c["dtype"], c["dim"]), {}).setdefault(c["backend"], []).append(c)
    groups = {k: v for k, v in groups.items() if any(len(points) > 1 for points in v.values())} or groups
    if not groups:
        return False
    keys = sorted(groups, key=lambda k: (list(OPS).index(k[0]), k[1], k[2]))
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.6 * len(keys)), squeeze=False)
    for (op, dtype, dim), (ax_t, ax_m) in zip(keys, axes):
        for backend in sorted(groups[(op, dtype, dim)], key=BACKEND_ORDER.index):
            points = sorted(groups[(op, dtype, dim)][backend], key=lambda c: c["rows"])
            xs = [c["rows"] for c in points]
            ax_t.plot(xs, [c["ms"] for c in points], marker="o", label=backend)
            ax_m.plot(xs, [max(c["peak_mb"], 1e-2) for c in points], marker="o", label=backend)
        rows_name = "2N" if op == "nt_xent" else "B" if op == "sinkhorn" else "N"
        for ax, what in ((ax_t, "fwd+bwd ms"), (ax_m, "peak extra MB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"rows ({rows_name})")
            ax.set_ylabel(what)
            ax.set_title(f"{op} {dtype} D={dim}: {what}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(device_name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ main
class _Stop(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Stop(f"stopped by {signal.Signals(signum).name}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return _child_main()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    on_cpu = device.type == "cpu"
    threads = args.threads or (2 if on_cpu else None)
    if threads:
        torch.set_num_threads(threads)
    defaults = {"repeats": 3 if on_cpu else 10, "warmup": 1 if on_cpu else 2, "cell_seconds": 8.0 if on_cpu else 2.0}
    cell_timeout = args.cell_timeout or (900.0 if on_cpu else 120.0)
    isolate = args.isolate or ("cell" if on_cpu else "run")
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    device_name = _device_name(device, threads)
    load = _load_text() if on_cpu else None

    cells = plan(args, device)
    # Fused and eager cells first, torch.compile (slow to compile) last, so a time budget cuts those.
    todo = [c for c in cells if "status" not in c]
    todo.sort(key=lambda c: (c["backend"] == "compile", _sort_key(c)))
    jobs = [{**c, **settings} for c in todo]
    by_job = {id(job): cell for job, cell in zip(jobs, todo)}
    started = time.perf_counter()
    finished = 0

    def on_result(job, result):
        nonlocal finished
        cell = by_job[id(job)]
        cell.update(result)
        finished += 1
        if not args.quiet:
            ok = result["status"] == "ok"
            what = f"{cell['ms']:.3f} ms, {cell['peak_mb']:.1f} MB" if ok else result.get("note", "")
            print(f"[{finished}/{len(todo)} {time.perf_counter() - started:.0f}s] {cell['op']} {cell['backend']} "
                  f"{cell['label']} D={cell['dim']} {cell['dtype']}: {what}", file=sys.stderr, flush=True)
        if args.csv:  # rewritten after every cell: a run killed later keeps what it measured
            write_csv(args.csv, cells, device_name, threads)

    budget_note = f"skipped (time budget of {args.time_budget:.0f} s spent)" if args.time_budget else ""
    deadline = time.time() + args.time_budget if args.time_budget is not None else None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    stopped = False
    try:
        if isolate == "none":
            compiled = {}
            for job in jobs:
                over = deadline is not None and time.time() > deadline
                on_result(job, {"status": "skipped", "note": budget_note} if over else measure(job, compiled))
        else:
            runner = _ChildRunner(per_process=1 if isolate == "cell" else None, threads=threads,
                                  cell_timeout=cell_timeout, compile_dynamic=isolate == "run", deadline=deadline,
                                  budget_note=budget_note, on_result=on_result)
            runner.run(jobs)
    except (_Stop, KeyboardInterrupt) as e:
        stopped = True
        for cell in todo:
            if "status" not in cell:
                cell.update(status="skipped", note=f"not run ({e or 'interrupted'})")
    finally:
        signal.signal(signal.SIGTERM, previous)

    methods = sorted({c["mem_method"] for c in cells if c.get("mem_method")}) or [memory_meter(device).method]
    mem_method = ("fresh process per cell, " if isolate == "cell" else "") + ", ".join(methods)
    compile_note = "static, per cell" if isolate == "cell" else "dynamic=True, one compilation per op and dtype"
    if load:
        load = f"{load} before, {_load_text()} after"
    header = header_lines(device, device_name, threads, mem_method, compile_note, load)
    print("\n".join(header))
    print(format_table(cells))
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.csv:
        write_csv(args.csv, cells, device_name, threads)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join("- " + line for line in header) + "\n\n" + format_markdown(cells) + "\n")
    if args.plot and not write_plot(args.plot, cells, device_name):
        print(f"--plot: nothing measured to plot, {args.plot} not written", file=sys.stderr)
    failed = [c for c in cells if c.get("status") not in ("ok", "skipped", "n/a")]
    return 1 if stopped or failed else 0


if __name__ == "__main__":
    sys.exit(main())
