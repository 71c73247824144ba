"""MoCo in Triton: the InfoNCE loss of queries against their key and a (K, D) queue, and the
ring-buffer enqueue of new keys into that queue.

Math (SPEC.md, moco_loss). u_i = n(q_i), v_i = n(k_i), w_j = queue_j AS STORED (the queue holds
already-normalised keys; it is not re-normalised), s = 1/T:
    l_i0 = s u_i.v_i,  l_ij = s u_i.w_j,  lse_i = log(exp(l_i0) + sum_j exp(l_ij)),  loss_i = lse_i - l_i0.
The gradient goes only into q. With P_ij = exp(l_ij - lse_i) and upstream g_i:
    dL/du_i = s g_i d_i,  d_i = (P_i0 - 1) v_i + o_i,  o_i = sum_j P_ij w_j
    dL/ds   = sum_i g_i c_i,  c_i = u_i.d_i
    dL/dq_i = s g_i e_i,  e_i = r_i (d_i - u_i c_i)   (r_i d_i when ||q_i|| <= eps, n(q) = q / eps)
g_i is one scalar per row, so e and c do not depend on it: the forward accumulates o_i next to
the log-sum-exp (flash attention's P @ V with V = the queue) and the backward is an O(N D)
scaling done in cl_fast/_ops/moco.py. Nothing of size N x K is ever allocated or recomputed.
s arrives as a 0-d fp32 device tensor and is loaded by the kernels (no host sync). Row norms are
taken on the rows divided by their max |x| (`_inv_norms`), so no square overflows for any finite
input. No atomics anywhere: every program owns its output rows.

Kernels, in the order a forward runs them:
1. `_moco_tiles_kernel`, grid (row blocks, splits, D chunks of o): the queue is cut into `splits`
   contiguous ranges so that a small batch still fills the GPU. Each program runs an online
   log-sum-exp over its range, tile by tile, with a running max m (the queue is used as stored,
   so no fixed bound on the logits is assumed):
       S = s r_i (q_i . w_j)   (dot on the raw rows: tensor cores for fp16/bf16)
       m' = max(m, rowmax S),  P = exp(S - m'),  l = l exp(m - m') + rowsum P,
       o = o exp(m - m') + P W_tile    (only when the gradient is wanted)
   and stores (m, l) per row and split, and o per row, split and D chunk (fp32).
2. `_moco_merge_kernel`, one program per row block: the positive and the splits,
       m = max(l_i0, m_s),  L = exp(l_i0 - m) + sum_s l_s exp(m_s - m),  loss = m + log L - l_i0,
       d = (exp(l_i0 - m) / L - 1) v + sum_s (exp(m_s - m) / L) o_s,  then c and e (two D passes).
Extra memory: (splits, N) fp32 twice and (splits, N, D) fp32 when the gradient is wanted.

`_enqueue_kernel`: queue[(ptr + b) mod K] = n(keys_b), cast to the queue's dtype, with ptr read
on the device (a 0-d integer tensor: no host sync); the launcher then advances ptr in place.
Keys that are a view of the queue are copied first (a program could otherwise read a key row
another program already overwrote).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["moco_fwd", "queue_update_", "MAX_DIM", "sm90_specs"]

# The D loops impose no limit on the feature dimension.
MAX_DIM = None

# Under TRITON_INTERPRET=1, tl.dot on bf16 operands multiplies the raw bit patterns, so the
# interpreter upcasts the dot operands to fp32. On a GPU the fp16/bf16 tiles go to the tensor cores.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Loop bounds are tl.constexpr (D, the keys per split, the number of splits): the interpreter
# cannot use a runtime int as a range() bound (numpy >= 2.4 refuses int() of the 1-element array
# it stores), and on a GPU they are fixed per model (one compile per queue size and feature width).
_EPS = tl.constexpr(1e-12)
# Start of the running max: finite, so exp(m - m') is 0 or 1 and never exp(-inf + inf).
_M_FLOOR = tl.constexpr(-1e30)

# D up to this width keeps the query block in registers for the whole queue walk; wider features
# loop over D in chunks of _BLOCK_D_WIDE for the logits, and split o over the grid's third axis.
_SINGLE_CHUNK_D = 128
_BLOCK_D_WIDE = 64
_BLOCK_DV_WIDE = 128


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the queue-walk kernel's autotune configs on a GPU.
# BLOCK_M = 128 spills registers on sm_90 at D = 128 with the gradient (the (BLOCK_M, D) query block
# and the o accumulator both live in registers): 28-56 bytes of spill stores per thread in the
# offline compile (ptxas -v), so the row block stays at 32-64 rows.
_GPU_TILE_SHAPES = [(64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4)]


def _tile_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _GPU_TILE_SHAPES]


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST: both operands in fp32 (mixed dtypes, the interpreter)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision=PRECISION)
    else:
        return tl.dot(a, b)


@triton.jit
def _row_absmax(x_ptr, base, row_mask, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """a_i = max_d |x_id| for a block of rows (fp32; 0 for masked rows)."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + base[:, None] + cols[None, :], mask=row_mask[:, None] & (cols < D)[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
    return amax


@triton.jit
def _scaled_sq_norms(x_ptr, base, row_mask, amax, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_d (x_id / a_i)^2 in [1, D] (0 for a zero row): the squares cannot overflow, so
    ||x_i|| = a_i sqrt(this) is exact to rounding for any finite row (torch.linalg.vector_norm's
    scaling). A division, not a reciprocal: 1 / a_i overflows for a subnormal a_i."""
    divisor = tl.where(amax > 0, amax, 1.0)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + base[:, None] + cols[None, :], mask=row_mask[:, None] & (cols < D)[None, :], other=0.0)
        x = x.to(tl.float32) / divisor[:, None]
        sq += tl.sum(x * x, 1)
    return sq


@triton.jit
def _inv_norms(x_ptr, rows, row_mask, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """r_i = 1 / max(||x_i||, eps) for a block of rows (fp32), without overflow for any finite row."""
    base = rows.to(tl.int64) * D
    amax = _row_absmax(x_ptr, base, row_mask, D, BLOCK_M, BLOCK_D)
    sq = _scaled_sq_norms(x_ptr, base, row_mask, amax, D, BLOCK_M, BLOCK_D)
    return 1.0 / tl.maximum(amax * tl.sqrt_rn(sq), _EPS)


@triton.autotune(configs=_tile_configs(), key=["D", "NEED_GRAD"])
@triton.jit
def _moco_tiles_kernel(
    q_ptr, queue_ptr, part_m_ptr, part_l_ptr, part_o_ptr,
    N, K, scale_ptr, D: tl.constexpr, KEYS_PER_SPLIT: tl.constexpr,
    NEED_GRAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    pid_d = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    q_base = rows.to(tl.int64) * D
    scale = tl.load(scale_ptr)  # on the device: no host sync
    row_scale = scale * _inv_norms(q_ptr, rows, row_mask, D, BLOCK_M, BLOCK_D)  # s r_i

    dk = tl.arange(0, BLOCK_D)
    if SINGLE_CHUNK:  # the whole (BLOCK_M, D) query block stays in registers
        q_tile = tl.load(q_ptr + q_base[:, None] + dk[None, :], mask=row_mask[:, None] & (dk < D)[None, :], other=0.0)
    dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = dv < D

    k_lo = split * KEYS_PER_SPLIT
    m = tl.full((BLOCK_M,), _M_FLOOR, dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    o = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for offset in range(0, KEYS_PER_SPLIT, BLOCK_N):
        in_split = offset + tl.arange(0, BLOCK_N)
        cols = k_lo + in_split
        col_mask = (in_split < KEYS_PER_SPLIT) & (cols < K)
        w_base = cols.to(tl.int64) * D
        if SINGLE_CHUNK:
            w_mask = col_mask[:, None] & (dk < D)[None, :]
            w = tl.load(queue_ptr + w_base[:, None] + dk[None, :], mask=w_mask, other=0.0)
            dots = _dot(q_tile, tl.trans(w), UPCAST, PRECISION)
        else:
            dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dcols = d0 + dk
                d_ok = (dcols < D)[None, :]
                a = tl.load(q_ptr + q_base[:, None] + dcols[None, :], mask=row_mask[:, None] & d_ok, other=0.0)
                b = tl.load(queue_ptr + w_base[:, None] + dcols[None, :], mask=col_mask[:, None] & d_ok, other=0.0)
                dots += _dot(a, tl.trans(b), UPCAST, PRECISION)
        S = tl.where(col_mask[None, :], dots * row_scale[:, None], float("-inf"))
        m_new = tl.maximum(m, tl.max(S, 1))
        alpha = tl.exp(m - m_new)
        P = tl.exp(S - m_new[:, None])
        l = l * alpha + tl.sum(P, 1)
        m = m_new
        if NEED_GRAD:
            if SINGLE_CHUNK:
                wv = w
            else:
                wv_mask = col_mask[:, None] & dv_mask[None, :]
                wv = tl.load(queue_ptr + w_base[:, None] + dv[None, :], mask=wv_mask, other=0.0)
            W_DTYPE: tl.constexpr = queue_ptr.dtype.element_ty
            if W_DTYPE == tl.float16:
                # fp16 has 5 exponent bits: P relative to the running max can flush to zero, so
                # each row of P is scaled by its tile max and the product scaled back in fp32.
                p_scale = tl.max(P, 1)
                p_scale = tl.where(p_scale > 0, p_scale, 1.0)
                part = _dot((P / p_scale[:, None]).to(W_DTYPE), wv, UPCAST, PRECISION) * p_scale[:, None]
            else:
                part = _dot(P.to(W_DTYPE), wv, UPCAST, PRECISION)
            o = o * alpha[:, None] + part

    stat = split.to(tl.int64) * N + rows
    if pid_d == 0:
        tl.store(part_m_ptr + stat, m, mask=row_mask)
        tl.store(part_l_ptr + stat, l, mask=row_mask)
    if NEED_GRAD:
        tl.store(part_o_ptr + stat[:, None] * D + dv[None, :], o, mask=row_mask[:, None] & dv_mask[None, :])


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small x (Goldberg: the rounding of 1 + x cancels in the ratio)."""
    one_plus = 1.0 + x
    exact = one_plus == 1.0
    return tl.where(exact, x, tl.log(one_plus) * (x / tl.where(exact, 1.0, one_plus - 1.0)))


@triton.jit
def _merged_d(k_ptr, part_o_ptr, k_base, rows, row_mask, cols, col_mask, r_k, pos_coef, m, inv_L,
              part_m_ptr, N, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BLOCK_M, BLOCK_D) chunk of d = (P0 - 1) v + sum_s (exp(m_s - m) / L) o_s."""
    mask = row_mask[:, None] & col_mask[None, :]
    kk = tl.load(k_ptr + k_base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    d = pos_coef[:, None] * (r_k[:, None] * kk)  # v = r_k k first: r_k * pos_coef may underflow
    for sp in range(0, SPLITS):
        stat = sp * N + rows
        weight = tl.exp(tl.load(part_m_ptr + stat, mask=row_mask, other=0.0) - m) * inv_L
        o = tl.load(part_o_ptr + stat.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        d += weight[:, None] * o
    return d


@triton.jit
def _moco_merge_kernel(
    q_ptr, k_ptr, part_m_ptr, part_l_ptr, part_o_ptr, loss_ptr, e_ptr, c_ptr,
    N, scale_ptr, D: tl.constexpr, SPLITS: tl.constexpr,
    NEED_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    base = rows.to(tl.int64) * D
    scale = tl.load(scale_ptr)
    # Row norms and q.k on the rows scaled by their max |x| (no overflow of the squares):
    # q' = q / a_q, k' = k / a_k, ||q|| = a_q ||q'||, and l0 = s n(q).n(k) = s (q'.k') (a_q r_q) (a_k r_k),
    # where a r <= 1 always (a <= ||x||, and a <= ||x|| < eps where the norm is clamped).
    a_q = _row_absmax(q_ptr, base, row_mask, D, BLOCK_M, BLOCK_D)
    a_k = _row_absmax(k_ptr, base, row_mask, D, BLOCK_M, BLOCK_D)
    div_q = tl.where(a_q > 0, a_q, 1.0)
    div_k = tl.where(a_k > 0, a_k, 1.0)
    qq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    kk = tl.zeros((BLOCK_M,), dtype=tl.float32)
    qk = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        a = tl.load(q_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32) / div_q[:, None]
        b = tl.load(k_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32) / div_k[:, None]
        qq += tl.sum(a * a, 1)
        kk += tl.sum(b * b, 1)
        qk += tl.sum(a * b, 1)
    norm_q = a_q * tl.sqrt_rn(qq)
    r_q = 1.0 / tl.maximum(norm_q, _EPS)
    r_k = 1.0 / tl.maximum(a_k * tl.sqrt_rn(kk), _EPS)
    l0 = scale * qk * (a_q * r_q) * (a_k * r_k)

    # m_neg = max_s m_s, m = max(l0, m_neg), L_neg = sum_s l_s exp(m_s - m), L = exp(l0 - m) + L_neg.
    # The loss lse - l0 is formed without cancelling against l0: log1p(L_neg) where the positive is
    # the max (the loss is small there), else (m - l0) + log L; likewise P0 - 1 = -L_neg / L.
    m_neg = tl.full((BLOCK_M,), _M_FLOOR, dtype=tl.float32)
    for sp in range(0, SPLITS):
        m_neg = tl.maximum(m_neg, tl.load(part_m_ptr + sp * N + rows, mask=row_mask, other=0.0),
                           propagate_nan=tl.PropagateNan.ALL)
    m = tl.maximum(l0, m_neg, propagate_nan=tl.PropagateNan.ALL)
    L_neg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for sp in range(0, SPLITS):
        stat = sp * N + rows
        m_s = tl.load(part_m_ptr + stat, mask=row_mask, other=0.0)
        L_neg += tl.load(part_l_ptr + stat, mask=row_mask, other=0.0) * tl.exp(m_s - m)
    L = tl.exp(l0 - m) + L_neg
    loss = tl.where(l0 >= m_neg, _log1p(L_neg), (m - l0) + tl.log(L))
    tl.store(loss_ptr + rows, loss, mask=row_mask)

    if NEED_GRAD:
        inv_L = 1.0 / L
        pos_coef = -L_neg * inv_L
        # pass 1: c = u . d  (u = r_q q formed first: q itself may be huge)
        c = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            d = _merged_d(k_ptr, part_o_ptr, base, rows, row_mask, cols, col_mask, r_k, pos_coef, m, inv_L,
                          part_m_ptr, N, D, SPLITS, BLOCK_M, BLOCK_D)
            a = tl.load(q_ptr + base[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            c += tl.sum((r_q[:, None] * a.to(tl.float32)) * d, 1)
        tl.store(c_ptr + rows, c, mask=row_mask)
        # pass 2: e = r (d - u c), or r d where the norm is clamped
        proj = tl.where(norm_q > _EPS, c, 0.0)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            mask = row_mask[:, None] & col_mask[None, :]
            d = _merged_d(k_ptr, part_o_ptr, base, rows, row_mask, cols, col_mask, r_k, pos_coef, m, inv_L,
                          part_m_ptr, N, D, SPLITS, BLOCK_M, BLOCK_D)
            a = tl.load(q_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            e = r_q[:, None] * (d - proj[:, None] * (r_q[:, None] * a))
            tl.store(e_ptr + base[:, None] + cols[None, :], e, mask=mask)


@triton.jit
def _enqueue_kernel(queue_ptr, keys_ptr, ptr_ptr, B, K, D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    start = tl.load(ptr_ptr).to(tl.int64)
    start = ((start % K) + K) % K  # any integer pointer wraps into [0, K)
    dest = ((start + rows) % K).to(tl.int64) * D
    src = rows.to(tl.int64) * D
    r = _inv_norms(keys_ptr, rows, row_mask, D, BLOCK_B, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(keys_ptr + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = x * r[:, None]
        tl.store(queue_ptr + dest[:, None] + cols[None, :], y.to(queue_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers (inputs are checked by cl_fast/moco.py; here: contiguous, one device)
# ---------------------------------------------------------------------------------------------
def _num_splits(N: int, K: int, device: torch.device) -> int:
    """Contiguous queue ranges per row block: enough programs to fill the GPU (two waves),
    at least 512 keys per range. Under the interpreter: two ranges, to exercise the merge."""
    if _INTERPRET or device.type != "cuda":
        return min(2, K)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(N, 64)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(K, 512)))


def moco_fwd(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, scale: torch.Tensor, need_grad: bool,
             splits: int | None = None, block_d: int | None = None):
    """-> (loss (N,), e (N, D) or (0, D), c (N,) or (0,)), fp32; see the module docstring.

    `scale` is the 0-d fp32 tensor s on q's device; the kernels load it (no host sync).

    `splits` and `block_d` override the queue split count and the D chunk width (tests use them
    to reach the multi-split and multi-chunk paths at small sizes).
    """
    q, k, queue = q.contiguous(), k.contiguous(), queue.contiguous()
    N, D = q.shape
    K = queue.shape[0]
    f32 = dict(device=q.device, dtype=torch.float32)
    splits = _num_splits(N, K, q.device) if splits is None else max(1, min(int(splits), K))
    keys_per_split = triton.cdiv(K, splits)
    if not _INTERPRET:  # whole tiles per range on a GPU (every BLOCK_N divides 128)
        keys_per_split = triton.cdiv(keys_per_split, 128) * 128
    splits = triton.cdiv(K, keys_per_split)  # no empty range

    if block_d is None:
        single = D <= _SINGLE_CHUNK_D
        block_d = max(16, triton.next_power_of_2(D)) if single else _BLOCK_D_WIDE
        block_dv = block_d if single else _BLOCK_DV_WIDE
    else:
        single = D <= block_d
        block_dv = block_d
    d_chunks = triton.cdiv(D, block_dv) if need_grad else 1

    # dtype policy of the dots: one input dtype -> its native dot (exact ieee for fp32); mixed
    # dtypes (say a bf16 q from autocast against an fp32 queue) -> fp32 operands, tf32 when q is
    # already half precision (no accuracy left to lose), ieee otherwise.
    upcast = _INTERPRET or q.dtype != queue.dtype
    precision = "tf32" if (q.dtype != torch.float32 and not _INTERPRET) else "ieee"

    part_m = torch.empty((splits, N), **f32)
    part_l = torch.empty((splits, N), **f32)
    part_o = torch.empty((splits, N, D) if need_grad else (1,), **f32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), splits, d_chunks)  # noqa: E731
    _moco_tiles_kernel[grid](
        q, queue, part_m, part_l, part_o, N, K, scale, D=D, KEYS_PER_SPLIT=keys_per_split,
        NEED_GRAD=bool(need_grad), UPCAST=upcast, PRECISION=precision,
        BLOCK_D=block_d, BLOCK_DV=block_dv, SINGLE_CHUNK=single,
    )

    loss = torch.empty((N,), **f32)
    e = torch.empty((N if need_grad else 0, D), **f32)
    c = torch.empty((N if need_grad else 0,), **f32)
    merge_block_m = 16
    merge_block_d = 32 if _INTERPRET else min(128, max(16, triton.next_power_of_2(D)))
    _moco_merge_kernel[(triton.cdiv(N, merge_block_m),)](
        q, k, part_m, part_l, part_o, loss, e, c, N, scale, D=D, SPLITS=splits,
        NEED_GRAD=bool(need_grad), BLOCK_M=merge_block_m, BLOCK_D=merge_block_d,
    )
    return loss, e, c


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b may overlap in memory (same storage; the byte ranges are not compared)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.numel() > 0


def queue_update_(queue: torch.Tensor, keys: torch.Tensor, ptr: torch.Tensor) -> None:
    """queue[(ptr + b) % K] = n(keys_b) in place; ptr (0-d integer tensor, queue's device) <- (ptr + B) % K.

    The pointer is read by the kernel on the device and advanced by an in-place tensor op after
    it, in stream order: no host synchronisation, CUDA-graph friendly.
    """
    K, D = queue.shape
    B = keys.shape[0]
    keys = keys.contiguous()
    if _shares_memory(keys, queue):
        # keys read by one program may be queue rows another program is overwriting (keys a view
        # of the queue): read them from a copy, as the sequential definition does.
        keys = keys.clone()
    block_b = 16
    block_d = 32 if _INTERPRET else min(256, max(16, triton.next_power_of_2(D)))
    _enqueue_kernel[(triton.cdiv(B, block_b),)](queue, keys, ptr, B, K, D=D, BLOCK_B=block_b, BLOCK_D=block_d)
    ptr.add_(B).remainder_(K)


# ---------------------------------------------------------------------------------------------
# Offline compile specs (tests/test_triton_sm90.py compiles them for sm_90 without a GPU)
# ---------------------------------------------------------------------------------------------
def sm90_specs():
    """One spec per kernel and GPU autotune config, at a representative MoCo shape: bf16 q and
    queue, D = 128 (one D chunk: the query block stays in registers), gradient wanted, 4 splits
    of 16384 keys. Dicts with name, fn (the @triton.jit function), signature (argument -> Triton
    type), constexprs, num_warps, num_stages, config and no_atomics (benchmarks/ptx_table.py)."""
    D = 128
    tiles_signature = {
        "q_ptr": "*bf16", "queue_ptr": "*bf16", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
        "part_o_ptr": "*fp32", "N": "i32", "K": "i32", "scale_ptr": "*fp32",
    }
    tiles_constexprs = {
        "D": D, "KEYS_PER_SPLIT": 16384, "NEED_GRAD": True, "UPCAST": False, "PRECISION": "tf32",
        "BLOCK_D": D, "BLOCK_DV": D, "SINGLE_CHUNK": True,
    }
    specs = []
    for block_m, block_n, warps, stages in _GPU_TILE_SHAPES:
        constexprs = dict(tiles_constexprs, BLOCK_M=block_m, BLOCK_N=block_n)
        specs.append(_spec("moco_tiles[bf16,D=128]", _moco_tiles_kernel.fn, tiles_signature, constexprs, warps, stages,
                           f"BLOCK_M={block_m} BLOCK_N={block_n} w={warps} s={stages}"))
    merge_signature = {
        "q_ptr": "*bf16", "k_ptr": "*bf16", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_o_ptr": "*fp32",
        "loss_ptr": "*fp32", "e_ptr": "*fp32", "c_ptr": "*fp32", "N": "i32", "scale_ptr": "*fp32",
    }
    merge_constexprs = {"D": D, "SPLITS": 4, "NEED_GRAD": True, "BLOCK_M": 16, "BLOCK_D": D}
    specs.append(_spec("moco_merge[bf16,D=128]", _moco_merge_kernel, merge_signature, merge_constexprs, 4, 3,
                       "BLOCK_M=16 BLOCK_D=128 SPLITS=4 w=4 s=3"))
    enqueue_signature = {"queue_ptr": "*bf16", "keys_ptr": "*bf16", "ptr_ptr": "*i64", "B": "i32", "K": "i32"}
    enqueue_constexprs = {"D": D, "BLOCK_B": 16, "BLOCK_D": D}
    specs.append(_spec("moco_enqueue[bf16,D=128]", _enqueue_kernel, enqueue_signature, enqueue_constexprs, 4, 3,
                       "BLOCK_B=16 BLOCK_D=128 w=4 s=3"))
    return specs


def _spec(name, fn, signature, constexprs, num_warps, num_stages, config):
    signature = dict(signature, **{key: "constexpr" for key in constexprs})
    return dict(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=num_warps,
                num_stages=num_stages, config=config, no_atomics=True)
