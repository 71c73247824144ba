"""The training loop every method shares: data, augmentations, optimiser and schedule, timing of
the loss's share of each step, checkpoints (periodic, at the end, on Ctrl-C), evaluation, plot."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from . import data as data_mod
from . import distributed
from .augment import Augment, AugmentConfig
from .base import Method, MethodConfig
from .evaluate import evaluate
from .models import SmallCNN, convert_global_bn


@dataclass
class RunConfig:
    method: str
    epochs: float
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    steps: int | None
    data: str | None
    image_size: int | None
    out: str
    resume: str | None
    seed: int
    device: str
    precision: str
    save_every: int | None
    stop_at: int | None
    eval: bool
    progress: bool
    plot: bool
    knn_k: int
    method_config: MethodConfig = field(default_factory=lambda: MethodConfig(temperature=0.1))


@dataclass
class RunResult:
    losses: list[float]
    loss_seconds: list[float]
    step_seconds: list[float]
    steps_done: int
    total_steps: int
    interrupted: bool
    train_seconds: float
    batch_size: int
    accuracy: dict | None = None  # {"trained": {"knn", "linear"}, "random_init": {...}}
    out: str = ""

    @property
    def samples_per_second(self) -> float:
        timed = self.step_seconds[1:] or self.step_seconds  # the first step pays one-time set-up
        return self.batch_size * len(timed) / max(sum(timed), 1e-12)

    @property
    def loss_share(self) -> float:
        pairs = list(zip(self.loss_seconds, self.step_seconds))[1:] or list(zip(self.loss_seconds, self.step_seconds))
        return sum(a for a, _ in pairs) / max(sum(b for _, b in pairs), 1e-12)


class _StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step (and save); a second one
    interrupts at once (the last periodic checkpoint stays valid: saves are atomic)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: RunConfig, methods: dict, device: torch.device, ranks) -> tuple:
    """Data, method, optimiser, scheduler, augmentations and the checkpoint to resume (if any).
    Raises DataError / CheckpointError before anything is written."""
    from .schedule import warmup_cosine

    dataset = data_mod.load(config.data, config.image_size).to(device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    method: Method = methods[config.method](config.method_config, dataset.channels).to(device)
    if ranks.enabled:
        method.group = distributed.group()  # the losses' negatives / codes span the global batch
        if config.method_config.sync_bn:
            convert_global_bn(method)  # BatchNorm statistics of the global batch too
    shape = {key: getattr(config.method_config, key) for key in method.shape_keys}
    shape.update(data=dataset.name, channels=dataset.channels, image_size=dataset.image_size)
    resumed = None
    if config.resume:
        resumed = ckpt.load(config.resume)
        ckpt.check_compatible(resumed, config.resume, config.method, shape)
        if len(resumed["augment"]) != ranks.world:
            raise ckpt.CheckpointError(
                f"--resume: {config.resume} was written by {len(resumed['augment'])} rank(s); resume it with as many, "
                f"not {ranks.world}"
            )
    n_train = dataset.train_images.shape[0]
    steps_per_epoch = max(1, n_train // (config.batch_size * ranks.world))
    total_steps = config.steps if config.steps is not None else max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, warmup, total_steps)
    augment = Augment(AugmentConfig.for_data(dataset.name, dataset.channels), device, config.seed + 7919 * ranks.rank)
    return dataset, method, shape, optimizer, scheduler, augment, resumed, total_steps, steps_per_epoch


def train(config: RunConfig, methods: dict, log=print) -> RunResult:
    ranks, device = distributed.setup(config.device)
    finished = False
    try:
        result = _train(config, methods, log if ranks.is_main else (lambda line: None), ranks, device)
        finished = True
        return result
    finally:
        distributed.teardown(ranks, finished)


def _train(config: RunConfig, methods: dict, log, ranks, device) -> RunResult:
    dataset, method, shape, optimizer, scheduler, augment, resumed, total_steps, steps_per_epoch = build(
        config, methods, device, ranks)
    init_encoder = {k: v.detach().cpu().clone() for k, v in method.encoder.state_dict().items()}
    losses, loss_seconds, step_seconds, start = [], [], [], 0
    if resumed is not None:
        method.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        augment.load_state_dict(resumed["augment"][ranks.rank])
        ckpt.set_rng_state(resumed["rng"][ranks.rank], device)
        init_encoder = resumed["init_encoder"]
        losses, loss_seconds, step_seconds = resumed["losses"], resumed["loss_seconds"], resumed["step_seconds"]
        start = resumed["step"]
        if start >= total_steps:
            log(f"checkpoint {config.resume} is already at step {start} of {total_steps}: nothing to train")
    if ranks.is_main:
        os.makedirs(config.out, exist_ok=True)
    checkpoint_path = os.path.join(config.out, "checkpoint.pt")
    save_every = config.save_every or steps_per_epoch

    def save(step: int) -> None:
        # every rank's generators (collective), one file written by rank 0
        augment_states = distributed.gather(ranks, augment.state_dict())
        rng_states = distributed.gather(ranks, ckpt.rng_state(device))
        if not ranks.is_main:
            return
        ckpt.save(checkpoint_path, {
            "method": config.method, "shape": shape, "step": step, "total_steps": total_steps,
            "model": method.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "augment": augment_states, "rng": rng_states, "init_encoder": init_encoder,
            "losses": losses, "loss_seconds": loss_seconds, "step_seconds": step_seconds,
            "config": _plain(config),
        })

    stop = total_steps if config.stop_at is None else min(total_steps, config.stop_at)
    images = dataset.train_images
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    bar = None
    if config.progress and ranks.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc=f"{config.method} ({method.config.loss_backend} loss)",
                   unit="step", dynamic_ncols=True, file=sys.stderr)
    method.train()
    model = method
    if ranks.enabled:  # averages the gradients over the ranks during the backward
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    interrupted, train_start, done = False, time.perf_counter(), start
    with _StopRequest() as stop_request:
        for step in range(start, stop):
            t0 = time.perf_counter()
            # this rank's slice of the global batch (batch size x ranks)
            index = data_mod.batch_indices(images.shape[0], config.batch_size * ranks.world, step, config.seed)
            index = index[ranks.rank * config.batch_size: (ranks.rank + 1) * config.batch_size]
            views = method.views(images[index.to(device)], augment, dataset.image_size)
            with autocast:
                outputs, context = model(views)
            # The loss runs on detached copies of the network outputs, so its forward and backward
            # can be timed on their own; the gradients then continue through the networks.
            leaves = [out.detach().requires_grad_() for out in outputs]
            _sync(device)
            t1 = time.perf_counter()
            loss = method.loss(leaves, context)
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
            torch.autograd.backward(outputs, grads)
            method.after_backward(step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step(step, total_steps, context)
            # the loss of the global batch (the mean over ranks of their local means), and whether
            # any rank was asked to stop (Ctrl-C): one all-reduce, so every rank agrees on both
            value, stop_requested = distributed.mean_and_any(ranks, loss.detach(), stop_request.requested)
            _sync(device)
            t3 = time.perf_counter()
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at step {step}; lower --lr or check the data")
            losses.append(value)
            loss_seconds.append(t2 - t1)
            step_seconds.append(t3 - t0)
            done = step + 1
            if bar is not None:
                window = slice(-min(10, len(step_seconds)), None)  # the last 10 steps
                seconds = sum(step_seconds[window])
                bar.set_postfix(loss=f"{value:.4f}", samples_per_s=f"{config.batch_size * len(step_seconds[window]) / seconds:.0f}",
                                loss_share=f"{100 * sum(loss_seconds[window]) / seconds:.1f}%", refresh=False)
                bar.update(1)
            if stop_requested:
                interrupted = True
                break
            if done % save_every == 0 and done < stop:
                save(done)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - train_start
    save(done)
    result = RunResult(losses, loss_seconds, step_seconds, done, total_steps, interrupted, train_seconds,
                       config.batch_size, out=config.out)
    if interrupted or done < total_steps:
        log(f"stopped at step {done} of {total_steps}; checkpoint {checkpoint_path} "
            f"(continue with: python -m cl_fast train {config.method} --resume {checkpoint_path})")
    if config.eval and not interrupted and ranks.is_main:
        result.accuracy = _evaluate(method, init_encoder, dataset, config, device)
    if ranks.is_main:
        _report(result, config, log)
    return result


def _evaluate(method: Method, init_encoder: dict, dataset, config: RunConfig, device) -> dict:
    random_init = SmallCNN(dataset.channels, config.method_config.width).to(device)
    random_init.load_state_dict(init_encoder)
    return {"trained": evaluate(method.encoder, dataset, k=config.knn_k),
            "random_init": evaluate(random_init, dataset, k=config.knn_k)}


def _report(result: RunResult, config: RunConfig, log) -> None:
    if result.losses:
        log(f"{result.steps_done} steps, batch {config.batch_size}: {result.samples_per_second:.0f} samples/s, "
            f"loss {100 * result.loss_share:.1f}% of the step time ({config.method_config.loss_backend} loss backend)")
    if result.accuracy is not None:
        trained, init = result.accuracy["trained"], result.accuracy["random_init"]
        log(f"kNN accuracy:    {trained['knn']:.1f}% trained vs {init['knn']:.1f}% random init "
            f"({trained['knn'] - init['knn']:+.1f} points)")
        log(f"linear accuracy: {trained['linear']:.1f}% trained vs {init['linear']:.1f}% random init "
            f"({trained['linear'] - init['linear']:+.1f} points)")
    if result.losses:
        log(f"first loss {result.losses[0]:.4f}, last loss {result.losses[-1]:.4f}")
        written = [os.path.join(config.out, "checkpoint.pt"), os.path.join(config.out, "metrics.json")]
        if config.plot:
            written.insert(1, _plot(result, config))
        metrics = {
            "method": config.method, "loss_backend": config.method_config.loss_backend, "steps": result.steps_done,
            "total_steps": result.total_steps, "batch_size": config.batch_size, "train_seconds": result.train_seconds,
            "samples_per_second": result.samples_per_second, "loss_share": result.loss_share,
            "first_loss": result.losses[0], "last_loss": result.losses[-1], "accuracy": result.accuracy,
            "config": _plain(config),
        }
        with open(os.path.join(config.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        log(f"wrote {', '.join(written)}")


def _plot(result: RunResult, config: RunConfig) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(config.out, "loss_curve.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(result.losses) + 1)
    ax.plot(steps, result.losses, lw=0.8, alpha=0.5, label="per step")
    window = max(1, len(result.losses) // 20)
    if window > 1:
        smooth = np.convolve(result.losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.8, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{config.method}, {config.method_config.loss_backend} loss backend, batch {config.batch_size}")
    ax.legend()
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plain(config: RunConfig) -> dict:
    return asdict(config)
