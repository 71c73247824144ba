"""SwAV: the Sinkhorn-Knopp assignment (`sinkhorn`) and the swapped-prediction loss (`SwAVLoss`).

`sinkhorn` is SPEC.md's: facebookresearch/swav's distributed_sinkhorn, computed in the log
domain so that it is finite for any finite scores, fp32 output, no gradient (the codes are
targets; SwAV runs it under no_grad). The fused backends never build a (B, K) intermediate: they
keep the two scaling vectors and re-read the scores once per iteration (see
cl_fast/triton_kernels/sinkhorn.py and csrc/cpu/sinkhorn.cpp for the recurrence).

Backends. "torch" is `reference.sinkhorn` (log domain, eager, one (B, K) tensor per step);
"cpu" / "cuda" are the C++ / CUDA kernels in cl_fast._C (ops cl_fast_C::sinkhorn*, through
cl_fast._native; "cuda" where built); "triton" runs on CUDA tensors (and on CPU tensors under
TRITON_INTERPRET=1). The custom ops: cl_fast/_ops/sinkhorn.py. Every fused backend has the same
three functions:

    sinkhorn(scores, inv_eps, iterations) -> (B, K) fp32        the fused single-process op
    sinkhorn_col_lse(scores, inv_eps, f or None) -> (col_max (K,), col_sum (K,))
    sinkhorn_assign(scores, inv_eps, f) -> (B, K) fp32           softmax_k(scores / eps + f)

Distributed (`group=` a process group): the rows are split over the ranks, B is the global batch,
and the per-prototype log-sum-exps over the batch are all-reduced (the max first, then the sums
rescaled to it), one pair of all-reduces per iteration; the per-sample steps stay local. The
fused backends then run one kernel per step (`sinkhorn_col_lse`) with the all-reduce in between.
`group=None` with gather_distributed=False (lightly's default) means no communication at all, even
when a default process group exists; gather_distributed=True uses the default group.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, _dispatch, reference
from ._ops import sinkhorn as ops

__all__ = ["sinkhorn", "swav_loss", "SwAVLoss", "SwaVLoss"]


def _all_reduce_lse(col_max: Tensor, col_sum: Tensor, group) -> Tensor:
    """lse over all ranks of the per-rank (max, sum exp(. - max)) pairs."""
    global_max = col_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(global_max == float("-inf"), torch.zeros_like(global_max), global_max)
    total = col_sum * torch.exp(col_max - shift)
    dist.all_reduce(total, group=group)
    return shift + total.log()


def _distributed_sinkhorn(scores: Tensor, epsilon: float, iterations: int, group, backend: str) -> Tensor:
    f = None
    for _ in range(iterations):
        col_max, col_sum = ops.sinkhorn_col_lse(scores, epsilon, f, backend)
        f = -_all_reduce_lse(col_max, col_sum, group)
    return ops.sinkhorn_assign(scores, epsilon, f, backend)


# ------------------------------------------------------------------------------ input checks
def _check_iterations(iterations) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
        raise TypeError(f"iterations must be an int, got {type(iterations).__name__}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")


def _check_group(group) -> None:
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialised")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


def _as_float(name: str, value, device: torch.device) -> float:
    _checks.check_positive_scalar(name, value, device)
    return float(value)


# ------------------------------------------------------------------------------ public API
def sinkhorn(
    scores: Tensor, iterations: int = 3, epsilon: float = 0.05, gather_distributed: bool = False, *,
    group=None, backend: str = "auto",
) -> Tensor:
    """SwAV's Sinkhorn-Knopp codes for prototype scores (B, K): (B, K) fp32, each row sums to 1.

    lightly's argument order and names: sinkhorn(scores, iterations, epsilon, gather_distributed).
    Q = exp(scores / epsilon)^T normalised to total 1, then `iterations` times: rows (prototypes)
    to 1/K each, columns (samples) to 1/B each; returned times B and transposed. Computed in the
    log domain: finite for any finite scores (the plain formula overflows past scores / eps ~ 88).
    With `group` (or gather_distributed=True: the default group, when torch.distributed is
    initialised; a no-op otherwise, as in lightly), the batch is the concatenation of every rank's
    rows and the result equals the single-process one on it (local rows returned); no group never
    communicates. No gradient: the result is detached (float64 scores give a float64 result, via
    the reference). iterations=0 (no normalisation step: B times the global softmax) is computed
    by the reference.
    """
    if group is None and gather_distributed and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    _checks.check_features("scores", scores)
    epsilon = _as_float("epsilon", epsilon, scores.device)
    _check_iterations(iterations)
    _check_group(group)
    backend = _dispatch.resolve(backend, scores.device, scores.dtype, op="sinkhorn")
    scores = scores.detach()
    if backend == "torch" or iterations == 0:
        return reference.sinkhorn(scores, epsilon, iterations, group=group)
    if group is None:
        return ops.sinkhorn(scores, epsilon, int(iterations), backend)
    return _distributed_sinkhorn(scores, epsilon, int(iterations), group, backend)


def _check_crops(high_resolution_outputs, low_resolution_outputs, queue_outputs):
    def as_list(name, value):
        if isinstance(value, Tensor) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list of (B, K) tensors, got {type(value).__name__}")
        return list(value)

    high = as_list("high_resolution_outputs", high_resolution_outputs)
    low = as_list("low_resolution_outputs", low_resolution_outputs)
    if not high:
        raise ValueError("high_resolution_outputs must hold at least one crop")
    if len(high) + len(low) < 2:
        raise ValueError("SwAV needs at least two crops in all (each crop predicts the codes of the others)")
    first = high[0]
    for kind, crops in (("high_resolution_outputs", high), ("low_resolution_outputs", low)):
        for i, crop in enumerate(crops):
            name = f"{kind}[{i}]"
            _checks.check_features(name, crop)
            if crop.shape != first.shape:
                raise ValueError(
                    f"{name} has shape {tuple(crop.shape)} but high_resolution_outputs[0] has {tuple(first.shape)}; "
                    "every crop must be (B, K) with the same B and K"
                )
            if crop.device != first.device:
                raise ValueError(f"{name} is on {crop.device} but high_resolution_outputs[0] is on {first.device}")
            if crop.dtype != first.dtype:
                raise TypeError(f"{name} is {crop.dtype} but high_resolution_outputs[0] is {first.dtype}")
    queue = None
    if queue_outputs is not None:
        queue = as_list("queue_outputs", queue_outputs)
        if len(queue) != len(high):
            raise ValueError(
                f"queue_outputs must hold one tensor per high-resolution crop ({len(high)}), got {len(queue)}"
            )
        for i, q in enumerate(queue):
            name = f"queue_outputs[{i}]"
            _checks.check_features(name, q)
            if q.shape[1] != first.shape[1]:
                raise ValueError(f"{name} has K={q.shape[1]} prototypes but the crops have K={first.shape[1]}")
            if q.device != first.device:
                raise ValueError(f"{name} is on {q.device} but the crops are on {first.device}")
    return high, low, queue


def swav_loss(
    high_resolution_outputs: Sequence[Tensor],
    low_resolution_outputs: Sequence[Tensor],
    queue_outputs: Optional[Sequence[Tensor]] = None,
    *,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
    group=None,
    backend: str = "auto",
) -> Tensor:
    """lightly's SwaVLoss: the codes of each high-resolution crop are predicted from every other crop.

    For each high-resolution crop i: q_i = sinkhorn(crop_i, with queue_outputs[i]'s rows appended
    for the assignment and dropped after); loss_i = mean over the other n_crops - 1 crops v of
    -mean_b sum_k q_i log_softmax(crop_v / temperature). The loss is the mean of loss_i over the
    high-resolution crops, fp32 (float64 stays float64). Each crop is (B, K) prototype scores.
    """
    high, low, queue = _check_crops(high_resolution_outputs, low_resolution_outputs, queue_outputs)
    _checks.check_positive_scalar("temperature", temperature, high[0].device)
    sinkhorn_epsilon = _as_float("sinkhorn_epsilon", sinkhorn_epsilon, high[0].device)
    _check_iterations(sinkhorn_iterations)
    _check_group(group)
    backend = _dispatch.resolve(backend, high[0].device, high[0].dtype, op="sinkhorn")
    if backend == "torch":
        return reference.swav_loss(
            high, low, queue, temperature=temperature, sinkhorn_iterations=sinkhorn_iterations,
            sinkhorn_epsilon=sinkhorn_epsilon, group=group,
        )
    codes = []
    for i, anchor in enumerate(high):
        scores = anchor.detach()
        if queue is not None:
            scores = torch.cat([scores, queue[i].detach().to(scores.dtype)])
        q = sinkhorn(scores, iterations=sinkhorn_iterations, epsilon=sinkhorn_epsilon, group=group, backend=backend)
        codes.append(q[: anchor.shape[0]])
    # The cross-entropy is linear in the codes, so each crop's log-softmax is computed once and
    # scored against the sum of the codes it predicts (all q_i with i != its own index):
    # loss = sum_v -mean_b sum_k (sum_{i != v} q_i) log p_v / (n_high (n_crops - 1)).
    crops = high + low
    loss = 0.0
    for v, crop in enumerate(crops):
        predicted = [q for i, q in enumerate(codes) if i != v]
        if not predicted:
            continue  # the only high-resolution crop: its own codes are not its target
        target = predicted[0] if len(predicted) == 1 else torch.stack(predicted).sum(0)
        log_p = F.log_softmax(crop.float() / temperature, dim=1)
        loss = loss - (target * log_p).sum(dim=1).mean()
    return loss / (len(high) * (len(crops) - 1))


class SwAVLoss(nn.Module):
    """Drop-in for lightly's SwaVLoss: loss(high_resolution_outputs, low_resolution_outputs, queue_outputs=None).

    sinkhorn_gather_distributed=True all-reduces the Sinkhorn sums over the default process group
    (when one is initialised), as lightly does; `group=` picks another group.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_gather_distributed: bool = False,
        *,
        group=None,
        backend: str = "auto",
    ):
        super().__init__()
        _checks.check_positive_scalar("temperature", temperature, torch.device("cpu"))
        _checks.check_positive_scalar("sinkhorn_epsilon", sinkhorn_epsilon, torch.device("cpu"))
        _check_iterations(sinkhorn_iterations)
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        if sinkhorn_gather_distributed and not dist.is_available():
            raise ValueError("sinkhorn_gather_distributed=True needs torch.distributed, which this torch build lacks")
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_gather_distributed = sinkhorn_gather_distributed
        self.group, self.backend = group, backend

    def _group(self):
        if self.group is not None:
            return self.group
        if self.sinkhorn_gather_distributed and dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None

    def forward(
        self,
        high_resolution_outputs: Sequence[Tensor],
        low_resolution_outputs: Sequence[Tensor],
        queue_outputs: Optional[Sequence[Tensor]] = None,
    ) -> Tensor:
        return swav_loss(
            high_resolution_outputs, low_resolution_outputs, queue_outputs,
            temperature=self.temperature, sinkhorn_iterations=self.sinkhorn_iterations,
            sinkhorn_epsilon=self.sinkhorn_epsilon, group=self._group(), backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, "
            f"sinkhorn_epsilon={self.sinkhorn_epsilon}, backend={self.backend!r}"
        )


SwaVLoss = SwAVLoss  # lightly's spelling
