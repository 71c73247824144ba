"""SwAV's Sinkhorn-Knopp assignment in Triton: log domain, streaming the scores, fp32 math.

The contract is SPEC.md's `sinkhorn`. Notation: x = scores / eps (B x K). SwAV's iterations keep
Q[k, b] = exp(x_bk + f_k + g_b) up to constants (which cancel in the final row normalisation),
with the two scaling vectors updated in the log domain:

    prototype step  f_k = -lse_b (x_bk + g_b)      (g = 0 before the first step)
    sample step     g_b = -lse_k (x_bk + f_k)
    output          out[b, :] = softmax_k(x_b + f)  (the last sample step, written out)

Only f (K fp32) and per-block partials are stored; no (B, K) tensor except the output. Every
exp has its argument shifted by a maximum, so any finite scores give a finite result (a single
global shift is not enough: rows far below it underflow to all zeros).

Kernels, in the order one iteration runs them:

1. `_col_lse_kernel` (grid: row blocks of BLOCK_B rows). With f (HAS_F), first the sample step
   of its rows: g = -lse_k (x + f), an online (max, sum) over K tiles. Then a second sweep over
   the same K tiles writes the column partials of z = x + g over its rows:
   part_max[blk, k] = max_b z_bk, part_sum[blk, k] = sum_b exp(z_bk - part_max).
2. `_col_merge_kernel` (grid: K tiles): merges the row-block partials per column into
   col_max, col_sum (the column log-sum-exp is col_max + log col_sum) and the new f = -that.
   Distributed runs all-reduce (col_max, col_sum) between ranks instead (cl_fast/swav.py).
3. After the last iteration, `_assign_kernel` (grid: row blocks): row lse of x + f, then a second
   sweep writes out = exp(x + f - lse) in fp32.

Backend interface (the CPU kernels in csrc/cpu/sinkhorn.cpp have the same three):
    sinkhorn(scores, inv_eps, iterations) -> out (B, K) fp32          (iterations >= 1)
    sinkhorn_col_lse(scores, inv_eps, f or None) -> (col_max (K,), col_sum (K,)), local rows
    sinkhorn_assign(scores, inv_eps, f) -> out (B, K) fp32
scores: contiguous (B, K) fp32/fp16/bf16; f: contiguous (K,) fp32.
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["sinkhorn", "sinkhorn_col_lse", "sinkhorn_assign", "sm90_specs"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# K (the number of prototypes, fixed for a model) is a tl.constexpr of the K-loop kernels: the
# interpreter cannot use a runtime int as a range() bound (numpy >= 2.4 refuses int() of the
# 1-element array it stores), and on a GPU it costs one compile per model.
# Rows per program of the row-block kernels: fixed (not tuned) because it sets the number of
# column partials the launcher allocates.
_BLOCK_B = 8 if _INTERPRET else 16
_MERGE_BLOCK_K = 32 if _INTERPRET else 256
_MERGE_BLOCK_P = 8 if _INTERPRET else 16


# (BLOCK_K, num_warps) of the K-loop kernels' autotune configs on a GPU
_GPU_K_TILES = ((128, 4), (256, 4), (256, 8), (512, 8), (1024, 8))


def _configs():
    """K-tile width and warps: one small config under the interpreter, tuned on a GPU."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_K": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_K": block_k}, num_warps=warps) for block_k, warps in _GPU_K_TILES]


@triton.jit
def _logits_tile(scores_ptr, f_ptr, rows, cols, B, K, stride, inv_eps, HAS_F: tl.constexpr):
    """x (+ f) for one (rows x cols) tile in fp32; -inf outside the matrix."""
    mask = (rows < B)[:, None] & (cols < K)[None, :]
    ptrs = scores_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :]
    x = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32) * inv_eps
    if HAS_F:
        x += tl.load(f_ptr + cols, mask=cols < K, other=0.0)[None, :]
    return x


@triton.jit
def _finite_shift(m):
    """The shift for exp(v - shift): the max, or 0 where nothing finite was seen (max = -inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _row_lse(scores_ptr, f_ptr, rows, B, K: tl.constexpr, stride, inv_eps,
             HAS_F: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """lse_k (x_bk (+ f_k)) for a block of rows: online max and rescaled sum over the K tiles."""
    row_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _logits_tile(scores_ptr, f_ptr, rows, cols, B, K, stride, inv_eps, HAS_F)
        new_max = tl.maximum(row_max, tl.max(x, axis=1))
        shift = _finite_shift(new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        row_max = new_max
    return _finite_shift(row_max) + tl.log(tl.where(rows < B, row_sum, 1.0))


@triton.autotune(configs=_configs(), key=["K"])
@triton.jit
def _col_lse_kernel(scores_ptr, f_ptr, part_max_ptr, part_sum_ptr, B, K: tl.constexpr, stride, inv_eps,
                    HAS_F: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    if HAS_F:
        g = -_row_lse(scores_ptr, f_ptr, rows, B, K, stride, inv_eps, True, BLOCK_B, BLOCK_K)
        g = tl.where(rows < B, g, 0.0)  # rows past B hold -inf: keep them -inf, not -inf + inf
    else:
        g = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        z = _logits_tile(scores_ptr, f_ptr, rows, cols, B, K, stride, inv_eps, False) + g[:, None]
        col_max = tl.max(z, axis=0)
        col_sum = tl.sum(tl.exp(z - _finite_shift(col_max)[None, :]), axis=0)
        out = pid.to(tl.int64) * K + cols
        tl.store(part_max_ptr + out, col_max, mask=cols < K)
        tl.store(part_sum_ptr + out, col_sum, mask=cols < K)


@triton.jit
def _col_merge_kernel(part_max_ptr, part_sum_ptr, col_max_ptr, col_sum_ptr, f_ptr, NUM_PARTS, K,
                      BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_max = tl.full([BLOCK_K], float("-inf"), tl.float32)
    col_sum = tl.zeros([BLOCK_K], tl.float32)
    # A while loop (not range): NUM_PARTS follows B, which must not be a constexpr (one compile
    # per batch size) and which the interpreter cannot use as a range() bound. p0 starts as an
    # int32 tensor, not the literal 0, so the loop-carried type does not change.
    p0 = tl.program_id(0) * 0
    while p0 < NUM_PARTS:
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = (parts < NUM_PARTS)[:, None] & (cols < K)[None, :]
        offs = parts.to(tl.int64)[:, None] * K + cols[None, :]
        part_max = tl.load(part_max_ptr + offs, mask=mask, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + offs, mask=mask, other=0.0)
        new_max = tl.maximum(col_max, tl.max(part_max, axis=0))
        shift = _finite_shift(new_max)
        col_sum = col_sum * tl.exp(col_max - shift) + tl.sum(part_sum * tl.exp(part_max - shift[None, :]), axis=0)
        col_max = new_max
        p0 += BLOCK_P
    tl.store(col_max_ptr + cols, col_max, mask=cols < K)
    tl.store(col_sum_ptr + cols, col_sum, mask=cols < K)
    f = -(_finite_shift(col_max) + tl.log(tl.where(cols < K, col_sum, 1.0)))
    tl.store(f_ptr + cols, f, mask=cols < K)


@triton.autotune(configs=_configs(), key=["K"])
@triton.jit
def _assign_kernel(scores_ptr, f_ptr, out_ptr, B, K: tl.constexpr, stride, inv_eps,
                   BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    lse = _row_lse(scores_ptr, f_ptr, rows, B, K, stride, inv_eps, True, BLOCK_B, BLOCK_K)
    lse = tl.where(rows < B, lse, 0.0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _logits_tile(scores_ptr, f_ptr, rows, cols, B, K, stride, inv_eps, True)
        mask = (rows < B)[:, None] & (cols < K)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], tl.exp(x - lse[:, None]), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _column_step(scores, inv_eps, f):
    """(col_max, col_sum, -(col lse)) over the rows of scores, g from f (None: g = 0)."""
    num_rows, num_protos = scores.shape
    num_parts = triton.cdiv(num_rows, _BLOCK_B)
    part_max = torch.empty((num_parts, num_protos), dtype=torch.float32, device=scores.device)
    part_sum = torch.empty_like(part_max)
    _col_lse_kernel[(num_parts,)](
        scores, part_max if f is None else f, part_max, part_sum, num_rows, num_protos, scores.stride(0),
        float(inv_eps), HAS_F=f is not None, BLOCK_B=_BLOCK_B,
    )
    col_max = torch.empty(num_protos, dtype=torch.float32, device=scores.device)
    col_sum, f_next = torch.empty_like(col_max), torch.empty_like(col_max)
    _col_merge_kernel[(triton.cdiv(num_protos, _MERGE_BLOCK_K),)](
        part_max, part_sum, col_max, col_sum, f_next, num_parts, num_protos,
        BLOCK_P=_MERGE_BLOCK_P, BLOCK_K=_MERGE_BLOCK_K,
    )
    return col_max, col_sum, f_next


def sinkhorn_col_lse(scores, inv_eps, f=None):
    """Per-column (max, sum exp(x + g - max)) over this process's rows (g from f; None: g = 0)."""
    col_max, col_sum, _ = _column_step(scores, inv_eps, f)
    return col_max, col_sum


def sinkhorn_assign(scores, inv_eps, f):
    """out[b, :] = softmax_k(scores[b, :] * inv_eps + f), fp32."""
    num_rows, num_protos = scores.shape
    out = torch.empty((num_rows, num_protos), dtype=torch.float32, device=scores.device)
    _assign_kernel[(triton.cdiv(num_rows, _BLOCK_B),)](
        scores, f, out, num_rows, num_protos, scores.stride(0), float(inv_eps), BLOCK_B=_BLOCK_B,
    )
    return out


def sinkhorn(scores, inv_eps, iterations):
    """The whole single-process assignment: `iterations` column steps, then the assign pass."""
    if iterations < 1:
        raise ValueError(f"the fused kernel needs iterations >= 1, got {iterations}")
    f = None
    for _ in range(iterations):
        _, _, f = _column_step(scores, inv_eps, f)
    return sinkhorn_assign(scores, inv_eps, f)


# ---------------------------------------------------------------------------------------------
# Offline compile specs (tests/test_triton_sm90.py compiles them for sm_90 without a GPU)
# ---------------------------------------------------------------------------------------------
def sm90_specs():
    """One spec per kernel and GPU autotune config at SwAV's size, K = 3000 prototypes, bf16 scores,
    the column step with f (every iteration after the first). Dicts with name, fn (the
    @triton.jit function), signature, constexprs, num_warps, num_stages (Triton's default 3),
    config and no_atomics (benchmarks/ptx_table.py)."""
    K = 3000
    col_signature = {"scores_ptr": "*bf16", "f_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
                     "B": "i32", "stride": "i32", "inv_eps": "fp32"}
    assign_signature = {"scores_ptr": "*bf16", "f_ptr": "*fp32", "out_ptr": "*fp32", "B": "i32", "stride": "i32",
                        "inv_eps": "fp32"}
    merge_signature = {"part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "col_max_ptr": "*fp32",
                       "col_sum_ptr": "*fp32", "f_ptr": "*fp32", "NUM_PARTS": "i32", "K": "i32"}
    specs = []
    for block_k, warps in _GPU_K_TILES:
        specs.append(("sinkhorn_col_lse[bf16,K=3000]", _col_lse_kernel.fn, col_signature,
                      {"K": K, "HAS_F": True, "BLOCK_B": 16, "BLOCK_K": block_k}, warps))
        specs.append(("sinkhorn_assign[bf16,K=3000]", _assign_kernel.fn, assign_signature,
                      {"K": K, "BLOCK_B": 16, "BLOCK_K": block_k}, warps))
    specs.append(("sinkhorn_col_merge", _col_merge_kernel, merge_signature, {"BLOCK_P": 16, "BLOCK_K": 256}, 4))
    return [
        dict(name=name, fn=fn, signature=dict(signature, **{key: "constexpr" for key in constexprs}),
             constexprs=constexprs, num_warps=warps, num_stages=3,
             config=" ".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK")) + f" w={warps} s=3",
             no_atomics=True)
        for name, fn, signature, constexprs, warps in specs
    ]
