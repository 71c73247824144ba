"""Which backend runs: the one place that decides, for every op family.

A fused backend of an op family is a module holding that family's launchers (DESIGN.md's
backend interface; for the InfoNCE family ntxent_fwd, ntxent_bwd, cross_fwd, cross_bwd).
"cpu" and "cuda" are both served by cl_fast._native (the C++ / CUDA kernels of cl_fast._C,
which the dispatcher picks by device); each is listed only where the build registered the
family's kernels for that device. "triton" is cl_fast.triton_kernels.<family>. "torch" is the
pure-PyTorch reference and has no module here (it is autograd all the way). Adding a backend is
one module and one entry per family in _MODULES.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
ENV_VAR = "CL_FAST_BACKEND"

_NATIVE = "cl_fast._native"
# op family -> backend -> the module with that family's launchers
_MODULES = {
    family: {"cuda": _NATIVE, "triton": f"cl_fast.triton_kernels.{family}", "cpu": _NATIVE}
    for family in ("infonce", "moco", "byol", "sinkhorn", "siglip")
}
# "auto" on a device tries these, first available wins
_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except (ImportError, OSError, RuntimeError):
        return None


# Imported once, here: torch.compile traces resolve() and cannot trace an import.
_LOADED = {
    op: {backend: _try_import(name) for backend, name in table.items()} for op, table in _MODULES.items()
}


def module(backend: str, op: str = "infonce"):
    """The module holding `op`'s launchers for `backend` (None where it did not import)."""
    return _LOADED[op].get(backend)


def _has_kernels(backend: str, op: str) -> bool:
    loaded = module(backend, op)
    if loaded is None:
        return False
    if backend in ("cpu", "cuda"):  # the native module: kernels registered for this device?
        return loaded.has_kernels(op, backend)
    return True


# op family -> the backends whose module imported and whose kernels are built (decided once,
# here: torch.compile traces resolve() and cannot trace the dispatcher query)
_BUILT = {op: {backend for backend in table if _has_kernels(backend, op)} for op, table in _MODULES.items()}


def _built(backend: str, op: str) -> bool:
    return backend in _BUILT[op]


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return False


def backends(op: str = "infonce", device: torch.device | str | None = None) -> list[str]:
    """The backends usable here for `op` (on tensors of `device`, if given), fused ones first."""
    found = [name for name in _MODULES[op] if _built(name, op)]
    if "cuda" in found and not torch.cuda.is_available():
        found.remove("cuda")
    if "triton" in found and not (torch.cuda.is_available() or triton_interpreted()):
        found.remove("triton")
    if device is not None:
        found = [name for name in found if _runs_on(name, torch.device(device))]
    return found + ["torch"]


def max_dim(backend: str, op: str = "infonce") -> int | None:
    """The largest feature dimension D a fused backend's kernels take (None: no limit)."""
    return getattr(module(backend, op), "MAX_DIM", None)


def resolve(backend: str, device: torch.device, dtype: torch.dtype, dim: int | None = None, op: str = "infonce") -> str:
    """Turn the user's `backend=` into the concrete backend of `op` for (., dim) tensors on `device`.

    "auto" (or the CL_FAST_BACKEND environment variable) picks the fastest fused backend for the
    device, the reference for float64 or where none is built, and falls back to the reference
    (with a warning) when D is beyond the fused kernels; an explicit fused backend raises instead.
    """
    chosen = _resolve(backend, device, dtype, op)
    if chosen == "torch" or dim is None:
        return chosen
    limit = max_dim(chosen, op)
    if limit is not None and dim > limit:
        if backend == "auto" and os.environ.get(ENV_VAR, "auto") in ("", "auto"):
            warnings.warn(f"D={dim} exceeds the {chosen} kernels' limit of {limit}; using the reference backend")
            return "torch"
        raise ValueError(f"feature dimension D={dim} exceeds backend {chosen!r}'s limit of {limit}")
    return chosen


def _resolve(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
        if backend not in _MODULES[op] and backend != "torch":
            backend = "auto"  # the override names a backend this op family has no kernel for
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"  # the fused kernels are fp32/fp16/bf16; float64 gets the exact reference
        here = backends(op, device)
        return next((name for name in _PREFERENCE.get(device.type, ()) if name in here), "torch")
    if backend == "torch":
        return backend
    if backend not in _MODULES[op]:
        options = ", ".join(f"backend={name!r}" for name in _MODULES[op])
        raise ValueError(f"backend={backend!r} has no {op} kernel; use {options}, 'torch' or 'auto'")
    if dtype == torch.float64:
        raise TypeError(f"backend={backend!r} takes float32, float16 or bfloat16 inputs, got float64")
    if not _runs_on(backend, device):
        hint = " (set TRITON_INTERPRET=1 to run Triton on CPU tensors)" if backend == "triton" else ""
        raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors{hint}")
    if not _built(backend, op):
        raise ValueError(f"backend={backend!r} is not available here; available: {backends(op)}")
    return backend
