"""Public InfoNCE-family losses: functional API and nn.Module wrappers.

Names and defaults follow SPEC.md (and the libraries users come from: lightly's NTXentLoss,
OpenCLIP's ClipLoss). Each function checks its inputs once, picks the backend through
_dispatch.resolve, and either evaluates the reference (backend "torch") or calls the fused
custom op, which owns the autograd.
"""
from __future__ import annotations

import numbers
from typing import Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _checks, _dispatch, reference
from . import distributed as _distributed
from ._ops import infonce as ops
from ._ops import reduce_loss, scale_tensor


def _zero_loss(rows: int, reduction: str, *tensors) -> Tensor:
    """The loss of a batch of one (N = 1): the positive is the only candidate, so every per-row
    loss is exactly 0 and so is every gradient. Kept in the graph of each input that requires grad
    (a NaN input still gives NaN, as the formula would)."""
    zero = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for t in tensors:
        if isinstance(t, Tensor) and t.requires_grad:
            zero = zero + (t * 0).sum().to(torch.float32)
    per_row = zero.expand(rows) if reduction == "none" else zero
    return per_row if reduction == "none" else reduce_loss(per_row.reshape(1), reduction)


def _distributed_group(group, dist_impl) -> bool:
    """Validates group / dist_impl; True when the loss is computed over a group of > 1 ranks."""
    _distributed.check_dist_impl(dist_impl)
    return _distributed.group_size(group) > 1


def nt_xent(
    z1: Tensor, z2: Tensor, temperature=0.5, *, reduction: str = "mean", backend: str = "auto",
    group=None, dist_impl: str = "gather",
) -> Tensor:
    """SimCLR NT-Xent loss of two views (N, D): mean over the 2N rows of cat(z1, z2).

    Row i's positive is the other view of the same sample; its own similarity is excluded.
    `temperature` is a float or a 0-d tensor (a learnable one receives its gradient).
    N = 1 gives 0 (the positive is the only candidate), with zero gradients.

    group: None (one process) or a torch.distributed ProcessGroup (e.g. dist.group.WORLD): this
    rank's 2n rows against the columns of every rank (SPEC.md's distributed convention; the
    reduction is over this rank's rows). dist_impl: "gather" or "ring" (same numbers).
    """
    if _distributed_group(group, dist_impl):
        return _distributed.nt_xent(
            z1, z2, temperature, reduction=reduction, group=group, dist_impl=dist_impl, backend=backend
        )
    _checks.check_pair("z1", z1, "z2", z2)
    _checks.check_positive_scalar("temperature", temperature, z1.device)
    _checks.check_reduction(reduction)
    backend = _dispatch.resolve(backend, z1.device, z1.dtype, z1.shape[1])
    if backend == "torch":
        return reference.nt_xent(z1, z2, temperature, reduction=reduction)
    if z1.shape[0] == 1:
        return _zero_loss(2, reduction, z1, z2, temperature)
    losses, _ = ops.ntxent_fwd(z1, z2, scale_tensor(temperature, True, z1.device), backend)
    return reduce_loss(losses, reduction)


def _cross(query, key, scale, both, normalize, reduction, backend):
    row_loss, col_loss, _, _ = ops.cross_fwd(query, key, scale, both, normalize, backend)
    per_row = 0.5 * (row_loss + col_loss) if both else row_loss
    return reduce_loss(per_row, reduction)


def info_nce(
    query: Tensor, key: Tensor, temperature=0.1, *, symmetric: bool = False,
    reduction: str = "mean", backend: str = "auto", group=None, dist_impl: str = "gather",
) -> Tensor:
    """InfoNCE with positives on the diagonal: row i of `query` against all rows of `key`.

    symmetric=True averages the query->key and key->query directions (the CLIP loss with
    logit_scale = 1/temperature); reduction="none" then returns 0.5 * (row_i + col_i).
    N = 1 gives 0 with zero gradients.

    group (a ProcessGroup): this rank's queries against the keys of every rank (and, symmetric,
    its keys against every rank's queries); see nt_xent and README "Distributed".
    """
    if _distributed_group(group, dist_impl):
        return _distributed.cross(
            query, key, temperature, reciprocal=True, symmetric=bool(symmetric), normalize=True,
            reduction=reduction, group=group, dist_impl=dist_impl, backend=backend, op="info_nce",
            names=("query", "key"), scale_name="temperature",
        )[0]
    _checks.check_pair("query", query, "key", key)
    _checks.check_positive_scalar("temperature", temperature, query.device)
    _checks.check_reduction(reduction)
    backend = _dispatch.resolve(backend, query.device, query.dtype, query.shape[1])
    if backend == "torch":
        return reference.info_nce(query, key, temperature, symmetric=symmetric, reduction=reduction)
    if query.shape[0] == 1:
        return _zero_loss(1, reduction, query, key, temperature)
    scale = scale_tensor(temperature, True, query.device)
    return _cross(query, key, scale, bool(symmetric), True, reduction, backend)


def clip_loss(
    image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *, normalize: bool = False,
    backend: str = "auto", group=None, dist_impl: str = "gather",
) -> Tensor:
    """OpenCLIP's ClipLoss on one process: 0.5 * (CE(S, arange) + CE(S^T, arange)), S = s I T^T + b.

    Features are used AS GIVEN, as OpenCLIP does (its model normalises them first); normalize=True
    normalises the rows inside. `logit_scale` is the already-exponentiated scale s > 0, a float or
    a 0-d tensor (a learnable one receives its gradient). `logit_bias` (None, a float or a 0-d
    tensor) shifts every logit, so it cancels in both softmaxes: accepted, and a tensor bias that
    requires grad receives its gradient, 0 (as OpenCLIP's autograd gives). N = 1 gives 0.
    Both settings of `normalize` run on the fused kernels.

    group (a ProcessGroup): this rank's images against every rank's texts and its texts against
    every rank's images, mean over this rank's rows (OpenCLIP's local_loss=True,
    gather_with_grad=True); ClipLoss offers OpenCLIP's other settings.
    """
    if _distributed_group(group, dist_impl):
        return _distributed_clip(
            image_features, text_features, logit_scale, logit_bias, normalize=normalize, backend=backend,
            group=group, dist_impl=dist_impl,
        )
    _checks.check_pair("image_features", image_features, "text_features", text_features)
    _checks.check_positive_scalar("logit_scale", logit_scale, image_features.device)
    _checks.check_finite_scalar("logit_bias", logit_bias, image_features.device)
    backend = _dispatch.resolve(backend, image_features.device, image_features.dtype, image_features.shape[1])
    if backend == "torch":
        return reference.clip_loss(image_features, text_features, logit_scale, logit_bias, normalize=normalize)
    if image_features.shape[0] == 1:
        return _zero_loss(1, "mean", image_features, text_features, logit_scale, logit_bias)
    scale = scale_tensor(logit_scale, False, image_features.device)
    loss = _cross(image_features, text_features, scale, True, bool(normalize), "mean", backend)
    if isinstance(logit_bias, Tensor):
        loss = loss + (logit_bias * 0).sum().to(loss.dtype)  # the bias cancels: its gradient is 0
    return loss


def _distributed_clip(image_features, text_features, logit_scale, logit_bias, *, normalize, backend, group,
                      dist_impl, local_loss=True, gather_with_grad=True):
    """clip_loss over a group with OpenCLIP's (local_loss, gather_with_grad) meaning.

    local_loss=True: this rank's mean. gather_with_grad=True: every column's gradient reaches its
    owner; False: the gathered columns are constants (OpenCLIP: no column gradient at all).
    local_loss=False: the global-batch loss on every rank (all-reduced, differentiably: the
    adjoint sums the ranks' upstream gradients, which is what OpenCLIP's all_gather backward
    gives). With gather_with_grad=False OpenCLIP computes that loss with only this rank's slot
    live, i.e. 1 / W of the gather_with_grad=True feature gradient (exact when every rank
    backpropagates the same multiple of its loss, as DDP training does); the scale's gradient
    is unchanged.
    """
    world = _distributed.group_size(group)
    check_bias = lambda: _checks.check_finite_scalar("logit_bias", logit_bias, image_features.device)  # noqa: E731
    loss, comm, counts = _distributed.cross(
        image_features, text_features, logit_scale, reciprocal=False, symmetric=True, normalize=bool(normalize),
        reduction="mean", group=group, dist_impl=dist_impl, backend=backend, op="clip_loss",
        names=("image_features", "text_features"), scale_name="logit_scale",
        column_grads=bool(gather_with_grad or not local_loss),
        feature_grad_factor=None if (local_loss or gather_with_grad) else 1.0 / world, extra_checks=check_bias,
    )
    if not local_loss:
        loss = _distributed.global_mean(loss, comm, counts)
    if isinstance(logit_bias, Tensor):
        loss = loss + (logit_bias * 0).sum().to(loss.dtype)  # the bias cancels: its gradient is 0
    return loss


def _memory_bank_size(value) -> tuple:
    """lightly's memory_bank_size: an int K, or a (K,) / (K, D) sequence of ints; K = 0 is off."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        size = (int(value),)
    elif isinstance(value, Sequence) and not isinstance(value, str) and 1 <= len(value) <= 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        size = tuple(int(v) for v in value)
    else:
        raise TypeError(f"memory_bank_size must be an int K or a (K, D) tuple of ints, got {value!r}")
    if any(v < 0 for v in size):
        raise ValueError(f"memory_bank_size entries must be >= 0, got {value!r}")
    if size[0] > 0 and len(size) == 2 and size[1] < 1:
        raise ValueError(f"memory_bank_size's feature dimension must be >= 1, got {value!r}")
    return size


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class NTXentLoss(nn.Module):
    """Drop-in for lightly's NTXentLoss(temperature, memory_bank_size, gather_distributed): loss(out0, out1).

    Without a memory bank: nt_xent(out0, out1) (SimCLR, in-batch negatives; N = 1 gives 0).
    With one (memory_bank_size = K > 0, or lightly's (K, D) tuple), lightly's MoCo-style loss:
    out0 is the query, out1 its positive key, and the K stored keys are the negatives, computed
    by the fused moco_loss path (gradients into out0 and, as in lightly, into out1 through the
    positive). The bank is a MoCoQueue (`memory_bank`, saved in the state_dict); after the loss
    it receives n(out1) when out0 requires grad (lightly's rule: evaluation leaves it alone). It
    starts as random unit rows, created at construction for (K, D) or at the first call for an
    int K. Unlike lightly it wraps around (a batch that does not fit continues at row 0 instead of
    being cut); a batch larger than K leaves its last K keys, as a ring buffer written row by row would.
    gather_distributed=True needs torch.distributed; when the default process group has more
    than one rank, each rank's rows are scored against every rank's (nt_xent with
    group=dist.group.WORLD, lightly's gather_distributed meaning; `dist_impl` picks "gather" or
    "ring"), and a memory bank enqueues the keys of every rank (as lightly's bank does); on one
    process it changes nothing (as in lightly).
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        *,
        reduction: str = "mean",
        backend: str = "auto",
        dist_impl: str = "gather",
    ):
        super().__init__()
        _checks.check_positive_scalar("temperature", temperature, torch.device("cpu"))
        _checks.check_reduction(reduction)
        _distributed.check_dist_impl(dist_impl)
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.dist_impl = dist_impl
        self.memory_bank_size = _memory_bank_size(memory_bank_size)
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch build lacks")
        self.temperature, self.gather_distributed = temperature, bool(gather_distributed)
        self.reduction, self.backend = reduction, backend
        self.memory_bank = None
        if self.memory_bank_size[0] > 0 and len(self.memory_bank_size) == 2:
            self._make_bank(self.memory_bank_size[1], None)

    def _make_bank(self, dim: int, device) -> None:
        from .moco import MoCoQueue  # moco imports this module

        self.memory_bank = MoCoQueue(
            self.memory_bank_size[0], dim, device=device, gather_distributed=self.gather_distributed,
            backend=self.backend,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an int-size bank is created at the first call: create it now from the saved one
        saved = state_dict.get(prefix + "memory_bank.queue")
        if saved is not None and self.memory_bank is None and self.memory_bank_size[0] > 0:
            self._make_bank(saved.shape[1], saved.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank_size[0] == 0:
            group = dist.group.WORLD if self.gather_distributed and _world_size() > 1 else None
            return nt_xent(
                out0, out1, self.temperature, reduction=self.reduction, backend=self.backend,
                group=group, dist_impl=self.dist_impl,
            )
        return self._bank_loss(out0, out1)

    def _bank_loss(self, out0: Tensor, out1: Tensor) -> Tensor:
        from .moco import moco_loss

        _checks.check_pair("out0", out0, "out1", out1)
        if self.memory_bank is None:
            self._make_bank(out0.shape[1], out0.device)
        bank = self.memory_bank
        if bank.queue.device != out0.device:
            bank.to(out0.device)  # lightly moves its negatives to the features' device
        negatives = bank.negatives()
        dtype = torch.float64 if torch.float64 in (out0.dtype, negatives.dtype) else out0.dtype
        if _dispatch.resolve(self.backend, out0.device, dtype, op="moco") == "torch":
            negatives = negatives.clone()  # the reference keeps the queue for backward; the enqueue below writes it
        per_row = moco_loss(out0, out1, negatives, self.temperature, reduction="none", backend=self.backend)
        if out1.requires_grad and torch.is_grad_enabled():
            per_row = per_row + self._positive_key_term(out0, out1, per_row)
        if out0.requires_grad:
            keys = out1.detach()
            size = bank.queue.shape[0]
            if keys.shape[0] > size:  # a ring buffer written row by row keeps the last K keys
                with torch.no_grad():
                    bank.ptr.add_(keys.shape[0] - size).remainder_(size)
                keys = keys[-size:]
            bank.enqueue(keys)
        return reduce_loss(per_row, self.reduction)

    def _positive_key_term(self, out0: Tensor, out1: Tensor, per_row: Tensor) -> Tensor:
        """A zero-valued term whose gradient is lightly's gradient into out1 (moco_loss gives none).

        loss_i = -s u_i . v_i + lse_i, v = n(out1), and P_i0 = exp(-loss_i) is the positive's
        probability, so dloss_i / dv_i = -s (1 - P_i0) u_i (the positive's share of the lse is
        s P_i0 u_i). 1 - P_i0 = -expm1(-loss_i) keeps its precision when the loss is small.
        """
        s = 1.0 / (self.temperature.detach() if isinstance(self.temperature, Tensor) else self.temperature)
        u = reference.l2_normalize(out0.detach())
        v = reference.l2_normalize(out1)
        weight = -torch.expm1(-per_row.detach()) * s
        term = -weight * (u * v).sum(dim=1)
        return term - term.detach()

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size}, "
            f"gather_distributed={self.gather_distributed}, reduction={self.reduction!r}, backend={self.backend!r}, "
            f"dist_impl={self.dist_impl!r}"
        )


class InfoNCELoss(nn.Module):
    """loss(query, key) with positives on the diagonal; see info_nce (group / dist_impl included)."""

    def __init__(
        self, temperature: float = 0.1, symmetric: bool = False, reduction: str = "mean", backend: str = "auto",
        *, group=None, dist_impl: str = "gather",
    ):
        super().__init__()
        _checks.check_positive_scalar("temperature", temperature, torch.device("cpu"))
        _checks.check_reduction(reduction)
        _distributed.check_dist_impl(dist_impl)
        self.temperature, self.symmetric, self.reduction, self.backend = temperature, symmetric, reduction, backend
        self.group, self.dist_impl = group, dist_impl

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return info_nce(
            query, key, self.temperature, symmetric=self.symmetric, reduction=self.reduction, backend=self.backend,
            group=self.group, dist_impl=self.dist_impl,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, symmetric={self.symmetric}, backend={self.backend!r}, "
            f"dist_impl={self.dist_impl!r}"
        )


class ClipLoss(nn.Module):
    """Drop-in for OpenCLIP's ClipLoss: loss(image_features, text_features, logit_scale, logit_bias=None).

    Arguments in OpenCLIP's order, so `open_clip.create_loss(args)` builds it. Features are used as
    given (normalize=True normalises them inside). `cache_labels` has nothing to cache (no labels
    tensor exists). world_size > 1: the loss over the default process group (rank and world_size
    must be this process's; ValueError otherwise), with OpenCLIP's meaning of the two switches:
    local_loss=True returns this rank's rows' loss against every rank's columns, False the
    global-batch loss (the same on every rank); gather_with_grad=True sends every column's
    gradient to its owner (SPEC.md's convention), False treats the other ranks' features as
    constants, as OpenCLIP does (see losses._distributed_clip for the gradients that gives).
    `dist_impl` ("gather" / "ring") picks the exchange. use_horovod=True: NotImplementedError.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        normalize: bool = False,
        backend: str = "auto",
        dist_impl: str = "gather",
    ):
        super().__init__()
        _checks.check_world("ClipLoss", rank, world_size, use_horovod, multi_process=True)
        _distributed.check_dist_impl(dist_impl)
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.normalize, self.backend, self.dist_impl = normalize, backend, dist_impl
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            _checks.check_world_matches_group("ClipLoss", rank, world_size)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, output_dict: bool = False):
        if self.world_size > 1:
            _checks.check_world_matches_group("ClipLoss", self.rank, self.world_size)
            loss = _distributed_clip(
                image_features, text_features, logit_scale, logit_bias, normalize=self.normalize,
                backend=self.backend, group=dist.group.WORLD, dist_impl=self.dist_impl,
                local_loss=bool(self.local_loss), gather_with_grad=bool(self.gather_with_grad),
            )
        else:
            loss = clip_loss(
                image_features, text_features, logit_scale, logit_bias, normalize=self.normalize, backend=self.backend
            )
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (
            f"normalize={self.normalize}, local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
            f"rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}, dist_impl={self.dist_impl!r}"
        )
