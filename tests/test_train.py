"""The reference trainers (cl_fast.train): every method trains on digits, the fused and the
reference loss backends train identically, --resume continues exactly, Ctrl-C leaves a usable
checkpoint, and bad command lines fail cleanly (argparse-style, exit 2, nothing written).

Tiny models and batches keep the file to well under two minutes on two CPU cores."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import cl_fast
from cl_fast.train import cli
from cl_fast.train import data as train_data

METHODS = ["simclr", "moco", "byol", "swav"]
FAMILY = {"simclr": "infonce", "moco": "moco", "byol": "byol", "swav": "sinkhorn"}
# 8x8 digits (no upsampling), a 4-wide encoder, 32-row batches: a step takes milliseconds. One
# thread: these tiny ops are dominated by OpenMP hand-offs on a loaded 2-core machine (25x slower).
TINY = ["--threads", "1", "--image-size", "8", "--batch-size", "32", "--width", "4", "--hidden-dim", "32", "--feature-dim", "16",
        "--no-progress", "--no-eval", "--no-plot"]
METHOD_TINY = {"simclr": [], "moco": ["--queue-size", "96"], "byol": [], "swav": ["--prototypes", "12", "--freeze-prototypes-steps", "2"]}


def train(method, out, *extra, log=None):
    lines = []
    result = cli.run([method, *TINY, *METHOD_TINY[method], "--out", str(out), *extra], log=lines.append if log is None else log)
    return result, lines


@pytest.mark.parametrize("method", METHODS)
def test_trainer_runs_and_writes_its_outputs(method, tmp_path):
    lines = []
    argv = [method, *[a for a in TINY if a != "--no-plot"], *METHOD_TINY[method], "--out", str(tmp_path / "run")]
    result = cli.run(argv + ["--steps", "4"], log=lines.append)
    assert len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
    assert result.steps_done == 4 and not result.interrupted
    assert 0 < result.loss_share < 1
    for name in ("checkpoint.pt", "loss_curve.png", "metrics.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert f"first loss {result.losses[0]:.4f}, last loss {result.losses[-1]:.4f}" in lines


def test_evaluation_reports_trained_and_random_init_accuracy(tmp_path):
    lines = []
    result = cli.run(["simclr", *[a for a in TINY if a != "--no-eval"], "--steps", "2", "--out", str(tmp_path)],
                     log=lines.append)
    for encoder in ("trained", "random_init"):
        for probe in ("knn", "linear"):
            assert 0 <= result.accuracy[encoder][probe] <= 100
    assert any(line.startswith("kNN accuracy:") and "random init" in line for line in lines)
    assert any(line.startswith("linear accuracy:") for line in lines)


def test_swav_multi_crop(tmp_path):
    result, _ = train("swav", tmp_path, "--steps", "2", "--small-crops", "2")
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast(method, tmp_path):
    result, _ = train(method, tmp_path, "--steps", "2", "--precision", "bf16")
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize("method", METHODS)
def test_fused_and_torch_backends_train_the_same(method, tmp_path):
    if "cpu" not in cl_fast.backends(FAMILY[method], "cpu"):
        pytest.skip(f"needs cl_fast._C built (the fused cpu {FAMILY[method]} backend)")
    # Training amplifies the last-bit differences of the two backends' gradients step after step
    # (BYOL most: about 2x per step on this tiny model); a moderate learning rate keeps 20 steps of
    # that well under the 1e-4 bound while still moving the weights.
    fused, _ = train(method, tmp_path / "cpu", "--steps", "20", "--lr", "5e-4", "--loss-backend", "cpu")
    reference, _ = train(method, tmp_path / "torch", "--steps", "20", "--lr", "5e-4", "--loss-backend", "torch")
    assert abs(reference.losses[-1] - reference.losses[0]) > 1e-3  # the weights did move
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fused.losses, reference.losses)]
    assert len(rel) == 20 and max(rel) < 1e-4, rel


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_uninterrupted(method, tmp_path):
    whole, _ = train(method, tmp_path / "whole", "--steps", "6")
    first, lines = train(method, tmp_path / "part", "--steps", "6", "--stop-at", "3")
    assert first.steps_done == 3 and any("--resume" in line for line in lines)
    ckpt = str(tmp_path / "part" / "checkpoint.pt")
    resumed = cli.run([method, "--resume", ckpt, "--no-progress"], log=lambda line: None)
    assert resumed.steps_done == 6
    assert resumed.losses == whole.losses  # bitwise: same batches, augmentations, queue, EMA, RNG


def test_ctrl_c_leaves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    whole, _ = train("moco", tmp_path / "whole", "--steps", "6")
    batch_indices = train_data.batch_indices

    def interrupt_at_step_2(n, batch_size, step, seed):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler: finish this step, save, stop
        return batch_indices(n, batch_size, step, seed)

    monkeypatch.setattr(train_data, "batch_indices", interrupt_at_step_2)
    stopped, _ = train("moco", tmp_path / "part", "--steps", "6")
    monkeypatch.setattr(train_data, "batch_indices", batch_indices)
    assert stopped.interrupted and stopped.steps_done == 3
    resumed = cli.run(["moco", "--resume", str(tmp_path / "part" / "checkpoint.pt"), "--no-progress"], log=lambda line: None)
    assert resumed.losses == whole.losses


# ------------------------------------------------------------------------ bad command lines
def _checkpoint(tmp_path, method="simclr", *extra):
    train(method, tmp_path / "ckpt", "--steps", "1", *extra)
    return str(tmp_path / "ckpt" / "checkpoint.pt")


BAD = [
    (["nope"], "invalid choice"),
    (["simclr", "--epochs", "0"], "argument --epochs"),
    (["simclr", "--batch-size", "-4"], "argument --batch-size"),
    (["simclr", "--lr", "fast"], "argument --lr"),
    (["simclr", "--temperature", "nan"], "argument --temperature"),
    (["simclr", "--loss-backend", "numpy"], "argument --loss-backend"),
    (["simclr", "--precision", "fp16"], "argument --precision"),
    (["simclr", "--device", "tpu"], "argument --device"),
    (["moco", "--momentum", "1.5"], "argument --momentum"),
    (["moco", "--queue-size", "16"], "argument --queue-size: 16 is smaller than the 512 keys"),
    (["byol", "--temperature", "0.1"], "unrecognized arguments: --temperature"),
    (["simclr", "--data", "{tmp}/missing"], "does not exist"),
    (["simclr", "--data", "{tmp}/a_file.txt"], "is a file"),
    (["simclr", "--data", "{tmp}/empty_dir"], "neither CIFAR-10"),
    (["simclr", "--data", "{tmp}/broken_cifar"], "lacks"),
    (["simclr", "--resume", "{tmp}/missing.pt"], "does not exist"),
    (["simclr", "--resume", "{tmp}/a_file.txt"], "not a readable checkpoint"),
    (["moco", "--resume", "{ckpt}"], "is a simclr checkpoint, not moco"),
    (["simclr", "--resume", "{ckpt}", "--width", "5"], "different shape: width=4"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_and_write_nothing(argv, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file.txt").write_text("not data")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "broken_cifar").mkdir()
    (tmp_path / "broken_cifar" / "data_batch_1").write_bytes(b"")
    ckpt = _checkpoint(tmp_path) if any("{ckpt}" in a for a in argv) else ""
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in argv]
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # the default --out (runs/<method>) would land here
    out = tmp_path / "out"
    extra = [] if argv[0] == "nope" else ["--out", str(out), "--steps", "1", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(argv + extra, log=lambda line: None)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err
    assert not out.exists() and not any(work.iterdir())


def test_bad_argument_from_the_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-m", "cl_fast", "train", "simclr", "--batch-size", "0", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "usage: python -m cl_fast train simclr" in proc.stderr
    assert "argument --batch-size: expected a positive integer, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ the pieces
def test_batches_are_a_function_of_seed_and_step():
    a = train_data.batch_indices(100, 32, 7, seed=3)
    assert torch.equal(a, train_data.batch_indices(100, 32, 7, seed=3))
    big = train_data.batch_indices(100, 250, 0, seed=3)  # larger than the data set: whole epochs
    assert torch.equal(torch.sort(big[:100]).values, torch.arange(100))
    assert torch.equal(torch.sort(big[100:200]).values, torch.arange(100))


def test_augmentations_keep_shape_and_range_and_follow_the_seed():
    from cl_fast.train.augment import Augment, AugmentConfig

    images = torch.rand(6, 3, 12, 12)
    config = AugmentConfig.for_data("folder:x", 3)
    a = Augment(config, "cpu", seed=1)(images, 10)
    b = Augment(config, "cpu", seed=1)(images, 10)
    c = Augment(config, "cpu", seed=2)(images, 10)
    assert a.shape == (6, 3, 10, 10) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_folder_and_cifar_batches_load(tmp_path):
    import pickle

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).save(tmp_path / "folder" / cls / f"{i}.png")
    folder = train_data.load(str(tmp_path / "folder"), 12)
    assert folder.train_images.shape[1:] == (3, 12, 12) and folder.classes == 2
    assert folder.train_images.shape[0] + folder.test_images.shape[0] == 10

    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in train_data.CIFAR_TRAIN + ("test_batch",):
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        with open(cifar / name, "wb") as f:
            pickle.dump(batch, f)
    loaded = train_data.load(str(tmp_path), None)  # the parent folder works too
    assert loaded.train_images.shape == (20, 3, 32, 32) and loaded.test_images.shape == (4, 3, 32, 32)


def test_blur_equals_a_per_image_convolution():
    import torch.nn.functional as F

    from cl_fast.train.augment import Augment, AugmentConfig

    config = AugmentConfig(blur_p=1.0, blur_sigma=(0.2, 1.0))
    images = torch.rand(5, 3, 9, 11)
    blurred = Augment(config, "cpu", seed=4).blur(images)
    draws = Augment(config, "cpu", seed=4)  # the same generator: the same sigmas
    sigma = draws._uniform(5, *config.blur_sigma)
    radius = 2
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    for i in range(5):
        k = torch.exp(-0.5 * (taps / sigma[i]) ** 2)
        k = k / k.sum()
        x = F.pad(images[i: i + 1], (radius,) * 4, mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
        x = F.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
        torch.testing.assert_close(blurred[i: i + 1], x, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ torchrun (DDP, gloo)
def test_two_ranks_under_torchrun(tmp_path, capsys):
    """2 ranks with gloo: MoCo's queue is all-gathered, DDP averages the gradients, rank 0 writes
    one checkpoint holding both ranks' generator states (resuming it on 1 rank is a clear error)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cl_fast", "train", "moco", *TINY, "--queue-size", "256", "--steps", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("first loss") == 1  # rank 0 reports, rank 1 stays quiet
    payload = torch.load(out / "checkpoint.pt", weights_only=False)
    assert payload["step"] == 3 and len(payload["augment"]) == 2
    queue = payload["model"]["queue.queue"]
    assert int(payload["model"]["queue.ptr"]) == 3 * 2 * 2 * 32 % queue.shape[0]  # steps x views x ranks x batch
    with pytest.raises(SystemExit):
        cli.run(["moco", "--resume", str(out / "checkpoint.pt")], log=lambda line: None)
    assert "written by 2 rank(s)" in capsys.readouterr().err
