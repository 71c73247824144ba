"""InfoNCE block pieces in Triton: rows against one slice of columns (the distributed losses' unit).

The contract is PLAN.md's / cl_fast/_ops/infonce.py's; the dense math is cl_fast/reference.py
(infonce_block_excluded, infonce_block_lse, infonce_block_grad). With S = scale * rows cols^T
(fp32 accumulation, features as given: no normalisation, any magnitude) and row i's excluded
columns e1_i = i + diag (pairs=False: the positive; pairs=True: the row itself) and, with pairs,
e2_i = diag + (i + M/2) mod M (the positive):

  block_fwd: lse_i = log sum_{j in [0, C), j != e1_i, e2_i} exp(S_ij)   (-inf when nothing is left)
  block_bwd: P_ij = exp(S_ij - lse_i) with the MERGED lse, dS_ij = grad_i P_ij on the kept columns,
             drows = scale dS cols, dcols = scale dS^T rows, dscale = sum_ij dS_ij <rows_i, cols_j>.

Features of any finite magnitude: a dot <rows_i, cols_j> may overflow fp32 (|x| ~ 1e22 with a
scale of 1e-20 gives |S| ~ 1e24, an fp32 number, from a dot ~ 1e44, which is not). So
0. `_scale_rows_kernel` (rows and cols, one launch each): x = p x' with p = 2^floor(log2 max|x|)
   per row, x' = x / p an exact copy in the input dtype (max |x'| in [1, 2)). The tiles multiply the
   x' (dots' bounded by 4 D, never overflowing) and S_ij = (dots'_ij (scale p_i)) q_j, with p, q
   the rows' and the columns' powers of two.
Kernels (the layout of the fused-attention forward and its split dQ / dK,dV backward):
1. `_fwd_kernel`: one program per row block of BM rows, stationary in registers; it streams the
   column blocks of BN columns with an online max m and sum l (l <- l e^(m - m') + sum e^(S - m')),
   lse = m + log l. The running max starts at a finite -3e38, so a row whose every column is
   excluded ends with l = 0 and lse = -inf, never NaN.
2. `_bwd_rows_kernel`: one program per row block; drows_I = scale sum_J (dS_IJ q_J) cols'_J
   accumulated in registers, and each row's share of dscale, p_i sum_j (dS_ij q_j) dots'_ij,
   written to an (M,) buffer that one torch.sum reduces (a fixed order: deterministic).
3. `_bwd_cols_kernel`: one program per column block, stationary; it streams the row blocks (with
   their grad and lse) and recomputes the transposed tiles S^T from cols'_J rows'_I^T, so that
   dcols_J = scale sum_I (dS_IJ^T p_I) rows'_I accumulates in registers.
Each output element is written by exactly one program: no atomics, no host syncs, bit-identical
repeats. Only the tiles that may hold an excluded (i, j) (`_meets` the excluded index ranges,
computed once per program) or a ragged column edge take the masked path; the others run
unmasked. Rows whose lse is not finite (no column in any slice) contribute nothing: their grad is
taken as 0 and their lse as +inf, so P = 0 without a mask.

The tile helpers (`_dot`: tf32x3 for fp32, the interpreter's bf16 upcast; `_load_rows`,
`_store_block`) and the launch conventions (scale loaded on the device, MAX_DIM, the autotune
buckets) are cl_fast/triton_kernels/infonce.py's; that module re-exports block_fwd / block_bwd,
which cl_fast/_ops/infonce.py reaches as `_dispatch.module("triton", "infonce")`. It is always
imported first (cl_fast's import of _dispatch loads it), and imports this module at its end.
"""
import math

import torch
import triton
import triton.language as tl

from .. import _checks
from .infonce import (MAX_DIM, _AUTOTUNE, _INTERPRET, _M_INIT, _PREP_BLOCK, _TRITON_DTYPE, _d_bucket, _dot,
                      _dtype_class, _load_rows, _n_bucket, _store_block, _store_rows)

__all__ = ["block_fwd", "block_bwd", "MAX_DIM", "sm90_specs"]

# ---------------------------------------------------------------------------------------------
# Tile configurations: (BM rows, BN columns, num_warps, num_stages) per kernel, dtype class and
# D bucket. "fwd" and "rows" keep a BM-row block stationary and stream BN-column tiles; "cols"
# keeps a BN-column block stationary and streams BM-row tiles. The backward's (BM or BN, D_PAD)
# fp32 accumulator costs BM * D_PAD / (32 * warps) registers a thread, kept <= 64.
# Checked offline for sm_90 by tests/test_triton_sm90.py at D = 128 (no spills, shared <= 227 KB).
# Compiled by hand at the wider buckets: fp16/bf16 and fp32 D = 256's forward are clean; fp32's
# backward spills 8-32 bytes at D = 256, and every fp32 kernel spills kilobytes from D = 512 on
# (tf32x3 splits the whole (rows, D) operands; a D-sliced dot would cure it, not done yet).
# ---------------------------------------------------------------------------------------------
_CONFIGS = {
    ("fwd", "half", 128): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("fwd", "half", 256): [(64, 64, 4, 3)],
    ("fwd", "half", 512): [(32, 32, 4, 2)],
    ("fwd", "half", 1024): [(32, 32, 8, 2)],
    ("fwd", "fp32", 128): [(64, 32, 4, 2)],
    ("fwd", "fp32", 256): [(64, 16, 4, 2), (64, 32, 8, 2)],
    ("fwd", "fp32", 512): [(16, 16, 4, 1)],
    ("fwd", "fp32", 1024): [(16, 16, 4, 1)],
    ("rows", "half", 128): [(64, 64, 8, 2), (64, 128, 8, 2)],
    ("rows", "half", 256): [(32, 64, 8, 2)],
    ("rows", "half", 512): [(32, 32, 8, 1)],
    ("rows", "half", 1024): [(16, 32, 8, 1)],
    ("rows", "fp32", 128): [(32, 32, 8, 1), (16, 32, 8, 2)],
    ("rows", "fp32", 256): [(16, 16, 8, 1)],
    ("rows", "fp32", 512): [(16, 16, 8, 1)],
    ("rows", "fp32", 1024): [(16, 16, 8, 1)],
    ("cols", "half", 128): [(64, 64, 8, 2), (128, 64, 8, 2)],
    ("cols", "half", 256): [(64, 32, 8, 2)],
    ("cols", "half", 512): [(32, 32, 8, 1)],
    ("cols", "half", 1024): [(32, 16, 8, 1)],
    ("cols", "fp32", 128): [(32, 32, 8, 2)],
    ("cols", "fp32", 256): [(16, 16, 8, 1)],
    ("cols", "fp32", 512): [(16, 16, 8, 1)],
    ("cols", "fp32", 1024): [(16, 16, 8, 1)],
}
_INTERPRET_SHAPE = (32, 32, 4, 1)  # the interpreter pays per tile step


def configs_for(kind, dtype_class, d_pad):
    """The (BM, BN, num_warps, num_stages) tuples a kernel kind is tuned over for one width."""
    if _INTERPRET:
        return [_INTERPRET_SHAPE]
    shapes = _CONFIGS[kind, dtype_class, _d_bucket(d_pad)]
    return shapes if _AUTOTUNE else shapes[:1]


def _tuned(kind):
    """Autotune over the kind's shapes, pruned to the dtype class and D bucket of the call. The key
    holds D (and the dtypes, which the autotuner adds) and buckets of both extents: the grid runs
    over one of them and each program's loop over the other."""
    if _INTERPRET:
        shapes = [_INTERPRET_SHAPE]
    else:
        shapes = sorted({s for (k, _, _), v in _CONFIGS.items() if k == kind for s in v})
    configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in shapes]

    def prune(configs, named_args, **kwargs):
        wanted = set(configs_for(kind, _dtype_class(named_args["rows_ptr"].dtype),
                                 triton.next_power_of_2(named_args["D"])))
        return [c for c in configs if (c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) in wanted]

    return triton.autotune(configs=configs, key=["D", "M_BUCKET", "C_BUCKET"],
                           prune_configs_by={"early_config_prune": prune})


# ---------------------------------------------------------------------------------------------
# Row prescaling: x = p x', p a power of two
# ---------------------------------------------------------------------------------------------
@triton.jit
def _scale_rows_kernel(x_ptr, xs_ptr, p_ptr, R, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """xs = x / p (exact), p = 2^floor(log2 max|x|) per row (1 for zero or subnormal rows)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < R
    x = _load_rows(x_ptr, rows, mask, D, D_PAD).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    p = (amax.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)  # exponent bits
    p = tl.where(p > 0, p, 1.0)
    _store_rows(xs_ptr, rows, mask, x / p[:, None], D, D_PAD)  # a division: 1 / 2^127 is subnormal
    tl.store(p_ptr + rows, p, mask=mask)


# ---------------------------------------------------------------------------------------------
# Excluded pairs
# ---------------------------------------------------------------------------------------------
@triton.jit
def _positive_col(i, diag, M):
    """e2_i = diag + (i + M/2) mod M for row indices i in [0, M)."""
    half = M // 2
    return tl.where(i < half, i + half, i - half) + diag


@triton.jit
def _range(lo, hi):
    """An index range [lo, hi); an empty one as [0, 0), which no tile [a, b) with a >= 0 meets."""
    empty = lo >= hi
    return tl.where(empty, 0, lo), tl.where(empty, 0, hi)


@triton.jit
def _cols_excluded_by(i0, i1, diag, M, PAIRS: tl.constexpr):
    """The columns that rows [i0, i1) exclude, as three ranges (once per row-stationary program):
    self [i0, i1) + diag; with PAIRS the positives, + M/2 for the rows below M/2 and - M/2 for
    the others (each contiguous)."""
    self_lo, self_hi = _range(i0 + diag, i1 + diag)
    if PAIRS:
        half = M // 2
        lo_a, hi_a = _range(i0 + half + diag, tl.minimum(i1, half) + half + diag)
        lo_b, hi_b = _range(tl.maximum(i0, half) - half + diag, i1 - half + diag)
    else:
        lo_a, hi_a, lo_b, hi_b = 0, 0, 0, 0
    return self_lo, self_hi, lo_a, hi_a, lo_b, hi_b


@triton.jit
def _rows_excluding(j0, j1, diag, M, PAIRS: tl.constexpr):
    """The rows that exclude a column of [j0, j1), as three ranges (once per column-stationary
    program): self rows [j0, j1) - diag; with PAIRS, u = e2 - diag in [j0, j1) - diag within
    [0, M) is row u - M/2 (u >= M/2) or u + M/2 (u < M/2)."""
    self_lo, self_hi = _range(j0 - diag, j1 - diag)
    if PAIRS:
        half = M // 2
        u_lo = tl.maximum(j0 - diag, 0)
        u_hi = tl.minimum(j1 - diag, M)
        lo_a, hi_a = _range(tl.maximum(u_lo, half) - half, u_hi - half)
        lo_b, hi_b = _range(u_lo + half, tl.minimum(u_hi, half) + half)
    else:
        lo_a, hi_a, lo_b, hi_b = 0, 0, 0, 0
    return self_lo, self_hi, lo_a, hi_a, lo_b, hi_b


@triton.jit
def _meets(ranges, a, b):
    """Whether the tile extent [a, b) meets one of the three ranges."""
    lo1, hi1, lo2, hi2, lo3, hi3 = ranges
    return ((a < hi1) & (b > lo1)) | ((a < hi2) & (b > lo2)) | ((a < hi3) & (b > lo3))


@triton.jit
def _row_stats(grad_ptr, lse_ptr, i, row_mask):
    """(grad, lse) of rows i; rows past M or with a non-finite lse get grad 0 and lse +inf, so that
    g exp(S - lse) = 0 for them without a mask (the reference leaves such rows out)."""
    lse = tl.load(lse_ptr + i, mask=row_mask, other=float("inf"))
    g = tl.load(grad_ptr + i, mask=row_mask, other=0.0)
    finite = (lse > float("-inf")) & (lse < float("inf"))  # False for NaN too
    return tl.where(finite, g, 0.0), tl.where(finite, lse, float("inf"))


@triton.jit
def _weighted_dot(W, x, UPCAST_DOT: tl.constexpr):
    """W @ x for fp32 weights W and features x, W cast to x's dtype for the tensor cores. fp16 has
    5 exponent bits and weights like g P ~ 1 / (M C) flush to zero: each row of W is scaled to its
    max first (exact algebra, multiplied back in fp32)."""
    DTYPE: tl.constexpr = x.dtype
    if DTYPE == tl.float16:
        w_scale = tl.max(tl.abs(W), 1)
        w_scale = tl.where(w_scale > 0, w_scale, 1.0)
        return _dot((W / w_scale[:, None]).to(DTYPE), x, UPCAST_DOT) * w_scale[:, None]
    else:
        return _dot(W.to(DTYPE), x, UPCAST_DOT)


# ---------------------------------------------------------------------------------------------
# Forward: online log-sum-exp of a row block
# ---------------------------------------------------------------------------------------------
# In the tiles below, S = (dots' (scale p_i)) q_j in this order: no intermediate overflows unless S does.
@triton.jit
def _fwd_step(j, x, a_row, self_col, pos_col, excluded_cols, cols_ptr, q_ptr, C, m, l,
              PAIRS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
              UPCAST_DOT: tl.constexpr):
    """Fold column block j into the rows' running (max m, sum l of exp(S - m))."""
    j0 = j * BN
    cols = j0 + tl.arange(0, BN)
    col_mask = cols < C
    c = _load_rows(cols_ptr, cols, col_mask, D, D_PAD)
    q = tl.load(q_ptr + cols, mask=col_mask, other=1.0)
    S = (_dot(x, tl.trans(c), UPCAST_DOT) * a_row[:, None]) * q[None, :]
    if (j0 + BN > C) | _meets(excluded_cols, j0, j0 + BN):
        keep = col_mask[None, :] & (cols[None, :] != self_col[:, None])
        if PAIRS:
            keep = keep & (cols[None, :] != pos_col[:, None])
        S = tl.where(keep, S, float("-inf"))
    m_new = tl.maximum(m, tl.max(S, 1))
    l = l * tl.exp(m - m_new) + tl.sum(tl.exp(S - m_new[:, None]), 1)
    return m_new, l


@_tuned("fwd")
@triton.jit
def _fwd_kernel(rows_ptr, cols_ptr, p_ptr, q_ptr, scale_ptr, lse_ptr, M, C, diag, M_BUCKET, C_BUCKET,
                D: tl.constexpr, D_PAD: tl.constexpr, PAIRS: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """lse of rows [i0, i0 + BM) over the slice's kept columns (rows, cols: the prescaled x')."""
    scale = tl.load(scale_ptr)
    i0 = tl.program_id(0) * BM
    i = i0 + tl.arange(0, BM)
    row_mask = i < M
    x = _load_rows(rows_ptr, i, row_mask, D, D_PAD)
    a_row = scale * tl.load(p_ptr + i, mask=row_mask, other=1.0)
    self_col = i + diag
    pos_col = _positive_col(i, diag, M)
    excluded_cols = _cols_excluded_by(i0, tl.minimum(i0 + BM, M), diag, M, PAIRS)
    m = tl.zeros((BM,), tl.float32) + _M_INIT
    l = tl.zeros((BM,), tl.float32)
    n_blocks = tl.cdiv(C, BN)
    # the interpreter passes scalars as arrays, which range() rejects: a while loop there
    if INTERPRET:
        j = 0
        while j < n_blocks:
            m, l = _fwd_step(j, x, a_row, self_col, pos_col, excluded_cols, cols_ptr, q_ptr, C, m, l,
                             PAIRS, BN, D, D_PAD, UPCAST_DOT)
            j += 1
    else:
        for j in range(0, n_blocks):
            m, l = _fwd_step(j, x, a_row, self_col, pos_col, excluded_cols, cols_ptr, q_ptr, C, m, l,
                             PAIRS, BN, D, D_PAD, UPCAST_DOT)
    tl.store(lse_ptr + i, m + tl.log(l), mask=row_mask)  # l = 0: -3e38 + -inf = -inf


# ---------------------------------------------------------------------------------------------
# Backward 1: drows and the dscale shares, row-stationary
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rows_step(j, x, a_row, g, lse, self_col, pos_col, excluded_cols, cols_ptr, q_ptr, C, acc, dsc,
               PAIRS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
               UPCAST_DOT: tl.constexpr):
    """acc += W cols'_J, dsc += sum_j W_ij dots'_ij for column block j, W_ij = dS_ij q_j."""
    j0 = j * BN
    cols = j0 + tl.arange(0, BN)
    col_mask = cols < C
    c = _load_rows(cols_ptr, cols, col_mask, D, D_PAD)
    q = tl.load(q_ptr + cols, mask=col_mask, other=1.0)
    dots = _dot(x, tl.trans(c), UPCAST_DOT)
    dS = g[:, None] * tl.exp((dots * a_row[:, None]) * q[None, :] - lse[:, None])
    # a zero-padded column has S = 0, whose exp(0 - lse) may overflow: masked with the excluded ones
    if (j0 + BN > C) | _meets(excluded_cols, j0, j0 + BN):
        keep = col_mask[None, :] & (cols[None, :] != self_col[:, None])
        if PAIRS:
            keep = keep & (cols[None, :] != pos_col[:, None])
        dS = tl.where(keep, dS, 0.0)
    W = dS * q[None, :]
    dsc += tl.sum(W * dots, 1)
    acc += _weighted_dot(W, c, UPCAST_DOT)
    return acc, dsc


@_tuned("rows")
@triton.jit
def _bwd_rows_kernel(grad_ptr, rows_ptr, cols_ptr, p_ptr, q_ptr, scale_ptr, lse_ptr, drows_ptr, dsc_ptr,
                     M, C, diag, M_BUCKET, C_BUCKET, D: tl.constexpr, D_PAD: tl.constexpr, PAIRS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """drows of rows [i0, i0 + BM) and their dscale shares dsc_i = sum_j dS_ij <rows_i, cols_j>."""
    scale = tl.load(scale_ptr)
    i0 = tl.program_id(0) * BM
    i = i0 + tl.arange(0, BM)
    row_mask = i < M
    x = _load_rows(rows_ptr, i, row_mask, D, D_PAD)
    p = tl.load(p_ptr + i, mask=row_mask, other=1.0)
    a_row = scale * p
    g, lse = _row_stats(grad_ptr, lse_ptr, i, row_mask)
    self_col = i + diag
    pos_col = _positive_col(i, diag, M)
    excluded_cols = _cols_excluded_by(i0, tl.minimum(i0 + BM, M), diag, M, PAIRS)
    acc = tl.zeros((BM, D_PAD), tl.float32)
    dsc = tl.zeros((BM,), tl.float32)
    n_blocks = tl.cdiv(C, BN)
    if INTERPRET:
        j = 0
        while j < n_blocks:
            acc, dsc = _rows_step(j, x, a_row, g, lse, self_col, pos_col, excluded_cols, cols_ptr, q_ptr, C,
                                  acc, dsc, PAIRS, BN, D, D_PAD, UPCAST_DOT)
            j += 1
    else:
        for j in range(0, n_blocks):
            acc, dsc = _rows_step(j, x, a_row, g, lse, self_col, pos_col, excluded_cols, cols_ptr, q_ptr, C,
                                  acc, dsc, PAIRS, BN, D, D_PAD, UPCAST_DOT)
    _store_block(drows_ptr, i0, M, scale * acc, D, BM, D_PAD)
    tl.store(dsc_ptr + i, p * dsc, mask=row_mask)


# ---------------------------------------------------------------------------------------------
# Backward 2: dcols, column-stationary
# ---------------------------------------------------------------------------------------------
@triton.jit
def _cols_step(t, j, c, q, excluding_rows, rows_ptr, p_ptr, grad_ptr, lse_ptr, scale, M, diag, acc,
               PAIRS: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
               UPCAST_DOT: tl.constexpr):
    """acc += (dS^T p_I) rows'_I for row block t, from the recomputed transposed tile of S."""
    i0 = t * BM
    i = i0 + tl.arange(0, BM)
    row_mask = i < M
    x = _load_rows(rows_ptr, i, row_mask, D, D_PAD)
    p = tl.load(p_ptr + i, mask=row_mask, other=1.0)
    # padded rows: g = 0 and lse = +inf give dS^T = 0 there; padded columns are never stored
    lse = tl.load(lse_ptr + i, mask=row_mask, other=float("inf"))
    g = tl.load(grad_ptr + i, mask=row_mask, other=0.0)
    finite = (lse > float("-inf")) & (lse < float("inf"))  # `_row_stats`, inline: one call less a tile
    g = tl.where(finite, g, 0.0)
    lse = tl.where(finite, lse, float("inf"))
    S_t = (_dot(c, tl.trans(x), UPCAST_DOT) * (scale * p)[None, :]) * q[:, None]
    dS_t = g[None, :] * tl.exp(S_t - lse[None, :])
    if _meets(excluding_rows, i0, i0 + BM):
        keep = j[:, None] != (i + diag)[None, :]
        if PAIRS:
            half = M // 2
            keep = keep & (j[:, None] != (tl.where(i < half, i + half, i - half) + diag)[None, :])
        dS_t = tl.where(keep, dS_t, 0.0)
    acc += _weighted_dot(dS_t * p[None, :], x, UPCAST_DOT)
    return acc


@_tuned("cols")
@triton.jit
def _bwd_cols_kernel(grad_ptr, rows_ptr, cols_ptr, p_ptr, q_ptr, scale_ptr, lse_ptr, dcols_ptr, M, C, diag,
                     M_BUCKET, C_BUCKET, D: tl.constexpr, D_PAD: tl.constexpr, PAIRS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """dcols of columns [j0, j0 + BN)."""
    scale = tl.load(scale_ptr)
    j0 = tl.program_id(0) * BN
    j = j0 + tl.arange(0, BN)
    c = _load_rows(cols_ptr, j, j < C, D, D_PAD)
    q = tl.load(q_ptr + j, mask=j < C, other=1.0)
    excluding_rows = _rows_excluding(j0, tl.minimum(j0 + BN, C), diag, M, PAIRS)
    acc = tl.zeros((BN, D_PAD), tl.float32)
    n_blocks = tl.cdiv(M, BM)
    if INTERPRET:
        t = 0
        while t < n_blocks:
            acc = _cols_step(t, j, c, q, excluding_rows, rows_ptr, p_ptr, grad_ptr, lse_ptr, scale, M, diag, acc,
                             PAIRS, BM, D, D_PAD, UPCAST_DOT)
            t += 1
    else:
        for t in range(0, n_blocks):
            acc = _cols_step(t, j, c, q, excluding_rows, rows_ptr, p_ptr, grad_ptr, lse_ptr, scale, M, diag, acc,
                             PAIRS, BM, D, D_PAD, UPCAST_DOT)
    _store_block(dcols_ptr, j0, C, scale * acc, D, BN, D_PAD)


# ---------------------------------------------------------------------------------------------
# Launchers (the contract of cl_fast/_ops/infonce.py's infonce_block_fwd / infonce_block_bwd)
# ---------------------------------------------------------------------------------------------
def _check(rows, cols, scale, pairs):
    """Validate the slice; returns (M, C, D). Shapes and dtypes the kernels rely on, named."""
    _checks.check_features("rows", rows, min_rows=0)
    _checks.check_features("cols", cols, min_rows=0)
    if rows.dtype not in _TRITON_DTYPE:
        raise TypeError(f"rows must be float32, float16 or bfloat16 for the Triton kernels, got {rows.dtype}")
    if cols.dtype != rows.dtype:
        raise TypeError(f"cols must have the same dtype as rows: expected {rows.dtype}, got {cols.dtype}")
    if cols.shape[1] != rows.shape[1]:
        raise ValueError(f"cols must have D={rows.shape[1]} columns (rows'), got shape {tuple(cols.shape)}")
    if cols.device != rows.device:
        raise ValueError(f"cols must be on rows' device {rows.device}, got {cols.device}")
    if pairs and rows.shape[0] % 2:
        raise ValueError(f"rows must have an even number of rows when pairs=True (the two views), "
                         f"got shape {tuple(rows.shape)}")
    M, D = rows.shape
    if D > MAX_DIM:
        raise ValueError(f"feature dimension D={D} exceeds the Triton kernels' MAX_DIM={MAX_DIM}")
    # scale as csrc/ops.cpp's check_scalar: 0-d fp32 on the device; its value only where readable
    if not isinstance(scale, torch.Tensor) or scale.dim() != 0:
        got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"scale must be a 0-d tensor, got {got}")
    if scale.dtype != torch.float32:
        raise TypeError(f"scale must be float32, got {scale.dtype}")
    if scale.device != rows.device:
        raise ValueError(f"scale must be on the inputs' device {rows.device}, got {scale.device}")
    if _checks.host_readable(scale) and not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale must be finite and > 0, got {float(scale)}")
    return M, cols.shape[0], D


def _row_vector(name, value, M, rows):
    """A per-row fp32 vector (M,) on rows' device (csrc/ops.cpp's check_row_vector)."""
    if not isinstance(value, torch.Tensor) or value.shape != (M,):
        raise ValueError(f"{name} must be a 1-D tensor of shape ({M},), got "
                         f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if value.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {value.dtype}")
    if value.device != rows.device:
        raise ValueError(f"{name} must be on {rows.device}, got {value.device}")
    return value.contiguous()


def _launch_args(M, C, D, diag):
    # diag clamped to [-M, C] excludes the same columns (none beyond those bounds) and fits int32
    diag = min(max(int(diag), -M), C)
    return (M, C, diag, _n_bucket(max(M, 1)), _n_bucket(max(C, 1)), D), max(16, triton.next_power_of_2(D))


def _prescaled(x):
    """(x', p): x = p x' row by row, p (R,) fp32 powers of two (`_scale_rows_kernel`)."""
    R, D = x.shape
    xs = torch.empty_like(x)
    p = torch.empty(R, device=x.device, dtype=torch.float32)
    if R:
        _scale_rows_kernel[(triton.cdiv(R, _PREP_BLOCK),)](x, xs, p, R, D, D_PAD=max(16, triton.next_power_of_2(D)),
                                                           BLOCK_R=_PREP_BLOCK)
    return xs, p


def block_fwd(rows, cols, scale, diag, pairs):
    """-> lse (M,) fp32: each row's log-sum-exp over the slice's kept columns (-inf if none)."""
    M, C, D = _check(rows, cols, scale, pairs)
    rows, cols = rows.contiguous(), cols.contiguous()
    lse = torch.empty(M, device=rows.device, dtype=torch.float32)
    if M == 0:
        return lse
    args, d_pad = _launch_args(M, C, D, diag)
    (rows_s, p), (cols_s, q) = _prescaled(rows), _prescaled(cols)
    _fwd_kernel[lambda meta: (triton.cdiv(M, meta["BM"]),)](
        rows_s, cols_s, p, q, scale, lse, *args, D_PAD=d_pad, PAIRS=bool(pairs), UPCAST_DOT=_INTERPRET,
        INTERPRET=_INTERPRET)
    return lse


def block_bwd(grad, rows, cols, scale, lse, diag, pairs):
    """-> (drows (M, D), dcols (C, D), dscale ()) fp32: the gradients of sum_i grad_i lse_i through
    this slice's terms, P = exp(S - lse) with the merged lse."""
    M, C, D = _check(rows, cols, scale, pairs)
    grad = _row_vector("grad (upstream gradient of the rows' log-sum-exp)", grad, M, rows)
    lse = _row_vector("lse (the rows' log-sum-exp over every column slice)", lse, M, rows)
    rows, cols = rows.contiguous(), cols.contiguous()
    drows = torch.empty((M, D), device=rows.device, dtype=torch.float32)
    dcols = torch.empty((C, D), device=rows.device, dtype=torch.float32)
    dsc = torch.empty(M, device=rows.device, dtype=torch.float32)
    args, d_pad = _launch_args(M, C, D, diag)
    flags = dict(D_PAD=d_pad, PAIRS=bool(pairs), UPCAST_DOT=_INTERPRET, INTERPRET=_INTERPRET)
    (rows_s, p), (cols_s, q) = _prescaled(rows), _prescaled(cols)
    if M:
        _bwd_rows_kernel[lambda meta: (triton.cdiv(M, meta["BM"]),)](
            grad, rows_s, cols_s, p, q, scale, lse, drows, dsc, *args, **flags)
    if C:
        _bwd_cols_kernel[lambda meta: (triton.cdiv(C, meta["BN"]),)](
            grad, rows_s, cols_s, p, q, scale, lse, dcols, *args, **flags)
    # the rows' dscale shares, summed by one deterministic torch reduction (0 for M = 0)
    return drows, dcols, dsc.sum()


# ---------------------------------------------------------------------------------------------
# Offline sm_90 compile specs (tests/test_triton_sm90.py, benchmarks/ptx_table.py)
# ---------------------------------------------------------------------------------------------
def sm90_specs(widths=((torch.bfloat16, 128), (torch.float32, 128))):
    """One compile spec per autotune config of each kernel, per (dtype, D) of `widths`, pairs=True
    (the masked path with both excluded columns): dicts with name, fn, signature, constexprs,
    num_warps, num_stages, and no_atomics (none of the kernels has any); and the prescaling kernel."""
    specs = []
    for dtype, D in widths:
        ty = "*" + _TRITON_DTYPE[dtype]
        d_pad = max(16, triton.next_power_of_2(D))
        sizes = {"M": "i32", "C": "i32", "diag": "i32", "M_BUCKET": "i32", "C_BUCKET": "i32"}
        kernels = (
            ("block_fwd", "fwd", _fwd_kernel.fn,
             {"rows_ptr": ty, "cols_ptr": ty, "p_ptr": "*fp32", "q_ptr": "*fp32", "scale_ptr": "*fp32",
              "lse_ptr": "*fp32", **sizes}),
            ("block_bwd_rows", "rows", _bwd_rows_kernel.fn,
             {"grad_ptr": "*fp32", "rows_ptr": ty, "cols_ptr": ty, "p_ptr": "*fp32", "q_ptr": "*fp32",
              "scale_ptr": "*fp32", "lse_ptr": "*fp32", "drows_ptr": "*fp32", "dsc_ptr": "*fp32", **sizes}),
            ("block_bwd_cols", "cols", _bwd_cols_kernel.fn,
             {"grad_ptr": "*fp32", "rows_ptr": ty, "cols_ptr": ty, "p_ptr": "*fp32", "q_ptr": "*fp32",
              "scale_ptr": "*fp32", "lse_ptr": "*fp32", "dcols_ptr": "*fp32", **sizes}),
        )
        for label, kind, fn, sig in kernels:
            for bm, bn, warps, stages in _CONFIGS[kind, _dtype_class(dtype), _d_bucket(d_pad)]:
                constexprs = dict(D=D, D_PAD=d_pad, PAIRS=True, BM=bm, BN=bn, UPCAST_DOT=False, INTERPRET=False)
                specs.append(dict(
                    name=f"{label}[{_TRITON_DTYPE[dtype]},D={D}]", fn=fn,
                    signature=dict(sig, **{k: "constexpr" for k in constexprs}),
                    constexprs=constexprs, num_warps=warps, num_stages=stages,
                    config=f"BM={bm} BN={bn} w={warps} s={stages}", no_atomics=True))
    specs.append(dict(name="scale_rows[bf16,D=128]", fn=_scale_rows_kernel,
                      signature={"x_ptr": "*bf16", "xs_ptr": "*bf16", "p_ptr": "*fp32", "R": "i32",
                                 "D": "constexpr", "D_PAD": "constexpr", "BLOCK_R": "constexpr"},
                      constexprs=dict(D=128, D_PAD=128, BLOCK_R=_PREP_BLOCK), num_warps=4, num_stages=1,
                      config=f"BLOCK_R={_PREP_BLOCK} w=4", no_atomics=True))
    return specs
