"""Fused SigLIP sigmoid loss in Triton (OpenCLIP SigLipLoss; SPEC.md), no N x N tensor.

Notation: x = image features, y = text features (N, D), used as given; s = scale, b = bias
(0-d fp32 DEVICE tensors, loaded inside the kernels: no host sync, CUDA-graph friendly).
    l_ij = s x_i . y_j + b,  z_ij = +1 if i == j else -1,
    row_loss_i = sum_j softplus(-z_ij l_ij),   softplus(t) = max(t, 0) + log1p(exp(-|t|)).
Backward with upstream g_i (one per row):
    d softplus(-z l) / dl = -z sigmoid(-z l)  ->  G_ij = g_i H_ij,
    H_ij = sigmoid(l_ij) (j != i),  H_ii = -sigmoid(-l_ii),
    dx_i = s sum_j G_ij y_j,  dy_j = s sum_i G_ij x_i,  ds = sum_ij G_ij x_i . y_j,  db = sum_ij G_ij.

Kernels:
1. `_fwd_kernel`, row-stationary: one program per BLOCK_M rows walks every column tile, the
   logits tile accumulated over D in BLOCK_D chunks, and keeps the row sums in registers. One
   fp32 per row is written; nothing is stored for the backward (it recomputes the tiles).
2. `_bwd_rows_kernel`, row-stationary: grid (row blocks, D slabs of BLOCK_DO columns). Each
   program owns dx[rows, slab]: acc += G' y_J[:, slab] over the column tiles; programs of slab 0
   also write the block's partial sums of ds and db (one fp32 each per program; the launcher adds
   the partials in fixed order). Atomic-free and deterministic.
3. `_bwd_cols_kernel`, column-stationary: grid (column blocks, D slabs); each program owns
   dy[cols, slab]: acc += G'^T x_I[:, slab] over the row tiles.
G' = G / max_i |g_i| (a device scalar), so the G' operand of the tile products stays in [-1, 1]
whatever the upstream scale (1/N for the mean): safe to cast to fp16/bf16 for the tensor cores;
the accumulator is multiplied back by s max|g| at the end. fp32 inputs multiply in IEEE fp32
("ieee": no TF32, which would miss the 1e-4 relative bound).
D wider than BLOCK_DO is covered by several slabs: each recomputes the logits tiles (the dot over
all of D), the price of keeping the accumulator in registers without atomics.
log1p(e) for e = exp(-|t|) in (0, 1] uses log(u) * e / (u - 1), u = 1 + e (exact to a few ulp,
and = e where u rounds to 1), so tiny softplus terms keep their relative precision.
"""

import os

import torch
import triton
import triton.language as tl

__all__ = ["siglip_fwd", "siglip_bwd", "MAX_DIM", "sm90_specs"]

MAX_DIM = 65536

# Under TRITON_INTERPRET=1, tl.dot on bf16 operands multiplies raw bit patterns (triton issue
# 11584): the interpreter upcasts dot operands to fp32 after the cast to the input dtype.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK_M = BLOCK_N, BLOCK_D, BLOCK_DO, num_warps, num_stages), per input dtype class. Chosen from
# the offline sm_90 compile (cuobjdump resource usage, D = 512): no spills, registers <= 211.
# fp32's IEEE dot runs on FMAs and needs more registers per tile: one stage, a 64-wide D slab.
# (64-wide BLOCK_D, or 4 warps, spill in every kernel: 255 registers plus a stack frame.)
_GPU_CONFIGS = {"fp32": (64, 32, 64, 8, 1), "16bit": (64, 32, 128, 8, 2)}
_INTERPRET_CONFIG = (16, 32, 32, 4, 1)


@triton.jit
def _dot(a, b, FP32: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if FP32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _logits_dots(x_ptr, y_ptr, rows, cols, N, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, FP32: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """x_rows . y_cols^T, (BLOCK_M, BLOCK_N) fp32, accumulated over D in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_mask = rows < N
    col_mask = cols < N
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        xt = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=row_mask[:, None] & dmask[None, :], other=0.0)
        yt = tl.load(y_ptr + cols[:, None] * D + dd[None, :], mask=col_mask[:, None] & dmask[None, :], other=0.0)
        acc += _dot(xt, tl.trans(yt), FP32, UPCAST_DOT)
    return acc


@triton.jit
def _log1p_small(e):
    """log1p(e) for e >= 0 (Goldberg's trick: exact where 1 + e rounds to 1)."""
    u = 1.0 + e
    exact = u == 1.0
    return tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _h_tile(dots, scale, bias, rows, cols, N):
    """H = dloss/dlogit without g: sigmoid(l) off the diagonal, -sigmoid(-l) on it; 0 outside N x N."""
    logits = scale * dots + bias
    diag = rows[:, None] == cols[None, :]
    t = tl.where(diag, -logits, logits)  # H = +-sigmoid(t), t = -z l
    e = tl.exp(-tl.abs(t))
    sig = tl.where(t < 0, e / (1.0 + e), 1.0 / (1.0 + e))
    h = tl.where(diag, -sig, sig)
    valid = (rows[:, None] < N) & (cols[None, :] < N)
    return tl.where(valid, h, 0.0)


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, loss_ptr, N, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                FP32: tl.constexpr, UPCAST_DOT: tl.constexpr, N_STATIC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # the tile loop's bound: the runtime N on a GPU; under the interpreter (where range() over a
    # runtime scalar fails with numpy >= 2.4) the launcher passes N as the constexpr N_STATIC
    for j0 in range(0, N_STATIC if N_STATIC > 0 else N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        dots = _logits_dots(x_ptr, y_ptr, rows, cols, N, D, BLOCK_M, BLOCK_N, BLOCK_D, FP32, UPCAST_DOT)
        logits = scale * dots + bias
        t = tl.where(rows[:, None] == cols[None, :], -logits, logits)  # softplus(-z l)
        sp = tl.maximum(t, 0.0) + _log1p_small(tl.exp(-tl.abs(t)))
        sp = tl.where(cols[None, :] < N, sp, 0.0)
        total += tl.sum(sp, axis=1)
    tl.store(loss_ptr + rows, total, mask=rows < N)


@triton.jit
def _bwd_rows_kernel(x_ptr, y_ptr, g_ptr, gmax_ptr, scale_ptr, bias_ptr, dx_ptr, ds_part_ptr, db_part_ptr, N,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DO: tl.constexpr, FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
                     N_STATIC: tl.constexpr):
    pid = tl.program_id(0)
    slab = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    out_cols = slab * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out_cols < D
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    gmax = tl.load(gmax_ptr)
    inv_gmax = tl.where(gmax > 0, 1.0 / gmax, 0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    g_rel = g * inv_gmax  # in [-1, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # the tile loop's bound: the runtime N on a GPU; under the interpreter (where range() over a
    # runtime scalar fails with numpy >= 2.4) the launcher passes N as the constexpr N_STATIC
    for j0 in range(0, N_STATIC if N_STATIC > 0 else N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        dots = _logits_dots(x_ptr, y_ptr, rows, cols, N, D, BLOCK_M, BLOCK_N, BLOCK_D, FP32, UPCAST_DOT)
        h = _h_tile(dots, scale, bias, rows, cols, N)
        w = h * g_rel[:, None]
        ds += tl.sum(h * dots, axis=1)
        db += tl.sum(h, axis=1)
        yt = tl.load(y_ptr + cols[:, None] * D + out_cols[None, :],
                     mask=(cols[:, None] < N) & out_mask[None, :], other=0.0)
        acc += _dot(w.to(yt.dtype), yt, FP32, UPCAST_DOT)
    acc = acc * (scale * gmax)
    tl.store(dx_ptr + rows[:, None] * D + out_cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=row_mask[:, None] & out_mask[None, :])
    if slab == 0:
        tl.store(ds_part_ptr + pid, tl.sum(ds * g, axis=0))
        tl.store(db_part_ptr + pid, tl.sum(db * g, axis=0))


@triton.jit
def _bwd_cols_kernel(x_ptr, y_ptr, g_ptr, gmax_ptr, scale_ptr, bias_ptr, dy_ptr, N,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DO: tl.constexpr, FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
                     N_STATIC: tl.constexpr):
    pid = tl.program_id(0)
    slab = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    out_cols = slab * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out_cols < D
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    gmax = tl.load(gmax_ptr)
    inv_gmax = tl.where(gmax > 0, 1.0 / gmax, 0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    # the tile loop's bound: the runtime N on a GPU; under the interpreter (where range() over a
    # runtime scalar fails with numpy >= 2.4) the launcher passes N as the constexpr N_STATIC
    for i0 in range(0, N_STATIC if N_STATIC > 0 else N, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        dots = _logits_dots(x_ptr, y_ptr, rows, cols, N, D, BLOCK_M, BLOCK_N, BLOCK_D, FP32, UPCAST_DOT)
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
        w = _h_tile(dots, scale, bias, rows, cols, N) * (g * inv_gmax)[:, None]
        xt = tl.load(x_ptr + rows[:, None] * D + out_cols[None, :], mask=row_mask[:, None] & out_mask[None, :],
                     other=0.0)
        acc += _dot(tl.trans(w.to(xt.dtype)), xt, FP32, UPCAST_DOT)
    acc = acc * (scale * gmax)
    tl.store(dy_ptr + cols[:, None] * D + out_cols[None, :], acc.to(dy_ptr.dtype.element_ty),
             mask=col_mask[:, None] & out_mask[None, :])


# ------------------------------------------------------------------------------ launchers
def _config(D: int, dtype: torch.dtype):
    if _INTERPRET:
        config = _INTERPRET_CONFIG
    else:
        config = _GPU_CONFIGS["fp32" if dtype == torch.float32 else "16bit"]
    block, block_d, block_do, warps, stages = config
    block_d = min(block_d, max(16, triton.next_power_of_2(D)))
    block_do = min(block_do, max(16, triton.next_power_of_2(D)))
    return block, block_d, block_do, warps, stages


def _check(x, y, scale, bias):
    if x.shape[1] > MAX_DIM:
        raise ValueError(f"feature dimension D={x.shape[1]} exceeds the Triton kernels' MAX_DIM={MAX_DIM}")
    for name, value in (("scale", scale), ("bias", bias)):
        if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype == torch.float32
                and value.device == x.device):
            raise TypeError(f"{name} must be a 0-d float32 tensor on the features' device ({x.device})")


def siglip_fwd(x, y, scale, bias):
    """-> row_loss (N,) fp32."""
    _check(x, y, scale, bias)
    x, y = x.contiguous(), y.contiguous()
    N, D = x.shape
    block, block_d, _, warps, stages = _config(D, x.dtype)
    loss = torch.empty(N, dtype=torch.float32, device=x.device)
    _fwd_kernel[(triton.cdiv(N, block),)](
        x, y, scale.reshape(()), bias.reshape(()), loss, N, D, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d,
        FP32=x.dtype == torch.float32, UPCAST_DOT=_INTERPRET, N_STATIC=N if _INTERPRET else 0,
        num_warps=warps, num_stages=stages,
    )
    return loss


def siglip_bwd(grad, x, y, scale, bias):
    """-> (dx, dy, dscale, dbias): gradients of sum(grad * row_loss); dscale, dbias 0-d fp32."""
    _check(x, y, scale, bias)
    x, y = x.contiguous(), y.contiguous()
    g = grad.to(torch.float32).contiguous()
    N, D = x.shape
    block, block_d, block_do, warps, stages = _config(D, x.dtype)
    blocks, slabs = triton.cdiv(N, block), triton.cdiv(D, block_do)
    gmax = g.abs().amax()  # a device scalar: no host sync
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    ds_part = torch.empty(blocks, dtype=torch.float32, device=x.device)
    db_part = torch.empty(blocks, dtype=torch.float32, device=x.device)
    common = dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, BLOCK_DO=block_do, FP32=x.dtype == torch.float32,
                  UPCAST_DOT=_INTERPRET, N_STATIC=N if _INTERPRET else 0, num_warps=warps, num_stages=stages)
    s, b = scale.reshape(()), bias.reshape(())
    _bwd_rows_kernel[(blocks, slabs)](x, y, g, gmax, s, b, dx, ds_part, db_part, N, D, **common)
    _bwd_cols_kernel[(blocks, slabs)](x, y, g, gmax, s, b, dy, N, D, **common)
    return dx, dy, ds_part.sum(), db_part.sum()


# ------------------------------------------------------------------------------ sm_90 compile specs
def sm90_specs(dims=(512,)):
    """Offline sm_90 compile specs (benchmarks/ptx_table.py, tests/test_triton_sm90.py): the three
    kernels per dtype at a representative CLIP width, with the GPU launch configs of _GPU_CONFIGS.
    Dicts with name, fn, signature, constexprs, num_warps, num_stages, config, no_atomics (every
    kernel here is atomic-free: the ds / db partials are one store per program)."""
    specs = []
    for D in dims:
        for dtype, ptr in (("fp32", "*fp32"), ("bf16", "*bf16"), ("fp16", "*fp16")):
            block, block_d, block_do, warps, stages = _GPU_CONFIGS["fp32" if dtype == "fp32" else "16bit"]
            fwd = dict(D=D, BLOCK_M=block, BLOCK_N=block, BLOCK_D=min(block_d, D), FP32=dtype == "fp32",
                       UPCAST_DOT=False, N_STATIC=0)
            bwd = dict(fwd, BLOCK_DO=min(block_do, D))
            scalars = {"scale_ptr": "*fp32", "bias_ptr": "*fp32"}
            grads = {"g_ptr": "*fp32", "gmax_ptr": "*fp32"}
            kernels = (
                ("siglip_fwd", _fwd_kernel, {"x_ptr": ptr, "y_ptr": ptr, **scalars, "loss_ptr": "*fp32", "N": "i32"}, fwd),
                ("siglip_bwd_rows", _bwd_rows_kernel,
                 {"x_ptr": ptr, "y_ptr": ptr, **grads, **scalars, "dx_ptr": ptr, "ds_part_ptr": "*fp32",
                  "db_part_ptr": "*fp32", "N": "i32"}, bwd),
                ("siglip_bwd_cols", _bwd_cols_kernel,
                 {"x_ptr": ptr, "y_ptr": ptr, **grads, **scalars, "dy_ptr": ptr, "N": "i32"}, bwd),
            )
            config = f"BLOCK={block} BLOCK_D={block_d} BLOCK_DO={block_do} w={warps} s={stages}"
            for name, fn, signature, constexprs in kernels:
                specs.append(dict(
                    name=f"{name}[{dtype},D={D}]", fn=fn,
                    signature=dict(signature, **{key: "constexpr" for key in constexprs}),
                    constexprs=constexprs, num_warps=warps, num_stages=stages, config=config, no_atomics=True,
                ))
    return specs
