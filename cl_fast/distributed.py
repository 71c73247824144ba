"""The InfoNCE losses over torch.distributed: each rank's rows against the columns of every rank.

SPEC.md's distributed convention. Rank r holds its local rows (nt_xent: u = [n(z1); n(z2)];
info_nce / clip: n(q), and n(k) for the k->q direction) and contributes the same features as
columns. The loss of a local row is softplus(lse_i - pos_i): pos_i, the positive logit, is local
(elementwise torch ops, autograd); lse_i is the log-sum-exp of the row's negatives over the
GLOBAL columns, computed by `_GlobalLSE` from the InfoNCE block pieces (the reference
infonce_block_lse / infonce_block_grad for backend "torch", the fused custom ops
infonce_block_fwd / infonce_block_bwd otherwise). Nothing of size (local rows) x (global columns)
is built by the fused backends: memory per rank is O(global N * D).

Backward: each rank's block backward gives its rows' gradient and a gradient for every global
column; the column gradients are summed onto the ranks that own the columns (so each rank's input
gradient is the gradient of the SUM of all ranks' losses), and the scale's gradient stays local
(DDP averages parameter gradients over the ranks; see the README's "Distributed" section).

Two exchanges, the same numbers up to fp32 summation order (dist_impl):
- "gather": one all_gather of the column blocks (rank-major), one block call over all columns,
  and one reduce_scatter of the (global N, D) column gradient to the owners. The gathered
  columns are kept for backward (O(global N * D)).
- "ring": W steps; at each, the current column block goes to rank r + 1 (isend / irecv, posted
  before the block is computed, so transfer and compute overlap) and its lse merges with
  torch.logaddexp. Backward passes the blocks round again with their fp32 gradient accumulators,
  which end at their owners. Only two blocks (and two accumulators) are alive at a time.

Every call first all-gathers each rank's (rows, D, dtype, will-backward) and whether its own
input checks passed, so a mismatch raises ValueError on EVERY rank (none waits in a collective
for a rank that has already raised). Uneven local batches are supported (the gather pads to the
largest block; the ring sends each block at its size). A failing collective (a dead rank, a
timeout of the process group) is re-raised as a RuntimeError naming the loss, the collective and
the group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks, _dispatch, reference
from ._ops import infonce as ops
from ._ops import reduce_loss

DIST_IMPLS = ("gather", "ring")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------- groups and collectives
def check_dist_impl(dist_impl) -> None:
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")


def group_size(group) -> int:
    """The size of `group` (a torch.distributed ProcessGroup, e.g. dist.group.WORLD), validated.
    None (single process) is 1."""
    if group is None:
        return 1
    if not dist.is_available():
        raise ValueError("group= needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise ValueError("group= needs an initialised process group (call torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be None or a torch.distributed ProcessGroup (e.g. dist.group.WORLD), got {type(group).__name__}"
        )
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the process group it was given")
    return dist.get_world_size(group)


def describe(group) -> str:
    try:
        name, backend = getattr(group, "group_name", "?"), dist.get_backend(group)
        return f"process group {name!r} ({backend}, {dist.get_world_size(group)} ranks, this is rank {dist.get_rank(group)})"
    except (RuntimeError, ValueError):
        return "a process group that is no longer usable"


class _Comm:
    """One loss call's group: rank bookkeeping and collectives whose failures name the loss."""

    def __init__(self, group, op: str):
        self.group, self.op = group, op
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def fail(self, what: str, error: BaseException) -> RuntimeError:
        return RuntimeError(
            f"cl_fast.{self.op}: torch.distributed {what} over {describe(self.group)} failed: {error}. "
            "Another rank may have died, raised, timed out or not reached the same loss call "
            "(every rank of the group must call the loss, and its backward, the same number of times)"
        )

    def run(self, what: str, fn):
        try:
            return fn()
        except RuntimeError as error:  # DistBackendError, DistNetworkError, gloo / NCCL timeouts
            raise self.fail(what, error) from error

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def all_gather_rows(self, block: Tensor, counts: list[int]) -> Tensor:
        """cat over ranks (rank order) of every rank's (counts[r], D) block. Unequal blocks are
        padded to the largest (gloo's all_gather takes equal sizes only)."""
        block = block.contiguous()
        pad = max(counts)
        if all(c == pad for c in counts):
            out = block.new_empty((sum(counts), block.shape[1]))
            self.run("all_gather", lambda: dist.all_gather(list(out.split(counts)), block, group=self.group))
            return out
        padded = block.new_zeros((pad, block.shape[1]))
        padded[: block.shape[0]] = block
        buf = block.new_empty((self.world, pad, block.shape[1]))
        self.run("all_gather", lambda: dist.all_gather(list(buf.unbind(0)), padded, group=self.group))
        return torch.cat([buf[r, : counts[r]] for r in range(self.world)])

    def reduce_scatter_rows(self, full: Tensor, counts: list[int]) -> Tensor:
        """Sum over ranks of `full` (sum(counts), D), each rank receiving its own counts[r] rows."""
        out = full.new_empty((counts[self.rank], full.shape[1]))
        parts = list(full.contiguous().split(counts))
        self.run("reduce_scatter", lambda: dist.reduce_scatter(out, parts, group=self.group))
        return out

    def ring(self, send: list[Tensor], recv: list[Tensor], tag: int):
        """Post isend of `send` to rank + 1 and irecv into `recv` from rank - 1; returns the works."""
        nxt, prv = self.global_rank((self.rank + 1) % self.world), self.global_rank((self.rank - 1) % self.world)
        p2p = [dist.P2POp(dist.isend, t, nxt, self.group, tag + i) for i, t in enumerate(send)]
        p2p += [dist.P2POp(dist.irecv, t, prv, self.group, tag + i) for i, t in enumerate(recv)]
        return self.run("isend/irecv (ring)", lambda: dist.batch_isend_irecv(p2p))

    def wait(self, works) -> None:
        self.run("isend/irecv (ring)", lambda: [work.wait() for work in works])

    def all_reduce_sum(self, value: Tensor) -> Tensor:
        out = value.detach().clone()
        self.run("all_reduce", lambda: dist.all_reduce(out, group=self.group))
        return out


def _meta_device(group, x) -> torch.device:
    """Where the small metadata exchange runs: CPU for gloo, the CUDA device for NCCL."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend:
        if isinstance(x, Tensor) and x.is_cuda:
            return x.device
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(comm: _Comm, local_error: BaseException | None, rows: int, dim: int, dtype, backward: bool,
          names: str, device: torch.device) -> list[int]:
    """All-gather every rank's (checks passed, rows, D, dtype, will backward) and raise on every
    rank if any rank's inputs were rejected or do not fit the others'. Returns each rank's rows."""
    code = _DTYPES.index(dtype) if dtype in _DTYPES else -1
    meta = torch.tensor([local_error is None, rows, dim, code, backward], dtype=torch.int64, device=device)
    parts = [torch.empty_like(meta) for _ in range(comm.world)]
    comm.run("all_gather (input shapes)", lambda: dist.all_gather(parts, meta, group=comm.group))
    table = torch.stack(parts).tolist()  # one small host read per call: buffers are sized from it
    if local_error is not None:
        raise local_error
    failed = [r for r, m in enumerate(table) if not m[0]]
    if failed:
        raise ValueError(
            f"cl_fast.{comm.op}: the inputs on rank(s) {failed} of the group were rejected (that rank's own "
            f"error says why); every rank stops here"
        )
    dims = [m[2] for m in table]
    if len(set(dims)) > 1:
        raise ValueError(f"{names}: the feature dimension D must be the same on every rank, got D = {dims} (rank order)")
    dtypes = [m[3] for m in table]
    if len(set(dtypes)) > 1:
        got = [str(_DTYPES[c]) if 0 <= c < len(_DTYPES) else "?" for c in dtypes]
        raise ValueError(f"{names}: the dtype must be the same on every rank, got {got} (rank order)")
    flags = [bool(m[4]) for m in table]
    if len(set(flags)) > 1:
        raise ValueError(
            f"cl_fast.{comm.op}: gradients are required on rank(s) {[r for r, f in enumerate(flags) if f]} "
            f"but not on the others; the backward is collective, so every rank must take part or none"
        )
    return [m[1] for m in table]


# ------------------------------------------------------------------------------- block pieces
def _block_fwd(rows, cols, scale, diag, pairs, backend):
    if backend == "torch":
        return reference.infonce_block_lse(rows, cols, scale, diag, pairs)
    return ops.infonce_block_fwd(rows, cols, scale, diag, pairs, backend)


def _block_bwd(grad, rows, cols, scale, lse, diag, pairs, backend):
    if backend == "torch":
        return reference.infonce_block_grad(grad, rows, cols, scale, lse, diag, pairs)
    return ops.infonce_block_bwd(grad, rows, cols, scale, lse, diag, pairs, backend)


class _Plan:
    """What one _GlobalLSE call needs besides its tensors (identical on every rank but `diag`)."""

    def __init__(self, comm: _Comm, counts: list[int], pairs: bool, impl: str, backend: str, column_grads: bool = True):
        self.comm, self.counts, self.pairs, self.impl, self.backend = comm, counts, pairs, impl, backend
        self.offsets = [sum(counts[:r]) for r in range(len(counts))]
        self.diag = self.offsets[comm.rank]  # this rank's rows sit at these global columns
        self.column_grads = column_grads


class _GlobalLSE(torch.autograd.Function):
    """(M,) log-sum-exp of each local row's negatives over the global columns.

    forward(rows (M, D), cols (C_r, D): the columns this rank contributes, scale (0-d), plan).
    Backward: drows local, dcols = the gradient of every rank's rows with respect to this rank's
    columns (summed onto the owner; none when plan.column_grads is False), dscale local.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, cols: Tensor, scale: Tensor, plan: _Plan) -> Tensor:
        comm, backend = plan.comm, plan.backend
        if plan.impl == "gather":
            columns = comm.all_gather_rows(cols, plan.counts)
            lse = _block_fwd(rows, columns, scale, plan.diag, plan.pairs, backend)
            ctx.save_for_backward(rows, cols, scale, lse, columns)
        else:
            lse, current = None, cols.contiguous()
            for step in range(comm.world):
                owner = (comm.rank - step) % comm.world
                if step + 1 < comm.world:  # post the transfer first: it runs while this block computes
                    incoming = cols.new_empty((plan.counts[(owner - 1) % comm.world], cols.shape[1]))
                    works = comm.ring([current], [incoming], tag=step)
                part = _block_fwd(rows, current, scale, plan.diag - plan.offsets[owner], plan.pairs, backend)
                lse = part if lse is None else torch.logaddexp(lse, part)
                if step + 1 < comm.world:
                    comm.wait(works)
                    current = incoming
            ctx.save_for_backward(rows, cols, scale, lse)
        ctx.plan = plan
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse: Tensor):
        plan = ctx.plan
        comm, backend, counts = plan.comm, plan.backend, plan.counts
        rows, cols, scale, lse = ctx.saved_tensors[:4]
        grad = grad_lse.to(lse.dtype).contiguous()
        if plan.impl == "gather":
            columns = ctx.saved_tensors[4]
            drows, dcolumns, dscale = _block_bwd(grad, rows, columns, scale, lse, plan.diag, plan.pairs, backend)
            dcols = comm.reduce_scatter_rows(dcolumns, counts) if plan.column_grads else None
        else:
            drows, dcols, dscale = _ring_backward(comm, plan, grad, rows, cols, scale, lse)
        dcols = None if dcols is None else dcols.to(cols.dtype)
        return drows.to(rows.dtype), dcols, dscale.to(scale.dtype).reshape(scale.shape), None


def _ring_backward(comm: _Comm, plan: _Plan, grad, rows, cols, scale, lse):
    """The ring again: block `owner` visits every rank with its fp32 gradient accumulator, which
    each rank adds its share to and passes on; after W steps it is back at its owner."""
    world, counts, backend = comm.world, plan.counts, plan.backend
    acc_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    drows = dscale = None
    current, acc_works, acc_in = cols.contiguous(), None, None
    for step in range(world):
        owner = (comm.rank - step) % world
        following = counts[(owner - 1) % world]  # the size of the block (and accumulator) arriving next
        if step + 1 < world:
            incoming = cols.new_empty((following, cols.shape[1]))
            block_works = comm.ring([current], [incoming], tag=2 * step)
        dr, dc, ds = _block_bwd(grad, rows, current, scale, lse, plan.diag - plan.offsets[owner], plan.pairs, backend)
        drows = dr if drows is None else drows.add_(dr)
        dscale = ds if dscale is None else dscale + ds
        if plan.column_grads:
            if acc_works is None:
                acc = dc.to(acc_dtype)  # this rank's own block starts its accumulator
            else:
                comm.wait(acc_works)
                acc = acc_in.add_(dc)
            acc_in = torch.empty((following, cols.shape[1]), dtype=acc_dtype, device=cols.device)
            acc_works = comm.ring([acc], [acc_in], tag=2 * step + 1)  # the last step hands it to its owner
        if step + 1 < world:
            comm.wait(block_works)
            current = incoming
    if not plan.column_grads:
        return drows, None, dscale
    comm.wait(acc_works)
    return drows, acc_in, dscale


def global_lse(rows: Tensor, cols: Tensor, scale: Tensor, plan: _Plan, dtype: torch.dtype) -> Tensor:
    """_GlobalLSE on rows / cols in the inputs' `dtype` for the fused backends: fp16 / bf16
    features are exchanged and multiplied at their own width (half the bytes of fp32, and the
    tensor cores' input type on a GPU), as the single-process kernels use them; the reference
    ("torch") keeps its compute dtype."""
    if plan.backend != "torch":
        rows, cols = rows.to(dtype), cols.to(dtype)
    return _GlobalLSE.apply(rows, cols, scale, plan)


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x (every rank gets it); dx = sum over ranks of dy (the adjoint)."""

    @staticmethod
    def forward(ctx, value: Tensor, comm: _Comm) -> Tensor:
        ctx.comm = comm
        return comm.all_reduce_sum(value)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return ctx.comm.all_reduce_sum(grad), None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


# ------------------------------------------------------------------------------------ losses
def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale(value, reciprocal: bool, device, dtype) -> Tensor:
    """The logit scale as a 0-d tensor (fp32; float64 for float64 inputs), autograd-linked to a
    tensor temperature / logit_scale."""
    if isinstance(value, Tensor):
        scale = value.reshape(()).to(device=device, dtype=dtype)
        return torch.reciprocal(scale) if reciprocal else scale
    return torch.full((), 1.0 / value if reciprocal else value, dtype=dtype, device=device)


def _will_backward(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _prepare(op: str, group, names: tuple[str, str], a, b, scale_name: str, scale_value, reduction, backend,
             extra_checks=None) -> tuple[_Comm, list[int], str]:
    """Local checks, then the exchange that makes every rank agree (or every rank raise)."""
    comm = _Comm(group, op)
    error, resolved = None, None
    try:
        _checks.check_pair(names[0], a, names[1], b)
        _checks.check_positive_scalar(scale_name, scale_value, a.device)
        _checks.check_reduction(reduction)
        if extra_checks is not None:
            extra_checks()
        resolved = _dispatch.resolve(backend, a.device, a.dtype, a.shape[1])
    except (ValueError, TypeError) as caught:
        error = caught
    ok = error is None
    counts = agree(
        comm, error, a.shape[0] if ok else 0, a.shape[1] if ok else 0, a.dtype if ok else None,
        _will_backward(a, b, scale_value) if ok else False, f"{names[0]} / {names[1]}", _meta_device(group, a),
    )
    return comm, counts, resolved


def nt_xent(z1: Tensor, z2: Tensor, temperature, *, reduction: str, group, dist_impl: str, backend: str) -> Tensor:
    """nt_xent over the group: this rank's 2n rows [n(z1); n(z2)] against the 2N global columns."""
    comm, counts, backend = _prepare("nt_xent", group, ("z1", "z2"), z1, z2, "temperature", temperature, reduction, backend)
    dtype = _compute_dtype(z1)
    scale = _scale(temperature, True, z1.device, dtype if backend == "torch" else torch.float32)
    u1, u2 = reference.l2_normalize(z1), reference.l2_normalize(z2)
    u = torch.cat([u1, u2])
    positive = (u1 * u2).sum(dim=1) * scale
    plan = _Plan(comm, [2 * c for c in counts], True, dist_impl, backend)
    lse = global_lse(u, u, scale, plan, z1.dtype)
    per_row = F.softplus(lse - torch.cat([positive, positive]))
    return reduce_loss(per_row, reduction)


def cross(query: Tensor, key: Tensor, scale_value, *, reciprocal: bool, symmetric: bool, normalize: bool,
          reduction: str, group, dist_impl: str, backend: str, op: str, names: tuple[str, str],
          scale_name: str, column_grads: bool = True, feature_grad_factor: float | None = None,
          extra_checks=None) -> tuple[Tensor, _Comm, list[int]]:
    """info_nce / clip over the group: rows q_r against the gathered k (and k_r against the
    gathered q when symmetric); per-row losses reduced over this rank's rows.

    column_grads=False: the gathered columns are constants (no gradient reaches any column, own
    included: OpenCLIP's ClipLoss(local_loss=True, gather_with_grad=False)); the positive logit
    then takes its gradient through the row only. feature_grad_factor multiplies the gradient
    that reaches query and key.
    """
    comm, counts, backend = _prepare(
        op, group, names, query, key, scale_name, scale_value, reduction, backend, extra_checks
    )
    dtype = _compute_dtype(query)
    scale = _scale(scale_value, reciprocal, query.device, dtype if backend == "torch" else torch.float32)
    if feature_grad_factor is not None:
        query, key = _ScaleGrad.apply(query, feature_grad_factor), _ScaleGrad.apply(key, feature_grad_factor)
    if normalize:
        uq, uk = reference.l2_normalize(query), reference.l2_normalize(key)
    else:  # features as given (OpenCLIP): the kernels take them in their dtype, the positive in fp32
        uq, uk = query, key
    fq, fk = uq.to(dtype), uk.to(dtype)
    plan = _Plan(comm, counts, False, dist_impl, backend, column_grads)
    if column_grads:
        positive = (fq * fk).sum(dim=1) * scale
        positive_t = positive
    else:
        positive = (fq * fk.detach()).sum(dim=1) * scale
        positive_t = (fk * fq.detach()).sum(dim=1) * scale
    per_row = F.softplus(global_lse(uq, uk, scale, plan, query.dtype) - positive)
    if symmetric:
        per_row = 0.5 * (per_row + F.softplus(global_lse(uk, uq, scale, plan, query.dtype) - positive_t))
    return reduce_loss(per_row, reduction), comm, counts


def global_mean(loss: Tensor, comm: _Comm, counts: list[int]) -> Tensor:
    """The global-batch mean from each rank's mean over its rows: sum_r (n_r / N) loss_r over the
    group, differentiably (the adjoint all-reduces the upstream gradients), the same on every rank."""
    weight = counts[comm.rank] / sum(counts)
    return _AllReduceSum.apply(loss * weight, comm)
