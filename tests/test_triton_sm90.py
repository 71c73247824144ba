"""What the compiler emits for sm_90, checked without a GPU (PLAN.md, "sm_90 compile checks").

Every `cl_fast/triton_kernels/<family>.py` with `sm90_specs()` is compiled offline for
GPUTarget("cuda", 90, 64), one spec per autotune config (benchmarks/ptx_table.py does the
compiling, in a subprocess with TRITON_INTERPRET=0). Asserted per kernel: no register spills,
shared memory within sm_90's 227 KB per block, no `acq_rel` / `membar` in the PTX, and no global
atomics at all in the kernels that must have none (the nt_xent and cross backward). A module
without `sm90_specs()` yet is reported as a skip with its name, never silently passed over.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ptx_table  # noqa: E402

pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas) to compile for sm_90")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx") / "rows.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ptx_table.py"), "--no-md",
                           "--json", str(out), "--jobs", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    print(proc.stdout)  # the table, shown with -s or on failure
    assert out.exists(), f"ptx_table.py did not run:\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("module", ptx_table.module_names())
def test_module_kernels_compile_clean_for_sm90(module, compiled):
    short = module.split(".")[-1]
    if module in compiled["missing"]:
        pytest.skip(f"{module} has no sm90_specs() yet: its kernels are not compile-checked")
    rows = [r for r in compiled["rows"] if r["module"] == short]
    assert rows, f"{module}.sm90_specs() returned no specs"
    problems = {f"{r['kernel']} [{r['config']}]": ptx_table.violations(r) for r in rows}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, problems


def test_infonce_backward_kernels_are_atomic_free(compiled):
    rows = [r for r in compiled["rows"] if r["module"] == "infonce" and "bwd" in r["kernel"]]
    assert {r["kernel"].split("[")[0] for r in rows} >= {"ntxent_bwd", "cross_bwd"}
    for r in rows:
        assert r["no_atomics"] and r.get("global_atomics") == 0, r


def test_infonce_kernels_use_tensor_cores_for_every_dtype(compiled):
    rows = [r for r in compiled["rows"] if r["module"] == "infonce" and "prep" not in r["kernel"]]
    for r in rows:
        assert r["wgmma"] + r["mma_sync"] > 0, f"{r['kernel']} [{r['config']}] has no MMA instruction"
