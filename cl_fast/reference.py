"""Pure-PyTorch reference: SPEC.md's formulas, evaluated literally.

This is the ``backend="torch"`` path and the ground truth every fused backend is tested
against. It materialises the full similarity matrix (O(N^2) memory) on purpose: it is the
readable definition, not the fast path. It computes in float32 (float64 stays float64), so a
float64 call of these functions is the float64 evaluation the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """n(x) = x / max(||x||_2, eps), row-wise, computed in fp32 (float64 stays float64).

    A row whose largest |x| exceeds 1 is divided by it first, so ||x||^2 cannot overflow for any
    finite row (F.normalize gives NaN from |x| ~ 1e19 in fp32). n is scale-invariant past eps, and
    the eps branch is scaled alongside, so the value and the gradient are those of the formula.
    """
    x = x.to(_compute_dtype(x))
    row_max = x.detach().abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    scaled = x / row_max
    return scaled / torch.linalg.vector_norm(scaled, dim=1, keepdim=True).clamp_min(NORM_EPS / row_max)


def reduce_loss(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of `logits` with target column `labels`, as SPEC.md asks for it:
    softplus(lse of the other logits - the target's logit) = log1p(negatives' mass / positive's).
    Equal to lse - S_pos, but a saturated row (loss near 0) keeps its relative precision, where
    the difference of two numbers near the largest logit would cancel. Never negative."""
    index = labels[:, None]
    others = logits.scatter(1, index, float("-inf"))
    return F.softplus(torch.logsumexp(others, dim=1) - logits.gather(1, index).squeeze(1))


def nt_xent(z1, z2, temperature=0.5, *, reduction="mean"):
    """SimCLR NT-Xent over the M = 2N rows of cat(n(z1), n(z2)); self-similarity excluded."""
    n = z1.shape[0]
    z = torch.cat([l2_normalize(z1), l2_normalize(z2)])
    logits = z @ z.T / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    positives = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return reduce_loss(cross_entropy(logits, positives), reduction)


def _cross_logits(query, key, scale, normalize=True):
    if normalize:
        query, key = l2_normalize(query), l2_normalize(key)
    else:
        query, key = query.to(_compute_dtype(query)), key.to(_compute_dtype(key))
    return (query @ key.T) * scale


def info_nce(query, key, temperature=0.1, *, symmetric=False, reduction="mean"):
    """InfoNCE q->k with positives on the diagonal; symmetric=True averages q->k and k->q."""
    logits = _cross_logits(query, key, 1.0 / temperature)
    labels = torch.arange(logits.shape[0], device=logits.device)
    per_row = cross_entropy(logits, labels)
    if symmetric:
        per_row = 0.5 * (per_row + cross_entropy(logits.T, labels))
    return reduce_loss(per_row, reduction)


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, normalize=False):
    """OpenCLIP ClipLoss: 0.5 * (CE(S, arange) + CE(S^T, arange)), S = s * I T^T (+ b).

    Features as given (OpenCLIP's convention); normalize=True uses n(I), n(T). The bias shifts
    every logit, so it cancels in both softmaxes (its gradient is 0, as OpenCLIP's autograd gives).
    """
    logits = _cross_logits(image_features, text_features, logit_scale, normalize)
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (cross_entropy(logits, labels).mean() + cross_entropy(logits.T, labels).mean())


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, reduction="mean"):
    """OpenCLIP SigLipLoss: -sum_ij logsigmoid(z_ij (s I_i . T_j + b)) / N, z = 2 eye(N) - 1.

    Features as given. reduction="none" gives the per-image (row) sums; "mean" divides their
    total by N (OpenCLIP's value), "sum" is the total.
    """
    logits = _cross_logits(image_features, text_features, logit_scale, normalize=False)
    if logit_bias is not None:
        logits = logits + logit_bias
    n = logits.shape[0]
    signs = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
    per_row = -F.logsigmoid(signs * logits).sum(dim=1)
    return reduce_loss(per_row, reduction)


# ------------------------------------------------- InfoNCE block pieces (distributed losses)
def infonce_block_excluded(m: int, c: int, diag: int, pairs: bool, device=None) -> torch.Tensor:
    """(M, C) bool: the columns of a slice that row i's log-sum-exp leaves out.

    pairs=False (info_nce / clip, positives on a diagonal): j == i + diag, the positive.
    pairs=True (nt_xent, rows = the two views [a; b] of M / 2 samples each): j == i + diag, the row
    itself, and j == diag + (i + M / 2) mod M, its positive. Indices outside [0, C) exclude nothing.
    """
    i = torch.arange(m, device=device)[:, None]
    j = torch.arange(c, device=device)[None, :]
    excluded = j == i + diag
    if pairs:
        excluded |= j == diag + (i + m // 2) % max(m, 1)
    return excluded


def infonce_block_lse(rows, cols, scale, diag: int, pairs: bool):
    """lse_i = log sum_{j not excluded} exp(S_ij), S = scale * rows cols^T (features as given);
    -inf where no column of the slice is left. The forward block piece, (M,) fp32 (float64 stays)."""
    dtype = _compute_dtype(rows)
    logits = (rows.to(dtype) @ cols.to(dtype).T) * scale
    excluded = infonce_block_excluded(rows.shape[0], cols.shape[0], diag, pairs, rows.device)
    return torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1)


def infonce_block_grad(grad, rows, cols, scale, lse, diag: int, pairs: bool):
    """The backward block piece: the gradients of sum_i grad_i lse_i through this slice's terms,
    with P = exp(S - lse) for the merged lse over every slice. dS = grad_i P_ij on the columns that
    are not excluded; returns (scale dS cols, scale dS^T rows, sum dS * rows cols^T), fp32 (float64 stays).
    Rows with lse = -inf (no column anywhere) contribute nothing."""
    dtype = _compute_dtype(rows)
    r, c = rows.to(dtype), cols.to(dtype)
    dots = r @ c.T
    excluded = infonce_block_excluded(rows.shape[0], cols.shape[0], diag, pairs, rows.device)
    finite = torch.isfinite(lse)[:, None]
    shifted = torch.where(finite, dots * scale - torch.where(finite, lse[:, None], 0), float("-inf"))
    ds = grad.to(dtype)[:, None] * shifted.masked_fill(excluded, float("-inf")).exp()
    return (ds @ c) * scale, (ds.T @ r) * scale, (ds * dots).sum()


# ------------------------------------------------------------------------- MoCo and BYOL
def moco_loss(q, k, queue, temperature=0.07, *, reduction="mean"):
    """MoCo v1/v2 InfoNCE: row i scores its key k_i (label 0) against every stored queue row.

    queue is (K, D), one stored key per row, used as stored (it holds already-normalised keys).
    No gradient flows into k or queue. Builds the N x (1 + K) logits, as MoCo's own code does.
    """
    u = l2_normalize(q)
    v = l2_normalize(k.detach())
    negatives = queue.detach().to(u.dtype)
    l_pos = (u * v).sum(dim=1, keepdim=True)
    l_neg = u @ negatives.T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return reduce_loss(cross_entropy(logits, labels), reduction)


@torch.no_grad()
def queue_update_(queue, keys, ptr):
    """Ring-buffer enqueue: queue[(ptr + b) % K] = n(keys[b]) cast to queue.dtype, in place.

    Returns (ptr + B) % K: a Python int for an int ptr; a 0-d tensor ptr is updated in place and
    returned (no host sync). B > K is an error (the batch would overwrite itself).
    """
    size, batch = queue.shape[0], keys.shape[0]
    if batch > size:
        raise ValueError(f"keys has B={batch} rows but the queue holds only K={size}; need B <= K")
    rows = (ptr + torch.arange(batch, device=queue.device)) % size
    queue.index_copy_(0, rows, l2_normalize(keys).to(queue.dtype))
    if isinstance(ptr, torch.Tensor):
        return ptr.copy_((ptr + batch) % size)
    return (ptr + batch) % size


def _norm_above_eps(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: ||x_i|| > eps, i.e. l2_normalize leaves row i unclamped (same scaling as there)."""
    x = x.detach().to(_compute_dtype(x))
    row_max = x.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    return (torch.linalg.vector_norm(x / row_max, dim=1, keepdim=True) > NORM_EPS / row_max).squeeze(1)


def byol_loss(p, z, *, reduction="mean"):
    """BYOL regression loss 2 - 2 cos(p_i, z_i); z is expected detached.

    Evaluated as ||u_i - v_i||^2 (u = n(p), v = n(z)) where both norms exceed eps: there
    ||u|| = ||v|| = 1 and the two are equal, but 2 - 2 cos cancels for nearly aligned rows (its
    absolute error ~1e-7 in fp32 is all of a loss ~1e-4), while the difference keeps the relative
    precision. A clamped row (n(x) = x / eps, ||n(x)|| < 1) uses 2 - 2 u.v, the definition; there
    u.v <= ||n(x)|| < 1, so it only cancels for a norm within rounding of eps itself.
    """
    u, v = l2_normalize(p), l2_normalize(z)
    unclamped = _norm_above_eps(p) & _norm_above_eps(z)
    per_row = torch.where(unclamped, (u - v).pow(2).sum(dim=1), 2 - 2 * (u * v).sum(dim=1))
    return reduce_loss(per_row, reduction)


# ------------------------------------------------------------------------- SwAV
def _lse(x, dim, group=None):
    """log-sum-exp over `dim` (None: all entries); with `group`, also over the ranks: all-reduce
    the max, then the sums of exp(x - max) (never an exp of an unshifted value)."""
    import torch.distributed as dist

    top = x.amax() if dim is None else x.amax(dim, keepdim=True)
    if group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # all -inf: exp(-inf - 0) = 0
    total = (x - shift).exp().sum() if dim is None else (x - shift).exp().sum(dim, keepdim=True)
    if group is not None:
        dist.all_reduce(total, group=group)
    return shift + total.log()


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iterations=3, *, group=None):
    """SwAV's distributed_sinkhorn (SPEC.md), every step in the log domain: finite for any finite scores.

    log Q = scores^T / eps minus its log total (K x B). Each iteration subtracts from every row its
    lse over the GLOBAL batch (all-reduced over `group`) and log K, then from every column its lse
    (local) and log B, B = local B times the group's size. Output: exp(log Q + log B)^T, (B, K).
    Where SwAV's plain formula (`sinkhorn_plain`) is finite the two agree.
    """
    import math

    import torch.distributed as dist

    log_q = scores.to(_compute_dtype(scores)).T / epsilon
    world = 1 if group is None else dist.get_world_size(group)
    n_protos, batch = log_q.shape[0], log_q.shape[1] * world
    log_q = log_q - _lse(log_q, None, group)
    for _ in range(iterations):
        log_q = log_q - _lse(log_q, 1, group) - math.log(n_protos)
        log_q = log_q - _lse(log_q, 0) - math.log(batch)
    return (log_q + math.log(batch)).exp().T


@torch.no_grad()
def sinkhorn_plain(scores, epsilon=0.05, iterations=3):
    """facebookresearch/swav's Sinkhorn on one process, as written there (exp, then divisions).

    The eager baseline. It overflows once scores / eps passes ~88 in fp32 (inf / inf = NaN), and
    with widely spread scores whole rows underflow to 0 (0 / 0 = NaN): use `sinkhorn` instead.
    """
    q = torch.exp(scores.to(_compute_dtype(scores)) / epsilon).T
    q /= q.sum()
    n_protos, batch = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.T


def _swav_subloss(z, q, temperature):
    """Cross-entropy of the crop's prototype scores z against the codes q: -mean_b sum_k q log p."""
    log_p = F.log_softmax(z.to(_compute_dtype(z)) / temperature, dim=1)
    return -(q * log_p).sum(dim=1).mean()


def swav_loss(high_resolution_outputs, low_resolution_outputs, queue_outputs=None, *, temperature=0.1,
              sinkhorn_iterations=3, sinkhorn_epsilon=0.05, group=None):
    """lightly's SwaVLoss.forward, as written there: for each high-resolution crop i, codes
    q_i = sinkhorn(crop_i (+ queue_i rows, dropped afterwards)); the subloss of every OTHER crop
    (high and low resolution) against q_i, averaged over those n_crops - 1 crops, then over the
    high-resolution crops."""
    crops = list(high_resolution_outputs) + list(low_resolution_outputs)
    loss = 0.0
    for i, anchor in enumerate(high_resolution_outputs):
        with torch.no_grad():
            scores = anchor.detach()
            if queue_outputs is not None:
                scores = torch.cat([scores, queue_outputs[i].detach().to(scores.dtype)])
            q = sinkhorn(scores, sinkhorn_epsilon, sinkhorn_iterations, group=group)[: anchor.shape[0]]
        subloss = 0.0
        for v, crop in enumerate(crops):
            if v != i:
                subloss = subloss + _swav_subloss(crop, q, temperature)
        loss = loss + subloss / (len(crops) - 1)
    return loss / len(high_resolution_outputs)
