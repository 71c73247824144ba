"""nt_xent, info_nce, clip_loss: every backend against a float64 evaluation of SPEC.md.

Values AND gradients (features, and a tensor temperature / logit_scale), ragged shapes
(N and D not multiples of any block), fp32/fp16/bf16, every reduction, fresh random inputs.
"""
from __future__ import annotations

import pytest
import torch

import cl_fast
from cl_fast import reference
from conftest import DEVICE, RTOL, backward_with_random_weights, fused_backend_params, randn, rel_err

BACKENDS = [pytest.param("torch", id="torch")] + fused_backend_params()
NS = [2, 3, 17, 64, 129]
DS = [3, 16, 100, 128, 257]
# fp32: every (N, D) pair; fp16/bf16: the ragged diagonal plus the extreme corners.
SHAPES_FP32 = [(n, d) for n in NS for d in DS]
SHAPES_HALF = list(zip(NS, DS)) + [(129, 3), (2, 257)]
CASES = [(torch.float32, n, d) for n, d in SHAPES_FP32] + [
    (dt, n, d) for dt in (torch.float16, torch.bfloat16) for n, d in SHAPES_HALF
]
CASE_IDS = [f"{str(dt)[6:]}-N{n}-D{d}" for dt, n, d in CASES]

LOSSES = ["nt_xent", "info_nce", "info_nce_sym", "clip_loss"]


def run_loss(name, a, b, scale_arg, backend, reduction="mean"):
    """One call of the public API; scale_arg is the temperature (or logit_scale for clip)."""
    if name == "nt_xent":
        return cl_fast.nt_xent(a, b, scale_arg, reduction=reduction, backend=backend)
    if name == "info_nce":
        return cl_fast.info_nce(a, b, scale_arg, reduction=reduction, backend=backend)
    if name == "info_nce_sym":
        return cl_fast.info_nce(a, b, scale_arg, symmetric=True, reduction=reduction, backend=backend)
    assert reduction == "mean", "clip_loss has no reduction argument"
    # the normalised rows (bounded logits) here; normalize=False (OpenCLIP's default) is tested in test_dropin.py
    return cl_fast.clip_loss(a, b, scale_arg, normalize=True, backend=backend)


def reference_loss(name, a, b, scale_arg, reduction="mean"):
    """The same loss in float64 through the reference formulas (autograd gives the gradients)."""
    if name == "nt_xent":
        return reference.nt_xent(a, b, scale_arg, reduction=reduction)
    if name == "info_nce":
        return reference.info_nce(a, b, scale_arg, reduction=reduction)
    if name == "info_nce_sym":
        return reference.info_nce(a, b, scale_arg, symmetric=True, reduction=reduction)
    return reference.clip_loss(a, b, scale_arg, normalize=True)


def default_scale_arg(name):
    return 2.0 if name == "clip_loss" else 0.5


def check_against_float64(name, backend, n, d, dtype, gen, scale_arg, reduction="mean", scale_grad=False):
    a = randn(n, d, dtype=dtype, generator=gen, requires_grad=True)
    b = randn(n, d, dtype=dtype, generator=gen, requires_grad=True)
    if scale_grad:
        scale_arg = torch.tensor(float(scale_arg), device=DEVICE, requires_grad=True)
    loss = run_loss(name, a, b, scale_arg, backend, reduction)
    assert loss.dtype == torch.float32 or backend == "torch"

    a64 = a.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    s64 = scale_arg.detach().double().requires_grad_() if scale_grad else scale_arg
    expected = reference_loss(name, a64, b64, s64, reduction)

    backward_with_random_weights(loss, expected, gen)

    tol = RTOL[dtype]
    assert rel_err(loss, expected) < tol, "loss"
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert rel_err(a.grad, a64.grad) < tol, "grad of first input"
    assert rel_err(b.grad, b64.grad) < tol, "grad of second input"
    if scale_grad:
        assert rel_err(scale_arg.grad, s64.grad) < tol, "grad of temperature / logit_scale"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,n,d", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", LOSSES)
def test_matches_float64(name, backend, dtype, n, d, gen):
    check_against_float64(name, backend, n, d, dtype, gen, default_scale_arg(name))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "info_nce_sym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_reductions_and_tensor_temperature(name, reduction, backend, dtype, gen):
    check_against_float64(name, backend, 37, 45, dtype, gen, 0.3, reduction, scale_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_clip_logit_scale_gradient(backend, dtype, gen):
    check_against_float64("clip_loss", backend, 33, 40, dtype, gen, 14.0, scale_grad=True)


# T = 0.01 puts 2/T above the fixed-shift limit (the running-max fallback); T = 0.07 is MoCo's.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.07, 0.01])
@pytest.mark.parametrize("name", LOSSES)
def test_small_temperatures(name, temperature, backend, gen):
    scale_arg = 1.0 / temperature if name == "clip_loss" else temperature
    check_against_float64(name, backend, 40, 24, torch.float32, gen, scale_arg, scale_grad=True)


def test_check_values_from_spec():
    torch.manual_seed(0)
    a = torch.randn(8, 16, dtype=torch.float64)
    b = torch.randn(8, 16, dtype=torch.float64)
    assert cl_fast.nt_xent(a, b, 0.5).item() == pytest.approx(2.85170, abs=5e-6)
    assert cl_fast.info_nce(a, b, 0.5).item() == pytest.approx(2.17937, abs=5e-6)
    assert cl_fast.clip_loss(a, b, 2.0, normalize=True).item() == pytest.approx(2.18190, abs=5e-6)


@pytest.mark.parametrize("backend", fused_backend_params())
def test_check_values_fused_fp32(backend):
    torch.manual_seed(0)
    a = torch.randn(8, 16, dtype=torch.float64).float().to(DEVICE)
    b = torch.randn(8, 16, dtype=torch.float64).float().to(DEVICE)
    assert cl_fast.nt_xent(a, b, 0.5, backend=backend).item() == pytest.approx(2.85170, abs=5e-5)
    assert cl_fast.info_nce(a, b, 0.5, backend=backend).item() == pytest.approx(2.17937, abs=5e-5)
    assert cl_fast.clip_loss(a, b, 2.0, normalize=True, backend=backend).item() == pytest.approx(2.18190, abs=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_symmetric_info_nce_is_clip_with_inverse_temperature(backend, gen):
    a, b = randn(20, 30, generator=gen), randn(20, 30, generator=gen)
    sym = cl_fast.info_nce(a, b, 0.25, symmetric=True, backend=backend)
    clip = cl_fast.clip_loss(a, b, 4.0, normalize=True, backend=backend)
    torch.testing.assert_close(sym, clip, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_nan_input_propagates(name, backend, gen):
    a, b = randn(9, 12, generator=gen), randn(9, 12, generator=gen)
    a[3, 5] = float("nan")
    assert torch.isnan(run_loss(name, a, b, default_scale_arg(name), backend))


def test_modules_match_functions(gen):
    a, b = randn(10, 8, generator=gen), randn(10, 8, generator=gen)
    torch.testing.assert_close(cl_fast.NTXentLoss(0.2)(a, b), cl_fast.nt_xent(a, b, 0.2))
    torch.testing.assert_close(
        cl_fast.InfoNCELoss(0.2, symmetric=True)(a, b), cl_fast.info_nce(a, b, 0.2, symmetric=True)
    )
    torch.testing.assert_close(cl_fast.ClipLoss()(a, b, 5.0), cl_fast.clip_loss(a, b, 5.0))
    assert set(cl_fast.ClipLoss()(a, b, 5.0, output_dict=True)) == {"contrastive_loss"}


def test_clip_normalize_false_uses_raw_features(gen):
    a, b = randn(6, 5, generator=gen), randn(6, 5, generator=gen)
    logits = 3.0 * a.double() @ b.double().T
    labels = torch.arange(6)
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))
    torch.testing.assert_close(cl_fast.clip_loss(a, b, 3.0, normalize=False).double(), expected, rtol=1e-5, atol=1e-6)
