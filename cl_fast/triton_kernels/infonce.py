"""Fused InfoNCE-family losses in Triton: nt_xent (SimCLR) and the cross-view info_nce / clip_loss.

The math is DESIGN.md's ("Triton kernels"); the contract is SPEC.md's. Launchers follow PLAN.md:
`scale` is a 0-d fp32 tensor on the inputs' device and every kernel loads it (no host sync).

Layout: one program owns a PAIR block of H indices t: rows a_t and b_t, where (a, b) = (z1, z2)
for nt_xent and (q, k) for the cross losses. Every row's positive partner is then in the same
program, so the positive-pair term, which needs the negative mass of both partners, is fused
into the backward's epilogue. The program keeps its row statistics (forward) or its gradient
rows (backward) in registers and streams column blocks of BN rows:
  nt_xent: columns z1 (half a: self on the diagonal, half b: positive) then z2 (a: positive, b: self);
  cross:   half a (q rows) meets k columns, half b (k rows) meets q columns; positives on the diagonal.
Only the column blocks that intersect the diagonal of the pair block, and the ragged last block,
take the masked path (`special`); the others run unmasked.

Kernels, in call order:
1. `_prep_rows_kernel` (normalize=True only): per row, p = 2^floor(log2 max|x|) (exact power of two),
   x' = x / p (exact; a copy in the input dtype, so tile dots never overflow or underflow whatever
   the magnitude), rho = 1 / max(||x'||, eps / p) (so u = rho x' = n(x)) and r = rho / p
   (= 1 / max(||x||, eps), for the normalisation backward).
2. `_walk_kernel` with STATS=False (forward): online row max m, negatives' mass neg and positive mass
   pos (both relative to m), the positive logit. lse = m + log(pos + neg);
   loss = log1p(neg / pos) (never lse - S_pos: a saturated row keeps its relative precision and is
   never negative), or lse - S_pos when pos underflows (loss > ~69, no cancellation there).
3. Backward: `_walk_kernel` with STATS=True writes the per-row shift and 1/l the backward
   uses. Fixed-shift regime (normalize and 2s <= 80, decided on the device from the loaded
   scale): shift = s, 1/l = exp(s - lse) (no walk). Otherwise (running max) the walk recomputes
   the exact row max m and l, because exp(S - lse) with lse rounded to fp32 at |lse| ~ s loses
   ~s * 6e-8 relative precision (2e-4 at T = 1e-4), where exp(S - m) / l keeps the fp32
   reference's precision.
   `_ntxent_bwd_kernel` (nt_xent) and `_bwd_kernel` (cross): row-stationary full-square walk, no
   atomics. nt_xent stacks the pair block's 2H rows [a_t; b_t] into one tile that walks the 2N
   columns of Z = [z1; z2], so each column load serves both halves; cross walks per half (q rows
   against k columns, k rows against q columns: different column tensors). Both compute:
     W_ij = g_i P_ij + g_j P_ji over the negatives (P_ij = exp(S_ij - shift_i) / l_i),
     dU_i = sum_j W_ij u_j in registers (fixed regime: W = E (g_i/l_i + g_j/l_j), one exp),
     nm_i = sum_{j neg} P_ij, dscale partial = sum W_ij cos_ij / 2 (each pair seen from both rows).
   Epilogue: positive pair weight w_t = G_ab + G_ba = -(g_a nm_a + g_b nm_b) (exact when P -> 1,
   where P - 1 would cancel), du = s (dU + w u_partner), dz = r (du - u (u . du)), written in the
   input dtype; dscale partial per program, summed in a fixed order by torch (deterministic).
Nothing of size M*M, no fp32 (2N, D) buffer, no atomics anywhere: results are bit-identical on
repeated calls.
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["ntxent_fwd", "ntxent_bwd", "cross_fwd", "cross_bwd", "MAX_DIM", "sm90_specs"]

# The widest D the kernels take: the backward keeps a (H, D) fp32 gradient block per half in
# registers, which at D = 1024 is the whole register file of 8 warps with H = 16.
MAX_DIM = 1024

# Under TRITON_INTERPRET=1, tl.dot on bf16 operands multiplies the raw bit patterns (triton issue
# 11584): the interpreter upcasts dot operands to fp32 after the cast to the input dtype. The
# interpreter also passes scalar arguments as 1-element arrays, which range() rejects with
# numpy >= 2.4: the column walk is a while loop there and a for loop (software-pipelined) on a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Past this value of 2s, exp(S - s) may underflow (fp32 normal min ~ e^-87): running max instead.
_FIXED_SHIFT_LIMIT = tl.constexpr(80.0)
_EPS = tl.constexpr(1e-12)
_M_INIT = tl.constexpr(-3.0e38)  # finite "-inf" for the running max (exp(-inf - -inf) is NaN)


# ---------------------------------------------------------------------------------------------
# Tile configurations: (H, BN, num_warps, num_stages) per kernel kind, dtype class and D bucket.
# H = rows per half (2H rows per program), BN = column block. The backward holds two (H, D_PAD)
# fp32 accumulators: H * D_PAD * 2 / (32 * warps) registers each thread, kept <= 64.
# Checked offline for sm_90 by tests/test_triton_sm90.py (no spills, shared <= 227 KB).
# ---------------------------------------------------------------------------------------------
_CONFIGS = {
    # forward / stats walk: row statistics only
    ("walk", "half", 128): [(64, 64, 4, 3)],
    ("walk", "half", 256): [(32, 64, 4, 3)],
    ("walk", "half", 512): [(16, 32, 4, 2)],
    ("walk", "half", 1024): [(16, 32, 4, 2)],
    ("walk", "fp32", 128): [(64, 32, 4, 2)],
    ("walk", "fp32", 256): [(32, 32, 4, 2)],
    ("walk", "fp32", 512): [(16, 32, 4, 2)],
    ("walk", "fp32", 1024): [(16, 32, 4, 2)],
    # backward: two (H, D_PAD) fp32 accumulators
    ("bwd", "half", 128): [(32, 64, 8, 2), (32, 32, 8, 2)],
    ("bwd", "half", 256): [(16, 64, 8, 2)],
    ("bwd", "half", 512): [(16, 32, 8, 1)],
    ("bwd", "half", 1024): [(16, 32, 8, 1)],
    ("bwd", "fp32", 128): [(16, 32, 8, 2)],
    ("bwd", "fp32", 256): [(16, 32, 8, 1)],
    ("bwd", "fp32", 512): [(16, 16, 8, 1)],
    ("bwd", "fp32", 1024): [(16, 16, 8, 1)],
    # nt_xent backward, stacked: one (2H, D_PAD) fp32 accumulator, (2H, BN) tiles
    ("bwd_stacked", "half", 128): [(32, 64, 8, 2), (32, 32, 8, 2)],
    ("bwd_stacked", "half", 256): [(16, 64, 8, 2)],
    ("bwd_stacked", "half", 512): [(16, 32, 8, 1)],
    ("bwd_stacked", "half", 1024): [(8, 32, 8, 1)],
    ("bwd_stacked", "fp32", 128): [(16, 32, 8, 1)],
    ("bwd_stacked", "fp32", 256): [(8, 16, 8, 1)],
    ("bwd_stacked", "fp32", 512): [(8, 16, 8, 1)],
    ("bwd_stacked", "fp32", 1024): [(8, 16, 8, 1)],
}
_INTERPRET_SHAPE = (16, 32, 4, 1)
_AUTOTUNE = os.environ.get("CL_FAST_AUTOTUNE", "1") != "0"


def _d_bucket(d_pad):
    return 128 if d_pad <= 128 else 256 if d_pad <= 256 else 512 if d_pad <= 512 else 1024


def _dtype_class(dtype):
    return "fp32" if dtype == torch.float32 else "half"


def configs_for(kind, dtype_class, d_pad):
    """The (H, BN, num_warps, num_stages) tuples a kernel kind is tuned over for one width."""
    if _INTERPRET:
        return [_INTERPRET_SHAPE]
    shapes = _CONFIGS[kind, dtype_class, _d_bucket(d_pad)]
    return shapes if _AUTOTUNE else shapes[:1]


def _all_configs(kind):
    if _INTERPRET:
        shapes = [_INTERPRET_SHAPE]
    else:
        shapes = sorted({s for (k, _, _), v in _CONFIGS.items() if k == kind for s in v})
    return [triton.Config({"H": h, "BN": bn}, num_warps=w, num_stages=st) for h, bn, w, st in shapes]


def _pruner(kind):
    def prune(configs, named_args, **kwargs):
        cls = _dtype_class(named_args["a_ptr" if "a_ptr" in named_args else "z_ptr"].dtype)
        wanted = set(configs_for(kind, cls, triton.next_power_of_2(named_args["D"])))
        return [c for c in configs if (c.kwargs["H"], c.kwargs["BN"], c.num_warps, c.num_stages) in wanted]
    return prune


def _tuned(kind):
    # The key holds D (with the dtypes, which the autotuner adds) and a bucket of the row count, so a
    # config tuned at N = 512 is not reused at N = 32768.
    return triton.autotune(configs=_all_configs(kind), key=["D", "N_BUCKET"],
                           prune_configs_by={"early_config_prune": _pruner(kind)})


def _n_bucket(n):
    return min(triton.next_power_of_2(n), 1 << 16)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, UPCAST_DOT: tl.constexpr):
    """a @ b on the tensor cores, fp32 accumulation. fp32 operands go through tf32x3 (three tf32
    products, ~fp32 accuracy): plain tf32 (10-bit mantissa) puts ~5e-4 relative error on each cosine,
    1e-3 on a logit at s = 2, past the 1e-4 fp32 tolerance (DESIGN.md, numerics)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    return tl.dot(a, b)


@triton.jit
def _load_rows(ptr, idx, mask, D: tl.constexpr, D_PAD: tl.constexpr):
    cols = tl.arange(0, D_PAD)
    offs = idx.to(tl.int64)[:, None] * D + cols[None, :]
    return tl.load(ptr + offs, mask=mask[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, idx, mask, value, D: tl.constexpr, D_PAD: tl.constexpr):
    cols = tl.arange(0, D_PAD)
    offs = idx.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask[:, None] & (cols < D)[None, :])


@triton.jit
def _store_block(ptr, first_row, R, value, D: tl.constexpr, H: tl.constexpr, D_PAD: tl.constexpr):
    """Store a (H, D_PAD) block at rows first_row.. of an (R, D) tensor through a block pointer
    (bounds-checked; no per-element address registers in the epilogue)."""
    block = tl.make_block_ptr(ptr, shape=(R, D), strides=(D, 1), offsets=(first_row, 0),
                              block_shape=(H, D_PAD), order=(1, 0))
    tl.store(block, value.to(ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _cosines(x, rho_x, c, rho_c, NORMALIZE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """cos_ij = u_i . u_j of a (rows, BN) tile (raw dots when not NORMALIZE)."""
    dots = _dot(x, tl.trans(c), UPCAST_DOT)
    if NORMALIZE:
        # rho_i rho_j first: cos_ij is then bit-identical to cos_ji (the dot is), so exp(S_ij - m_j)
        # of the backward's column term is exactly 1 at row j's max, as in a row-wise softmax
        dots = dots * (rho_x[:, None] * rho_c[None, :])
    return dots


# ---------------------------------------------------------------------------------------------
# Row preparation (normalize=True): scaled copy, rho, r
# ---------------------------------------------------------------------------------------------
@triton.jit
def _prep_rows_kernel(x_ptr, xs_ptr, rho_ptr, r_ptr, R, D: tl.constexpr, D_PAD: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """For R rows of x: xs = x / p, rho = 1 / max(||xs||, eps / p), r = rho / p, p = 2^floor(log2 max|x|).

    ||x|| = p ||xs|| with ||xs|| in [1, sqrt(D)): the norm never overflows (as torch.linalg.vector_norm
    scales by the max) and the tile dots of xs never overflow or underflow, for any finite x.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < R
    x = _load_rows(x_ptr, rows, mask, D, D_PAD).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    # exponent bits of amax: an exact power of two <= amax (0 for zero or subnormal rows -> p = 1)
    p = (amax.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    p = tl.where(p > 0, p, 1.0)
    inv_p = 1.0 / p
    xs = x * inv_p[:, None]
    norm_s = tl.sqrt_rn(tl.sum(xs * xs, 1))
    rho = 1.0 / tl.maximum(norm_s, _EPS * inv_p)
    _store_rows(xs_ptr, rows, mask, xs, D, D_PAD)
    tl.store(rho_ptr + rows, rho, mask=mask)
    tl.store(r_ptr + rows, rho * inv_p, mask=mask)


# ---------------------------------------------------------------------------------------------
# Forward walk: online row statistics
# ---------------------------------------------------------------------------------------------
@triton.jit
def _walk_tile(x, rho_x, t, c, rho_c, cols, special, scale, N, m, neg, pos, spos,
               IS_SELF: tl.constexpr, NORMALIZE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fold one column block into the running (max m, negatives' mass neg, positive mass pos,
    positive logit spos) of the rows x. The diagonal entry (column index == t) is the row itself
    (IS_SELF: excluded) or its positive."""
    S = scale * _cosines(x, rho_x, c, rho_c, NORMALIZE, UPCAST_DOT)
    if special:
        diag = t[:, None] == cols[None, :]
        inside = (cols < N)[None, :] & (t >= 0)[:, None]
        if IS_SELF:
            candidate = inside & (~diag)
        else:
            candidate = inside
        S_c = tl.where(candidate, S, float("-inf"))
        m_new = tl.maximum(m, tl.max(S_c, 1))
        alpha = tl.exp(m - m_new)
        E = tl.exp(S_c - m_new[:, None])
        if IS_SELF:
            neg = neg * alpha + tl.sum(E, 1)
            pos = pos * alpha
        else:
            is_pos = diag & inside
            neg = neg * alpha + tl.sum(tl.where(is_pos, 0.0, E), 1)
            pos = pos * alpha + tl.sum(tl.where(is_pos, E, 0.0), 1)
            spos += tl.sum(tl.where(is_pos, S, 0.0), 1)
    else:
        m_new = tl.maximum(m, tl.max(S, 1))
        alpha = tl.exp(m - m_new)
        neg = neg * alpha + tl.sum(tl.exp(S - m_new[:, None]), 1)
        pos = pos * alpha
    return m_new, neg, pos, spos


@triton.jit
def _walk_step(j, t0, xa, rho_a, xb, rho_b, t, ca_ptr, cb_ptr, rho_ca_ptr, rho_cb_ptr, scale, N,
               ma, nega, posa, sposa, mb, negb, posb, sposb,
               SELF_A: tl.constexpr, SELF_B: tl.constexpr, SAME_COLS: tl.constexpr, DO_B: tl.constexpr,
               NORMALIZE: tl.constexpr, H: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
               D_PAD: tl.constexpr, UPCAST_DOT: tl.constexpr):
    cols = j * BN + tl.arange(0, BN)
    col_mask = cols < N
    # masked path only where the block meets the pair block's diagonal [t0, t0 + H) or N's edge
    special = ((j * BN < t0 + H) & (j * BN + BN > t0)) | (j * BN + BN > N)
    ca = _load_rows(ca_ptr, cols, col_mask, D, D_PAD)
    if NORMALIZE:
        rho_ca = tl.load(rho_ca_ptr + cols, mask=col_mask, other=0.0)
    else:
        rho_ca = cols
    ma, nega, posa, sposa = _walk_tile(xa, rho_a, t, ca, rho_ca, cols, special, scale, N,
                                       ma, nega, posa, sposa, SELF_A, NORMALIZE, UPCAST_DOT)
    if DO_B:
        if SAME_COLS:
            cb = ca
            rho_cb = rho_ca
        else:
            cb = _load_rows(cb_ptr, cols, col_mask, D, D_PAD)
            if NORMALIZE:
                rho_cb = tl.load(rho_cb_ptr + cols, mask=col_mask, other=0.0)
            else:
                rho_cb = cols
        mb, negb, posb, sposb = _walk_tile(xb, rho_b, t, cb, rho_cb, cols, special, scale, N,
                                           mb, negb, posb, sposb, SELF_B, NORMALIZE, UPCAST_DOT)
    return ma, nega, posa, sposa, mb, negb, posb, sposb


@triton.jit
def _walk(t0, xa, rho_a, xb, rho_b, t, ca_ptr, cb_ptr, rho_ca_ptr, rho_cb_ptr, scale, N,
          ma, nega, posa, sposa, mb, negb, posb, sposb,
          SELF_A: tl.constexpr, SELF_B: tl.constexpr, SAME_COLS: tl.constexpr, DO_B: tl.constexpr,
          NORMALIZE: tl.constexpr, H: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
          D_PAD: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    n_blocks = tl.cdiv(N, BN)
    if INTERPRET:
        j = 0
        while j < n_blocks:
            ma, nega, posa, sposa, mb, negb, posb, sposb = _walk_step(
                j, t0, xa, rho_a, xb, rho_b, t, ca_ptr, cb_ptr, rho_ca_ptr, rho_cb_ptr, scale, N,
                ma, nega, posa, sposa, mb, negb, posb, sposb,
                SELF_A, SELF_B, SAME_COLS, DO_B, NORMALIZE, H, BN, D, D_PAD, UPCAST_DOT)
            j += 1
    else:
        for j in range(0, n_blocks):
            ma, nega, posa, sposa, mb, negb, posb, sposb = _walk_step(
                j, t0, xa, rho_a, xb, rho_b, t, ca_ptr, cb_ptr, rho_ca_ptr, rho_cb_ptr, scale, N,
                ma, nega, posa, sposa, mb, negb, posb, sposb,
                SELF_A, SELF_B, SAME_COLS, DO_B, NORMALIZE, H, BN, D, D_PAD, UPCAST_DOT)
    return ma, nega, posa, sposa, mb, negb, posb, sposb


@triton.jit
def _row_loss(m, neg, pos, spos):
    """(lse, loss) of rows from their running statistics; loss = log1p(neg / pos) >= 0 unless the
    positive's mass underflowed (pos < 1e-30: loss > 69, where lse - S_pos loses nothing)."""
    lse = m + tl.log(pos + neg)
    ok = pos > 1e-30
    loss = tl.where(ok, _log1p(neg / tl.where(ok, pos, 1.0)), lse - spos)
    return lse, loss


@triton.jit
def _log1p(x):
    """log(1 + x) to fp32 relative precision for x >= 0 (log(1 + x) loses it for x < ~1e-4):
    with v = 1 + x rounded, log(v) * x / (v - 1) is exact to rounding (Goldberg's trick)."""
    v = 1.0 + x
    return tl.where(v == 1.0, x, tl.log(v) * (x / (v - 1.0)))


@_tuned("walk")
@triton.jit
def _walk_kernel(a_ptr, b_ptr, rho_ptr, scale_ptr, lse_a_ptr, lse_b_ptr, out1_a_ptr, out1_b_ptr,
                 out2_a_ptr, out2_b_ptr, N, N_BUCKET, D: tl.constexpr, D_PAD: tl.constexpr,
                 NTXENT: tl.constexpr, BOTH: tl.constexpr, NORMALIZE: tl.constexpr, STATS: tl.constexpr,
                 H: tl.constexpr, BN: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """Forward (STATS=False): out1 = lse, out2 = per-row loss, for the a rows (and the b rows: nt_xent,
    or cross with BOTH). Backward statistics (STATS=True): out1 = shift, out2 = 1/l for both halves;
    fixed regime: shift = s, 1/l = exp(s - lse) from the saved lse (lse_*_ptr), no walk."""
    scale = tl.load(scale_ptr)
    t0 = tl.program_id(0) * H
    t = t0 + tl.arange(0, H)
    row_mask = t < N
    DO_B: tl.constexpr = NTXENT or BOTH
    if STATS:
        fixed = False
        if NORMALIZE:
            fixed = 2.0 * scale <= _FIXED_SHIFT_LIMIT
        if fixed:
            tl.store(out1_a_ptr + t, tl.zeros((H,), tl.float32) + scale, mask=row_mask)
            tl.store(out2_a_ptr + t, tl.exp(scale - tl.load(lse_a_ptr + t, mask=row_mask, other=0.0)),
                     mask=row_mask)
            if DO_B:
                tl.store(out1_b_ptr + t, tl.zeros((H,), tl.float32) + scale, mask=row_mask)
                tl.store(out2_b_ptr + t, tl.exp(scale - tl.load(lse_b_ptr + t, mask=row_mask, other=0.0)),
                         mask=row_mask)
        else:
            ma, nega, posa, sposa, mb, negb, posb, sposb = _row_walks(
                a_ptr, b_ptr, rho_ptr, scale, t0, t, row_mask, N, NTXENT, BOTH, NORMALIZE, H, BN, D,
                D_PAD, UPCAST_DOT, INTERPRET)
            tl.store(out1_a_ptr + t, ma, mask=row_mask)
            tl.store(out2_a_ptr + t, 1.0 / (nega + posa), mask=row_mask)
            if DO_B:
                tl.store(out1_b_ptr + t, mb, mask=row_mask)
                tl.store(out2_b_ptr + t, 1.0 / (negb + posb), mask=row_mask)
    else:
        ma, nega, posa, sposa, mb, negb, posb, sposb = _row_walks(
            a_ptr, b_ptr, rho_ptr, scale, t0, t, row_mask, N, NTXENT, BOTH, NORMALIZE, H, BN, D,
            D_PAD, UPCAST_DOT, INTERPRET)
        lse_a, loss_a = _row_loss(ma, nega, posa, sposa)
        tl.store(out1_a_ptr + t, lse_a, mask=row_mask)
        tl.store(out2_a_ptr + t, loss_a, mask=row_mask)
        if DO_B:
            lse_b, loss_b = _row_loss(mb, negb, posb, sposb)
            tl.store(out1_b_ptr + t, lse_b, mask=row_mask)
            tl.store(out2_b_ptr + t, loss_b, mask=row_mask)


@triton.jit
def _row_walks(a_ptr, b_ptr, rho_ptr, scale, t0, t, row_mask, N, NTXENT: tl.constexpr, BOTH: tl.constexpr,
               NORMALIZE: tl.constexpr, H: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
               D_PAD: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """Running statistics (m, neg, pos, spos) of the a rows and the b rows of the pair block."""
    xa = _load_rows(a_ptr, t, row_mask, D, D_PAD)
    xb = _load_rows(b_ptr, t, row_mask, D, D_PAD)
    if NORMALIZE:
        rho_a = tl.load(rho_ptr + t, mask=row_mask, other=0.0)
        rho_b = tl.load(rho_ptr + N + t, mask=row_mask, other=0.0)
    else:
        rho_a = t
        rho_b = t
    zero = tl.zeros((H,), tl.float32)
    ma = zero + _M_INIT
    mb = zero + _M_INIT
    nega, posa, sposa, negb, posb, sposb = zero, zero, zero, zero, zero, zero
    if NTXENT:
        # columns z1: a rows meet themselves, b rows their positives; then columns z2
        ma, nega, posa, sposa, mb, negb, posb, sposb = _walk(
            t0, xa, rho_a, xb, rho_b, t, a_ptr, a_ptr, rho_ptr, rho_ptr, scale, N,
            ma, nega, posa, sposa, mb, negb, posb, sposb,
            True, False, True, True, NORMALIZE, H, BN, D, D_PAD, UPCAST_DOT, INTERPRET)
        ma, nega, posa, sposa, mb, negb, posb, sposb = _walk(
            t0, xa, rho_a, xb, rho_b, t, b_ptr, b_ptr, rho_ptr + N, rho_ptr + N, scale, N,
            ma, nega, posa, sposa, mb, negb, posb, sposb,
            False, True, True, True, NORMALIZE, H, BN, D, D_PAD, UPCAST_DOT, INTERPRET)
    else:
        # q rows meet k columns, k rows meet q columns (only when BOTH directions are wanted)
        ma, nega, posa, sposa, mb, negb, posb, sposb = _walk(
            t0, xa, rho_a, xb, rho_b, t, b_ptr, a_ptr, rho_ptr + N, rho_ptr, scale, N,
            ma, nega, posa, sposa, mb, negb, posb, sposb,
            False, False, False, BOTH, NORMALIZE, H, BN, D, D_PAD, UPCAST_DOT, INTERPRET)
    return ma, nega, posa, sposa, mb, negb, posb, sposb


# ---------------------------------------------------------------------------------------------
# Backward walk: dU in registers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _grad_tile(x, rho_x, g_x, shift_x, inv_l_x, t, c, rho_c, g_c, shift_c, inv_l_c, cols, special,
               scale, N, acc, nm, dsc, FIXED: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
               NORMALIZE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc += W u_c, nm += sum of the negatives' P_ij, dsc += sum W cos, for one column block.

    W_ij = g_i P_ij [ROW_TERM] + g_j P_ji [COL_TERM], P_ij = exp(S_ij - shift_i) / l_i. Fixed
    regime (shift = s everywhere): E = exp(S - s), W = E (g_i/l_i + g_j/l_j), one exp per entry."""
    cos = _cosines(x, rho_x, c, rho_c, NORMALIZE, UPCAST_DOT)
    S = scale * cos
    if FIXED:
        E = tl.exp(S - scale)
        P_row = E * inv_l_x[:, None]
        if ROW_TERM and COL_TERM:
            W = E * ((g_x * inv_l_x)[:, None] + (g_c * inv_l_c)[None, :])
        elif ROW_TERM:
            W = E * (g_x * inv_l_x)[:, None]
        else:
            W = E * (g_c * inv_l_c)[None, :]
    else:
        P_row = tl.exp(S - shift_x[:, None]) * inv_l_x[:, None]
        if ROW_TERM and COL_TERM:
            W = g_x[:, None] * P_row + (g_c * inv_l_c)[None, :] * tl.exp(S - shift_c[None, :])
        elif ROW_TERM:
            W = g_x[:, None] * P_row
        else:
            W = (g_c * inv_l_c)[None, :] * tl.exp(S - shift_c[None, :])
    if special:
        negative = (cols < N)[None, :] & (t[:, None] != cols[None, :])
        W = tl.where(negative, W, 0.0)
        P_row = tl.where(negative, P_row, 0.0)
    if ROW_TERM:
        nm += tl.sum(P_row, 1)
    dsc += tl.sum(W * cos, 1)
    if NORMALIZE:
        W = W * rho_c[None, :]  # u_j = rho_j x'_j
    DTYPE: tl.constexpr = c.dtype
    if DTYPE == tl.float16:
        # fp16 has 5 exponent bits and weights like g P ~ 1/M^2 flush to zero: scale each row of
        # the tile to its max (exact algebra, multiplied back in fp32)
        w_scale = tl.max(tl.abs(W), 1)
        w_scale = tl.where(w_scale > 0, w_scale, 1.0)
        acc += _dot((W / w_scale[:, None]).to(DTYPE), c, UPCAST_DOT) * w_scale[:, None]
    else:
        acc += _dot(W.to(DTYPE), c, UPCAST_DOT)
    return acc, nm, dsc


@triton.jit
def _grad_step(j, t0, t, x, rho_x, g_x, shift_x, inv_l_x, c_ptr, cstat, scale, N, acc, nm, dsc,
               FIXED: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, NORMALIZE: tl.constexpr,
               H: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
               UPCAST_DOT: tl.constexpr):
    """One column block of c for one half. cstat = (rho, g, shift, 1/l) pointers of the columns' own
    rows (column j is row j of the tensor c)."""
    cols = j * BN + tl.arange(0, BN)
    col_mask = cols < N
    special = ((j * BN < t0 + H) & (j * BN + BN > t0)) | (j * BN + BN > N)
    rho_c_ptr, g_c_ptr, shift_c_ptr, inv_l_c_ptr = cstat
    c = _load_rows(c_ptr, cols, col_mask, D, D_PAD)
    if NORMALIZE:
        rho_c = tl.load(rho_c_ptr + cols, mask=col_mask, other=0.0)
    else:
        rho_c = cols
    g_c = tl.load(g_c_ptr + cols, mask=col_mask, other=0.0)
    shift_c = tl.load(shift_c_ptr + cols, mask=col_mask, other=0.0)
    inv_l_c = tl.load(inv_l_c_ptr + cols, mask=col_mask, other=0.0)
    return _grad_tile(x, rho_x, g_x, shift_x, inv_l_x, t, c, rho_c, g_c, shift_c, inv_l_c, cols, special,
                      scale, N, acc, nm, dsc, FIXED, ROW_TERM, COL_TERM, NORMALIZE, UPCAST_DOT)


@triton.jit
def _grad_walk(t0, t, x, rho_x, g_x, shift_x, inv_l_x, c_ptr, cstat, scale, N, acc, nm, dsc,
               FIXED: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, NORMALIZE: tl.constexpr,
               H: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
               UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """Stream the column blocks of c past one half of the pair block (one half's tiles live at a time)."""
    n_blocks = tl.cdiv(N, BN)
    if INTERPRET:
        j = 0
        while j < n_blocks:
            acc, nm, dsc = _grad_step(j, t0, t, x, rho_x, g_x, shift_x, inv_l_x, c_ptr, cstat, scale, N,
                                      acc, nm, dsc, FIXED, ROW_TERM, COL_TERM, NORMALIZE, H, BN, D, D_PAD,
                                      UPCAST_DOT)
            j += 1
    else:
        for j in range(0, n_blocks):
            acc, nm, dsc = _grad_step(j, t0, t, x, rho_x, g_x, shift_x, inv_l_x, c_ptr, cstat, scale, N,
                                      acc, nm, dsc, FIXED, ROW_TERM, COL_TERM, NORMALIZE, H, BN, D, D_PAD,
                                      UPCAST_DOT)
    return acc, nm, dsc


@triton.jit
def _grad_walks(t0, t, xa, rho_a, ga, shift_a, inv_l_a, xb, rho_b, gb, shift_b, inv_l_b,
                a_ptr, b_ptr, stat_a, stat_b, scale, N, acc_a, nm_a, dsc_a, acc_b, nm_b, dsc_b,
                FIXED: tl.constexpr, BOTH: tl.constexpr, NORMALIZE: tl.constexpr,
                H: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """The cross backward's walks, one half after the other (nt_xent: `_ntxent_bwd_kernel`)."""
    # q rows (half a) against k columns: row term = q->k softmax, column term = k->q (BOTH);
    # k rows (half b) against q columns: row term = k->q (BOTH), column term = q->k.
    acc_a, nm_a, dsc_a = _grad_walk(t0, t, xa, rho_a, ga, shift_a, inv_l_a, b_ptr, stat_b, scale, N,
                                    acc_a, nm_a, dsc_a, FIXED, True, BOTH, NORMALIZE, H, BN, D, D_PAD,
                                    UPCAST_DOT, INTERPRET)
    acc_b, nm_b, dsc_b = _grad_walk(t0, t, xb, rho_b, gb, shift_b, inv_l_b, a_ptr, stat_a, scale, N,
                                    acc_b, nm_b, dsc_b, FIXED, BOTH, True, NORMALIZE, H, BN, D, D_PAD,
                                    UPCAST_DOT, INTERPRET)
    return acc_a, nm_a, dsc_a, acc_b, nm_b, dsc_b


@triton.jit
def _input_grad(u, du, r, NORMALIZE: tl.constexpr):
    """Through n(x) = x r: dz = r (du - u (u . du)) when ||x|| > eps, r du below (n is linear there)."""
    if NORMALIZE:
        proj = tl.where(r < 1.0 / _EPS, tl.sum(u * du, 1), 0.0)
        return r[:, None] * (du - u * proj[:, None])
    else:
        return du


@_tuned("bwd")
@triton.jit
def _bwd_kernel(a_ptr, b_ptr, rho_ptr, r_ptr, scale_ptr, g_a_ptr, g_b_ptr, shift_ptr, inv_l_ptr,
                da_ptr, db_ptr, dscale_part_ptr, N, N_BUCKET, D: tl.constexpr, D_PAD: tl.constexpr,
                BOTH: tl.constexpr, NORMALIZE: tl.constexpr,
                H: tl.constexpr, BN: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """Cross backward: da = dq, db = dk for the pair block (rows q_t, k_t), dscale partial to
    dscale_part[program]; one half after the other (the halves meet different column tensors).
    shift / inv_l hold [a rows; b rows] (2N each), from the stats walk."""
    scale = tl.load(scale_ptr)
    pid = tl.program_id(0)
    t0 = pid * H
    t = t0 + tl.arange(0, H)
    row_mask = t < N
    HAS_GB: tl.constexpr = BOTH
    xa = _load_rows(a_ptr, t, row_mask, D, D_PAD)
    xb = _load_rows(b_ptr, t, row_mask, D, D_PAD)
    if NORMALIZE:
        rho_a = tl.load(rho_ptr + t, mask=row_mask, other=0.0)
        rho_b = tl.load(rho_ptr + N + t, mask=row_mask, other=0.0)
        rho_a_ptr = rho_ptr
        rho_b_ptr = rho_ptr + N
    else:
        rho_a = tl.full((H,), 1.0, tl.float32)
        rho_b = rho_a
        rho_a_ptr = shift_ptr  # not read
        rho_b_ptr = shift_ptr
    ga = tl.load(g_a_ptr + t, mask=row_mask, other=0.0)
    if HAS_GB:
        gb = tl.load(g_b_ptr + t, mask=row_mask, other=0.0)
    else:
        gb = tl.zeros((H,), tl.float32)
    shift_a = tl.load(shift_ptr + t, mask=row_mask, other=0.0)
    shift_b = tl.load(shift_ptr + N + t, mask=row_mask, other=0.0)
    inv_l_a = tl.load(inv_l_ptr + t, mask=row_mask, other=0.0)
    inv_l_b = tl.load(inv_l_ptr + N + t, mask=row_mask, other=0.0)
    stat_a = (rho_a_ptr, g_a_ptr, shift_ptr, inv_l_ptr)
    stat_b = (rho_b_ptr, g_b_ptr, shift_ptr + N, inv_l_ptr + N)
    acc_a = tl.zeros((H, D_PAD), tl.float32)
    acc_b = tl.zeros((H, D_PAD), tl.float32)
    zero = tl.zeros((H,), tl.float32)
    nm_a, dsc_a, nm_b, dsc_b = zero, zero, zero, zero
    # one uniform branch on the loaded scale: the fixed shift (one exp per entry) or the running max
    if NORMALIZE:
        if 2.0 * scale <= _FIXED_SHIFT_LIMIT:
            acc_a, nm_a, dsc_a, acc_b, nm_b, dsc_b = _grad_walks(
                t0, t, xa, rho_a, ga, shift_a, inv_l_a, xb, rho_b, gb, shift_b, inv_l_b,
                a_ptr, b_ptr, stat_a, stat_b, scale, N, acc_a, nm_a, dsc_a, acc_b, nm_b, dsc_b,
                True, BOTH, NORMALIZE, H, BN, D, D_PAD, UPCAST_DOT, INTERPRET)
        else:
            acc_a, nm_a, dsc_a, acc_b, nm_b, dsc_b = _grad_walks(
                t0, t, xa, rho_a, ga, shift_a, inv_l_a, xb, rho_b, gb, shift_b, inv_l_b,
                a_ptr, b_ptr, stat_a, stat_b, scale, N, acc_a, nm_a, dsc_a, acc_b, nm_b, dsc_b,
                False, BOTH, NORMALIZE, H, BN, D, D_PAD, UPCAST_DOT, INTERPRET)
    else:  # features as given: logits unbounded, always the running max
        acc_a, nm_a, dsc_a, acc_b, nm_b, dsc_b = _grad_walks(
            t0, t, xa, rho_a, ga, shift_a, inv_l_a, xb, rho_b, gb, shift_b, inv_l_b,
            a_ptr, b_ptr, stat_a, stat_b, scale, N, acc_a, nm_a, dsc_a, acc_b, nm_b, dsc_b,
            False, BOTH, NORMALIZE, H, BN, D, D_PAD, UPCAST_DOT, INTERPRET)
    # epilogue: the positive pair (a_t, b_t). w = G_ab + G_ba = g_a (P_ab - 1) + g_b (P_ba - 1)
    #         = -(g_a nm_a + g_b nm_b), exact to fp32 relative precision when P -> 1.
    w = -(ga * nm_a + gb * nm_b)
    if NORMALIZE:
        r_a = tl.load(r_ptr + t, mask=row_mask, other=0.0)
        r_b = tl.load(r_ptr + N + t, mask=row_mask, other=0.0)
    else:
        r_a = rho_a
        r_b = rho_b
    # one half after the other, each accumulator consumed in place (fewer live (H, D) tiles)
    # the rows are reloaded (L2-hot) rather than kept live from the walk in another layout
    ub = rho_b[:, None] * _load_rows(b_ptr, t, row_mask, D, D_PAD).to(tl.float32)
    acc_a = scale * (acc_a + w[:, None] * ub)
    ua = rho_a[:, None] * _load_rows(a_ptr, t, row_mask, D, D_PAD).to(tl.float32)
    cos_ab = tl.sum(ua * ub, 1)
    _store_block(da_ptr, t0, N, _input_grad(ua, acc_a, r_a, NORMALIZE), D, H, D_PAD)
    acc_b = scale * (acc_b + w[:, None] * ua)
    _store_block(db_ptr, t0, N, _input_grad(ub, acc_b, r_b, NORMALIZE), D, H, D_PAD)
    # dL/ds = sum_ij G_ij cos_ij: the walks saw every negative pair from both of its rows
    part = 0.5 * tl.sum(dsc_a + dsc_b, 0) + tl.sum(tl.where(row_mask, w * cos_ab, 0.0), 0)
    tl.store(dscale_part_ptr + pid, part)


# ---------------------------------------------------------------------------------------------
# nt_xent backward, stacked: both halves of the pair block share every column load
# ---------------------------------------------------------------------------------------------
@triton.jit
def _stacked_step(j, t0, t, x, rho_x, g_x, shift_x, inv_l_x, z_ptr, rho_ptr, g_ptr, shift_ptr, inv_l_ptr,
                  scale, N, acc, nm, dsc, FIXED: tl.constexpr, H: tl.constexpr, BN: tl.constexpr,
                  D: tl.constexpr, D_PAD: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Column block j of Z = [z1; z2] (2N rows) against the 2H stacked rows [a_t; b_t].
    Column c is pair index c mod N: it is the row's self (c == R) or its positive (c == R +- N)
    exactly when c mod N == t, so one test masks both out of W."""
    cols = j * BN + tl.arange(0, BN)
    col_mask = cols < 2 * N
    c_mod = tl.where(cols >= N, cols - N, cols)  # >= N past the end: masked as outside by _grad_tile
    lo = j * BN
    hi = lo + BN
    special = ((lo < t0 + H) & (hi > t0)) | ((lo < N + t0 + H) & (hi > N + t0)) | (hi > 2 * N)
    c = _load_rows(z_ptr, cols, col_mask, D, D_PAD)
    rho_c = tl.load(rho_ptr + cols, mask=col_mask, other=0.0)
    g_c = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
    shift_c = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    inv_l_c = tl.load(inv_l_ptr + cols, mask=col_mask, other=0.0)
    return _grad_tile(x, rho_x, g_x, shift_x, inv_l_x, t, c, rho_c, g_c, shift_c, inv_l_c, c_mod, special,
                      scale, N, acc, nm, dsc, FIXED, True, True, True, UPCAST_DOT)


@triton.jit
def _stacked_walk(t0, t, x, rho_x, g_x, shift_x, inv_l_x, z_ptr, rho_ptr, g_ptr, shift_ptr, inv_l_ptr,
                  scale, N, acc, nm, dsc, FIXED: tl.constexpr, H: tl.constexpr, BN: tl.constexpr,
                  D: tl.constexpr, D_PAD: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    n_blocks = tl.cdiv(2 * N, BN)
    if INTERPRET:
        j = 0
        while j < n_blocks:
            acc, nm, dsc = _stacked_step(j, t0, t, x, rho_x, g_x, shift_x, inv_l_x, z_ptr, rho_ptr, g_ptr,
                                         shift_ptr, inv_l_ptr, scale, N, acc, nm, dsc, FIXED, H, BN, D,
                                         D_PAD, UPCAST_DOT)
            j += 1
    else:
        for j in range(0, n_blocks):
            acc, nm, dsc = _stacked_step(j, t0, t, x, rho_x, g_x, shift_x, inv_l_x, z_ptr, rho_ptr, g_ptr,
                                         shift_ptr, inv_l_ptr, scale, N, acc, nm, dsc, FIXED, H, BN, D,
                                         D_PAD, UPCAST_DOT)
    return acc, nm, dsc


@triton.jit
def _halves(v, H: tl.constexpr):
    """(2H,) -> its first and second H entries."""
    return tl.split(tl.permute(tl.reshape(v, (2, H)), (1, 0)))


@_tuned("bwd_stacked")
@triton.jit
def _ntxent_bwd_kernel(z_ptr, rho_ptr, r_ptr, scale_ptr, g_ptr, shift_ptr, inv_l_ptr, da_ptr, db_ptr,
                       dscale_part_ptr, N, N_BUCKET, D: tl.constexpr, D_PAD: tl.constexpr,
                       H: tl.constexpr, BN: tl.constexpr, UPCAST_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """nt_xent da, db for pair block t0.. and its dscale partial. z = [z1'; z2'] (2N, D) scaled rows;
    rho, r, g, shift, inv_l are (2N,) in the same row order. The program's 2H rows R = t + N*half
    are one stacked tile, so each column block of Z is loaded once for both halves (the per-half
    walk of `_bwd_kernel` loads it twice): half the L2 traffic, and a 2H-row MMA tile."""
    scale = tl.load(scale_ptr)
    pid = tl.program_id(0)
    t0 = pid * H
    rr = tl.arange(0, 2 * H)
    half = rr // H
    t = t0 + rr - half * H
    row_mask = t < N
    R = t + half * N
    x = _load_rows(z_ptr, R, row_mask, D, D_PAD)
    rho_x = tl.load(rho_ptr + R, mask=row_mask, other=0.0)
    g_x = tl.load(g_ptr + R, mask=row_mask, other=0.0)
    shift_x = tl.load(shift_ptr + R, mask=row_mask, other=0.0)
    inv_l_x = tl.load(inv_l_ptr + R, mask=row_mask, other=0.0)
    acc = tl.zeros((2 * H, D_PAD), tl.float32)
    nm = tl.zeros((2 * H,), tl.float32)
    dsc = tl.zeros((2 * H,), tl.float32)
    if 2.0 * scale <= _FIXED_SHIFT_LIMIT:
        acc, nm, dsc = _stacked_walk(t0, t, x, rho_x, g_x, shift_x, inv_l_x, z_ptr, rho_ptr, g_ptr, shift_ptr,
                                     inv_l_ptr, scale, N, acc, nm, dsc, True, H, BN, D, D_PAD, UPCAST_DOT,
                                     INTERPRET)
    else:
        acc, nm, dsc = _stacked_walk(t0, t, x, rho_x, g_x, shift_x, inv_l_x, z_ptr, rho_ptr, g_ptr, shift_ptr,
                                     inv_l_ptr, scale, N, acc, nm, dsc, False, H, BN, D, D_PAD, UPCAST_DOT,
                                     INTERPRET)
    # epilogue, per half (as `_bwd_kernel`'s): w = -(g_a nm_a + g_b nm_b) is the positive pair's weight
    acc_a, acc_b = tl.split(tl.permute(tl.reshape(acc, (2, H, D_PAD)), (1, 2, 0)))
    nm_a, nm_b = _halves(nm, H)
    th = t0 + tl.arange(0, H)
    hmask = th < N
    ga = tl.load(g_ptr + th, mask=hmask, other=0.0)
    gb = tl.load(g_ptr + N + th, mask=hmask, other=0.0)
    w = -(ga * nm_a + gb * nm_b)
    rho_a = tl.load(rho_ptr + th, mask=hmask, other=0.0)
    rho_b = tl.load(rho_ptr + N + th, mask=hmask, other=0.0)
    ub = rho_b[:, None] * _load_rows(z_ptr, th + N, hmask, D, D_PAD).to(tl.float32)
    acc_a = scale * (acc_a + w[:, None] * ub)
    ua = rho_a[:, None] * _load_rows(z_ptr, th, hmask, D, D_PAD).to(tl.float32)
    cos_ab = tl.sum(ua * ub, 1)
    r_a = tl.load(r_ptr + th, mask=hmask, other=0.0)
    _store_block(da_ptr, t0, N, _input_grad(ua, acc_a, r_a, True), D, H, D_PAD)
    acc_b = scale * (acc_b + w[:, None] * ua)
    r_b = tl.load(r_ptr + N + th, mask=hmask, other=0.0)
    _store_block(db_ptr, t0, N, _input_grad(ub, acc_b, r_b, True), D, H, D_PAD)
    part = 0.5 * tl.sum(dsc, 0) + tl.sum(tl.where(hmask, w * cos_ab, 0.0), 0)
    tl.store(dscale_part_ptr + pid, part)


# ---------------------------------------------------------------------------------------------
# Launchers (PLAN.md's backend interface; inputs validated by the caller)
# ---------------------------------------------------------------------------------------------
_PREP_BLOCK = 16


def _check_d(D):
    if D > MAX_DIM:
        raise ValueError(f"feature dimension D={D} exceeds the Triton kernels' MAX_DIM={MAX_DIM}")


def _prepare(a, b, normalize):
    """(a', b', rho, r): the scaled copies and the row factors, or the raw inputs when not normalize."""
    if not normalize:
        return a, b, a.new_empty(0, dtype=torch.float32), a.new_empty(0, dtype=torch.float32)
    N, D = a.shape
    d_pad = max(16, triton.next_power_of_2(D))
    scaled = torch.empty((2, N, D), device=a.device, dtype=a.dtype)
    rho = torch.empty(2 * N, device=a.device, dtype=torch.float32)
    r = torch.empty(2 * N, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(N, _PREP_BLOCK),)
    for half, x in enumerate((a, b)):
        _prep_rows_kernel[grid](x, scaled[half], rho[half * N:], r[half * N:], N, D, D_PAD=d_pad,
                                BLOCK_R=_PREP_BLOCK)
    return scaled[0], scaled[1], rho, r


def _pair_grid(N):
    return lambda meta: (triton.cdiv(N, meta["H"]),)


def _walk_launch(a, b, rho, scale, lse_a, lse_b, outs, ntxent, both, normalize, stats):
    N, D = a.shape
    _walk_kernel[_pair_grid(N)](a, b, rho, scale, lse_a, lse_b, *outs, N, _n_bucket(N), D,
                                D_PAD=max(16, triton.next_power_of_2(D)), NTXENT=ntxent, BOTH=both,
                                NORMALIZE=normalize, STATS=stats, UPCAST_DOT=_INTERPRET,
                                INTERPRET=_INTERPRET)


def _backward(g_a, g_b, a, b, scale, lse_a, lse_b, ntxent, both, normalize):
    N, D = a.shape
    _check_d(D)
    a_s, b_s, rho, r = _prepare(a, b, normalize)
    shift = torch.empty(2 * N, device=a.device, dtype=torch.float32)
    inv_l = torch.empty(2 * N, device=a.device, dtype=torch.float32)
    _walk_launch(a_s, b_s, rho, scale, lse_a, lse_b, (shift[:N], shift[N:], inv_l[:N], inv_l[N:]),
                 ntxent, both, normalize, stats=True)
    if not (ntxent or both):  # one-direction info_nce: the k rows carry no statistics
        shift[N:].zero_()
        inv_l[N:].zero_()
    da = torch.empty_like(a)
    db = torch.empty_like(b)
    kind = "bwd_stacked" if ntxent else "bwd"
    smallest_h = min(h for h, _, _, _ in configs_for(kind, _dtype_class(a.dtype), 16))
    parts = torch.empty(triton.cdiv(N, smallest_h), device=a.device, dtype=torch.float32)
    grid = _pair_grid(N)
    used = []

    def grid_recording(meta):
        used.append(grid(meta)[0])
        return grid(meta)

    d_pad = max(16, triton.next_power_of_2(D))
    if ntxent:
        # the stacked kernel reads [z1'; z2'] and [g_a; g_b] as single (2N, ...) arrays: both pairs of
        # views are the halves of one contiguous buffer (_prepare's `scaled`, ntxent_bwd's `grad`)
        assert b_s.data_ptr() == a_s.data_ptr() + N * D * a_s.element_size()
        assert g_b.data_ptr() == g_a.data_ptr() + N * g_a.element_size()
        z = a_s.as_strided((2 * N, D), (D, 1))
        g = g_a.as_strided((2 * N,), (1,))
        _ntxent_bwd_kernel[grid_recording](z, rho, r, scale, g, shift, inv_l, da, db, parts, N, _n_bucket(N),
                                           D, D_PAD=d_pad, UPCAST_DOT=_INTERPRET, INTERPRET=_INTERPRET)
    else:
        _bwd_kernel[grid_recording](a_s, b_s, rho, r, scale, g_a, g_b, shift, inv_l, da, db, parts, N,
                                    _n_bucket(N), D, D_PAD=d_pad, BOTH=both,
                                    NORMALIZE=normalize, UPCAST_DOT=_INTERPRET, INTERPRET=_INTERPRET)
    # the partials of the config that ran, summed by one deterministic torch reduction
    dscale = parts[:used[-1]].sum()
    return da, db, dscale


def _scale_arg(scale, like):
    if not (isinstance(scale, torch.Tensor) and scale.dim() == 0 and scale.dtype == torch.float32
            and scale.device == like.device):
        raise TypeError("scale must be a 0-d float32 tensor on the inputs' device "
                        f"(got {type(scale).__name__} {getattr(scale, 'dtype', '')} {getattr(scale, 'device', '')})")
    return scale


def ntxent_fwd(z1, z2, scale):
    """-> (loss (2N,), lse (2N,)), fp32."""
    N, D = z1.shape
    _check_d(D)
    scale = _scale_arg(scale, z1)
    a, b, rho, _ = _prepare(z1, z2, True)
    lse = torch.empty(2 * N, device=z1.device, dtype=torch.float32)
    loss = torch.empty(2 * N, device=z1.device, dtype=torch.float32)
    _walk_launch(a, b, rho, scale, lse, lse, (lse[:N], lse[N:], loss[:N], loss[N:]),
                 ntxent=True, both=True, normalize=True, stats=False)
    return loss, lse


def ntxent_bwd(grad, z1, z2, scale, lse):
    """-> (dz1, dz2, dscale): input-dtype grads and dL/dscale (0-d fp32)."""
    N = z1.shape[0]
    scale = _scale_arg(scale, z1)
    grad = grad.to(torch.float32).contiguous()
    return _backward(grad[:N], grad[N:], z1, z2, scale, lse[:N], lse[N:], True, True, True)


def cross_fwd(q, k, scale, both, normalize=True):
    """-> (row_loss (N,), col_loss (N,) or (0,), row_lse (N,), col_lse (N,) or (0,)), fp32."""
    N, D = q.shape
    _check_d(D)
    scale = _scale_arg(scale, q)
    both, normalize = bool(both), bool(normalize)
    a, b, rho, _ = _prepare(q, k, normalize)
    row_loss, row_lse = (torch.empty(N, device=q.device, dtype=torch.float32) for _ in range(2))
    if both:  # separate tensors: a custom op's outputs may not alias each other
        col_loss, col_lse = (torch.empty(N, device=q.device, dtype=torch.float32) for _ in range(2))
    else:
        col_loss, col_lse = (torch.empty(0, device=q.device, dtype=torch.float32) for _ in range(2))
    outs = (row_lse, col_lse if both else row_lse, row_loss, col_loss if both else row_loss)
    _walk_launch(a, b, rho, scale, row_lse, row_lse, outs, ntxent=False, both=both, normalize=normalize,
                 stats=False)
    return row_loss, col_loss, row_lse, col_lse


def cross_bwd(grad_row, grad_col, q, k, scale, row_lse, col_lse, both, normalize=True):
    """-> (dq, dk, dscale): input-dtype grads and dL/dscale (0-d fp32)."""
    scale = _scale_arg(scale, q)
    both, normalize = bool(both), bool(normalize)
    grad_row = grad_row.to(torch.float32).contiguous()
    grad_col = grad_col.to(torch.float32).contiguous() if both else grad_row
    col_lse = col_lse.contiguous() if both else row_lse
    return _backward(grad_row, grad_col, q, k, scale, row_lse.contiguous(), col_lse, False, both, normalize)


# ---------------------------------------------------------------------------------------------
# Offline sm_90 compile specs (tests/test_triton_sm90.py, benchmarks/ptx_table.py)
# ---------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def sm90_specs():
    """One compile spec per autotune config of each kernel, at D = 128 (bf16 and fp32) and D = 512
    (bf16): dicts with name, fn (the @triton.jit function), signature, constexprs, num_warps,
    num_stages, and `no_atomics` (the backward kernels must have none)."""
    specs = []
    for dtype, D in ((torch.bfloat16, 128), (torch.float32, 128), (torch.bfloat16, 512)):
        ty = "*" + _TRITON_DTYPE[dtype]
        d_pad = triton.next_power_of_2(D)
        cls = _dtype_class(dtype)
        for kind, fn, variants in (
            ("walk", _walk_kernel.fn, [("ntxent_fwd", dict(NTXENT=True, BOTH=True, NORMALIZE=True, STATS=False)),
                                       ("ntxent_bwd_stats", dict(NTXENT=True, BOTH=True, NORMALIZE=True, STATS=True)),
                                       ("cross_fwd_raw", dict(NTXENT=False, BOTH=True, NORMALIZE=False, STATS=False))]),
            ("bwd_stacked", _ntxent_bwd_kernel.fn, [("ntxent_bwd", dict())]),
            ("bwd", _bwd_kernel.fn, [("cross_bwd", dict(BOTH=True, NORMALIZE=True))]),
        ):
            if kind == "bwd_stacked":
                sig = {"z_ptr": ty, "rho_ptr": "*fp32", "r_ptr": "*fp32", "scale_ptr": "*fp32", "g_ptr": "*fp32",
                       "shift_ptr": "*fp32", "inv_l_ptr": "*fp32", "da_ptr": ty, "db_ptr": ty,
                       "dscale_part_ptr": "*fp32", "N": "i32", "N_BUCKET": "i32"}
            elif kind == "walk":
                sig = {"a_ptr": ty, "b_ptr": ty, "rho_ptr": "*fp32", "scale_ptr": "*fp32", "lse_a_ptr": "*fp32",
                       "lse_b_ptr": "*fp32", "out1_a_ptr": "*fp32", "out1_b_ptr": "*fp32", "out2_a_ptr": "*fp32",
                       "out2_b_ptr": "*fp32", "N": "i32", "N_BUCKET": "i32"}
            else:
                sig = {"a_ptr": ty, "b_ptr": ty, "rho_ptr": "*fp32", "r_ptr": "*fp32", "scale_ptr": "*fp32",
                       "g_a_ptr": "*fp32", "g_b_ptr": "*fp32", "shift_ptr": "*fp32", "inv_l_ptr": "*fp32",
                       "da_ptr": ty, "db_ptr": ty, "dscale_part_ptr": "*fp32", "N": "i32", "N_BUCKET": "i32"}
            for label, flags in variants:
                for h, bn, warps, stages in _CONFIGS[kind, cls, _d_bucket(d_pad)]:
                    constexprs = dict(D=D, D_PAD=d_pad, H=h, BN=bn, UPCAST_DOT=False, INTERPRET=False, **flags)
                    specs.append(dict(
                        name=f"{label}[{_TRITON_DTYPE[dtype]},D={D}]", fn=fn,
                        signature=dict(sig, **{k: "constexpr" for k in constexprs}),
                        constexprs=constexprs, num_warps=warps, num_stages=stages,
                        config=f"H={h} BN={bn} w={warps} s={stages}", no_atomics=True))
    # no_atomics: none of these kernels has any (PLAN.md requires it of the backward ones)
    specs.append(dict(name="prep_rows[bf16,D=128]", fn=_prep_rows_kernel,
                      signature={"x_ptr": "*bf16", "xs_ptr": "*bf16", "rho_ptr": "*fp32", "r_ptr": "*fp32",
                                 "R": "i32", "D": "constexpr", "D_PAD": "constexpr", "BLOCK_R": "constexpr"},
                      constexprs=dict(D=128, D_PAD=128, BLOCK_R=_PREP_BLOCK), num_warps=4, num_stages=1,
                      config=f"BLOCK_R={_PREP_BLOCK} w=4", no_atomics=True))
    return specs


# the block pieces (rows against one column slice, for the distributed losses) use this module's helpers
from .infonce_block import block_bwd, block_fwd  # noqa: E402,F401
