"""`python -m cl_fast train {simclr,moco,byol,swav} [options]`: the reference trainers' command line.

Every check on the arguments runs before anything is written: bad flags, a missing or malformed
--data, and a --resume checkpoint of another method or shape all end in an argparse-style
error and exit status 2 with no output directory created.
"""
from __future__ import annotations

import argparse
import os
import sys

from .base import MethodConfig
from .byol import BYOL
from .moco import MoCo
from .simclr import SimCLR
from .swav import SwAV

METHODS = {m.name: m for m in (SimCLR, MoCo, BYOL, SwAV)}
LOSS_BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")

# Flags shared by every method; None means "the method's default" (or the checkpoint's value
# with --resume). (flag, type, default, help)
COMMON_DEFAULTS = dict(
    weight_decay=1e-5, steps=None, data=None, image_size=None, seed=0, device="cpu", precision="fp32",
    loss_backend="auto", dist_impl="gather", sync_bn=False, width=None, hidden_dim=256, feature_dim=64, save_every=None, stop_at=None, knn_k=20, threads=1,
)
METHOD_DEFAULTS = {
    "moco": dict(momentum=0.99, queue_size=4096),
    "byol": dict(momentum=0.99),
    "swav": dict(prototypes=30, freeze_prototypes_steps=20, small_crops=0, sinkhorn_iterations=3, sinkhorn_epsilon=0.05),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _momentum(text: str) -> float:
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a momentum in [0, 1), got {text}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:i], got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this torch has no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:i], got {text!r}")
    return text


def _default(method: str, name: str):
    cls = METHODS[method]
    if name in cls.defaults:
        return cls.defaults[name]
    if name in METHOD_DEFAULTS.get(method, {}):
        return METHOD_DEFAULTS[method][name]
    return COMMON_DEFAULTS.get(name)


def _add_method_parser(sub, method: str) -> argparse.ArgumentParser:
    cls = METHODS[method]
    d = lambda name: _default(method, name)  # noqa: E731
    p = sub.add_parser(
        method, help=cls.description, description=sys.modules[cls.__module__].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Defaults train on scikit-learn's bundled digits (offline) on the CPU in a few minutes.\n"
            "Unless given, settings come from the method's defaults, or from the checkpoint with --resume.\n"
            f"Output in --out: checkpoint.pt, loss_curve.png, metrics.json.\n"
            f"Example: python -m cl_fast train {method} --epochs 5 --loss-backend torch --out runs/{method}-torch"
        ),
    )
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_float, metavar="E",
                   help=f"passes over the training split (fractions allowed; default {d('epochs')})")
    g.add_argument("--steps", type=_positive_int, metavar="N",
                   help="optimiser steps in all, overriding --epochs (e.g. a few large-batch steps for timing)")
    g.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help=f"images per step, each seen as two (or more) views (default {d('batch_size')}); "
                        "a batch larger than the data set spans several epochs")
    g.add_argument("--lr", type=_positive_float, help=f"peak AdamW learning rate (default {d('lr')})")
    g.add_argument("--weight-decay", type=_non_negative_float, metavar="WD", help=f"AdamW weight decay (default {d('weight_decay')})")
    g.add_argument("--warmup-epochs", type=_non_negative_float, metavar="E",
                   help=f"linear LR warm-up, then cosine decay to 0 (default {d('warmup_epochs')})")
    if method != "byol":
        g.add_argument("--temperature", type=_positive_float, metavar="T",
                       help=f"softmax temperature of the loss (default {d('temperature')})")
    if method in ("moco", "byol"):
        what = "key encoder's EMA rate" if method == "moco" else "target network's base EMA rate tau (cosine schedule up to 1)"
        g.add_argument("--momentum", type=_momentum, help=f"the {what} (default {d('momentum')})")
    if method == "moco":
        g.add_argument("--queue-size", type=_positive_int, metavar="K", help=f"negative keys in the queue (default {d('queue_size')})")
    if method == "swav":
        g.add_argument("--prototypes", type=_positive_int, metavar="K", help=f"number of prototypes (default {d('prototypes')})")
        g.add_argument("--freeze-prototypes-steps", type=_non_negative_int, metavar="N",
                       help=f"steps during which the prototypes are not updated (default {d('freeze_prototypes_steps')})")
        g.add_argument("--small-crops", type=_non_negative_int, metavar="N",
                       help=f"multi-crop: extra half-resolution crops per image, 0 for two views only (default {d('small_crops')})")
        g.add_argument("--sinkhorn-iterations", type=_positive_int, metavar="N", help=f"Sinkhorn iterations (default {d('sinkhorn_iterations')})")
        g.add_argument("--sinkhorn-epsilon", type=_positive_float, metavar="EPS", help=f"Sinkhorn entropy weight (default {d('sinkhorn_epsilon')})")
    if method == "simclr":
        g.add_argument("--dist-impl", choices=("gather", "ring"),
                       help="under torchrun: how nt_xent meets the other ranks' negatives: gather (all-gather the "
                            "features, reduce-scatter their gradients) or ring (pass blocks rank to rank, overlapping "
                            "compute); the same numbers (default gather)")
    if method != "moco":  # MoCo shuffles its keys' BatchNorm batches instead
        g.add_argument("--sync-bn", action="store_true", default=None,
                       help="under torchrun: BatchNorm statistics over the global batch (all ranks; SimCLR's global "
                            "BN, gloo or NCCL) instead of each rank's own slice; no effect on one process")
    g.add_argument("--seed", type=_non_negative_int, help=f"seeds the model, batch order and augmentations (default {d('seed')})")

    g = p.add_argument_group("loss and hardware")
    g.add_argument("--loss-backend", choices=LOSS_BACKENDS,
                   help="cl_fast loss backend: auto (fastest fused one here), torch (the pure-PyTorch reference), "
                        "cpu (fused C++), triton, cuda (default auto)")
    g.add_argument("--precision", choices=("fp32", "bf16"), help="fp32, or bf16 autocast for the networks (default fp32)")
    g.add_argument("--device", type=_device, help="cpu or cuda[:i] (default cpu)")
    g.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads (torch.set_num_threads; default 1: the small default model is fastest on one "
                        "thread, and on a busy machine extra threads mostly wait for each other)")

    g = p.add_argument_group("model")
    g.add_argument("--width", type=_positive_int, help="encoder width: conv channels w, 2w, 4w, 4w; representation 4w (default 8 on digits, 32 otherwise)")
    g.add_argument("--hidden-dim", type=_positive_int, metavar="H", help=f"hidden width of the MLP heads (default {d('hidden_dim')})")
    g.add_argument("--feature-dim", type=_positive_int, metavar="D", help=f"projection (loss) dimension D (default {d('feature_dim')})")

    g = p.add_argument_group("data, output, checkpoints")
    g.add_argument("--data", metavar="PATH",
                   help="'digits' (default: scikit-learn's bundled 8x8 digits), a folder of CIFAR-10 python batches "
                        "(data_batch_1..5, test_batch), or an image folder with one subfolder per class; never downloaded")
    g.add_argument("--image-size", type=_positive_int, metavar="PX", help="images are resized to PX x PX (default 16 digits, 32 otherwise)")
    g.add_argument("--out", metavar="DIR", help=f"output folder (default runs/{method})")
    g.add_argument("--resume", metavar="CKPT", help="continue exactly from this checkpoint.pt (same method and shapes)")
    g.add_argument("--save-every", type=_positive_int, metavar="N", help="checkpoint every N steps (default: every epoch)")
    g.add_argument("--stop-at", type=_positive_int, metavar="STEP",
                   help="stop after this step with a checkpoint, as Ctrl-C does (the schedule still spans the whole run)")
    g.add_argument("--no-eval", dest="eval", action="store_false", default=None, help="skip the kNN / linear-probe evaluation")
    g.add_argument("--no-plot", dest="plot", action="store_false", default=None, help="do not write loss_curve.png")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    g.add_argument("--knn-k", type=_positive_int, metavar="K", help=f"neighbours of the kNN evaluation (default {d('knn_k')})")
    return p


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cl_fast train",
        description="Self-supervised training with cl_fast's fused losses: SimCLR, MoCo v2, BYOL, SwAV. "
                    "Prints the kNN and linear-probe accuracy of the trained encoder against the same encoder "
                    "at random init, the first and last loss, and writes a loss curve.",
    )
    sub = parser.add_subparsers(dest="method", required=True, metavar="{simclr,moco,byol,swav}")
    for method in METHODS:
        _add_method_parser(sub, method)
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Fill unset flags (checkpoint's values with --resume, else the method's defaults) and build
    the RunConfig. Errors go through parser.error (exit 2, nothing written)."""
    from . import checkpoint as ckpt
    from .loop import RunConfig

    values = {k: v for k, v in vars(args).items() if k != "method"}
    saved = {}
    if values.get("resume"):
        try:
            payload = ckpt.load(values["resume"])
        except ckpt.CheckpointError as exc:
            parser.error(str(exc))
        saved = dict(payload.get("config", {}))
        saved.update(saved.pop("method_config", {}))
        if payload.get("method") != args.method:
            parser.error(str(_method_mismatch(payload, values["resume"], args.method)))
    names = set(values) | set(COMMON_DEFAULTS) | set(METHODS[args.method].defaults) | set(METHOD_DEFAULTS.get(args.method, {}))
    for name in names:
        if values.get(name) is None:
            if name in saved and name not in ("resume", "stop_at"):
                values[name] = saved[name]
            else:
                values[name] = _default(args.method, name)
    if values.get("width") is None:  # digits are easy: a narrow encoder, so random init is a weak baseline
        values["width"] = 8 if values.get("data") in (None, "digits") else 32
    for flag in ("eval", "progress", "plot"):
        if values.get(flag) is None:
            values[flag] = saved.get(flag, True) if flag != "progress" else True
    if values.get("out") is None:
        values["out"] = os.path.join("runs", args.method)
    if values["loss_backend"] not in ("auto", "torch"):
        import cl_fast

        device = values["device"].split(":")[0]
        families = {"simclr": "infonce", "moco": "moco", "byol": "byol", "swav": "sinkhorn"}
        here = cl_fast.backends(families[args.method], device)
        if values["loss_backend"] not in here:
            parser.error(f"argument --loss-backend: {values['loss_backend']!r} cannot run {args.method}'s loss on "
                         f"{device} tensors here; available: {', '.join(['auto'] + here)}")
    if args.method == "moco":
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        keys_per_step = 2 * values["batch_size"] * ranks  # both views' keys, all ranks' (gathered)
        if values["queue_size"] < keys_per_step:
            parser.error(f"argument --queue-size: {values['queue_size']} is smaller than the {keys_per_step} keys "
                         f"enqueued per step (2 views x batch size {values['batch_size']} x {ranks} rank(s))")
    if values.get("threads"):
        import torch

        torch.set_num_threads(values["threads"])
    method_config = MethodConfig(**{k: values[k] for k in MethodConfig.__dataclass_fields__ if values.get(k) is not None})
    run_fields = {k: values[k] for k in RunConfig.__dataclass_fields__ if k not in ("method", "method_config")}
    return RunConfig(method=args.method, method_config=method_config, **run_fields)


def _method_mismatch(payload, path, method):
    from .checkpoint import CheckpointError

    return CheckpointError(
        f"--resume: {path} is a {payload.get('method')} checkpoint, not {method}; "
        f"resume it with `python -m cl_fast train {payload.get('method')} --resume {path}`"
    )


def parse(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    return resolve(args, parser), parser


def run(argv=None, log=print):
    """Parse, train, report; returns the RunResult (tests call this). Errors in the data or the
    checkpoint exit through parser.error like a bad flag, before anything is written."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .loop import train

    import torch

    threads = torch.get_num_threads()
    try:
        config, parser = parse(argv)
        subparser = parser._subparsers._group_actions[0].choices[config.method]
        try:
            return train(config, METHODS, log=log)
        except (DataError, CheckpointError) as exc:
            subparser.error(str(exc))
    finally:
        torch.set_num_threads(threads)  # --threads applies to this run only


def main(argv=None) -> int:
    result = run(argv)
    return 130 if result.interrupted else 0
