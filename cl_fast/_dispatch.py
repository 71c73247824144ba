"""Which backend runs: the one place that decides.

A fused backend is a module with the four functions of DESIGN.md's interface
(ntxent_fwd, ntxent_bwd, cross_fwd, cross_bwd); adding one is one entry in _MODULES.
"torch" is the pure-PyTorch reference and has no module here (it is autograd all the way).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
ENV_VAR = "CL_FAST_BACKEND"

# backend name -> module implementing DESIGN.md's interface
_MODULES = {
    "triton": "triton_kernels.infonce",
    "cpu": "cl_fast._cpu_backend",
    "cuda": "cl_fast._cuda_backend",
}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _try_import(backend: str):
    try:
        return importlib.import_module(_MODULES[backend])
    except (ImportError, OSError, RuntimeError):
        return None


# Imported once, here: torch.compile traces resolve() and cannot trace an import.
_LOADED = {name: _try_import(name) for name in _MODULES}


def _importable(backend: str) -> bool:
    return _LOADED[backend] is not None


def module(backend: str):
    return _LOADED[backend]


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


def backends() -> list[str]:
    """The backends usable on this machine (with this environment), fastest fused first."""
    found = []
    if _importable("cuda") and torch.cuda.is_available():
        found.append("cuda")
    if _importable("triton") and (torch.cuda.is_available() or triton_interpreted()):
        found.append("triton")
    if _importable("cpu"):
        found.append("cpu")
    found.append("torch")
    return found


def max_dim(backend: str) -> int | None:
    """The largest feature dimension D a fused backend's kernels take (None: no limit)."""
    return getattr(module(backend), "MAX_DIM", None)


def resolve(backend: str, device: torch.device, dtype: torch.dtype, dim: int | None = None) -> str:
    """Turn the user's `backend=` into the concrete backend for (., dim) tensors on `device`.

    "auto" falls back to the reference (with a warning) when D is beyond the fused kernels;
    an explicit fused backend raises instead.
    """
    chosen = _resolve(backend, device, dtype)
    if chosen == "torch" or dim is None:
        return chosen
    limit = max_dim(chosen)
    if limit is not None and dim > limit:
        if backend == "auto" and os.environ.get(ENV_VAR, "auto") in ("", "auto"):
            warnings.warn(f"D={dim} exceeds the {chosen} kernels' limit of {limit}; using the reference backend")
            return "torch"
        raise ValueError(f"feature dimension D={dim} exceeds backend {chosen!r}'s limit of {limit}")
    return chosen


def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"  # the fused kernels are fp32/fp16/bf16; float64 gets the exact reference
        preference = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        for name in preference:
            if name in backends():
                return name
        return "torch"
    if backend == "torch":
        return backend
    if dtype == torch.float64:
        raise TypeError(f"backend={backend!r} takes float32, float16 or bfloat16 inputs, got float64")
    if not _runs_on(backend, device):
        hint = " (set TRITON_INTERPRET=1 to run Triton on CPU tensors)" if backend == "triton" else ""
        raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors{hint}")
    if not _importable(backend):
        raise ValueError(f"backend={backend!r} is not available here; available: {backends()}")
    return backend
