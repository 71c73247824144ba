"""InfoNCE block pieces in Triton: rows against one slice of columns (the distributed losses' unit).

The contract is PLAN.md's / cl_fast/_ops/infonce.py's; the dense math is cl_fast/reference.py
(infonce_block_excluded, infonce_block_lse, infonce_block_grad). With S = scale * rows cols^T
(fp32 accumulation, features as given: no normalisation, any magnitude) and row i's excluded
columns e1_i = i + diag (pairs=False: the positive; pairs=True: the row itself) and, with pairs,
e2_i = diag + (i + M/2) mod M (the positive):

  block_fwd: lse_i = log sum_{j in [0, C), j != e1_i, e2_i} exp(S_ij)   (-inf when nothing is left)
  block_bwd: P_ij = exp(S_ij - lse_i) with the MERGED lse, dS_ij = grad_i P_ij on the kept columns,
             drows = scale dS cols, dcols = scale dS^T rows, dscale = sum_ij dS_ij <rows_i, cols_j>.

Kernels (the layout of the fused-attention forward and its split dQ / dK,dV backward):
1. `_fwd_kernel`: one program per row block of BM rows, stationary in registers; it streams the
   column blocks of BN columns with an online max m and sum l (l <- l e^(m - m') + sum e^(S - m')),
   lse = m + log l. The running max starts at a finite -3e38, so a row whose every column is
   excluded ends with l = 0 and lse = -inf, never NaN.
2. `_bwd_rows_kernel`: one program per row block; drows_I = scale sum_J dS_IJ cols_J accumulated in
   registers, and each row's share of dscale, sum_j dS_ij <rows_i, cols_j>, written to an (M,)
   buffer that one torch.sum reduces (a fixed order: deterministic).
3. `_bwd_cols_kernel`: one program per column block, stationary; it streams the row blocks (with
   their grad and lse) and recomputes the transposed tiles S^T = scale cols_J rows_I^T, so that
   dcols_J = scale sum_I dS_IJ^T rows_I accumulates in registers.
Each output element is written by exactly one program: no atomics, no host syncs, bit-identical
repeats. Only the tiles that may hold an excluded (i, j) (`_holds_excluded`, a test on the tile's
index ranges) or a ragged column edge take the masked path; the others run unmasked. Rows whose lse
is not finite (no column in any slice) contribute nothing: their grad is taken as 0 and their lse
as +inf, so P = 0 without a mask.

The tile helpers (`_dot`: tf32x3 for fp32, the interpreter's bf16 upcast; `_load_rows`,
`_store_block`) and the launch conventions (scale loaded on the device, MAX_DIM, the autotune
buckets) are cl_fast/triton_kernels/infonce.py's; that module re-exports block_fwd / block_bwd,
which cl_fast/_ops/infonce.py reaches as `_dispatch.module("triton", "infonce")`. It is always
imported first (cl_fast's import of _dispatch loads it), and imports this module at its end.
"""
import torch
import triton
import triton.language as tl

from .. import _checks
from .infonce import (MAX_DIM, _AUTOTUNE, _INTERPRET, _M_INIT, _TRITON_DTYPE, _d_bucket, _dot, _dtype_class,
                      _load_rows, _n_bucket, _scale_arg, _store_block)

__all__ = ["block_fwd", "block_bwd", "MAX_DIM", "sm90_specs"]

# ---------------------------------------------------------------------------------------------
# Tile configurations: (BM rows, BN columns, num_warps, num_stages) per kernel, dtype class and
# D bucket. "fwd" and "rows" keep a BM-row block stationary and stream BN-column tiles; "cols"
# keeps a BN-column block stationary and streams BM-row tiles. The backward's (BM or BN, D_PAD)
# fp32 accumulator costs BM * D_PAD / (32 * warps) registers a thread, kept <= 64.
# Checked offline for sm_90 by tests/test_triton_sm90.py (no spills, shared <= 227 KB).
# ---------------------------------------------------------------------------------------------
_CONFIGS = {
    ("fwd", "half", 128): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("fwd", "half", 256): [(64, 64, 4, 3)],
    ("fwd", "half", 512): [(32, 32, 4, 2)],
    ("fwd", "half", 1024): [(32, 32, 8, 2)],
    ("fwd", "fp32", 128): [(64, 32, 4, 2)],
    ("fwd", "fp32", 256): [(64, 32, 4, 2)],
    ("fwd", "fp32", 512): [(16, 16, 4, 1)],
    ("fwd", "fp32", 1024): [(16, 16, 4, 1)],
    ("rows", "half", 128): [(64, 64, 8, 2), (64, 128, 8, 2)],
    ("rows", "half", 256): [(32, 64, 8, 2)],
    ("rows", "half", 512): [(32, 32, 8, 1)],
    ("rows", "half", 1024): [(16, 32, 8, 1)],
    ("rows", "fp32", 128): [(32, 32, 8, 2)],
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
_INTERPRET_SHAPE = (16, 32, 4, 1)


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
# Excluded columns
# ---------------------------------------------------------------------------------------------
@triton.jit
def _positive_col(i, diag, M):
    """e2_i = diag + (i + M/2) mod M for row indices i in [0, M)."""
    half = M // 2
    return tl.where(i < half, i + half, i - half) + diag


@triton.jit
def _holds_excluded(i0, i1, j0, j1, diag, M, PAIRS: tl.constexpr):
    """Whether the tile rows [i0, i1) x columns [j0, j1) may hold an excluded (i, j), from the index
    ranges alone: the rows' self columns are [i0, i1) + diag; with PAIRS the positives of the rows
    below M/2 are those + M/2, of the rows from M/2 on those - M/2 (two contiguous ranges)."""
    hit = (j0 < i1 + diag) & (j1 > i0 + diag)
    if PAIRS:
        half = M // 2
        lo_a = i0
        hi_a = tl.minimum(i1, half)
        hit = hit | ((lo_a < hi_a) & (j0 < hi_a + half + diag) & (j1 > lo_a + half + diag))
        lo_b = tl.maximum(i0, half)
        hi_b = i1
        hit = hit | ((lo_b < hi_b) & (j0 < hi_b - half + diag) & (j1 > lo_b - half + diag))
    return hit


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
@triton.jit
def _fwd_step(j, i0, i1, x, self_col, pos_col, cols_ptr, scale, C, diag, M, m, l,
              PAIRS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
              UPCAST_DOT: tl.constexpr):
    """Fold column block j into the rows' running (max m, sum l of exp(S - m))."""
    j0 = j * BN
    cols = j0 + tl.arange(0, BN)
    col_mask = cols < C
    c = _load_rows(cols_ptr, cols, col_mask, D, D_PAD)
    S = scale * _dot(x, tl.trans(c), UPCAST_DOT)
    if (j0 + BN > C) | _holds_excluded(i0, i1, j0, j0 + BN, diag, M, PAIRS):
        keep = col_mask[None, :] & (cols[None, :] != self_col[:, None])
        if PAIRS:
            keep = keep & (cols[None, :] != pos_col[:, None])
        S = tl.where(keep, S, float("-inf"))
    m_new = tl.maximum(m, tl.max(S, 1))
    l = l * tl.exp(m - m_new) + tl.sum(tl.exp(S - m_new[:, None]), 1)
    return m_new, l


@_tuned("fwd")
@triton.jit
def _fwd_kernel(rows_ptr, cols_ptr, scale_ptr, lse_ptr, M, C, diag, M_BUCKET, C_BUCKET,
                D: tl.constexpr, D_PAD: tl.constexpr, PAIRS: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """lse of rows [i0, i0 + BM) over the slice's kept columns."""
    scale = tl.load(scale_ptr)
    i0 = tl.program_id(0) * BM
    i = i0 + tl.arange(0, BM)
    row_mask = i < M
    i1 = tl.minimum(i0 + BM, M)
    x = _load_rows(rows_ptr, i, row_mask, D, D_PAD)
    self_col = i + diag
    pos_col = _positive_col(i, diag, M)
    m = tl.zeros((BM,), tl.float32) + _M_INIT
    l = tl.zeros((BM,), tl.float32)
    n_blocks = tl.cdiv(C, BN)
    # the interpreter passes scalars as arrays, which range() rejects: a while loop there
    if INTERPRET:
        j = 0
        while j < n_blocks:
            m, l = _fwd_step(j, i0, i1, x, self_col, pos_col, cols_ptr, scale, C, diag, M, m, l,
                             PAIRS, BN, D, D_PAD, UPCAST_DOT)
            j += 1
    else:
        for j in range(0, n_blocks):
            m, l = _fwd_step(j, i0, i1, x, self_col, pos_col, cols_ptr, scale, C, diag, M, m, l,
                             PAIRS, BN, D, D_PAD, UPCAST_DOT)
    tl.store(lse_ptr + i, m + tl.log(l), mask=row_mask)  # l = 0: -3e38 + -inf = -inf


# ---------------------------------------------------------------------------------------------
# Backward 1: drows and the dscale shares, row-stationary
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rows_step(j, i0, i1, x, g, lse, self_col, pos_col, cols_ptr, scale, C, diag, M, acc, dsc,
               PAIRS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
               UPCAST_DOT: tl.constexpr):
    """acc += dS cols_J, dsc += sum_j dS_ij <rows_i, cols_j> for column block j."""
    j0 = j * BN
    cols = j0 + tl.arange(0, BN)
    col_mask = cols < C
    c = _load_rows(cols_ptr, cols, col_mask, D, D_PAD)
    dots = _dot(x, tl.trans(c), UPCAST_DOT)
    dS = g[:, None] * tl.exp(scale * dots - lse[:, None])
    # a zero-padded column has S = 0, whose exp(0 - lse) may overflow: masked with the excluded ones
    if (j0 + BN > C) | _holds_excluded(i0, i1, j0, j0 + BN, diag, M, PAIRS):
        keep = col_mask[None, :] & (cols[None, :] != self_col[:, None])
        if PAIRS:
            keep = keep & (cols[None, :] != pos_col[:, None])
        dS = tl.where(keep, dS, 0.0)
    dsc += tl.sum(dS * dots, 1)
    acc += _weighted_dot(dS, c, UPCAST_DOT)
    return acc, dsc


@_tuned("rows")
@triton.jit
def _bwd_rows_kernel(grad_ptr, rows_ptr, cols_ptr, scale_ptr, lse_ptr, drows_ptr, dsc_ptr, M, C, diag,
                     M_BUCKET, C_BUCKET, D: tl.constexpr, D_PAD: tl.constexpr, PAIRS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """drows of rows [i0, i0 + BM) and their dscale shares dsc_i = sum_j dS_ij <rows_i, cols_j>."""
    scale = tl.load(scale_ptr)
    i0 = tl.program_id(0) * BM
    i = i0 + tl.arange(0, BM)
    row_mask = i < M
    i1 = tl.minimum(i0 + BM, M)
    x = _load_rows(rows_ptr, i, row_mask, D, D_PAD)
    g, lse = _row_stats(grad_ptr, lse_ptr, i, row_mask)
    self_col = i + diag
    pos_col = _positive_col(i, diag, M)
    acc = tl.zeros((BM, D_PAD), tl.float32)
    dsc = tl.zeros((BM,), tl.float32)
    n_blocks = tl.cdiv(C, BN)
    if INTERPRET:
        j = 0
        while j < n_blocks:
            acc, dsc = _rows_step(j, i0, i1, x, g, lse, self_col, pos_col, cols_ptr, scale, C, diag, M,
                                  acc, dsc, PAIRS, BN, D, D_PAD, UPCAST_DOT)
            j += 1
    else:
        for j in range(0, n_blocks):
            acc, dsc = _rows_step(j, i0, i1, x, g, lse, self_col, pos_col, cols_ptr, scale, C, diag, M,
                                  acc, dsc, PAIRS, BN, D, D_PAD, UPCAST_DOT)
    _store_block(drows_ptr, i0, M, scale * acc, D, BM, D_PAD)
    tl.store(dsc_ptr + i, dsc, mask=row_mask)


# ---------------------------------------------------------------------------------------------
# Backward 2: dcols, column-stationary
# ---------------------------------------------------------------------------------------------
@triton.jit
def _cols_step(t, j0, j, c, rows_ptr, grad_ptr, lse_ptr, scale, M, diag, acc,
               PAIRS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
               D_PAD: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc += dS^T rows_I for row block t, from the recomputed transposed tile S^T = scale c x^T."""
    i0 = t * BM
    i = i0 + tl.arange(0, BM)
    row_mask = i < M
    x = _load_rows(rows_ptr, i, row_mask, D, D_PAD)
    g, lse = _row_stats(grad_ptr, lse_ptr, i, row_mask)
    # padded rows: g = 0, lse = +inf, so dS^T = 0 there; padded columns are never stored
    dS_t = g[None, :] * tl.exp(scale * _dot(c, tl.trans(x), UPCAST_DOT) - lse[None, :])
    if _holds_excluded(i0, tl.minimum(i0 + BM, M), j0, j0 + BN, diag, M, PAIRS):
        keep = j[:, None] != (i + diag)[None, :]
        if PAIRS:
            keep = keep & (j[:, None] != _positive_col(i, diag, M)[None, :])
        dS_t = tl.where(keep, dS_t, 0.0)
    acc += _weighted_dot(dS_t, x, UPCAST_DOT)
    return acc


@_tuned("cols")
@triton.jit
def _bwd_cols_kernel(grad_ptr, rows_ptr, cols_ptr, scale_ptr, lse_ptr, dcols_ptr, M, C, diag,
                     M_BUCKET, C_BUCKET, D: tl.constexpr, D_PAD: tl.constexpr, PAIRS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """dcols of columns [j0, j0 + BN)."""
    scale = tl.load(scale_ptr)
    j0 = tl.program_id(0) * BN
    j = j0 + tl.arange(0, BN)
    c = _load_rows(cols_ptr, j, j < C, D, D_PAD)
    acc = tl.zeros((BN, D_PAD), tl.float32)
    n_blocks = tl.cdiv(M, BM)
    if INTERPRET:
        t = 0
        while t < n_blocks:
            acc = _cols_step(t, j0, j, c, rows_ptr, grad_ptr, lse_ptr, scale, M, diag, acc,
                             PAIRS, BM, BN, D, D_PAD, UPCAST_DOT)
            t += 1
    else:
        for t in range(0, n_blocks):
            acc = _cols_step(t, j0, j, c, rows_ptr, grad_ptr, lse_ptr, scale, M, diag, acc,
                             PAIRS, BM, BN, D, D_PAD, UPCAST_DOT)
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
    _scale_arg(scale, rows)
    return M, cols.shape[0], D


def _row_vector(name, value, M, rows):
    if not (isinstance(value, torch.Tensor) and value.shape == (M,) and value.device == rows.device
            and value.is_floating_point()):
        raise ValueError(f"{name} must be a ({M},) floating-point tensor on {rows.device}, got "
                         f"{tuple(getattr(value, 'shape', ()))} {getattr(value, 'dtype', type(value).__name__)}")
    return value.to(torch.float32).contiguous()


def _launch_args(M, C, D, diag):
    # diag clamped to [-M, C] excludes the same columns (none beyond those bounds) and fits int32
    diag = min(max(int(diag), -M), C)
    return (M, C, diag, _n_bucket(max(M, 1)), _n_bucket(max(C, 1)), D), max(16, triton.next_power_of_2(D))


def block_fwd(rows, cols, scale, diag, pairs):
    """-> lse (M,) fp32: each row's log-sum-exp over the slice's kept columns (-inf if none)."""
    M, C, D = _check(rows, cols, scale, pairs)
    rows, cols = rows.contiguous(), cols.contiguous()
    lse = torch.empty(M, device=rows.device, dtype=torch.float32)
    if M == 0:
        return lse
    args, d_pad = _launch_args(M, C, D, diag)
    _fwd_kernel[lambda meta: (triton.cdiv(M, meta["BM"]),)](
        rows, cols, scale, lse, *args, D_PAD=d_pad, PAIRS=bool(pairs), UPCAST_DOT=_INTERPRET,
        INTERPRET=_INTERPRET)
    return lse


def block_bwd(grad, rows, cols, scale, lse, diag, pairs):
    """-> (drows (M, D), dcols (C, D), dscale ()) fp32: the gradients of sum_i grad_i lse_i through
    this slice's terms, P = exp(S - lse) with the merged lse."""
    M, C, D = _check(rows, cols, scale, pairs)
    grad = _row_vector("grad", grad, M, rows)
    lse = _row_vector("lse", lse, M, rows)
    rows, cols = rows.contiguous(), cols.contiguous()
    drows = torch.empty((M, D), device=rows.device, dtype=torch.float32)
    dcols = torch.empty((C, D), device=rows.device, dtype=torch.float32)
    dsc = torch.empty(M, device=rows.device, dtype=torch.float32)
    args, d_pad = _launch_args(M, C, D, diag)
    flags = dict(D_PAD=d_pad, PAIRS=bool(pairs), UPCAST_DOT=_INTERPRET, INTERPRET=_INTERPRET)
    if M:
        _bwd_rows_kernel[lambda meta: (triton.cdiv(M, meta["BM"]),)](
            grad, rows, cols, scale, lse, drows, dsc, *args, **flags)
    if C:
        _bwd_cols_kernel[lambda meta: (triton.cdiv(C, meta["BN"]),)](
            grad, rows, cols, scale, lse, dcols, *args, **flags)
    # the rows' dscale shares, summed by one deterministic torch reduction (0 for M = 0)
    return drows, dcols, dsc.sum()


# ---------------------------------------------------------------------------------------------
# Offline sm_90 compile specs (tests/test_triton_sm90.py, benchmarks/ptx_table.py)
# ---------------------------------------------------------------------------------------------
def sm90_specs(widths=((torch.bfloat16, 128), (torch.float32, 128))):
    """One compile spec per autotune config of each kernel, per (dtype, D) of `widths`, pairs=True
    (the masked path with both excluded columns): dicts with name, fn, signature, constexprs,
    num_warps, num_stages, and no_atomics (none of the three kernels has any)."""
    specs = []
    for dtype, D in widths:
        ty = "*" + _TRITON_DTYPE[dtype]
        d_pad = max(16, triton.next_power_of_2(D))
        sizes = {"M": "i32", "C": "i32", "diag": "i32", "M_BUCKET": "i32", "C_BUCKET": "i32"}
        kernels = (
            ("block_fwd", "fwd", _fwd_kernel.fn,
             {"rows_ptr": ty, "cols_ptr": ty, "scale_ptr": "*fp32", "lse_ptr": "*fp32", **sizes}),
            ("block_bwd_rows", "rows", _bwd_rows_kernel.fn,
             {"grad_ptr": "*fp32", "rows_ptr": ty, "cols_ptr": ty, "scale_ptr": "*fp32", "lse_ptr": "*fp32",
              "drows_ptr": "*fp32", "dsc_ptr": "*fp32", **sizes}),
            ("block_bwd_cols", "cols", _bwd_cols_kernel.fn,
             {"grad_ptr": "*fp32", "rows_ptr": ty, "cols_ptr": ty, "scale_ptr": "*fp32", "lse_ptr": "*fp32",
              "dcols_ptr": "*fp32", **sizes}),
        )
        for label, kind, fn, sig in kernels:
            for bm, bn, warps, stages in _CONFIGS[kind, _dtype_class(dtype), _d_bucket(d_pad)]:
                constexprs = dict(D=D, D_PAD=d_pad, PAIRS=True, BM=bm, BN=bn, UPCAST_DOT=False, INTERPRET=False)
                specs.append(dict(
                    name=f"{label}[{_TRITON_DTYPE[dtype]},D={D}]", fn=fn,
                    signature=dict(sig, **{k: "constexpr" for k in constexprs}),
                    constexprs=constexprs, num_warps=warps, num_stages=stages,
                    config=f"BM={bm} BN={bn} w={warps} s={stages}", no_atomics=True))
    return specs
