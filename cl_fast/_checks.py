"""Input validation shared by every public op: one place, messages that name the argument."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_features(name: str, x, min_rows: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} row(s), got N={x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one feature column, got D={x.shape[1]}")


def check_pair(name_a: str, a, name_b: str, b, min_rows: int = 1) -> None:
    """Two (N, D) feature tensors of one shape, dtype and device."""
    check_features(name_a, a, min_rows)
    check_features(name_b, b, min_rows)
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on one device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have one dtype, got {a.dtype} and {b.dtype}")


def host_readable(value: torch.Tensor) -> bool:
    """Whether a tensor's value can be read without waiting for a device: a CPU tensor, in eager
    mode (under torch.compile a read would break the graph, or sync once compiled)."""
    return value.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_scalar_tensor(name: str, value: torch.Tensor, device: torch.device) -> None:
    """A 0-d (or one-element 1-d) floating-point tensor on the features' device or the CPU."""
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a float or a 0-d tensor, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != device and value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")


def check_finite_scalar(name: str, value, device: torch.device) -> None:
    """None, a finite float or a 0-d float tensor of any sign (e.g. a logit bias). A tensor's value
    is not read (no host sync): a NaN there propagates into the loss as NaN, like any input."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        _check_scalar_tensor(name, value, device)
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_world(owner: str, rank, world_size, use_horovod: bool = False, multi_process: bool = False) -> None:
    """OpenCLIP's (rank, world_size): validated. multi_process=False (an owner without a
    distributed path): world_size > 1 is NotImplementedError."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
    if use_horovod:
        raise NotImplementedError(f"{owner}(use_horovod=True): Horovod is not supported by cl_fast")
    if world_size > 1 and not multi_process:
        raise NotImplementedError(
            f"{owner}(world_size={world_size}): the multi-process loss (features gathered over the ranks) "
            "is not implemented yet; cl_fast computes the single-process loss only (world_size=1)"
        )


def check_world_matches_group(owner: str, rank: int, world_size: int) -> None:
    """OpenCLIP's (rank, world_size) with world_size > 1 name the default process group: it must
    exist and this process must be that rank of that many."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"{owner}(world_size={world_size}) needs torch.distributed initialised "
            "(torch.distributed.init_process_group) before the loss is computed"
        )
    actual_world, actual_rank = dist.get_world_size(), dist.get_rank()
    if world_size != actual_world:
        raise ValueError(f"world_size={world_size} but the default process group has {actual_world} ranks")
    if rank != actual_rank:
        raise ValueError(f"rank={rank} but this process is rank {actual_rank} of the default process group")


def check_positive_scalar(name: str, value, device: torch.device) -> None:
    """A float or a 0-d float tensor, finite and > 0.

    A number, or a CPU tensor in eager mode, is checked here (ValueError). A device tensor, or any
    tensor under torch.compile, is never read on the host: the check is queued on its device
    instead (torch._assert_async), so an invalid value fails the step loudly (a RuntimeError
    naming the argument) rather than giving a silent number, and no step waits for the device.
    On a GPU that failure is a device-side assert: like an out-of-range index, it ends the
    process's CUDA context (the price of not synchronising on every step).
    """
    if isinstance(value, torch.Tensor):
        _check_scalar_tensor(name, value, device)
        if not host_readable(value):
            valid = (value.detach() > 0) & torch.isfinite(value.detach())
            torch._assert_async(valid.reshape(()), f"{name} must be finite and > 0")
            return
        value = float(value.detach())
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
