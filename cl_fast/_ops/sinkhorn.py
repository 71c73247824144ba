"""SwAV Sinkhorn custom ops: the fused single-process assignment (sinkhorn), and the two steps a
distributed run interleaves with its all-reduces (sinkhorn_col_lse, sinkhorn_assign).

The fused backends never build a (B, K) intermediate: they keep the two log-domain scaling
vectors and re-read the scores once per iteration (cl_fast/triton_kernels/sinkhorn.py,
csrc/cpu/sinkhorn.cpp). No gradient: the codes are targets (SwAV runs it under no_grad).
`epsilon` is a Python float (a hyperparameter, never a tensor): nothing to read on the host.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _dispatch
from . import define, fp32


def _launchers(backend: str):
    return _dispatch.module(backend, "sinkhorn")


def _sinkhorn_impl(scores: Tensor, epsilon: float, iterations: int, backend: str) -> Tensor:
    """The fused single-process assignment, (B, K) fp32."""
    return _launchers(backend).sinkhorn(scores.contiguous(), 1.0 / epsilon, iterations)


sinkhorn = define("sinkhorn", _sinkhorn_impl)


@sinkhorn.register_fake
def _(scores, epsilon, iterations, backend):
    return fp32(scores.shape, scores)


def _col_lse_impl(scores: Tensor, epsilon: float, f: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """Per-prototype (max, sum exp(. - max)) of scores / eps + g over this process's rows,
    g_b = -lse_k(scores_bk / eps + f_k) (g = 0 without f)."""
    f = None if f is None else f.contiguous()
    return tuple(_launchers(backend).sinkhorn_col_lse(scores.contiguous(), 1.0 / epsilon, f))


sinkhorn_col_lse = define("sinkhorn_col_lse", _col_lse_impl)


@sinkhorn_col_lse.register_fake
def _(scores, epsilon, f, backend):
    protos = scores.shape[1:]
    return fp32(protos, scores), fp32(protos, scores)


def _assign_impl(scores: Tensor, epsilon: float, f: Tensor, backend: str) -> Tensor:
    """softmax_k(scores / eps + f), (B, K) fp32."""
    return _launchers(backend).sinkhorn_assign(scores.contiguous(), 1.0 / epsilon, f.contiguous())


sinkhorn_assign = define("sinkhorn_assign", _assign_impl)


@sinkhorn_assign.register_fake
def _(scores, epsilon, f, backend):
    return fp32(scores.shape, scores)
