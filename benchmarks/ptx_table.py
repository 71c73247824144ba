"""Compile every Triton kernel of the package offline for sm_90 and tabulate what ptxas made of it.

No GPU needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 64))` runs the whole
pipeline down to the cubin. Each `cl_fast/triton_kernels/<family>.py` that defines `sm90_specs()` lists one
compile spec per autotune config (a dict with name, fn, signature, constexprs, num_warps,
num_stages and optionally config and no_atomics; or the tuple (name, fn, signature, constexprs,
num_warps, num_stages)). Per spec: registers, spill (local memory) bytes, shared memory, global
atomics, and whether the PTX holds `acq_rel` or `membar`.

    python benchmarks/ptx_table.py                 # table on stdout + benchmarks/results/ptx_sm90.md
    python benchmarks/ptx_table.py --json out.json --no-md --jobs 2

tests/test_triton_sm90.py runs it with --json and asserts on the rows. Compiles go to Triton's
own cache (~/.triton), never into the repository. TRITON_INTERPRET is forced off here: under the
interpreter @triton.jit gives Python functions, not compilable kernels.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Hopper's per-block shared memory limit with the opt-in carve-out: 227 KB.
SM90_SHARED_LIMIT = 227 * 1024
_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(atom|red)\.(?!.*\.shared)", re.M)


def _prepare_env():
    os.environ["TRITON_INTERPRET"] = "0"
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def module_names():
    """Every module of cl_fast.triton_kernels, found on disk (nothing imported: the caller's interpreter
    setting stays as it is)."""
    return [f"cl_fast.triton_kernels.{info.name}" for info in pkgutil.iter_modules([os.path.join(ROOT, "cl_fast", "triton_kernels")])]


def discover():
    """(module name, has sm90_specs) for every module of cl_fast.triton_kernels (imports them, compiled mode)."""
    _prepare_env()
    return [(name, callable(getattr(importlib.import_module(name), "sm90_specs", None))) for name in module_names()]


def _normalise(spec):
    if isinstance(spec, dict):
        return dict(spec)
    name, fn, signature, constexprs, num_warps, num_stages = spec
    return dict(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=num_warps,
                num_stages=num_stages)


def _specs(module_name):
    _prepare_env()
    return [_normalise(s) for s in importlib.import_module(module_name).sm90_specs()]


def _resource_usage(cubin):
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", out))
    return int(fields.get("REG", -1)), int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))


def compile_one(module_name, index):
    """Compile spec `index` of `module_name` for sm_90 and return its table row (a dict)."""
    _prepare_env()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _specs(module_name)[index]
    row = dict(module=module_name.split(".")[-1], kernel=spec["name"],
               config=spec.get("config", f"w={spec['num_warps']} s={spec['num_stages']}"),
               no_atomics=bool(spec.get("no_atomics", False)))
    start = time.perf_counter()
    try:
        source = ASTSource(spec["fn"], spec["signature"], spec["constexprs"])
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 64),
                                options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    except Exception as exc:  # reported as a failed row, the table goes on
        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return row
    ptx = kernel.asm["ptx"]
    registers, spill_bytes = _resource_usage(kernel.asm["cubin"])
    row.update(registers=registers, spill_bytes=spill_bytes, shared=int(kernel.metadata.shared),
               global_atomics=len(_ATOMIC.findall(ptx)), acq_rel="acq_rel" in ptx, membar="membar" in ptx,
               wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
               seconds=round(time.perf_counter() - start, 1))
    return row


def collect(jobs=2):
    """(rows, modules without sm90_specs). Compiles in `jobs` spawned processes."""
    modules = discover()
    missing = [name for name, has in modules if not has]
    tasks = [(name, i) for name, has in modules if has for i in range(len(_specs(name)))]
    if jobs <= 1:
        rows = [compile_one(*t) for t in tasks]
    else:
        with futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_prepare_env) as pool:
            rows = list(pool.map(compile_one, *zip(*tasks))) if tasks else []
    return rows, missing


def violations(row):
    """What is wrong with one compiled kernel (empty when it passes)."""
    if "error" in row:
        return [row["error"]]
    bad = []
    if row["spill_bytes"]:
        bad.append(f"{row['spill_bytes']} bytes of register spills")
    if row["shared"] > SM90_SHARED_LIMIT:
        bad.append(f"shared memory {row['shared']} > {SM90_SHARED_LIMIT}")
    if row["acq_rel"] or row["membar"]:
        bad.append("acq_rel / membar in the PTX")
    if row["no_atomics"] and row["global_atomics"]:
        bad.append(f"{row['global_atomics']} global atomics in a kernel that must have none")
    return bad


def markdown(rows, missing):
    import triton

    lines = [
        "# Triton kernels compiled offline for sm_90",
        "",
        f"Triton {triton.__version__}, `GPUTarget(\"cuda\", 90, 64)`, one row per autotune config "
        "(`python benchmarks/ptx_table.py`). Registers and spill (local memory) bytes from "
        "`cuobjdump -res-usage`; shared = Triton's shared memory per block (limit "
        f"{SM90_SHARED_LIMIT} bytes); atomics = global `atom`/`red` instructions in the PTX; "
        "MMA = wgmma / mma.sync instructions in the PTX.",
        "",
        "| module | kernel | config | registers | spills (B) | shared (B) | global atomics | acq_rel/membar | MMA (wgmma/mma.sync) | check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['module']} | {r['kernel']} | {r['config']} | - | - | - | - | - | - | {r['error']} |")
            continue
        bad = violations(r)
        lines.append(
            f"| {r['module']} | {r['kernel']} | {r['config']} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['shared']} | {r['global_atomics']} | {'yes' if r['acq_rel'] or r['membar'] else 'no'} | "
            f"{r['wgmma']}/{r['mma_sync']} | {'; '.join(bad) if bad else 'ok'} |")
    if missing:
        lines += ["", "Modules without `sm90_specs()` (not compiled): " + ", ".join(f"`{m}`" for m in missing)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--md", default=os.path.join(ROOT, "benchmarks", "results", "ptx_sm90.md"))
    parser.add_argument("--no-md", action="store_true", help="do not write the markdown table")
    parser.add_argument("--json", help="also write the rows (and missing modules) as JSON to this path")
    args = parser.parse_args(argv)
    rows, missing = collect(args.jobs)
    table = markdown(rows, missing)
    print(table)
    if not args.no_md:
        with open(args.md, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, missing=missing), f, indent=1)
    return 0 if all(not violations(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
