"""Fused InfoNCE-family losses in Triton: nt_xent (SimCLR) and the cross-view info_nce / clip_loss.

The math is DESIGN.md's; the contract is SPEC.md's. Notation: r_i = 1 / max(||z_i||, eps),
u_i = r_i z_i, s = scale, S_ij = s (z_i . z_j) r_i r_j. Every dot runs on the RAW input rows (tensor
cores for fp16/bf16); the normalisation costs one fp32 multiply per tile entry. |S_ij| <= s.

Kernels, in the order a forward + backward runs them:

1. `_row_norms_kernel` (row pass, both ops): for paired rows a_i, b_i (z1/z2 or q/k) writes
   r = [r(a), r(b)] (2N fp32; for nt_xent this is r of Z = cat(z1, z2)) and the positive cosine
   cos_i = u(a_i) . u(b_i) (N fp32). Recomputed in the backward, never saved.
2. Tile passes of the forward. Fixed shift c = s (safe while 2s <= 80, since E >= exp(-2s) stays a
   normal fp32): E_ij = exp(S_ij - s), l_i = sum_j E_ij accumulated with fp32 atomics.
   - `_ntxent_fwd_kernel`: S is symmetric, so only tiles I <= J run (program id -> (I, J) by
     `_triangle_tile`); row sums go to block I and column sums (= row sums of the mirrored tile)
     to block J. A diagonal tile holds both orders of each pair: self masked, row sums only.
   - `_cross_fwd_kernel`: all tiles of q k^T; the same E gives the row sums (q->k) and, when
     BOTH, the column sums (k->q), written to l[N:].
   Fallback when 2s > 80: `_ntxent_max_kernel` / `_cross_max_kernel` first write the row (and
   column) maxima m with fp32 atomic max, then the sum pass uses exp(S - m_i) for row sums and
   exp(S - m_j) for column sums (two exps per entry).
3. `_lse_loss_kernel` (row pass): lse_i = shift_i + log l_i, loss_i = lse_i - s cos_{i mod N}.
   Stored between forward and backward: lse only (M fp32; row_lse and col_lse for cross).
4. Tile passes of the backward (same walks), upstream grads g:
   dL/dS_ij = G_ij = g_i (P_ij - [j is i's positive]),  P_ij = exp(S_ij - lse_i).
   The tiles recompute S from the inputs and handle the NEGATIVES (positive pairs masked like the
   diagonal), as one weight per entry:
   - nt_xent: W_ij = g_i P_ij + g_j P_ji = E_ij (a_i + a_j), a_i = g_i exp(s - lse_i) (one exp);
     dL/du_i = s sum_j W_ij u_j. Off-diagonal tile: dU_I += W u_J, dU_J += W^T u_I; diagonal
     tile: dU_I += W u_I only (W already holds both orders).
   - cross: W_ij = gr_i Pr_ij + gc_j Pc_ij = E_ij (a_i + b_j); dU_I += W v_J, dV_J += W^T u_I.
   Fallback: W from two exps, exp(S - lse_i) and exp(S - lse_j) (exp(s - lse) could overflow).
   The W @ Z products run on the input dtype (W cast; for fp16 each row of W is scaled by its max
   first). dU is an fp32 (2N, D) buffer filled with atomics from both sides of each tile: the
   products loop over D in BLOCK_D chunks, so a block's whole (BLOCK, D) gradient cannot stay in
   registers across tiles (D up to MAX_DIM); each chunk is added once per tile instead.
   Alongside, neg_mass_i = sum_{j negative} P_ij (row sums; column sums for block J / k->q), and
   dL/ds = sum_ij G_ij (u_i . u_j) gets sum W_ij S_ij / s (a diagonal nt_xent tile counts each
   pair twice, hence half).
5. `_bwd_rows_kernel` (row pass, both ops): the positive pair, G_i,p(i) = g_i (P_i,p(i) - 1) =
   -g_i neg_mass_i (exact to fp32 relative precision even when P -> 1, where 1 - exp(S - lse)
   would not be), giving du_i += s G u_p(i) from both directions and dL/ds += G cos_i; then the
   normalisation backward dz_i = r_i (du_i - u_i (u_i . du_i)) (= du_i / eps when
   ||z_i|| <= eps), cast to the input dtype.

Nothing of size M*M is ever allocated: per-row vectors (r, l, m, lse, neg_mass) and the (2N, D) dU
buffer. D is a constexpr (like HEAD_DIM in the fused-attention tutorial): one compile per width,
known trip counts for the D loops (and no Python range() over a runtime scalar under the
interpreter, which numpy >= 2.4 rejects).
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["ntxent_fwd", "ntxent_bwd", "cross_fwd", "cross_bwd", "MAX_DIM"]

# The largest feature dimension D the launchers take (read by cl_fast._dispatch.max_dim). The D loops
# impose no hard limit; the bound gives absurd widths a clear error (or the dispatcher's fallback)
# instead of one compile and a kernel that re-reads every row per tile.
MAX_DIM = 65536

# Under TRITON_INTERPRET=1, tl.dot on bf16 operands multiplies the raw bit patterns (triton issue
# 11584), so the interpreter upcasts dot operands to fp32 after the cast to the input dtype (the
# rounding a GPU would do is kept). On a GPU the fp16/bf16 tiles go to the tensor cores as they are.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
UPCAST_DOT = _INTERPRET

# Past this value of 2s, exp(S - s) may underflow (fp32 normal min ~ e^-87): use the max pass.
_FIXED_SHIFT_LIMIT = 80.0

_EPS = tl.constexpr(1e-12)


# ---------------------------------------------------------------------------------------------
# Block sizes: autotuned on a GPU (keyed on D; the autotuner adds the tensors' dtypes to the key),
# one small fixed config under the interpreter. Tile kernels accumulate with atomics, so every
# benchmark trial starts from reset buffers (reset_to_zero / restore_value).
# (BLOCK_M = BLOCK_N, BLOCK_D, num_warps, num_stages). fp32 runs tl.dot on FMAs ("ieee"), which
# keep whole BLOCK_D slices of both operands in registers: small BLOCK_D there. The backward holds
# the W tile next to the products' accumulators: smaller tiles or more warps than the forward.
# ptxas reports no register spills for any of these on sm_90 at D = 256 (compiled offline).
# ---------------------------------------------------------------------------------------------
_TILE_SHAPES = {
    ("fwd", "fp32"): [(64, 16, 4, 3), (32, 32, 4, 3), (64, 32, 8, 3), (128, 16, 8, 3)],
    ("fwd", "half"): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4), (64, 128, 8, 3)],
    ("bwd", "fp32"): [(64, 16, 4, 3), (32, 32, 4, 3), (64, 32, 8, 3)],
    ("bwd", "half"): [(64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
}
_INTERPRET_SHAPE = (32, 64, 4, 1)
_CONFIG_DTYPE = {}  # id(config) -> "fp32" / "half", read by the pruning


# CL_FAST_AUTOTUNE=0 keeps only the first config of each dtype class: no tuning sweep, one compile
# per (D, dtype) - what a test run over many widths wants on a GPU.
_AUTOTUNE = os.environ.get("CL_FAST_AUTOTUNE", "1") != "0"


def _tile_configs(kind, square):
    if _INTERPRET:
        shapes = [("fp32", _INTERPRET_SHAPE)]
    else:
        count = None if _AUTOTUNE else 1
        shapes = [(cls, shape) for cls in ("fp32", "half") for shape in _TILE_SHAPES[kind, cls][:count]]
    configs = []
    for dtype_class, (block, block_d, warps, stages) in shapes:
        meta = {"BLOCK": block} if square else {"BLOCK_M": block, "BLOCK_N": block}
        config = triton.Config(dict(meta, BLOCK_D=block_d), num_warps=warps, num_stages=stages)
        _CONFIG_DTYPE[id(config)] = dtype_class
        configs.append(config)
    return configs


def _prune(configs, named_args, **kwargs):
    """Keep the configs of the inputs' dtype class. D is a constexpr, so every config is a compile:
    clamp BLOCK_D to D's power of two and drop the configs that become duplicates."""
    inputs = named_args.get("z1_ptr", named_args.get("q_ptr"))
    dtype_class = "fp32" if inputs.dtype == torch.float32 else "half"
    cap = max(16, triton.next_power_of_2(named_args["D"]))
    pruned = {}
    for c in configs:
        if _CONFIG_DTYPE[id(c)] != dtype_class:
            continue
        meta = dict(c.kwargs, BLOCK_D=min(c.kwargs["BLOCK_D"], cap))
        key = (tuple(sorted(meta.items())), c.num_warps, c.num_stages)
        pruned.setdefault(key, triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(pruned.values())


def _tuned(kind, square, **hooks):
    return triton.autotune(configs=_tile_configs(kind, square), key=["D"],
                           prune_configs_by={"early_config_prune": _prune}, **hooks)


_ROW_BLOCK = 16
_ROW_BLOCK_D = 64
_VEC_BLOCK = 64 if _INTERPRET else 1024


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, UPCAST_DOT: tl.constexpr):
    """a @ b accumulated in fp32; exact fp32 products for fp32 inputs (accuracy target 1e-4)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _triangle_tile(pid):
    """Program id -> tile (I, J), I <= J, enumerating the upper triangle column by column:
    pid = J (J + 1) / 2 + I. The float sqrt guess is fixed up by one step either way."""
    J = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    J = tl.where(J * (J + 1) // 2 > pid, J - 1, J)
    J = tl.where((J + 1) * (J + 2) // 2 <= pid, J + 1, J)
    return pid - J * (J + 1) // 2, J


@triton.jit
def _cat_rows(z1_ptr, z2_ptr, rows, N, D):
    """Row pointers into Z = cat(z1, z2) without materialising the concatenation."""
    rows64 = rows.to(tl.int64)
    return tl.where(rows < N, z1_ptr + rows64 * D, z2_ptr + (rows64 - N) * D)


@triton.jit
def _tile_dot(base_i, mask_i, base_j, mask_j, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST_DOT: tl.constexpr):
    """Raw dots z_i . z_j of a (BLOCK_M, BLOCK_N) tile, looping over D."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        a = tl.load(base_i[:, None] + cols[None, :], mask=mask_i[:, None] & col_mask[None, :], other=0.0)
        b = tl.load(base_j[:, None] + cols[None, :], mask=mask_j[:, None] & col_mask[None, :], other=0.0)
        acc += _dot(a, tl.trans(b), UPCAST_DOT)
    return acc


@triton.jit
def _add_weighted_rows(out_ptr, out_rows, out_mask, w, base_z, z_mask, D,
                       BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """out[out_rows] += w @ Z (fp32 atomics), Z's rows given by the pointers base_z, looping over D.

    w (fp32) is cast to the input dtype for the tensor cores. fp16 has 5 exponent bits and weights
    like g_i P_ij ~ 1/M^2 would flush to zero, so for fp16 each row of w is divided by its max
    (exact algebra: the product's row is multiplied back in fp32). bf16 keeps fp32's exponent range.
    """
    DTYPE: tl.constexpr = base_z.dtype.element_ty
    if DTYPE == tl.float16:
        w_scale = tl.max(tl.abs(w), 1)
        w_scale = tl.where(w_scale > 0, w_scale, 1.0)
        w = w / w_scale[:, None]
    w = w.to(DTYPE)
    out_base = out_rows.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        z = tl.load(base_z[:, None] + cols[None, :], mask=z_mask[:, None] & col_mask[None, :], other=0.0)
        part = _dot(w, z, UPCAST_DOT)
        if DTYPE == tl.float16:
            part = part * w_scale[:, None]
        tl.atomic_add(out_ptr + out_base[:, None] + cols[None, :], part,
                      mask=out_mask[:, None] & col_mask[None, :])


@triton.jit
def _ntxent_logits(z1_ptr, z2_ptr, r_ptr, scale, rows_i, rows_j, N, M, D,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """S tile of Z Z^T and the mask of its counted entries (inside M, self excluded)."""
    mask_i = rows_i < M
    mask_j = rows_j < M
    base_i = _cat_rows(z1_ptr, z2_ptr, rows_i, N, D)
    base_j = _cat_rows(z1_ptr, z2_ptr, rows_j, N, D)
    acc = _tile_dot(base_i, mask_i, base_j, mask_j, D, BLOCK, BLOCK, BLOCK_D, UPCAST_DOT)
    r_i = tl.load(r_ptr + rows_i, mask=mask_i, other=0.0)
    r_j = tl.load(r_ptr + rows_j, mask=mask_j, other=0.0)
    S = acc * ((scale * r_i)[:, None] * r_j[None, :])
    valid = mask_i[:, None] & mask_j[None, :] & (rows_i[:, None] != rows_j[None, :])
    return S, valid, base_i, base_j, r_i, r_j


@triton.jit
def _cross_logits(q_ptr, k_ptr, r_ptr, scale, rows, cols, N, D,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  UPCAST_DOT: tl.constexpr):
    """S tile of q k^T (r holds [r(q), r(k)]) and the mask of entries inside N x N."""
    mask_i = rows < N
    mask_j = cols < N
    base_q = q_ptr + rows.to(tl.int64) * D
    base_k = k_ptr + cols.to(tl.int64) * D
    acc = _tile_dot(base_q, mask_i, base_k, mask_j, D, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST_DOT)
    r_q = tl.load(r_ptr + rows, mask=mask_i, other=0.0)
    r_k = tl.load(r_ptr + N + cols, mask=mask_j, other=0.0)
    S = acc * ((scale * r_q)[:, None] * r_k[None, :])
    valid = mask_i[:, None] & mask_j[None, :]
    return S, valid, base_q, base_k, r_q, r_k


# ---------------------------------------------------------------------------------------------
# Row kernels (shared by both ops; a_i pairs with b_i: z1/z2 for nt_xent, q/k for cross)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _row_norms_kernel(a_ptr, b_ptr, r_ptr, cos_ptr, N, D: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """r[:N] = r(a), r[N:] = r(b), cos_i = u(a_i) . u(b_i)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    base = rows.to(tl.int64) * D
    aa = tl.zeros((BLOCK_R,), dtype=tl.float32)
    bb = tl.zeros((BLOCK_R,), dtype=tl.float32)
    ab = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = base[:, None] + cols[None, :]
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        aa += tl.sum(a * a, 1)
        bb += tl.sum(b * b, 1)
        ab += tl.sum(a * b, 1)
    r_a = 1.0 / tl.maximum(tl.sqrt_rn(aa), _EPS)
    r_b = 1.0 / tl.maximum(tl.sqrt_rn(bb), _EPS)
    tl.store(r_ptr + rows, r_a, mask=row_mask)
    tl.store(r_ptr + N + rows, r_b, mask=row_mask)
    tl.store(cos_ptr + rows, ab * r_a * r_b, mask=row_mask)


@triton.jit
def _lse_loss_kernel(l_ptr, m_ptr, cos_ptr, lse_ptr, loss_ptr, scale, N, L,
                     FIXED_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """lse_i = shift_i + log l_i, loss_i = lse_i - s cos_(i mod N), for L = N or 2N rows."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < L
    l = tl.load(l_ptr + idx, mask=mask, other=1.0)
    if FIXED_SHIFT:
        lse = scale + tl.log(l)
    else:
        lse = tl.load(m_ptr + idx, mask=mask, other=0.0) + tl.log(l)
    pos = scale * tl.load(cos_ptr + idx % N, mask=mask, other=0.0)
    tl.store(lse_ptr + idx, lse, mask=mask)
    tl.store(loss_ptr + idx, lse - pos, mask=mask)


@triton.jit
def _bwd_rows_kernel(a_ptr, b_ptr, dU_ptr, neg_mass_ptr, ga_ptr, gb_ptr, da_ptr, db_ptr, dscale_ptr,
                     scale, N, D: tl.constexpr,
                     HAS_GB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dU[:N] / dU[N:] hold sum_j W_ij u_j for the a / b rows (without the factor s), positives excluded.

    The positive pair's weight is w = g_a (P_ab - 1) + g_b (P_ba - 1) = -(g_a nm_a + g_b nm_b), with
    nm = neg_mass = sum of P over the negatives. For a well-separated pair P_ab -> 1: 1 - P_ab from
    exp(s cos - lse) would carry lse's absolute rounding (~s * 2^-24), and rounding P_ab to the tile
    dot's fp16/bf16 before subtracting 1 would swamp the gradient; the negative mass keeps w to
    fp32 relative precision.
      du_a = s (dU_a + w u_b),  du_b = s (dU_b + w u_a),
      u_a . du_a = s (r_a (a . dU_a) + w cos),  dz_a = r_a (du_a - u_a (u_a . du_a)).
    Pass 1 accumulates the dots, pass 2 writes dz; dL/ds gets sum w cos.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    base = rows.to(tl.int64) * D
    base_b = (rows + N).to(tl.int64) * D
    aa = tl.zeros((BLOCK_R,), dtype=tl.float32)
    bb = tl.zeros((BLOCK_R,), dtype=tl.float32)
    ab = tl.zeros((BLOCK_R,), dtype=tl.float32)
    a_dUa = tl.zeros((BLOCK_R,), dtype=tl.float32)
    b_dUb = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = base[:, None] + cols[None, :]
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dUa = tl.load(dU_ptr + offs, mask=mask, other=0.0)
        dUb = tl.load(dU_ptr + base_b[:, None] + cols[None, :], mask=mask, other=0.0)
        aa += tl.sum(a * a, 1)
        bb += tl.sum(b * b, 1)
        ab += tl.sum(a * b, 1)
        a_dUa += tl.sum(a * dUa, 1)
        b_dUb += tl.sum(b * dUb, 1)
    norm_a = tl.sqrt_rn(aa)
    norm_b = tl.sqrt_rn(bb)
    r_a = 1.0 / tl.maximum(norm_a, _EPS)
    r_b = 1.0 / tl.maximum(norm_b, _EPS)
    cos = ab * r_a * r_b
    g_a = tl.load(ga_ptr + rows, mask=row_mask, other=0.0)
    w = -g_a * tl.load(neg_mass_ptr + rows, mask=row_mask, other=0.0)
    if HAS_GB:
        g_b = tl.load(gb_ptr + rows, mask=row_mask, other=0.0)
        w -= g_b * tl.load(neg_mass_ptr + N + rows, mask=row_mask, other=0.0)
    # Projection coefficients r_a (u_a . du_a) / s; zero below eps, where n(z) = z / eps is linear.
    proj_a = tl.where(norm_a > _EPS, r_a * (r_a * a_dUa + w * cos), 0.0)
    proj_b = tl.where(norm_b > _EPS, r_b * (r_b * b_dUb + w * cos), 0.0)
    tl.atomic_add(dscale_ptr, tl.sum(w * cos, 0))
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = base[:, None] + cols[None, :]
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dUa = tl.load(dU_ptr + offs, mask=mask, other=0.0)
        dUb = tl.load(dU_ptr + base_b[:, None] + cols[None, :], mask=mask, other=0.0)
        dua = dUa + (w * r_b)[:, None] * b
        dub = dUb + (w * r_a)[:, None] * a
        da = scale * r_a[:, None] * (dua - proj_a[:, None] * a)
        db = scale * r_b[:, None] * (dub - proj_b[:, None] * b)
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# nt_xent tile kernels: upper triangle of Z Z^T, square BLOCK x BLOCK tiles
# ---------------------------------------------------------------------------------------------
@_tuned("fwd", square=True, restore_value=["m_ptr"])
@triton.jit
def _ntxent_max_kernel(z1_ptr, z2_ptr, r_ptr, m_ptr, scale, N, M, D: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fallback only: m_i = max_{j != i} S_ij (m starts at -inf)."""
    I, J = _triangle_tile(tl.program_id(0))
    rows_i = I * BLOCK + tl.arange(0, BLOCK)
    rows_j = J * BLOCK + tl.arange(0, BLOCK)
    S, valid, _, _, _, _ = _ntxent_logits(z1_ptr, z2_ptr, r_ptr, scale, rows_i, rows_j, N, M, D,
                                          BLOCK, BLOCK_D, UPCAST_DOT)
    S = tl.where(valid, S, float("-inf"))
    tl.atomic_max(m_ptr + rows_i, tl.max(S, 1), mask=rows_i < M)
    tl.atomic_max(m_ptr + rows_j, tl.max(S, 0), mask=(rows_j < M) & (I != J))


@_tuned("fwd", square=True, reset_to_zero=["l_ptr"])
@triton.jit
def _ntxent_fwd_kernel(z1_ptr, z2_ptr, r_ptr, m_ptr, l_ptr, scale, N, M, D: tl.constexpr,
                       FIXED_SHIFT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                       UPCAST_DOT: tl.constexpr):
    """l_i += sum_j exp(S_ij - shift_i) for block I (row sums) and block J (column sums)."""
    I, J = _triangle_tile(tl.program_id(0))
    rows_i = I * BLOCK + tl.arange(0, BLOCK)
    rows_j = J * BLOCK + tl.arange(0, BLOCK)
    S, valid, _, _, _, _ = _ntxent_logits(z1_ptr, z2_ptr, r_ptr, scale, rows_i, rows_j, N, M, D,
                                          BLOCK, BLOCK_D, UPCAST_DOT)
    if FIXED_SHIFT:
        E = tl.where(valid, tl.exp(S - scale), 0.0)
        row_sum = tl.sum(E, 1)
        col_sum = tl.sum(E, 0)
    else:
        m_i = tl.load(m_ptr + rows_i, mask=rows_i < M, other=0.0)
        m_j = tl.load(m_ptr + rows_j, mask=rows_j < M, other=0.0)
        row_sum = tl.sum(tl.where(valid, tl.exp(S - m_i[:, None]), 0.0), 1)
        col_sum = tl.sum(tl.where(valid, tl.exp(S - m_j[None, :]), 0.0), 0)
    tl.atomic_add(l_ptr + rows_i, row_sum, mask=rows_i < M)
    tl.atomic_add(l_ptr + rows_j, col_sum, mask=(rows_j < M) & (I != J))


@_tuned("bwd", square=True, reset_to_zero=["dU_ptr", "neg_mass_ptr", "dscale_ptr"])
@triton.jit
def _ntxent_bwd_kernel(z1_ptr, z2_ptr, r_ptr, g_ptr, lse_ptr, dU_ptr, neg_mass_ptr, dscale_ptr, scale, N, M,
                       D: tl.constexpr, FIXED_SHIFT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                       UPCAST_DOT: tl.constexpr):
    """dU_I += W r_J z_J, dU_J += W^T r_I z_I (I != J), W_ij = g_i P_ij + g_j P_ji over the negatives;
    neg_mass_i += sum_j P_ij over the negatives (the row kernel's 1 - P_i,p(i))."""
    I, J = _triangle_tile(tl.program_id(0))
    rows_i = I * BLOCK + tl.arange(0, BLOCK)
    rows_j = J * BLOCK + tl.arange(0, BLOCK)
    mask_i = rows_i < M
    mask_j = rows_j < M
    S, valid, base_i, base_j, r_i, r_j = _ntxent_logits(z1_ptr, z2_ptr, r_ptr, scale, rows_i, rows_j,
                                                        N, M, D, BLOCK, BLOCK_D, UPCAST_DOT)
    g_i = tl.load(g_ptr + rows_i, mask=mask_i, other=0.0)
    g_j = tl.load(g_ptr + rows_j, mask=mask_j, other=0.0)
    lse_i = tl.load(lse_ptr + rows_i, mask=mask_i, other=0.0)
    lse_j = tl.load(lse_ptr + rows_j, mask=mask_j, other=0.0)
    # Positive pairs (j = p(i), equivalently i = p(j)) are left to the row kernel.
    partner_i = tl.where(rows_i < N, rows_i + N, rows_i - N)
    valid = valid & (rows_j[None, :] != partner_i[:, None])
    if FIXED_SHIFT:
        # P_ij = E_ij exp(s - lse_i) = E_ij / l_i: W = E (a_i + a_j), a_i = g_i / l_i, one exp per entry.
        E = tl.where(valid, tl.exp(S - scale), 0.0)
        inv_l_i = tl.exp(scale - lse_i)
        inv_l_j = tl.exp(scale - lse_j)
        W = E * ((g_i * inv_l_i)[:, None] + (g_j * inv_l_j)[None, :])
        mass_i = tl.sum(E, 1) * inv_l_i
        mass_j = tl.sum(E, 0) * inv_l_j
    else:
        P_row = tl.where(valid, tl.exp(S - lse_i[:, None]), 0.0)  # P_ij
        P_col = tl.where(valid, tl.exp(S - lse_j[None, :]), 0.0)  # P_ji
        W = g_i[:, None] * P_row + g_j[None, :] * P_col
        mass_i = tl.sum(P_row, 1)
        mass_j = tl.sum(P_col, 0)
    tl.atomic_add(neg_mass_ptr + rows_i, mass_i, mask=mask_i)
    tl.atomic_add(neg_mass_ptr + rows_j, mass_j, mask=mask_j & (I != J))
    dscale = tl.sum(tl.sum(W * S, 1), 0) / scale
    tl.atomic_add(dscale_ptr, tl.where(I == J, 0.5 * dscale, dscale))
    _add_weighted_rows(dU_ptr, rows_i, mask_i, W * r_j[None, :], base_j, mask_j, D, BLOCK_D, UPCAST_DOT)
    if I != J:
        _add_weighted_rows(dU_ptr, rows_j, mask_j, tl.trans(W * r_i[:, None]), base_i, mask_i, D,
                           BLOCK_D, UPCAST_DOT)


# ---------------------------------------------------------------------------------------------
# cross tile kernels: all tiles of q k^T, positives on the diagonal
# ---------------------------------------------------------------------------------------------
@_tuned("fwd", square=False, restore_value=["m_ptr"])
@triton.jit
def _cross_max_kernel(q_ptr, k_ptr, r_ptr, m_ptr, scale, N, D: tl.constexpr, BOTH: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST_DOT: tl.constexpr):
    """Fallback only: row maxima to m[:N] and, when BOTH, column maxima to m[N:]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    S, valid, _, _, _, _ = _cross_logits(q_ptr, k_ptr, r_ptr, scale, rows, cols, N, D,
                                         BLOCK_M, BLOCK_N, BLOCK_D, UPCAST_DOT)
    S = tl.where(valid, S, float("-inf"))
    tl.atomic_max(m_ptr + rows, tl.max(S, 1), mask=rows < N)
    if BOTH:
        tl.atomic_max(m_ptr + N + cols, tl.max(S, 0), mask=cols < N)


@_tuned("fwd", square=False, reset_to_zero=["l_ptr"])
@triton.jit
def _cross_fwd_kernel(q_ptr, k_ptr, r_ptr, m_ptr, l_ptr, scale, N, D: tl.constexpr,
                      FIXED_SHIFT: tl.constexpr, BOTH: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST_DOT: tl.constexpr):
    """l[:N] += row sums of exp(S - shift), and l[N:] += column sums when BOTH."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    S, valid, _, _, _, _ = _cross_logits(q_ptr, k_ptr, r_ptr, scale, rows, cols, N, D,
                                         BLOCK_M, BLOCK_N, BLOCK_D, UPCAST_DOT)
    if FIXED_SHIFT:
        E = tl.where(valid, tl.exp(S - scale), 0.0)
        tl.atomic_add(l_ptr + rows, tl.sum(E, 1), mask=rows < N)
        if BOTH:
            tl.atomic_add(l_ptr + N + cols, tl.sum(E, 0), mask=cols < N)
    else:
        m_r = tl.load(m_ptr + rows, mask=rows < N, other=0.0)
        E_row = tl.where(valid, tl.exp(S - m_r[:, None]), 0.0)
        tl.atomic_add(l_ptr + rows, tl.sum(E_row, 1), mask=rows < N)
        if BOTH:
            m_c = tl.load(m_ptr + N + cols, mask=cols < N, other=0.0)
            E_col = tl.where(valid, tl.exp(S - m_c[None, :]), 0.0)
            tl.atomic_add(l_ptr + N + cols, tl.sum(E_col, 0), mask=cols < N)


@_tuned("bwd", square=False, reset_to_zero=["dU_ptr", "neg_mass_ptr", "dscale_ptr"])
@triton.jit
def _cross_bwd_kernel(q_ptr, k_ptr, r_ptr, gr_ptr, gc_ptr, row_lse_ptr, col_lse_ptr, dU_ptr, neg_mass_ptr,
                      dscale_ptr, scale, N, D: tl.constexpr, FIXED_SHIFT: tl.constexpr, BOTH: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST_DOT: tl.constexpr):
    """dU[rows] += W r_k k_J (q side), dU[N + cols] += W^T r_q q_I (k side),
    W_ij = gr_i Pr_ij + gc_j Pc_ij off the diagonal; neg_mass[:N] += off-diagonal row sums of Pr
    and, when BOTH, neg_mass[N:] += off-diagonal column sums of Pc."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_i = rows < N
    mask_j = cols < N
    S, valid, base_q, base_k, r_q, r_k = _cross_logits(q_ptr, k_ptr, r_ptr, scale, rows, cols, N, D,
                                                       BLOCK_M, BLOCK_N, BLOCK_D, UPCAST_DOT)
    valid = valid & (rows[:, None] != cols[None, :])  # positives are left to the row kernel
    gr = tl.load(gr_ptr + rows, mask=mask_i, other=0.0)
    row_lse = tl.load(row_lse_ptr + rows, mask=mask_i, other=0.0)
    if BOTH:
        gc = tl.load(gc_ptr + cols, mask=mask_j, other=0.0)
        col_lse = tl.load(col_lse_ptr + cols, mask=mask_j, other=0.0)
    if FIXED_SHIFT:
        E = tl.where(valid, tl.exp(S - scale), 0.0)
        inv_lr = tl.exp(scale - row_lse)
        W = E * (gr * inv_lr)[:, None]
        tl.atomic_add(neg_mass_ptr + rows, tl.sum(E, 1) * inv_lr, mask=mask_i)
        if BOTH:
            inv_lc = tl.exp(scale - col_lse)
            W += E * (gc * inv_lc)[None, :]
            tl.atomic_add(neg_mass_ptr + N + cols, tl.sum(E, 0) * inv_lc, mask=mask_j)
    else:
        P_row = tl.where(valid, tl.exp(S - row_lse[:, None]), 0.0)
        W = gr[:, None] * P_row
        tl.atomic_add(neg_mass_ptr + rows, tl.sum(P_row, 1), mask=mask_i)
        if BOTH:
            P_col = tl.where(valid, tl.exp(S - col_lse[None, :]), 0.0)
            W += gc[None, :] * P_col
            tl.atomic_add(neg_mass_ptr + N + cols, tl.sum(P_col, 0), mask=mask_j)
    tl.atomic_add(dscale_ptr, tl.sum(tl.sum(W * S, 1), 0) / scale)
    _add_weighted_rows(dU_ptr, rows, mask_i, W * r_k[None, :], base_k, mask_j, D, BLOCK_D, UPCAST_DOT)
    _add_weighted_rows(dU_ptr, N + cols, mask_j, tl.trans(W * r_q[:, None]), base_q, mask_i, D,
                       BLOCK_D, UPCAST_DOT)


# ---------------------------------------------------------------------------------------------
# Launchers (the backend interface of DESIGN.md; inputs already validated by the caller)
# ---------------------------------------------------------------------------------------------
def _check_d(D):
    if D > MAX_DIM:
        raise ValueError(f"feature dimension D={D} exceeds the Triton kernels' MAX_DIM={MAX_DIM}")


def _fixed_shift(scale):
    return 2.0 * scale <= _FIXED_SHIFT_LIMIT


def _row_norms(a, b):
    N, D = a.shape
    r = torch.empty(2 * N, device=a.device, dtype=torch.float32)
    cos = torch.empty(N, device=a.device, dtype=torch.float32)
    _row_norms_kernel[(triton.cdiv(N, _ROW_BLOCK),)](a, b, r, cos, N, D,
                                                     BLOCK_R=_ROW_BLOCK, BLOCK_D=_ROW_BLOCK_D)
    return r, cos


def _lse_loss(l, m, cos, scale, fixed):
    L, N = l.numel(), cos.numel()
    lse = torch.empty_like(l)
    loss = torch.empty_like(l)
    _lse_loss_kernel[(triton.cdiv(L, _VEC_BLOCK),)](l, m, cos, lse, loss, scale, N, L,
                                                    FIXED_SHIFT=fixed, BLOCK=_VEC_BLOCK)
    return loss, lse


def _bwd_rows(a, b, dU, neg_mass, ga, gb, dscale, scale):
    N, D = a.shape
    da = torch.empty_like(a)
    db = torch.empty_like(b)
    _bwd_rows_kernel[(triton.cdiv(N, _ROW_BLOCK),)](a, b, dU, neg_mass, ga, ga if gb is None else gb, da, db,
                                                    dscale, scale, N, D, HAS_GB=gb is not None,
                                                    BLOCK_R=_ROW_BLOCK, BLOCK_D=_ROW_BLOCK_D)
    return da, db


def _triangle_grid(M):
    def grid(meta):
        t = triton.cdiv(M, meta["BLOCK"])
        return (t * (t + 1) // 2,)
    return grid


def _square_grid(N):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))


def ntxent_fwd(z1, z2, scale):
    """-> (loss (2N,), lse (2N,)), fp32."""
    N, D = z1.shape
    _check_d(D)
    M = 2 * N
    scale = float(scale)
    fixed = _fixed_shift(scale)
    r, cos = _row_norms(z1, z2)
    l = torch.zeros(M, device=z1.device, dtype=torch.float32)
    m = l
    if not fixed:
        m = torch.full((M,), float("-inf"), device=z1.device, dtype=torch.float32)
        _ntxent_max_kernel[_triangle_grid(M)](z1, z2, r, m, scale, N, M, D, UPCAST_DOT=UPCAST_DOT)
    _ntxent_fwd_kernel[_triangle_grid(M)](z1, z2, r, m, l, scale, N, M, D, FIXED_SHIFT=fixed,
                                          UPCAST_DOT=UPCAST_DOT)
    return _lse_loss(l, m, cos, scale, fixed)


def ntxent_bwd(grad, z1, z2, scale, lse):
    """-> (dz1, dz2, dscale): input-dtype grads and dL/dscale (0-d fp32)."""
    N, D = z1.shape
    _check_d(D)
    M = 2 * N
    scale = float(scale)
    grad = grad.to(torch.float32).contiguous()
    r, _ = _row_norms(z1, z2)
    dU = torch.zeros(M, D, device=z1.device, dtype=torch.float32)
    neg_mass = torch.zeros(M, device=z1.device, dtype=torch.float32)
    dscale = torch.zeros((), device=z1.device, dtype=torch.float32)
    _ntxent_bwd_kernel[_triangle_grid(M)](z1, z2, r, grad, lse, dU, neg_mass, dscale, scale, N, M, D,
                                          FIXED_SHIFT=_fixed_shift(scale), UPCAST_DOT=UPCAST_DOT)
    dz1, dz2 = _bwd_rows(z1, z2, dU, neg_mass, grad[:N], grad[N:], dscale, scale)
    return dz1, dz2, dscale


def _require_normalize(normalize):
    if not normalize:
        raise ValueError("normalize=False (features used as given) is not implemented by the Triton cross "
                         "kernels yet; use normalize=True or the reference (backend='torch')")


def cross_fwd(q, k, scale, both, normalize=True):
    """-> (row_loss (N,), col_loss (N,) or (0,), row_lse (N,), col_lse (N,) or (0,)), fp32."""
    N, D = q.shape
    _check_d(D)
    _require_normalize(normalize)
    scale = float(scale)
    both = bool(both)
    fixed = _fixed_shift(scale)
    L = 2 * N if both else N
    r, cos = _row_norms(q, k)
    l = torch.zeros(L, device=q.device, dtype=torch.float32)
    m = l
    if not fixed:
        m = torch.full((L,), float("-inf"), device=q.device, dtype=torch.float32)
        _cross_max_kernel[_square_grid(N)](q, k, r, m, scale, N, D, BOTH=both, UPCAST_DOT=UPCAST_DOT)
    _cross_fwd_kernel[_square_grid(N)](q, k, r, m, l, scale, N, D, FIXED_SHIFT=fixed, BOTH=both,
                                       UPCAST_DOT=UPCAST_DOT)
    row_loss, row_lse = _lse_loss(l[:N], m[:N], cos, scale, fixed)
    if not both:
        empty = l.new_empty(0)
        return row_loss, empty, row_lse, empty.clone()
    col_loss, col_lse = _lse_loss(l[N:], m[N:], cos, scale, fixed)
    return row_loss, col_loss, row_lse, col_lse


def cross_bwd(grad_row, grad_col, q, k, scale, row_lse, col_lse, both, normalize=True):
    """-> (dq, dk, dscale): input-dtype grads and dL/dscale (0-d fp32)."""
    N, D = q.shape
    _check_d(D)
    _require_normalize(normalize)
    scale = float(scale)
    both = bool(both)
    grad_row = grad_row.to(torch.float32).contiguous()
    grad_col = grad_col.to(torch.float32).contiguous() if both else grad_row
    col_lse = col_lse if both else row_lse
    r, _ = _row_norms(q, k)
    dU = torch.zeros(2 * N, D, device=q.device, dtype=torch.float32)
    neg_mass = torch.zeros(2 * N, device=q.device, dtype=torch.float32)
    dscale = torch.zeros((), device=q.device, dtype=torch.float32)
    _cross_bwd_kernel[_square_grid(N)](q, k, r, grad_row, grad_col, row_lse, col_lse, dU, neg_mass, dscale,
                                       scale, N, D, FIXED_SHIFT=_fixed_shift(scale), BOTH=both,
                                       UPCAST_DOT=UPCAST_DOT)
    dq, dk = _bwd_rows(q, k, dU, neg_mass, grad_row, grad_col if both else None, dscale, scale)
    return dq, dk, dscale
