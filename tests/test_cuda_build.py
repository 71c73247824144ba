"""Compile checks of the CUDA sources, no GPU needed (issue 8 part 3).

Every kernel file (csrc/cuda/*.cu without a torch registration) is compiled with nvcc for sm_80
and sm_90a with `-Xptxas -v`; a test fails on a compile error, on any register spill or local
stack frame, or on static shared memory over 48 KB per block (the dynamic tiles are bounded by a
static_assert in the source). Their sm_90a PTX must hold no atomics and no fences (the kernels
are row-stationary and deterministic). The registration files (TORCH_LIBRARY_IMPL) are compiled too,
compile-only, against this machine's torch headers.

Compiles run in parallel (one process per core) and their results are cached under
~/.cache/cl_fast/nvcc (override: CL_FAST_NVCC_CACHE), keyed by a hash of the sources and
headers, the flags and `nvcc --version`, so a rerun without changes takes seconds.

`python tests/test_cuda_build.py --table FILE` writes the ptxas table (markdown).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)
ARCHES = {"sm_80": "-gencode=arch=compute_80,code=sm_80", "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}
MAX_STATIC_SMEM = 48 * 1024
# What torch.utils.cpp_extension adds to every .cu of the extension (no implicit half/bf16
# conversions, relaxed constexpr), so a kernel that compiles here compiles in the real build.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
COMMON_FLAGS = ["-std=c++20", "-O3", "-lineinfo", "-diag-suppress", "3306,20013,20015"] + TORCH_NVCC_FLAGS

pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc (CUDA toolkit) to compile the CUDA sources")


def cache_dir() -> Path:
    path = Path(os.environ.get("CL_FAST_NVCC_CACHE", Path.home() / ".cache" / "cl_fast" / "nvcc"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cu_files() -> list[Path]:
    return sorted(CUDA_DIR.glob("*.cu"))


def is_registration(path: Path) -> bool:
    return "TORCH_LIBRARY_IMPL" in path.read_text()


def nvcc_version() -> str:
    return subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout


def torch_include_flags() -> list[str]:
    """Include paths of this torch, plus a stand-in for the one generated header a CPU wheel lacks."""
    import torch.utils.cpp_extension as cpp

    flags = [f"-I{p}" for p in cpp.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    torch_include = Path(cpp.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # CMake writes this header into CUDA builds of torch only; its one definition is what a
        # shared-library CUDA build of c10 sets.
        shim = cache_dir() / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags.append(f"-I{cache_dir() / 'shim'}")
    return flags


def registrations_unit() -> Path:
    """One translation unit including every registration file: the torch headers, which take most
    of the time, are parsed once."""
    unit = cache_dir() / "cl_fast_registrations.cu"
    text = "".join(f'#include "{p}"\n' for p in cu_files() if is_registration(p))
    if not unit.exists() or unit.read_text() != text:
        unit.write_text(text)
    return unit


def command(path: Path, arch: str, registration: bool) -> list[str]:
    out = cache_dir() / "obj.o"  # never kept: only the log matters
    if registration:
        # host code + torch headers; PTX only for the device pass (no kernels of its own)
        return [NVCC, *COMMON_FLAGS, *torch_include_flags(), f"-I{CUDA_DIR}",
                "-gencode=arch=compute_90a,code=compute_90a", "-c", str(path), "-o", f"{out}.{path.stem}.{arch}"]
    if arch == "ptx":
        return [NVCC, *COMMON_FLAGS, "-gencode=arch=compute_90a,code=compute_90a", "-ptx", str(path), "-o",
                f"{out}.{path.stem}.{arch}"]
    return [NVCC, *COMMON_FLAGS, ARCHES[arch], "-Xptxas", "-v", "-c", str(path), "-o", f"{out}.{path.stem}.{arch}"]


def cache_key(cmd: list[str], version: str) -> str:
    digest = hashlib.sha256()
    digest.update(version.encode())
    digest.update("\0".join(c for c in cmd if not c.startswith(str(cache_dir()))).encode())
    for header in sorted(CUDA_DIR.glob("*.h")) + sorted(CUDA_DIR.glob("*.cuh")) + [ROOT / "csrc" / "ops.h"]:
        if header.exists():
            digest.update(header.name.encode() + header.read_bytes())
    source = Path(cmd[-3])
    digest.update(source.read_bytes())
    if source.suffix == ".cu" and source.parent == cache_dir():  # the registrations unit
        for path in cu_files():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def compile_one(path: Path, arch: str, version: str) -> dict:
    registration = arch == "registrations"
    cmd = command(path, arch, registration)
    key = cache_key(cmd, version)
    cached = cache_dir() / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    result = {"file": path.name, "arch": arch, "returncode": proc.returncode, "log": proc.stdout + proc.stderr,
              "registration": registration}
    if arch == "ptx" and proc.returncode == 0:  # keep only what the test asks of the PTX
        ptx = Path(cmd[-1]).read_text()
        result["atomics"] = re.findall(r"^\s*(?:@%p\d+\s+)?((?:atom|red)\.\S+)", ptx, flags=re.M)
        result["fences"] = re.findall(r"^\s*((?:membar|fence)\.\S+)", ptx, flags=re.M)
    Path(f"{cache_dir() / 'obj.o'}.{path.stem}.{arch}").unlink(missing_ok=True)
    if proc.returncode == 0:  # failures are recompiled next time (they may be environmental)
        cached.write_text(json.dumps(result))
    return result


def jobs() -> list[tuple[Path, str]]:
    """(source, arch) pairs; the registration files compile together as ("...registrations.cu", "registrations")."""
    out = [(registrations_unit(), "registrations")] if any(map(is_registration, cu_files())) else []
    for path in cu_files():
        if not is_registration(path):
            out.extend((path, arch) for arch in [*ARCHES, "ptx"])
    return out


_results: dict | None = None


def all_results() -> dict:
    """(file, arch) -> result, compiled once per session, in parallel."""
    global _results
    if _results is None:
        version = nvcc_version()
        work = jobs()
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            done = pool.map(lambda job: compile_one(job[0], job[1], version), work)
            _results = {(path.name, arch): result for (path, arch), result in zip(work, done)}
    return _results


ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USAGE = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def ptxas_report(log: str) -> list[dict]:
    """One entry per kernel: name, arch, registers, stack, spill stores/loads, static smem."""
    kernels, current = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = {"kernel": demangle(m.group(1)), "arch": m.group(2), "stack": 0, "spill_stores": 0,
                       "spill_loads": 0}
        elif current and (m := FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := USAGE.search(line)):
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
            kernels.append(current)
            current = None
    return kernels


def demangle(name: str) -> str:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return name
    text = subprocess.run([tool], input=name, capture_output=True, text=True).stdout.strip() or name
    text = re.sub(r"\(anonymous namespace\)::|cl_fast::cuda::", "", text)
    return re.sub(r"\(.*\)$", "", text)  # drop the parameter list


KERNEL_FILES = [p.name for p in cu_files() if not is_registration(p)]
KERNEL_JOBS = [(name, arch) for name in KERNEL_FILES for arch in ARCHES]


@pytest.mark.parametrize("name,arch", KERNEL_JOBS)
def test_kernels_compile_without_spills(name, arch):
    result = all_results()[(name, arch)]
    assert result["returncode"] == 0, f"nvcc failed for {name} ({arch}):\n{result['log'][-4000:]}"
    kernels = ptxas_report(result["log"])
    assert kernels, f"no ptxas report for {name} ({arch}): is -Xptxas -v honoured?\n{result['log'][-2000:]}"
    bad = [k for k in kernels if k["spill_stores"] or k["spill_loads"] or k["stack"]]
    assert not bad, "register spills / local stack frames:\n" + "\n".join(map(str, bad))
    big = [k for k in kernels if k["smem"] > MAX_STATIC_SMEM]
    assert not big, "static shared memory over 48 KB:\n" + "\n".join(map(str, big))


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernels_have_no_atomics_or_fences(name):
    """Row-stationary and deterministic: no atomic (atom./red.) and no memory fence in any kernel's PTX."""
    result = all_results()[(name, "ptx")]
    assert result["returncode"] == 0, f"nvcc -ptx failed for {name}:\n{result['log'][-4000:]}"
    assert not result["atomics"], f"atomics in {name}: {sorted(set(result['atomics']))}"
    assert not result["fences"], f"fences in {name}: {sorted(set(result['fences']))}"


def test_registrations_compile():
    """The torch registration files (csrc/cuda/<family>.cu), compile-only, against this torch."""
    pytest.importorskip("torch")
    result = all_results()[(registrations_unit().name, "registrations")]
    names = [p.name for p in cu_files() if is_registration(p)]
    assert result["returncode"] == 0, f"nvcc failed for {names}:\n{result['log'][-4000:]}"


def test_every_family_registers_cuda_kernels():
    registered = "".join(p.read_text() for p in cu_files() if is_registration(p))
    for op in ["ntxent_fwd", "ntxent_bwd", "cross_fwd", "cross_bwd", "moco_fwd", "moco_queue_update_", "byol_fwd",
               "byol_bwd", "sinkhorn", "sinkhorn_col_lse", "sinkhorn_assign", "siglip_fwd", "siglip_bwd",
               "infonce_block_fwd", "infonce_block_bwd"]:
        assert f'm.impl("{op}"' in registered, f"{op} has no CUDA registration"


def table() -> str:
    rows = ["| file | arch | kernel | registers | stack (B) | spill stores / loads (B) | static smem (B) |",
            "|---|---|---|---|---|---|---|"]
    for (name, arch), result in sorted(all_results().items()):
        if result["registration"] or arch == "ptx":
            continue
        for k in ptxas_report(result["log"]):
            rows.append(f"| {name} | {k['arch']} | `{k['kernel']}` | {k['registers']} | {k['stack']} | "
                        f"{k['spill_stores']} / {k['spill_loads']} | {k['smem']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        Path(sys.argv[2]).write_text(table())
    else:
        print(table())
