"""The trainers' measurement table: every method with its defaults on the fused and the reference
loss backend side by side, then a few large-batch steps per method and backend for the loss's
share of the step time.

    python -m cl_fast.train.table --out benchmarks/results/train_digits.md [--methods simclr,moco]
        [--large-batch 4096 --large-steps 3] [--runs-dir /tmp/cl_fast_train_table]

Each run is a separate `python -m cl_fast train ...` process (timed from the outside, import and
evaluation included); its metrics.json gives accuracy, samples/s and the loss share.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time


def _run(argv: list[str], out: str) -> dict:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "cl_fast", "train", *argv, "--no-progress", "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    metrics["wall_seconds"] = wall
    metrics["stdout"] = proc.stdout
    return metrics


def _acc(metrics: dict, probe: str) -> str:
    acc = metrics.get("accuracy")
    if not acc:
        return "-"
    return f"{acc['trained'][probe]:.1f} ({acc['random_init'][probe]:.1f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cl_fast.train.table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="simclr,moco,byol,swav")
    p.add_argument("--backends", default="cpu,torch", help="loss backends, side by side (default cpu,torch)")
    p.add_argument("--large-batch", type=int, default=4096)
    p.add_argument("--large-steps", type=int, default=3)
    p.add_argument("--extra", default="", help="extra flags for every run, e.g. '--threads 2'")
    p.add_argument("--runs-dir", default="/tmp/cl_fast_train_table")
    p.add_argument("--skip-default", action="store_true", help="only the large-batch rows")
    p.add_argument("--out", required=True, help="markdown file for the table")
    args = p.parse_args(argv)
    methods, backends, extra = args.methods.split(","), args.backends.split(","), args.extra.split()
    load_before = os.getloadavg()
    rows = []
    for method in methods if not args.skip_default else []:
        for backend in backends:
            m = _run([method, "--loss-backend", backend, *extra], os.path.join(args.runs_dir, f"{method}-{backend}"))
            rows.append(("default", method, backend, m))
            print(f"{method} {backend}: {m['stdout'].strip().splitlines()[-5:]}", flush=True)
    if args.large_steps > 0:
        for method in methods:
            for backend in backends:
                queue = ["--queue-size", str(4 * args.large_batch)] if method == "moco" else []  # >= 2 views x batch
                m = _run([method, "--loss-backend", backend, "--batch-size", str(args.large_batch), "--steps",
                          str(args.large_steps), "--no-eval", "--no-plot", *queue, *extra],
                         os.path.join(args.runs_dir, f"{method}-{backend}-large"))
                rows.append(("large", method, backend, m))
                print(f"{method} {backend} large: {m['stdout'].strip().splitlines()[0]}", flush=True)
    load_after = os.getloadavg()
    lines = [
        f"# Trainers on digits: fused (`cpu`) vs reference (`torch`) loss backend",
        "",
        f"{datetime.datetime.now().isoformat(timespec='minutes')}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after (the machine is shared: timings are noisy; "
        "fused and torch rows of one method ran back to back).",
        "",
        "Command: `python -m cl_fast.train.table " + " ".join(sys.argv[1:] if argv is None else argv) + "`",
        "",
        "| method | loss backend | batch | steps | kNN % trained (random init) | linear % trained (random init) "
        "| first / last loss | wall time | samples/s | loss share of step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, method, backend, m in rows:
        lines.append(
            f"| {method} | {backend} | {m['batch_size']} | {m['steps']} | {_acc(m, 'knn')} | {_acc(m, 'linear')} "
            f"| {m['first_loss']:.3f} / {m['last_loss']:.3f} | {m['wall_seconds']:.0f} s | {m['samples_per_second']:.0f} "
            f"| {100 * m['loss_share']:.1f}% |"
        )
    lines += ["", "Wall time is the whole process (import, data, training, both evaluations, plot); samples/s and the "
              "loss share are over the training steps after the first. Large-batch rows: a few steps, no evaluation.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
