"""MoCo: `moco_loss` against a key queue, the ring-buffer enqueue `queue_update_`, and `MoCoQueue`.

Semantics are SPEC.md's (moco_loss, queue_update_). The queue is (K, D), one stored key per ROW
(MoCo's own buffer is its transpose), used as stored: it holds already-normalised keys.

The fused backends never build the N x (1 + K) logits; the custom ops, their autograd and the
math of the O(N D) backward are in cl_fast/_ops/moco.py.

Backends: "torch" (reference.moco_loss / reference.queue_update_), "cpu" / "cuda" (cl_fast._C ops
cl_fast_C::moco_fwd and cl_fast_C::moco_queue_update_, through cl_fast._native; "cuda" where the
extension was built with CUDA kernels for MoCo), "triton" (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1). Every fused backend provides

    moco_fwd(q, k, queue, scale: 0-d fp32 tensor, need_grad: bool) -> (loss (N,), e (N, D) or (0, D), c (N,) or (0,))
    queue_update_(queue, keys, ptr: 0-d integer tensor on queue's device) -> None  (ptr advanced in place)
"""
from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, _dispatch, reference
from ._ops import moco as ops
from ._ops import reduce_loss, scale_tensor

__all__ = ["moco_loss", "queue_update_", "MoCoQueue"]

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------ input checks
def _check_queue(queue, q: Tensor) -> None:
    _checks.check_features("queue", queue)
    if queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must hold keys of D={q.shape[1]} (q's), got shape {tuple(queue.shape)}")
    if queue.device != q.device:
        raise ValueError(f"queue is on {queue.device} but q is on {q.device}")


def _check_ptr(ptr, size: int, device: torch.device) -> None:
    if isinstance(ptr, Tensor):
        if ptr.dim() != 0:
            raise ValueError(f"ptr must be an int or a 0-d tensor, got shape {tuple(ptr.shape)}")
        if ptr.is_floating_point() or ptr.is_complex() or ptr.dtype == torch.bool:
            raise TypeError(f"ptr must be an integer tensor, got {ptr.dtype}")
        if ptr.device != device:
            raise ValueError(f"ptr is on {ptr.device} but the queue is on {device}")
        return
    if isinstance(ptr, bool) or not isinstance(ptr, numbers.Integral):
        raise TypeError(f"ptr must be an int or a 0-d integer tensor, got {type(ptr).__name__}")
    if not 0 <= ptr < size:
        raise ValueError(f"ptr must be in [0, K) = [0, {size}), got {ptr}")


def _check_enqueue(queue, keys) -> None:
    _checks.check_features("queue", queue)
    _checks.check_features("keys", keys)
    if keys.shape[1] != queue.shape[1]:
        raise ValueError(f"keys must have D={queue.shape[1]} columns (the queue's), got shape {tuple(keys.shape)}")
    if keys.device != queue.device:
        raise ValueError(f"keys is on {keys.device} but the queue is on {queue.device}")
    if keys.shape[0] > queue.shape[0]:
        raise ValueError(
            f"keys has B={keys.shape[0]} rows but the queue holds only K={queue.shape[0]}; need B <= K"
        )
    if queue.requires_grad:
        raise ValueError("queue must not require grad (it is a buffer updated in place)")
    if not queue.is_contiguous():
        raise ValueError("queue must be contiguous (rows are written in place)")


# ------------------------------------------------------------------------------ public API
def moco_loss(
    q: Tensor, k: Tensor, queue: Tensor, temperature=0.07, *, reduction: str = "mean", backend: str = "auto"
) -> Tensor:
    """MoCo v1/v2 InfoNCE: row i of n(q) scores n(k_i) (the positive) against every queue row.

    q, k: (N, D); queue: (K, D) stored keys, one per row, used as stored (it may have its own
    dtype, e.g. an fp32 queue with bf16 q, k under autocast). Gradient flows only into q (and a
    tensor `temperature`). Returns fp32: the mean (or sum, or per-row) cross-entropy with label 0.
    """
    _checks.check_pair("q", q, "k", k)
    _check_queue(queue, q)
    _checks.check_positive_scalar("temperature", temperature, q.device)
    _checks.check_reduction(reduction)
    dtype = torch.float64 if torch.float64 in (q.dtype, queue.dtype) else q.dtype
    if dtype == torch.float64 and q.dtype != torch.float64 and backend not in ("auto", "torch"):
        raise TypeError(f"backend={backend!r} takes a float32, float16 or bfloat16 queue, got float64")
    backend = _dispatch.resolve(backend, q.device, dtype, op="moco")
    if backend == "torch":
        return reference.moco_loss(q, k, queue, temperature, reduction=reduction)
    scale = scale_tensor(temperature, True, q.device)
    need_grad = torch.is_grad_enabled() and (q.requires_grad or scale.requires_grad)
    loss, _, _ = ops.moco_fwd(q, k, queue, scale, need_grad, backend)
    return reduce_loss(loss, reduction)


def queue_update_(queue: Tensor, keys: Tensor, ptr, *, backend: str = "auto"):
    """MoCo's enqueue: writes n(keys) (cast to queue.dtype) into rows ptr, ptr+1, ... mod K.

    Wraps around the end (K need not be a multiple of B); B > K is an error. `ptr` is a Python
    int (returns the new int pointer) or a 0-d integer tensor on the queue's device, which is
    advanced in place without a host sync (and returned). No gradient flows (keys are detached).
    """
    _check_enqueue(queue, keys)
    _check_ptr(ptr, queue.shape[0], queue.device)
    dtype = torch.float64 if torch.float64 in (queue.dtype, keys.dtype) else queue.dtype
    backend = _dispatch.resolve(backend, queue.device, dtype, op="moco")
    keys = keys.detach()
    if backend == "torch":
        return reference.queue_update_(queue, keys, ptr)
    if isinstance(ptr, Tensor):
        ops.queue_update_(queue, keys, ptr, backend)
        return ptr
    ptr_tensor = torch.full((), ptr, dtype=torch.int64, device=queue.device)  # a fill: no host copy
    ops.queue_update_(queue, keys, ptr_tensor, backend)
    return (ptr + keys.shape[0]) % queue.shape[0]


def _gather_keys(keys: Tensor, group) -> Tensor:
    """cat over ranks (rank order) of every rank's keys; equal batch sizes on every rank, no grad."""
    world = dist.get_world_size(group)
    if world == 1:
        return keys
    parts = [torch.empty_like(keys) for _ in range(world)]
    dist.all_gather(parts, keys.contiguous(), group=group)
    return torch.cat(parts)


class MoCoQueue(nn.Module):
    """MoCo's queue of negative keys: a (size, dim) ring buffer and its write pointer.

    Both are persistent buffers (`queue`, `ptr`), so `state_dict()` / `load_state_dict()` save
    and restore them and `.to()` moves them. The queue starts as random unit rows drawn from a
    generator seeded with `seed`, so every rank starts from the same queue without communication.

    `enqueue(keys)` writes n(keys) at the pointer (wrapping around) and advances it on the
    device. When torch.distributed is initialised (and `gather_distributed`), the keys of every
    rank are all-gathered first (no grad; every rank must pass the same number of keys, as in
    MoCo), so every rank holds the same queue: the one a single process would hold after
    enqueueing the concatenated batch. `negatives()` is the queue to pass to `moco_loss`.
    """

    def __init__(
        self, size: int, dim: int, dtype: torch.dtype = torch.float32, *, device=None,
        gather_distributed: bool = True, process_group=None, seed: int = 0, backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if dtype not in _FUSED_DTYPES + (torch.float64,):
            raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
        if backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
        generator = torch.Generator().manual_seed(seed)
        initial = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("queue", initial.to(device=device, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.gather_distributed, self.process_group, self.backend = gather_distributed, process_group, backend

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write n(keys) (all ranks' keys, gathered, when distributed) at the pointer and advance it."""
        _check_enqueue(self.queue, keys)
        keys = keys.detach()
        if self.gather_distributed and dist.is_available() and dist.is_initialized():
            keys = _gather_keys(keys, self.process_group)
        queue_update_(self.queue, keys, self.ptr, backend=self.backend)

    def negatives(self) -> Tensor:
        """The queue (K, D), detached: a view of the buffer, not a copy.

        The fused backends do not keep it for backward, so `enqueue` may run between the loss and
        its backward. backend="torch" (the reference) saves it for backward: enqueue after the
        backward there, or pass `negatives().clone()`.
        """
        return self.queue.detach()

    def extra_repr(self) -> str:
        size, dim = self.queue.shape
        return f"size={size}, dim={dim}, dtype={self.queue.dtype}, backend={self.backend!r}"
