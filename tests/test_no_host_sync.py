"""No host synchronisation on the fused paths: the scale reaches the kernels as a device tensor.

On a GPU, reading a device tensor's value on the host (float(t), t.item(), bool(t), t.tolist())
waits for the device and makes CUDA-graph capture impossible. These tests run the generic layer
(public functions, cl_fast._ops custom ops and their autograd) and the Triton launchers with every
host read of a tensor patched to raise, on CPU tensors under TRITON_INTERPRET=1 with the checks
told to treat them as device tensors (the CUDA path: a device-side assert, never a host read).
The native "cpu" backend may read its CPU scale (host memory, no sync) and is not tested here.
A GPU session also runs forward + backward under CUDA-graph capture.

Under torch.compile, an invalid tensor temperature (negative, NaN) is caught by the device-side
check, never a silent number.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import cl_fast
from cl_fast import _checks
from conftest import DEVICE, fused_backend_params, randn, rel_err

TRITON = {p.values[0]: p for p in fused_backend_params("infonce")}["triton"]
_HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every host read of a tensor's value raises HostRead; scalar checks take the device path."""
    with monkeypatch.context() as patch:
        patch.setattr(_checks, "host_readable", lambda value: False)
        for name in _HOST_READS:
            def refuse(self, *args, _name=name, **kwargs):
                raise HostRead(f"Tensor.{_name}() read a tensor on the host (a device sync on a GPU)")
            patch.setattr(torch.Tensor, name, refuse)
        yield


def _features(gen, n=6, d=10, requires_grad=True):
    return randn(n, d, generator=gen, requires_grad=requires_grad), randn(n, d, generator=gen)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _nt_xent(gen):
    z1, z2 = _features(gen)
    t = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    return lambda: _grads(cl_fast.nt_xent(z1, z2, t, backend="triton"), (z1, t))


def _clip(gen):
    a, b = _features(gen)
    s = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    return lambda: _grads(cl_fast.clip_loss(a, b, s, normalize=True, backend="triton"), (a, s))


def _info_nce(gen):
    a, b = _features(gen)
    return lambda: _grads(cl_fast.info_nce(a, b, 0.2, backend="triton"), (a,))


def _clip_as_given(gen):
    a, b = _features(gen)
    s = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    return lambda: _grads(cl_fast.clip_loss(a, b, s, normalize=False, backend="triton"), (a, s))


def _siglip(gen):
    a, b = _features(gen)
    s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    return lambda: _grads(cl_fast.siglip_loss(a, b, s, bias, backend="triton"), (a, s, bias))


def _moco(gen):
    q, k = _features(gen)
    queue = torch.nn.functional.normalize(randn(20, 10, generator=gen), dim=1)
    t = torch.tensor(0.2, device=DEVICE, requires_grad=True)
    return lambda: _grads(cl_fast.moco_loss(q, k, queue, t, backend="triton"), (q, t))


def _queue_update(gen):
    queue = torch.nn.functional.normalize(randn(20, 10, generator=gen), dim=1)
    keys = randn(7, 10, generator=gen)
    ptr = torch.tensor(17, device=DEVICE)
    return lambda: (cl_fast.queue_update_(queue, keys, ptr, backend="triton"), queue)


def _byol(gen):
    p, z = _features(gen)
    return lambda: _grads(cl_fast.byol_loss(p, z, backend="triton"), (p,))


def _sinkhorn(gen):
    scores = randn(9, 7, generator=gen)
    return lambda: cl_fast.sinkhorn(scores, epsilon=0.05, iterations=3, backend="triton")


def _swav(gen):
    crops = [randn(8, 5, generator=gen, requires_grad=True) for _ in range(3)]
    return lambda: _grads(cl_fast.swav_loss(crops[:2], crops[2:], backend="triton"), tuple(crops))


CASES = [
    pytest.param(_nt_xent, id="nt_xent"),
    pytest.param(_clip, id="clip_loss"),
    pytest.param(_info_nce, id="info_nce"),
    pytest.param(_clip_as_given, id="clip_loss-normalize=False"),
    pytest.param(_siglip, id="siglip_loss"),
    pytest.param(_moco, id="moco_loss"),
    pytest.param(_queue_update, id="queue_update_"),
    pytest.param(_byol, id="byol_loss"),
    pytest.param(_sinkhorn, id="sinkhorn"),
    pytest.param(_swav, id="swav_loss"),
]


@pytest.mark.parametrize("make_step", CASES)
def test_fused_path_reads_no_tensor_on_the_host(make_step, gen, monkeypatch):
    if TRITON.marks:
        pytest.skip(TRITON.marks[0].kwargs["reason"])
    step = make_step(gen)
    step()  # first call: Triton's launch setup (and any one-off work) outside the patch
    with no_host_reads(monkeypatch):
        step()


def test_the_patch_catches_a_host_read(monkeypatch):
    """The guard is live: the checks' host path and float() of a tensor both trip it."""
    with no_host_reads(monkeypatch):
        with pytest.raises(HostRead):
            float(torch.tensor(0.5))
        monkeypatch.setattr(_checks, "host_readable", lambda value: True)
        with pytest.raises(HostRead):
            _checks.check_positive_scalar("temperature", torch.tensor(0.5), torch.device("cpu"))


def test_device_path_check_still_rejects_a_bad_temperature(monkeypatch):
    """Where the value is not read on the host, an invalid tensor temperature still fails (the
    device-side assert), naming the argument."""
    with monkeypatch.context() as patch:
        patch.setattr(_checks, "host_readable", lambda value: False)
        for bad in (-0.5, 0.0, math.nan, math.inf):
            with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
                _checks.check_positive_scalar("temperature", torch.tensor(bad), torch.device("cpu"))


# ---------------------------------------------------------------- torch.compile: invalid temperature
COMPILED_LOSSES = {
    "infonce": lambda a, b, t, backend: cl_fast.nt_xent(a, b, t, backend=backend),
    "moco": lambda a, b, t, backend: cl_fast.moco_loss(a, b, torch.nn.functional.normalize(b, dim=1), t, backend=backend),
}


@pytest.mark.parametrize(
    "family,backend",
    [pytest.param(f, b.values[0], marks=b.marks, id=f"{f}-{b.values[0]}") for f in COMPILED_LOSSES for b in fused_backend_params(f)],
)
def test_compiled_invalid_temperature_is_caught(family, backend, gen):
    a, b = _features(gen, requires_grad=False)
    loss = COMPILED_LOSSES[family]
    compiled = torch.compile(lambda a, b, t: loss(a, b, t, backend), fullgraph=True, backend="aot_eager")
    good = torch.tensor(0.4, device=DEVICE)
    assert rel_err(compiled(a, b, good), loss(a, b, good, backend)) < 1e-6
    for bad in (-0.4, math.nan, 0.0):
        with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
            compiled(a, b, torch.tensor(bad, device=DEVICE))


# ---------------------------------------------------------------- CUDA graphs (needs a GPU)
def _gpu_backends():
    if not torch.cuda.is_available():
        return [pytest.param("none", marks=pytest.mark.skip(reason="needs a CUDA GPU (CUDA-graph capture)"))]
    return [b for b in ("triton", "cuda") if b in cl_fast.backends("infonce", "cuda")]


GRAPH_LOSSES = {
    "nt_xent": lambda a, b, t, queue, backend: cl_fast.nt_xent(a, b, t, backend=backend),
    "clip_loss": lambda a, b, t, queue, backend: cl_fast.clip_loss(a, b, 1 / t, backend=backend),
    "moco_loss": lambda a, b, t, queue, backend: cl_fast.moco_loss(a, b, queue, t, backend=backend),
    "byol_loss": lambda a, b, t, queue, backend: cl_fast.byol_loss(a, b, backend=backend),
}
_FAMILY = {"nt_xent": "infonce", "clip_loss": "infonce", "moco_loss": "moco", "byol_loss": "byol"}


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("name", list(GRAPH_LOSSES))
def test_forward_backward_under_cuda_graph_capture(name, backend):
    if backend not in cl_fast.backends(_FAMILY[name], "cuda"):
        pytest.skip(f"{name} has no {backend!r} kernel in this build")
    gen = torch.Generator().manual_seed(0)
    device = torch.device("cuda")
    a = torch.randn(64, 32, generator=gen).to(device).requires_grad_()
    b = torch.randn(64, 32, generator=gen).to(device)
    t = torch.tensor(0.2, device=device, requires_grad=True)
    queue = torch.nn.functional.normalize(torch.randn(256, 32, generator=gen), dim=1).to(device)
    loss_fn = GRAPH_LOSSES[name]

    def step():
        loss = loss_fn(a, b, t, queue, backend)
        grads = torch.autograd.grad(loss, (a, t), allow_unused=True)
        return loss.detach(), grads[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: autotuning and compilation happen outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_static, grad_static = step()
    with torch.no_grad():  # new inputs in the captured buffers, then replay
        a.copy_(torch.randn(64, 32, generator=gen).to(device))
        t.fill_(0.3)
    graph.replay()
    loss_eager, grad_eager = step()
    torch.cuda.synchronize()
    assert rel_err(loss_static, loss_eager) < 1e-5
    assert rel_err(grad_static, grad_eager) < 1e-4
