"""The trainers under DDP (2 gloo ranks, spawned) equal one process on the doubled batch.

Each rank takes its half of the global batch; SimCLR's nt_xent scores its rows against the
negatives of BOTH ranks (group=WORLD), SwAV's Sinkhorn normalises over the global batch, BYOL's
loss is per sample, and --sync-bn gives BatchNorm the global batch's statistics. With DDP's
gradient average, SPEC's distributed convention makes every step the single-process step on the
concatenated batch: same initial weights (same seed), same batches (the global batch is one
stream, sliced by rank), and deterministic views (the random augmentations are replaced by a
fixed function of the image, since every rank draws its own), so the logged losses (the mean
over ranks) and the weights after 3 AdamW steps agree within fp32 rounding.

One spawn runs every case (importing torch in the children costs seconds)."""
from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import cl_fast
from cl_fast.train import cli
from cl_fast.train.augment import Augment

WORLD, LOCAL_BATCH, STEPS = 2, 12, 3
COMMON = ["--threads", "1", "--image-size", "8", "--width", "4", "--hidden-dim", "32", "--feature-dim", "16",
          "--no-progress", "--no-eval", "--no-plot", "--steps", str(STEPS), "--warmup-epochs", "0", "--sync-bn"]
FAMILY = {"simclr": "infonce", "byol": "byol", "swav": "sinkhorn"}
CASES = [("simclr", "torch", "gather"), ("simclr", "torch", "ring"), ("simclr", "cpu", "gather"), ("swav", "cpu", ""),
         ("byol", "cpu", "")]  # (method, loss backend, SimCLR's dist_impl)
# BYOL: that noise bias shifts the predictor's input, so the heads' BatchNorm running means (and
# the EMA target) drift by O(lr); the encoder (the representation) is compared
WEIGHTS_CHECKED = {"byol": "encoder."}
EXTRA = {"simclr": [], "byol": [], "swav": ["--prototypes", "12", "--freeze-prototypes-steps", "1"]}


def _runnable(method: str, backend: str, impl: str = "") -> str | None:
    if backend != "torch" and backend not in cl_fast.backends(FAMILY[method], "cpu"):
        return f"needs cl_fast._C built (the fused cpu {FAMILY[method]} backend)"
    return None


def _fixed_views(self, images, size, scale=None):
    """A deterministic stand-in for Augment.__call__: the image (resized), every other view mirrored."""
    self.calls = getattr(self, "calls", 0) + 1
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images if self.calls % 2 else images.flip(-1)


def _argv(method, backend, impl, batch, out):
    impl = ["--dist-impl", impl] if impl else []
    return [method, *COMMON, *EXTRA[method], *impl, "--loss-backend", backend, "--batch-size", str(batch), "--out", out]


def _worker(rank: int, init_file: str, out_dir: str, cases) -> None:
    try:
        Augment.__call__ = _fixed_views
        # the process group is this worker's, so one spawn serves every case (the trainer uses it)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=120))
        for case in cases:
            out = os.path.join(out_dir, "-".join(case))
            result = cli.run(_argv(*case, LOCAL_BATCH, out), log=lambda line: None)
            torch.save(result.losses, os.path.join(out, f"losses-rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    out_dir = tmp_path_factory.mktemp("ddp")
    cases = [case for case in CASES if _runnable(*case) is None]
    try:
        mp.start_processes(_worker, args=(str(out_dir / "init"), str(out_dir), cases), nprocs=WORLD, join=True,
                           start_method="spawn")
    except mp.ProcessRaisedException as error:
        details = "".join(p.read_text() for p in out_dir.glob("rank*.error"))
        pytest.fail(f"a rank failed:\n{details or error}")
    return out_dir


@pytest.mark.parametrize("method,backend,impl", [
    pytest.param(*case, id="-".join(filter(None, case)), marks=[pytest.mark.skip(reason=why)] if (why := _runnable(*case)) else [])
    for case in CASES
])
def test_two_ranks_equal_one_process_on_the_doubled_batch(method, backend, impl, two_ranks, tmp_path, monkeypatch):
    monkeypatch.setattr(Augment, "__call__", _fixed_views)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    single = cli.run(_argv(method, backend, impl, WORLD * LOCAL_BATCH, str(tmp_path)), log=lambda line: None)
    run = two_ranks / "-".join((method, backend, impl))

    ranks = [torch.load(run / f"losses-rank{r}.pt") for r in range(WORLD)]
    assert ranks[0] == ranks[1]  # every rank logs the global batch's loss
    assert len(single.losses) == len(ranks[0]) == STEPS
    assert abs(single.losses[-1] - single.losses[0]) > 1e-4  # the weights moved
    rel = [abs(a - b) / abs(b) for a, b in zip(ranks[0], single.losses)]
    assert rel[0] < 1e-6 and max(rel) < 1e-4, (ranks[0], single.losses)

    distributed = torch.load(run / "checkpoint.pt", weights_only=False)
    expected = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    initial, trainable = _initial_model(expected)
    # the gradients' history (AdamW's moments), against the model's largest
    moments = {}
    for name, state_a, state_b in zip(trainable, distributed["optimizer"]["state"].values(),
                                      expected["optimizer"]["state"].values()):
        moments[name] = state_b["exp_avg"].abs().max()
        for key in ("exp_avg", "exp_avg_sq"):
            scale = max(float(s[key].abs().max()) for s in expected["optimizer"]["state"].values())
            assert float((state_a[key] - state_b[key]).abs().max()) / scale < 1e-4, (name, key)
    largest = max(moments.values())
    for name, value in expected["model"].items():
        if not value.is_floating_point():
            assert torch.equal(distributed["model"][name], value), name
            continue
        if name in moments and moments[name] < 1e-6 * largest:
            # a gradient that is zero up to rounding (BYOL's last projector bias: the predictor's
            # BatchNorm removes it); AdamW normalises it into steps of +-lr on noise: checked above only
            continue
        if not name.startswith(WEIGHTS_CHECKED.get(method, "")):
            continue
        # AdamW moves a weight by about lr per step whatever its gradient's size: compare the
        # difference to the distance travelled (running statistics: to their size)
        moved = float((value - initial[name]).abs().max())
        scale = max(moved, 1e-6 * float(value.abs().max()), 1e-12)
        err = float((distributed["model"][name] - value).abs().max()) / scale
        assert err < 1e-3, f"{name}: {err:.2e}"


def _initial_model(checkpoint):
    """(state_dict, names of the trainable parameters in the optimiser's order) of the method at
    initialisation: every run seeds the same, so this is the weights every run started from."""
    from cl_fast.train.base import MethodConfig

    shape = checkpoint["shape"]
    fields = {k: v for k, v in shape.items() if k in MethodConfig.__dataclass_fields__}
    torch.manual_seed(checkpoint["config"]["seed"])
    model = cli.METHODS[checkpoint["method"]](MethodConfig(**fields), shape["channels"])
    return model.state_dict(), [name for name, p in model.named_parameters() if p.requires_grad]
