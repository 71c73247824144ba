"""The drop-in contract: OpenCLIP's and lightly's signatures, and their values against formulas.

Written from those libraries' documented behaviour (argument order and names, what each argument
means), checked against float64 formulas here; no third-party code is run by these tests.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import cl_fast
from cl_fast import reference
from conftest import DEVICE, DTYPES, RTOL, fused_backend_params, randn, rel_err

INFONCE = fused_backend_params("infonce") + ["torch"]
MOCO = fused_backend_params("moco") + ["torch"]
SINKHORN = fused_backend_params("sinkhorn") + ["torch"]


def _params(callable_):
    return [(p.name, p.default, p.kind) for p in inspect.signature(callable_).parameters.values()]


def _names(callable_, kind=inspect.Parameter.POSITIONAL_OR_KEYWORD):
    return [p.name for p in inspect.signature(callable_).parameters.values() if p.kind == kind]


# ---------------------------------------------------------------- signatures
def test_clip_loss_signatures_follow_openclip():
    assert _names(cl_fast.ClipLoss.__init__)[1:] == [
        "local_loss", "gather_with_grad", "cache_labels", "rank", "world_size", "use_horovod"]
    defaults = {name: default for name, default, _ in _params(cl_fast.ClipLoss.__init__)}
    assert (defaults["local_loss"], defaults["gather_with_grad"], defaults["cache_labels"]) == (False, False, False)
    assert (defaults["rank"], defaults["world_size"], defaults["use_horovod"]) == (0, 1, False)
    assert _names(cl_fast.ClipLoss.forward)[1:] == [
        "image_features", "text_features", "logit_scale", "logit_bias", "output_dict"]
    assert _names(cl_fast.clip_loss) == ["image_features", "text_features", "logit_scale", "logit_bias"]
    assert inspect.signature(cl_fast.clip_loss).parameters["normalize"].default is False


def test_siglip_signatures_follow_openclip():
    assert _names(cl_fast.SigLipLoss.__init__)[1:5] == ["cache_labels", "rank", "world_size", "dist_impl"]
    assert _names(cl_fast.SigLipLoss.forward)[1:] == [
        "image_features", "text_features", "logit_scale", "logit_bias", "output_dict"]
    assert _names(cl_fast.siglip_loss) == ["image_features", "text_features", "logit_scale", "logit_bias"]


def test_lightly_signatures():
    assert _names(cl_fast.NTXentLoss.__init__)[1:] == ["temperature", "memory_bank_size", "gather_distributed"]
    defaults = {name: default for name, default, _ in _params(cl_fast.NTXentLoss.__init__)}
    assert (defaults["temperature"], defaults["memory_bank_size"], defaults["gather_distributed"]) == (0.5, 0, False)
    assert _names(cl_fast.sinkhorn) == ["scores", "iterations", "epsilon", "gather_distributed"]
    defaults = {name: default for name, default, _ in _params(cl_fast.sinkhorn)}
    assert (defaults["iterations"], defaults["epsilon"], defaults["gather_distributed"]) == (3, 0.05, False)
    assert _names(cl_fast.SwaVLoss.__init__)[1:] == [
        "temperature", "sinkhorn_iterations", "sinkhorn_epsilon", "sinkhorn_gather_distributed"]


# ---------------------------------------------------------------- OpenCLIP ClipLoss
def _clip_float64(image, text, scale, bias=None, normalize=False):
    """OpenCLIP's formula, float64: logits = s I T^T (+ b); mean of the two cross-entropies."""
    image, text = image.double().cpu(), text.double().cpu()
    if normalize:
        image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    logits = scale * image @ text.T
    if bias is not None:
        logits = logits + bias
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_clip_loss_positional_false_is_local_loss():
    loss = cl_fast.ClipLoss(False)  # OpenCLIP's local_loss=False, not a normalize switch
    assert loss.local_loss is False and loss.normalize is False


def test_openclip_create_loss_construction_call():
    # open_clip.create_loss(args) for one process: keywords only, in this form
    loss = cl_fast.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    assert isinstance(loss, torch.nn.Module)
    siglip = cl_fast.SigLipLoss(cache_labels=True, rank=0, world_size=1, dist_impl=None)
    assert isinstance(siglip, torch.nn.Module)


def test_clip_loss_horovod_is_not_supported():
    with pytest.raises(NotImplementedError, match="Horovod"):
        cl_fast.ClipLoss(use_horovod=True)


@pytest.mark.parametrize("kwargs", [dict(world_size=2, rank=1), dict(world_size=4, local_loss=True)])
def test_clip_loss_distributed_is_not_silently_local(kwargs, gen):
    # world_size > 1 is the multi-process loss (tests/test_infonce_distributed.py); without a
    # process group of that size it raises instead of computing a local loss
    if dist.is_available() and dist.is_initialized():
        pytest.skip("needs a process without an initialised process group")
    loss = cl_fast.ClipLoss(**kwargs)
    a, b = randn(4, 8, generator=gen), randn(4, 8, generator=gen)
    with pytest.raises(ValueError, match="init_process_group"):
        loss(a, b, 2.0)


@pytest.mark.parametrize("backend", INFONCE)
@pytest.mark.parametrize("normalize", [False, True])
def test_clip_loss_unnormalised_features_match_openclip_formula(backend, normalize, gen):
    image = randn(19, 24, generator=gen) * 3  # not unit rows: OpenCLIP uses them as given
    text = randn(19, 24, generator=gen) * 0.5
    scale = torch.tensor(1 / 0.07, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-4.0, device=DEVICE, requires_grad=True)
    image.requires_grad_()
    text.requires_grad_()
    loss = cl_fast.ClipLoss(normalize=normalize, backend=backend)(image, text, scale, bias)
    leaves64 = [t.detach().double().cpu().requires_grad_() for t in (image, text, scale, bias)]
    expected = _clip_float64(*leaves64, normalize=normalize)
    assert rel_err(loss, expected) < RTOL[torch.float32]
    loss.backward()
    expected.backward()
    for got, want in zip((image.grad, text.grad, scale.grad), leaves64[:3]):
        assert rel_err(got, want.grad) < RTOL[torch.float32]
    # the bias cancels in the softmax: its gradient is 0 (the reference's autograd leaves rounding, ~1e-8)
    assert bias.grad is not None and abs(float(bias.grad)) < 1e-6


@pytest.mark.parametrize("backend", INFONCE)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,d", [(2, 3), (17, 100), (129, 257)])
def test_clip_loss_features_as_given_match_float64(backend, dtype, n, d, gen):
    """normalize=False (the default) on ragged shapes and every dtype; row norms spread over
    [0.2, 3] so that the logits are not bounded by s (the fused kernels' running-max path)."""
    norms = 0.2 + 2.8 * torch.rand(n, 1, generator=gen)
    image = (F.normalize(torch.randn(n, d, generator=gen), dim=1) * norms).to(DEVICE, dtype).requires_grad_()
    text = (F.normalize(torch.randn(n, d, generator=gen), dim=1) * norms.flip(0)).to(DEVICE, dtype).requires_grad_()
    scale = torch.tensor(6.0, device=DEVICE, requires_grad=True)
    loss = cl_fast.clip_loss(image, text, scale, backend=backend)
    leaves64 = [t.detach().double().cpu().requires_grad_() for t in (image, text, scale)]
    expected = _clip_float64(*leaves64)
    assert rel_err(loss, expected) < RTOL[dtype]
    loss.backward()
    expected.backward()
    for got, want in zip((image.grad, text.grad, scale.grad), leaves64):
        assert rel_err(got, want.grad) < RTOL[dtype]


@pytest.mark.parametrize("backend", INFONCE)
def test_clip_loss_output_dict_and_model_out_call(backend, gen):
    image, text = randn(8, 16, generator=gen), randn(8, 16, generator=gen)
    model_out = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(10.0, device=DEVICE),
                 "logit_bias": torch.tensor(-2.0, device=DEVICE)}
    out = cl_fast.ClipLoss(backend=backend)(**model_out, output_dict=True)  # OpenCLIP's loss(**model_out, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert rel_err(out["contrastive_loss"], _clip_float64(image, text, 10.0, -2.0)) < RTOL[torch.float32]


def test_clip_loss_normalize_check_value():
    torch.manual_seed(0)
    a = torch.randn(8, 16, dtype=torch.float64)
    b = torch.randn(8, 16, dtype=torch.float64)
    assert abs(float(cl_fast.clip_loss(a, b, 2.0, normalize=True)) - 2.18190) < 1e-5


# ---------------------------------------------------------------- N = 1
@pytest.mark.parametrize("backend", INFONCE)
@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "info_nce_sym", "clip_loss"])
def test_single_row_gives_zero_loss_and_zero_gradients(name, backend, gen):
    a = randn(1, 7, generator=gen, requires_grad=True)
    b = randn(1, 7, generator=gen, requires_grad=True)
    temperature = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    if name == "nt_xent":
        loss = cl_fast.nt_xent(a, b, temperature, backend=backend)
        rows = cl_fast.nt_xent(a, b, temperature, reduction="none", backend=backend)
        assert rows.shape == (2,) and float(rows.detach().abs().max()) == 0.0
    elif name.startswith("info_nce"):
        loss = cl_fast.info_nce(a, b, temperature, symmetric=name.endswith("sym"), backend=backend)
    else:
        loss = cl_fast.clip_loss(a, b, 1 / temperature, backend=backend)
    assert float(loss.detach()) == 0.0
    loss.backward()
    for t in (a, b, temperature):
        assert t.grad is not None and float(t.grad.abs().max()) == 0.0


# ---------------------------------------------------------------- lightly NTXentLoss
def test_ntxent_without_bank_is_nt_xent_and_symmetric(gen):
    a, b = randn(9, 12, generator=gen), randn(9, 12, generator=gen)
    loss = cl_fast.NTXentLoss(0.2, 0, False)
    torch.testing.assert_close(loss(a, b), cl_fast.nt_xent(a, b, 0.2))
    torch.testing.assert_close(loss(a, b), loss(b, a))
    assert loss.memory_bank is None and not any(k.startswith("memory_bank") for k in loss.state_dict())


def _bank_loss_float64(out0, out1, bank, temperature):
    """lightly's NTXentLoss with a memory bank, float64: out0 the query, out1 its positive, the
    bank rows the negatives; CE with label 0, mean."""
    u, v = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    logits = torch.cat([(u * v).sum(1, keepdim=True), u @ bank.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(out0.shape[0], dtype=torch.long))


@pytest.mark.parametrize("backend", MOCO)
@pytest.mark.parametrize("size", [12, (12, 6)], ids=["int", "tuple"])
def test_ntxent_memory_bank_follows_lightly(backend, size, gen):
    loss_fn = cl_fast.NTXentLoss(temperature=0.3, memory_bank_size=size, backend=backend)
    assert (loss_fn.memory_bank is None) == isinstance(size, int)  # an int K: created at the first call
    for step in range(4):  # 4 x 5 keys through a bank of 12: wraps around
        out0 = randn(5, 6, generator=gen, requires_grad=True)
        out1 = randn(5, 6, generator=gen, requires_grad=True)
        bank_before = None if loss_fn.memory_bank is None else loss_fn.memory_bank.queue.detach().clone()
        loss = loss_fn(out0, out1)
        bank = loss_fn.memory_bank.queue.detach()
        # the bank was updated with n(out1) at the pointer, wrapping around
        rows = ((step * 5) % 12 + torch.arange(5)) % 12
        torch.testing.assert_close(bank[rows.to(bank.device)].cpu(), F.normalize(out1.detach().float(), dim=1).cpu())
        if bank_before is None:
            continue  # an int K: the bank was created (random unit rows) by this call
        # the loss used the bank as it was BEFORE this call's update
        leaves = [t.detach().double().cpu().requires_grad_() for t in (out0, out1)]
        expected = _bank_loss_float64(*leaves, bank_before.double().cpu(), 0.3)
        assert rel_err(loss, expected) < RTOL[torch.float32]
        loss.backward()
        expected.backward()
        assert rel_err(out0.grad, leaves[0].grad) < RTOL[torch.float32]
        assert rel_err(out1.grad, leaves[1].grad) < RTOL[torch.float32]  # lightly: out1 gets the positive's gradient


def test_ntxent_memory_bank_not_updated_without_grad(gen):
    loss_fn = cl_fast.NTXentLoss(memory_bank_size=(8, 4))
    before = loss_fn.memory_bank.queue.clone()
    loss_fn(randn(3, 4, generator=gen), randn(3, 4, generator=gen))  # out0 does not require grad
    torch.testing.assert_close(loss_fn.memory_bank.queue, before, rtol=0, atol=0)


def test_ntxent_batch_larger_than_bank_keeps_the_last_keys(gen):
    loss_fn = cl_fast.NTXentLoss(memory_bank_size=(4, 3))
    out1 = randn(10, 3, generator=gen)
    loss_fn(randn(10, 3, generator=gen, requires_grad=True), out1)
    # written row by row from ptr 0: key b lands in row b % 4; the last 4 keys survive
    expected = torch.empty(4, 3)
    for b in range(10):
        expected[b % 4] = F.normalize(out1[b:b + 1].float(), dim=1).cpu()
    torch.testing.assert_close(loss_fn.memory_bank.queue.cpu(), expected)
    assert int(loss_fn.memory_bank.ptr) == 10 % 4


def test_ntxent_memory_bank_is_saved_in_state_dict(gen):
    loss_fn = cl_fast.NTXentLoss(memory_bank_size=16)
    loss_fn(randn(5, 8, generator=gen, requires_grad=True), randn(5, 8, generator=gen))
    state = loss_fn.state_dict()
    assert state["memory_bank.queue"].shape == (16, 8) and int(state["memory_bank.ptr"]) == 5
    restored = cl_fast.NTXentLoss(memory_bank_size=16)  # bank not yet created: load creates it
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.memory_bank.queue, loss_fn.memory_bank.queue, rtol=0, atol=0)
    assert int(restored.memory_bank.ptr) == 5


def test_ntxent_gather_distributed_single_process_is_a_no_op(gen):
    a, b = randn(6, 5, generator=gen), randn(6, 5, generator=gen)
    assert not dist.is_initialized()
    torch.testing.assert_close(cl_fast.NTXentLoss(gather_distributed=True)(a, b), cl_fast.NTXentLoss()(a, b))


def test_ntxent_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(dist, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        cl_fast.NTXentLoss(gather_distributed=True)
    with pytest.raises(ValueError, match="sinkhorn_gather_distributed"):
        cl_fast.SwaVLoss(sinkhorn_gather_distributed=True)


@pytest.mark.parametrize("bad,error", [(-1, ValueError), ((4, -2), ValueError), ("8", TypeError), (2.5, TypeError)])
def test_ntxent_bad_memory_bank_size(bad, error):
    with pytest.raises(error, match="memory_bank_size"):
        cl_fast.NTXentLoss(memory_bank_size=bad)


# ---------------------------------------------------------------- lightly sinkhorn / SwaVLoss / SimSiam
@pytest.mark.parametrize("backend", SINKHORN)
def test_sinkhorn_positional_order_is_lightlys(backend, gen):
    scores = randn(16, 8, generator=gen)
    positional = cl_fast.sinkhorn(scores, 10, 0.1, False, backend=backend)  # iterations, epsilon, gather
    keywords = cl_fast.sinkhorn(scores, iterations=10, epsilon=0.1, backend=backend)
    torch.testing.assert_close(positional, keywords, rtol=0, atol=0)
    expected = reference.sinkhorn_plain(scores.double().cpu(), 0.1, 10)  # SwAV's formula, float64
    assert rel_err(positional, expected) < 1e-4


def test_sinkhorn_gather_distributed_single_process_is_a_no_op(gen):
    scores = randn(12, 5, generator=gen)
    torch.testing.assert_close(cl_fast.sinkhorn(scores, 3, 0.05, True), cl_fast.sinkhorn(scores, 3, 0.05))


@pytest.mark.parametrize("backend", SINKHORN)
def test_swav_loss_still_matches_the_reference(backend, gen):
    high = [randn(8, 6, generator=gen) for _ in range(2)]
    low = [randn(8, 6, generator=gen) for _ in range(3)]
    loss = cl_fast.SwaVLoss(sinkhorn_iterations=3, backend=backend)(high, low)
    expected = reference.swav_loss([h.double() for h in high], [x.double() for x in low])
    assert rel_err(loss, expected) < 1e-4


@pytest.mark.parametrize("n", [1, 5])
def test_negative_cosine_similarity(n, gen):
    x0 = randn(n, 10, generator=gen, requires_grad=True)
    x1 = randn(n, 10, generator=gen, requires_grad=True)
    loss = cl_fast.NegativeCosineSimilarity()(x0, x1)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x0, x1)]
    expected = -F.cosine_similarity(*leaves, dim=1).mean()
    # -mean cos can be ~0 by chance (a row nearly orthogonal, or cosines of both signs): cos is only
    # resolvable to ~eps32 absolute there (one rounding of the normalised rows moves it by that), so
    # relative error alone failed 2-3e-3 of the draws. The fused path (byol_loss / 2 - 1) errs by up to
    # 3.6 eps32 (3000 draws each, n in {1, 5, 64}); 8 eps32 leaves a 2x margin.
    err = abs(float(loss.detach()) - float(expected.detach()))
    assert err <= RTOL[torch.float32] * abs(float(expected.detach())) + 8 * torch.finfo(torch.float32).eps, "loss"
    loss.backward()
    expected.backward()
    assert rel_err(x0.grad, leaves[0].grad) < RTOL[torch.float32]
    assert rel_err(x1.grad, leaves[1].grad) < RTOL[torch.float32]
