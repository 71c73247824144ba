"""nt_xent, info_nce, clip_loss and their modules over torch.distributed (gloo, torch.multiprocessing).

One spawn of 3 ranks for the whole module: the 2-rank cases run on the subgroup of ranks [1, 2]
(its group ranks differ from the global ones), the 3-rank cases, the modules (default group),
bad inputs, the memory check and the failures on the default group. The workers run every case
(backends whose block pieces run here, both dist_impls, every loss and reduction, even and
uneven local batches) and save what they computed; the tests below compare each rank's numbers
with the single-process run on the concatenated batch (the same backend in fp32, and float64).

SPEC.md's convention, for a rank r holding rows R_r of the global batch: its value is the
reduction over R_r of the single-process per-row losses; when every rank r backpropagates
sum_{i in R_r} w_i loss_i, each rank's input gradient is the slice R_r of the gradient of
sum_i w_i loss_i over the global batch, and the temperature gradients summed over the ranks are
its temperature gradient. (With mean, equal batches and w = 1: the mean over ranks of the losses
is the single loss, each rank's gradient is W times its slice, the mean of the temperature
gradients is the single one.)
"""
from __future__ import annotations

import datetime
import os
import time
import traceback
import warnings
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cl_fast
from cl_fast import _dispatch, reference
from conftest import RTOL, rel_err

D = 7
LOSSES = ("nt_xent", "info_nce", "info_nce_sym", "clip_norm", "clip_raw")
REDUCTIONS = {"nt_xent": ("none", "mean", "sum"), "info_nce": ("none", "mean", "sum"),
              "info_nce_sym": ("none", "mean", "sum"), "clip_norm": ("mean",), "clip_raw": ("mean",)}
IMPLS = ("gather", "ring")
UNEVEN = {2: [2, 5], 3: [3, 5, 4]}
EVEN = 4
TOL = 1e-5  # fp32 relative error against the single-process fp32 run and against float64
MEMORY_N, MEMORY_D = 128, 8
SHORT_TIMEOUT = 2.0
STARTED = time.monotonic()  # module import time (in a worker: its start)
WORLD = 3  # one spawn; the 2-rank cases run on a subgroup of it
TRITON_CASE = ("spec", "nt_xent", "mean", torch.float32)  # the one case Triton's interpreter runs
OPENCLIP_MODES = [(True, True), (True, False), (False, True), (False, False)]  # (local_loss, gather_with_grad)


# ------------------------------------------------------------------------------ what runs here
def _device_for(backend):
    return torch.device("cpu")  # gloo on CPU tensors (Triton through its interpreter)


def _why_not(backend):
    """None if the InfoNCE block pieces of `backend` run here, else why not."""
    if backend == "torch":
        return None
    if backend == "triton" and not _dispatch.triton_interpreted():
        return "runs here under TRITON_INTERPRET=1 only (gloo on CPU tensors)"
    if backend not in cl_fast.backends("infonce", _device_for(backend)):
        return {"cpu": "needs cl_fast._C built", "triton": "needs triton with a CUDA GPU or TRITON_INTERPRET=1"}[backend]
    from cl_fast._ops import infonce as ops

    rows = torch.randn(4, 3, device=_device_for(backend))
    try:
        ops.infonce_block_fwd(rows, rows, torch.ones((), device=rows.device), 0, True, backend)
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        return f"has no infonce_block_fwd kernel in this build ({type(error).__name__})"
    return None


BACKENDS = ("torch", "cpu", "triton")
RUNNABLE = {b: _why_not(b) for b in BACKENDS}


def _backend_param(backend):
    why = RUNNABLE[backend]
    marks = [pytest.mark.skip(reason=f"infonce backend {backend!r} {why}")] if why else []
    return pytest.param(backend, marks=marks, id=backend)


def _worker_backends():
    """Backends the workers run (Triton's interpreter: TRITON_CASE only)."""
    return [b for b in BACKENDS if RUNNABLE[b] is None]


# ----------------------------------------------------------------------------------- the cases
def _layout(world, even):
    counts = [EVEN] * world if even else UNEVEN[world]
    offsets = [sum(counts[:r]) for r in range(world)]
    return counts, offsets


def _cases(world):
    """(key, loss, reduction, even, dtype): 'spec' = mean over even batches with w = 1 (SPEC's
    statement); 'weighted' = uneven batches, random row weights / rank multipliers."""
    out = []
    for loss in LOSSES:
        out.append((("spec", loss, "mean", torch.float32), loss, "mean", True, torch.float32))
        for reduction in REDUCTIONS[loss]:
            out.append((("weighted", loss, reduction, torch.float32), loss, reduction, False, torch.float32))
    for loss in ("nt_xent", "clip_raw"):
        out.append((("spec", loss, "mean", torch.bfloat16), loss, "mean", True, torch.bfloat16))
    return out


def _scale_value(loss):
    return {"clip_norm": 2.5, "clip_raw": 1.5}.get(loss, 0.3)


def _inputs(seed, key, world, even):
    """The global batch (identical on every rank), row weights and per-rank multipliers."""
    counts, _ = _layout(world, even)
    n = sum(counts)
    g = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(str(key).encode())) % (2**31))
    a, b = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    if key[1] == "clip_raw":  # not unit rows: the features are used as given
        a, b = a * 2, b * 0.5
    rows = 2 * n if key[1] == "nt_xent" else n
    weights = torch.rand(rows, generator=g, dtype=torch.float64) + 0.5
    multipliers = torch.rand(world, generator=g, dtype=torch.float64) + 0.5
    if key[0] == "spec":
        weights, multipliers = torch.ones_like(weights), torch.ones_like(multipliers)
    return a, b, weights, multipliers


def _local_rows(loss, rank, counts, offsets):
    """Indices of rank's rows among the single-process per-row losses."""
    own = torch.arange(offsets[rank], offsets[rank] + counts[rank])
    return torch.cat([own, own + sum(counts)]) if loss == "nt_xent" else own


def _call(loss, a, b, scale, reduction, backend, **kw):
    if loss == "nt_xent":
        return cl_fast.nt_xent(a, b, scale, reduction=reduction, backend=backend, **kw)
    if loss in ("info_nce", "info_nce_sym"):
        return cl_fast.info_nce(a, b, scale, symmetric=loss == "info_nce_sym", reduction=reduction, backend=backend, **kw)
    assert reduction == "mean"
    return cl_fast.clip_loss(a, b, scale, normalize=loss == "clip_norm", backend=backend, **kw)


def _per_row64(loss, a, b, scale):
    """The single-process per-row losses in float64 (reference formulas; clip: 0.5 (row + column))."""
    if loss == "nt_xent":
        return reference.nt_xent(a, b, scale, reduction="none")
    if loss in ("info_nce", "info_nce_sym"):
        return reference.info_nce(a, b, scale, symmetric=loss == "info_nce_sym", reduction="none")
    if loss == "clip_norm":
        a, b = reference.l2_normalize(a), reference.l2_normalize(b)
    logits = scale * a @ b.T
    labels = torch.arange(a.shape[0])
    return 0.5 * (reference.cross_entropy(logits, labels) + reference.cross_entropy(logits.T, labels))


def _row_weights(key, loss, reduction, weights, multipliers, counts, offsets):
    """The single-process per-row weights of the objective the ranks backpropagate together."""
    if reduction == "none":
        return weights
    total = torch.zeros_like(weights)
    for r in range(len(counts)):
        rows = _local_rows(loss, r, counts, offsets)
        total[rows] = multipliers[r] / (len(rows) if reduction == "mean" else 1)
    return total


# ------------------------------------------------------------------------------------ workers
def _openclip_reference(image, text, scale, local_loss, gather_with_grad, rank, world):
    """OpenCLIP's ClipLoss on gathered features, restated with torch.distributed.nn's
    differentiable all_gather and cl_fast.reference's cross-entropy."""
    import torch.distributed.nn.functional as dnn

    if gather_with_grad:
        with warnings.catch_warnings():  # torch 2.13 marks it deprecated; it is what OpenCLIP calls
            warnings.simplefilter("ignore", FutureWarning)
            all_image, all_text = torch.cat(dnn.all_gather(image)), torch.cat(dnn.all_gather(text))
    else:
        images = [torch.zeros_like(image) for _ in range(world)]
        texts = [torch.zeros_like(text) for _ in range(world)]
        dist.all_gather(images, image)
        dist.all_gather(texts, text)
        if not local_loss:
            images[rank], texts[rank] = image, text
        all_image, all_text = torch.cat(images), torch.cat(texts)
    if local_loss:
        per_image, per_text = scale * image @ all_text.T, scale * text @ all_image.T
        labels = torch.arange(image.shape[0]) + image.shape[0] * rank
    else:
        per_image = scale * all_image @ all_text.T
        per_text = per_image.T
        labels = torch.arange(per_image.shape[0])
    return 0.5 * (reference.cross_entropy(per_image, labels).mean() + reference.cross_entropy(per_text, labels).mean())


def _catch(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - recorded for the main process to judge
        return type(error).__name__, str(error)
    return None


def _run_cases(rank, world, group, seed, backends, results):
    """Every case on `group` (world ranks; rank = this process's rank in it). The modules and
    OpenCLIP's formula use the default group, so they run when `group` is it."""
    on_world = group is dist.group.WORLD
    for backend in backends:
        device = _device_for(backend)
        cases = _cases(world)
        if backend == "triton":  # the interpreter is slow: one small case
            cases = [c for c in cases if c[0] == TRITON_CASE]
        for impl in IMPLS:
            for key, loss, reduction, even, dtype in cases:
                counts, offsets = _layout(world, even)
                a, b, weights, multipliers = _inputs(seed, key, world, even)
                own = slice(offsets[rank], offsets[rank] + counts[rank])
                la = a[own].to(device, dtype).clone().requires_grad_()
                lb = b[own].to(device, dtype).clone().requires_grad_()
                scale = torch.tensor(_scale_value(loss), device=device, requires_grad=True)
                out = _call(loss, la, lb, scale, reduction, backend, group=group, dist_impl=impl)
                if reduction == "none":
                    objective = (out.double() * weights[_local_rows(loss, rank, counts, offsets)].to(device)).sum()
                else:
                    objective = out.double() * multipliers[rank]
                objective.backward()
                results[(backend, impl) + key] = {
                    "loss": out.detach().cpu(), "ga": la.grad.cpu(), "gb": lb.grad.cpu(), "gs": scale.grad.cpu(),
                    "dtype": out.dtype,
                }
            if on_world and backend != "triton":
                _run_modules(rank, world, seed, backend, impl, device, results)
                _run_ddp(rank, world, seed, backend, impl, results)
                _run_openclip_modes(rank, world, seed, backend, impl, device, results)


class _Tower(torch.nn.Module):
    """A linear projection and a learnable temperature: what DDP averages."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.proj = torch.nn.Linear(D, 5)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(5, D, generator=g))
            self.proj.bias.copy_(torch.randn(5, generator=g))
        self.temperature = torch.nn.Parameter(torch.tensor(0.4))

    def forward(self, x1, x2, loss="nt_xent", **kw):
        h = self.proj(torch.cat([x1, x2]))
        n = x1.shape[0]
        if loss == "nt_xent":
            return cl_fast.nt_xent(h[:n], h[n:], self.temperature, **kw)
        return cl_fast.info_nce(h[:n], h[n:], self.temperature, symmetric=True, **kw)


def _ddp_grads(model):
    return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}


def _run_ddp(rank, world, seed, backend, impl, results):
    """DDP (gloo) around the loss: the averaged parameter gradients are the single-process ones."""
    counts, offsets = _layout(world, True)
    for loss in ("nt_xent", "info_nce_sym"):
        x1, x2, _, _ = _inputs(seed, ("ddp", loss, "mean", torch.float32), world, True)
        own = slice(offsets[rank], offsets[rank] + counts[rank])
        model = torch.nn.parallel.DistributedDataParallel(_Tower())
        value = model(x1[own], x2[own], loss, group=dist.group.WORLD, dist_impl=impl, backend=backend)
        value.backward()
        results[(backend, impl, "ddp", loss)] = {"loss": value.detach(), "grads": _ddp_grads(model.module)}


def _run_modules(rank, world, seed, backend, impl, device, results):
    counts, offsets = _layout(world, True)
    a, b, _, _ = _inputs(seed, ("spec", "nt_xent", "mean", torch.float32), world, True)
    own = slice(offsets[rank], offsets[rank] + counts[rank])
    la, lb = a[own].to(device).requires_grad_(), b[own].to(device).requires_grad_()
    module = cl_fast.NTXentLoss(0.3, gather_distributed=True, backend=backend, dist_impl=impl)
    value = module(la, lb)
    value.backward()
    results[(backend, impl, "NTXentLoss")] = {"loss": value.detach().cpu(), "ga": la.grad.cpu(), "gb": lb.grad.cpu()}
    module = cl_fast.InfoNCELoss(0.3, symmetric=True, backend=backend, group=dist.group.WORLD, dist_impl=impl)
    results[(backend, impl, "InfoNCELoss")] = {
        "loss": module(la.detach(), lb.detach()).cpu(),
        "function": cl_fast.info_nce(la.detach(), lb.detach(), 0.3, symmetric=True, backend=backend,
                                     group=dist.group.WORLD, dist_impl=impl).cpu(),
    }


def _run_openclip_modes(rank, world, seed, backend, impl, device, results):
    counts, offsets = _layout(world, True)
    a, b, _, multipliers = _inputs(seed, ("openclip", "clip_raw", "mean", torch.float32), world, True)
    own = slice(offsets[rank], offsets[rank] + counts[rank])
    for local_loss, gather_with_grad in OPENCLIP_MODES:
        # mode (local_loss=False, gather_with_grad=False) is exact for equal upstream multiples only
        mult = float(multipliers[rank]) if (local_loss or gather_with_grad) else 0.75
        image, text = a[own].to(device).requires_grad_(), b[own].to(device).requires_grad_()
        scale = torch.tensor(1.5, device=device, requires_grad=True)
        bias = torch.tensor(-3.0, device=device, requires_grad=True)
        criterion = cl_fast.ClipLoss(local_loss, gather_with_grad, False, rank, world, backend=backend, dist_impl=impl)
        value = criterion(image, text, scale, bias)
        (value * mult).backward()
        image64, text64 = a[own].double().requires_grad_(), b[own].double().requires_grad_()
        scale64 = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        expected = _openclip_reference(image64, text64, scale64, local_loss, gather_with_grad, rank, world)
        (expected * mult).backward()
        results[(backend, impl, "openclip", local_loss, gather_with_grad)] = {
            "loss": value.detach().cpu(), "ga": image.grad.cpu(), "gb": text.grad.cpu(), "gs": scale.grad.cpu(),
            "gbias": bias.grad.cpu(), "expected": expected.detach(), "ea": image64.grad, "eb": text64.grad,
            "es": scale64.grad,
        }


def _run_bad_inputs(rank, world, results, solo):
    """Each call must raise on EVERY rank (none may wait for a rank that already raised). Then a
    group of one rank (the single-process path) and a group this rank is not in."""
    group = dist.group.WORLD
    n = 3

    def call(a, b, **kw):
        return cl_fast.nt_xent(a, b, 0.5, group=group, backend="torch", **kw)

    good = torch.randn(n, D), torch.randn(n, D)
    wide = torch.randn(n, D + 1), torch.randn(n, D + 1)
    cases = {
        "dim": lambda: call(*(wide if rank == world - 1 else good)),
        "local": lambda: call(good[0], torch.randn(n + 1, D) if rank == 1 else good[1]),
        "dtype": lambda: call(*([t.bfloat16() for t in good] if rank == 0 else good)),
        "grad": lambda: call(good[0].clone().requires_grad_(rank == 0), good[1]),
        "dist_impl": lambda: call(*good, dist_impl="allgather"),
        "group_type": lambda: cl_fast.info_nce(*good, group="WORLD"),
        "clip_world": lambda: cl_fast.ClipLoss(rank=rank, world_size=world + 1),
        "clip_rank": lambda: cl_fast.ClipLoss(rank=(rank + 1) % world, world_size=world),
        "horovod": lambda: cl_fast.ClipLoss(rank=rank, world_size=world, use_horovod=True),
    }
    for name, fn in cases.items():
        results[("error", name)] = _catch(fn)
    # the group is still usable afterwards
    results[("error", "after")] = call(*good).detach()
    if rank == 0:
        results[("solo",)] = (cl_fast.nt_xent(*good, 0.5, group=solo, dist_impl="ring"), cl_fast.nt_xent(*good, 0.5))
    else:
        results[("error", "not_member")] = _catch(lambda: cl_fast.nt_xent(*good, group=solo))


def _run_memory(rank, world, backends, results):
    """Largest allocation of one rank's forward + backward (the recorder of test_api_contract)."""
    from test_api_contract import AllocationRecorder, _largest_cpu_allocation

    for backend in backends:
        if backend == "triton":
            continue
        for impl in IMPLS if backend != "torch" else ("gather",):  # the reference: only to see the check is live
            g = torch.Generator().manual_seed(rank)
            a = torch.randn(MEMORY_N, MEMORY_D, generator=g).requires_grad_()
            b = torch.randn(MEMORY_N, MEMORY_D, generator=g).requires_grad_()
            temperature = torch.tensor(0.3, requires_grad=True)

            def step():
                cl_fast.nt_xent(a, b, temperature, group=dist.group.WORLD, dist_impl=impl, backend=backend).backward()
                cl_fast.info_nce(a, b, temperature, symmetric=True, group=dist.group.WORLD, dist_impl=impl,
                                 backend=backend).backward()

            with AllocationRecorder() as recorder:
                step()
            # the profiler (sees inside the C++ kernels) is slow: once, on the gather path
            profiled = _largest_cpu_allocation(step) if backend != "torch" and impl == "gather" else None
            results[("memory", backend, impl)] = {"recorded": recorder.largest, "profiled": profiled}


def _run_failures(rank, results, short):
    """Ranks that do not come: rank 0 gets a RuntimeError within the group's timeout."""
    a, b = torch.randn(3, D), torch.randn(3, D)
    if rank == 0:
        start = time.monotonic()
        results[("fail", "absent")] = _catch(lambda: cl_fast.nt_xent(a, b, group=short, backend="torch"))
        results[("fail", "absent_seconds")] = time.monotonic() - start
    dist.barrier()


def _worker(rank, init_file, out_dir, seed, backends):
    """One spawn of WORLD ranks: the 2-rank cases on the subgroup of ranks [1, 2] (group rank !=
    global rank), the 3-rank cases, modules and errors on the default group, then the failures."""
    results = {2: {}, 3: {}}
    out = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        pair = dist.new_group([1, 2])
        solo = dist.new_group([0])
        short = dist.new_group(timeout=datetime.timedelta(seconds=SHORT_TIMEOUT))
        dead = dist.new_group(timeout=datetime.timedelta(seconds=SHORT_TIMEOUT))
        timings = results[3].setdefault("seconds", {"start": time.monotonic() - STARTED})
        steps = [
            ("cases 2", lambda: rank > 0 and _run_cases(rank - 1, 2, pair, seed, backends, results[2])),
            ("cases 3", lambda: _run_cases(rank, 3, dist.group.WORLD, seed, backends, results[3])),
            ("bad inputs", lambda: _run_bad_inputs(rank, 3, results[3], solo)),
            ("memory", lambda: _run_memory(rank, 3, backends, results[3])),
            ("failures", lambda: _run_failures(rank, results[3], short)),
        ]
        for name, fn in steps:
            begin = time.monotonic()
            fn()
            timings[name] = time.monotonic() - begin
        dist.barrier()
        # last: rank 2 dies; ranks 0 and 1 call the loss on a group that still counts it
        if rank == 2:
            torch.save(results, out)
            os._exit(0)
        a, b = torch.randn(3, D), torch.randn(3, D)
        time.sleep(0.5)
        start = time.monotonic()
        results[3][("fail", "dead")] = _catch(
            lambda: cl_fast.info_nce(a, b, group=dead, dist_impl="ring", backend="torch")
        )
        results[3][("fail", "dead_seconds")] = time.monotonic() - start
        torch.save(results, out)
        os._exit(0)  # the default group has a dead member: no clean teardown
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


class _World:
    def __init__(self, size, seed, ranks):
        self.size, self.seed, self.ranks = size, seed, ranks


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """The one spawn of this module: {world size: [results of each rank of that group]}."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    out = tmp_path_factory.mktemp("ranks")
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    start = time.monotonic()
    try:
        mp.start_processes(_worker, args=(str(out / "init"), str(out), seed, _worker_backends()),
                           nprocs=WORLD, join=True, start_method="spawn")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        details = "".join((out / f"rank{r}.error").read_text() for r in range(WORLD) if (out / f"rank{r}.error").exists())
        pytest.fail(f"a rank failed (seed {seed}):\n{details or error}")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    seconds = time.monotonic() - start
    print(f"\nspawn: {seconds:.1f} s; per rank: {[r[3]['seconds'] for r in ranks]}")
    return seed, {2: [r[2] for r in ranks[1:]], 3: [r[3] for r in ranks]}


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def world(request, spawned):
    seed, by_size = spawned
    return _World(request.param, seed, by_size[request.param])


@pytest.fixture
def world3(spawned):
    """The default group's run (3 ranks): modules, OpenCLIP's formula, errors, memory, failures."""
    seed, by_size = spawned
    return _World(3, seed, by_size[3])


# -------------------------------------------------------------------------------------- tests
def _single(backend, loss, a, b, scale_value, reduction, row_weights, dtype=torch.float32):
    """The single-process run on the concatenated batch: (per-row or reduced loss, ga, gb, gs)."""
    device = _device_for(backend)
    a = a.to(device, dtype).clone().requires_grad_()
    b = b.to(device, dtype).clone().requires_grad_()
    scale = torch.tensor(scale_value, device=device, requires_grad=True)
    out = _call(loss, a, b, scale, reduction, backend)
    weights = row_weights.to(device) if reduction == "none" else 1.0
    (out.double() * weights).sum().backward()
    return out.detach().cpu(), a.grad.cpu(), b.grad.cpu(), scale.grad.cpu()


def _float64(loss, a, b, scale_value, row_weights):
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    s64 = torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)
    per_row = _per_row64(loss, a64, b64, s64)
    (per_row * row_weights).sum().backward()
    return per_row.detach(), a64.grad, b64.grad, s64.grad


def _scale_grad_err(got, expected, loss, a, b, weight_sum):
    """Error of a logit-scale gradient relative to the size of the terms it sums, not only to
    itself: dL/ds is a sum of weight_i * (softmax-weighted dots - positive dot), which can cancel
    far below its terms (then fp32 summation order alone moves it by more than 1e-5 of itself).
    The terms are bounded by weight_sum * max |a_i . b_j| (1 for normalised rows)."""
    if loss in ("clip_raw", "openclip"):
        bound = float(a.double().norm(dim=1).max() * b.double().norm(dim=1).max())
    else:
        bound = 1.0
    scale = max(abs(float(expected)), float(weight_sum) * bound)
    return abs(float(got) - float(expected)) / scale


def _check_case(world, backend, impl, key, tol):
    _, loss, reduction, dtype = key
    even = key[0] == "spec"
    counts, offsets = _layout(world.size, even)
    a, b, weights, multipliers = _inputs(world.seed, key, world.size, even)
    if dtype != torch.float32:
        a, b = a.to(dtype).float(), b.to(dtype).float()  # the values the ranks held
    row_weights = _row_weights(key, loss, reduction, weights, multipliers, counts, offsets)
    per_row, ea, eb, es = _float64(loss, a, b, _scale_value(loss), row_weights)
    scale_grad = sum(r[(backend, impl) + key]["gs"] for r in world.ranks)
    assert _scale_grad_err(scale_grad, es, loss, a, b, row_weights.sum()) < tol, "temperature gradient summed over the ranks vs float64"
    for rank, res in enumerate(world.ranks):
        got = res[(backend, impl) + key]
        rows = _local_rows(loss, rank, counts, offsets)
        mine = per_row[rows]
        expected = {"none": mine, "mean": mine.mean(), "sum": mine.sum()}[reduction]
        assert got["dtype"] == torch.float32
        assert got["loss"].shape == expected.shape
        own = slice(offsets[rank], offsets[rank] + counts[rank])
        assert rel_err(got["loss"], expected) < tol, f"rank {rank}: loss vs float64"
        assert got["ga"].dtype == dtype
        assert rel_err(got["ga"], ea[own]) < tol, f"rank {rank}: gradient of the first input vs float64"
        assert rel_err(got["gb"], eb[own]) < tol, f"rank {rank}: gradient of the second input vs float64"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", [_backend_param(b) for b in BACKENDS])
@pytest.mark.parametrize("loss", LOSSES)
def test_spec_convention_equals_single_process(world, backend, impl, loss):
    """Even batches, mean: mean over ranks of the losses == the single-process loss, each rank's
    gradient == W * its slice of the single-process gradient, mean of the dscale == single dscale
    (the single-process fp32 run of the same backend, then float64)."""
    key = ("spec", loss, "mean", torch.float32)
    if backend == "triton" and key != TRITON_CASE:
        pytest.skip("Triton's interpreter is slow: the distributed run covers one case (nt_xent)")
    counts, offsets = _layout(world.size, True)
    a, b, _, _ = _inputs(world.seed, key, world.size, True)
    single, sa, sb, ss = _single(backend, loss, a, b, _scale_value(loss), "mean", None)
    results = [r[(backend, impl) + key] for r in world.ranks]
    w = world.size
    assert rel_err(sum(r["loss"] for r in results) / w, single) < TOL
    assert _scale_grad_err(sum(r["gs"] for r in results) / w, ss, loss, a, b, 1.0) < TOL
    for rank, res in enumerate(results):
        own = slice(offsets[rank], offsets[rank] + counts[rank])
        assert rel_err(res["ga"], w * sa[own]) < TOL, f"rank {rank}"
        assert rel_err(res["gb"], w * sb[own]) < TOL, f"rank {rank}"
    _check_case(world, backend, impl, key, TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", [_backend_param(b) for b in ("torch", "cpu")])
@pytest.mark.parametrize("loss,reduction", [(l, r) for l in LOSSES for r in REDUCTIONS[l]])
def test_uneven_batches_and_every_reduction(world, backend, impl, loss, reduction):
    """Uneven local batches, random per-row weights / per-rank multipliers: each rank's value and
    gradients are its part of the single-process objective (fp32 run of the same backend where
    the reduction exists there, and float64)."""
    key = ("weighted", loss, reduction, torch.float32)
    _check_case(world, backend, impl, key, TOL)
    if loss.startswith("clip"):
        return  # clip_loss has no per-row reduction to compare with: float64 above
    counts, offsets = _layout(world.size, False)
    a, b, weights, multipliers = _inputs(world.seed, key, world.size, False)
    row_weights = _row_weights(key, loss, reduction, weights, multipliers, counts, offsets)
    per_row, sa, sb, ss = _single(backend, loss, a, b, _scale_value(loss), "none", row_weights)
    scale_grad = sum(r[(backend, impl) + key]["gs"] for r in world.ranks)
    assert _scale_grad_err(scale_grad, ss, loss, a, b, row_weights.sum()) < TOL
    for rank, res in enumerate(world.ranks):
        got = res[(backend, impl) + key]
        own = slice(offsets[rank], offsets[rank] + counts[rank])
        mine = per_row[_local_rows(loss, rank, counts, offsets)]
        expected = {"none": mine, "mean": mine.mean(), "sum": mine.sum()}[reduction]
        assert rel_err(got["loss"], expected) < TOL
        assert rel_err(got["ga"], sa[own]) < TOL and rel_err(got["gb"], sb[own]) < TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", [_backend_param(b) for b in ("torch", "cpu")])
@pytest.mark.parametrize("loss", ["nt_xent", "clip_raw"])
def test_bfloat16(world, backend, impl, loss):
    _check_case(world, backend, impl, ("spec", loss, "mean", torch.bfloat16), RTOL[torch.bfloat16])


@pytest.mark.parametrize("backend", [_backend_param(b) for b in ("torch", "cpu")])
def test_ring_equals_gather(world, backend):
    for key, *_ in _cases(world.size):
        for res in world.ranks:
            ring, gather = res[(backend, "ring") + key], res[(backend, "gather") + key]
            for name in ("loss", "ga", "gb"):
                assert rel_err(ring[name], gather[name]) < TOL, (key, name)
            a, b, _, _ = _inputs(world.seed, key, world.size, key[0] == "spec")
            assert _scale_grad_err(ring["gs"], gather["gs"], key[1], a, b, 2.0) < TOL, key


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", [_backend_param(b) for b in ("torch", "cpu")])
def test_modules(world3, backend, impl):
    world = world3
    key = ("spec", "nt_xent", "mean", torch.float32)
    for res in world.ranks:
        module, function = res[(backend, impl, "NTXentLoss")], res[(backend, impl) + key]
        for name in ("loss", "ga", "gb"):  # NTXentLoss(0.3, gather_distributed=True) == nt_xent(group=WORLD)
            assert rel_err(module[name], function[name]) < 1e-6
        info = res[(backend, impl, "InfoNCELoss")]
        assert torch.equal(info["loss"], info["function"])


@pytest.mark.parametrize("local_loss,gather_with_grad", OPENCLIP_MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", [_backend_param(b) for b in ("torch", "cpu")])
def test_clip_loss_module_matches_openclip(world3, backend, impl, local_loss, gather_with_grad):
    """ClipLoss(local_loss, gather_with_grad, rank, world_size) against OpenCLIP's formula on
    features gathered by torch.distributed.nn's all_gather (float64): each rank's value and
    feature gradients; the scale gradient after DDP's averaging (mean over the ranks)."""
    world = world3
    results = [r[(backend, impl, "openclip", local_loss, gather_with_grad)] for r in world.ranks]
    for rank, res in enumerate(results):
        assert rel_err(res["loss"], res["expected"]) < TOL, f"rank {rank}: value"
        assert rel_err(res["ga"], res["ea"]) < TOL, f"rank {rank}: image gradient"
        assert rel_err(res["gb"], res["eb"]) < TOL, f"rank {rank}: text gradient"
        assert float(res["gbias"]) == 0.0
    mean = sum(r["gs"] for r in results) / world.size
    expected = sum(r["es"] for r in results) / world.size
    a, b, _, _ = _inputs(world.seed, ("openclip", "clip_raw", "mean", torch.float32), world.size, True)
    weight = 1.0  # the upstream multipliers are in [0.5, 1.5)
    assert _scale_grad_err(mean, expected, "openclip", a, b, weight) < TOL, "logit_scale gradient, DDP-averaged"


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce_sym"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", [_backend_param(b) for b in ("torch", "cpu")])
def test_ddp_gradients_equal_single_process_on_the_global_batch(world3, backend, impl, loss):
    """DistributedDataParallel around a projection + learnable temperature: after DDP's average,
    every parameter gradient (the temperature's included) is the single-process gradient of the
    loss on the concatenated batch, and the mean of the ranks' losses is that loss."""
    x1, x2, _, _ = _inputs(world3.seed, ("ddp", loss, "mean", torch.float32), 3, True)
    model = _Tower()
    single = model(x1, x2, loss, backend=backend)
    single.backward()
    expected = _ddp_grads(model)
    results = [r[(backend, impl, "ddp", loss)] for r in world3.ranks]
    assert rel_err(sum(r["loss"] for r in results) / 3, single) < TOL
    for rank, res in enumerate(results):
        for name, grad in expected.items():
            assert rel_err(res["grads"][name], grad) < TOL, (rank, name)


def test_bad_inputs_raise_on_every_rank(world3):
    world = world3
    for rank, res in enumerate(world.ranks):
        kind, message = res[("error", "dim")]
        assert kind == "ValueError" and "z1 / z2" in message and "feature dimension" in message, message
        kind, message = res[("error", "local")]
        if rank == 1:
            assert kind == "ValueError" and "z1 and z2 must have the same shape" in message, message
        else:
            assert kind == "ValueError" and "rank(s) [1]" in message, message
        kind, message = res[("error", "dtype")]
        assert kind == "ValueError" and "dtype" in message, message
        kind, message = res[("error", "grad")]
        assert kind == "ValueError" and "every rank must take part" in message, message
        kind, message = res[("error", "dist_impl")]
        assert kind == "ValueError" and "dist_impl" in message
        kind, message = res[("error", "group_type")]
        assert kind == "TypeError" and "group" in message
        kind, message = res[("error", "clip_world")]
        assert kind == "ValueError" and "world_size" in message
        kind, message = res[("error", "clip_rank")]
        assert kind == "ValueError" and "rank" in message
        assert res[("error", "horovod")][0] == "NotImplementedError"
        assert torch.isfinite(res[("error", "after")])
        if rank == 0:  # a group of one rank: the single-process path
            torch.testing.assert_close(*res[("solo",)], rtol=0, atol=0)
        else:
            kind, message = res[("error", "not_member")]
            assert kind in ("TypeError", "ValueError") and "group" in message, message


def test_per_rank_memory_is_not_local_rows_times_global_columns(world3):
    world = world3
    local_rows, global_cols = 2 * MEMORY_N, 2 * MEMORY_N * world.size  # nt_xent: 2n rows, 2nW columns
    square = local_rows * global_cols  # elements of the local x global matrix
    measured = {k: v for k, v in world.ranks[0].items() if k[0] == "memory"}
    assert measured, "no backend ran the memory check"
    for (_, backend, impl), sizes in measured.items():
        if backend == "torch":  # the reference builds it (ring: per block): the recorder sees it (the check is live)
            assert sizes["recorded"] >= 4 * square, impl
            continue
        assert sizes["recorded"] < square, (backend, impl, sizes)  # bytes < elements: far below 4 bytes each
        if sizes["profiled"] is not None:
            assert sizes["profiled"] < square, (backend, impl, sizes)


def test_absent_or_dead_rank_gives_runtime_error_not_hang(world3):
    world = world3
    res = world.ranks[0]
    kind, message = res[("fail", "absent")]
    assert kind == "RuntimeError" and "cl_fast.nt_xent" in message and "all_gather" in message, message
    assert res[("fail", "absent_seconds")] < SHORT_TIMEOUT + 5
    for rank in (0, 1):  # rank 2 has exited
        kind, message = world.ranks[rank][("fail", "dead")]
        assert kind == "RuntimeError" and "cl_fast.info_nce" in message, message
        assert world.ranks[rank][("fail", "dead_seconds")] < SHORT_TIMEOUT + 5


def test_group_none_and_size_one_are_single_process(gen):
    """No process group needed without group=; a one-rank group is the single-process path."""
    a, b = torch.randn(5, D, generator=gen), torch.randn(5, D, generator=gen)
    torch.testing.assert_close(cl_fast.nt_xent(a, b, group=None, dist_impl="ring"), cl_fast.nt_xent(a, b))
    with pytest.raises(ValueError, match="dist_impl"):
        cl_fast.info_nce(a, b, dist_impl="nccl")
    if not dist.is_initialized():  # (dist.group.WORLD is None here: the single-process path)
        with pytest.raises(ValueError, match="init_process_group"):
            cl_fast.nt_xent(a, b, group=object())
