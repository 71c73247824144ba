"""Reference self-supervised trainers on cl_fast's fused losses: SimCLR, MoCo v2, BYOL, SwAV.

    python -m cl_fast train {simclr,moco,byol,swav} [--epochs --batch-size --lr --temperature
        --loss-backend --precision --data --out --resume --seed --device ...]

Layout: data.py (digits / CIFAR-10 / image folders), augment.py (batched torch augmentations on
the tensors' device), models.py (encoder, heads, EMA), schedule.py (warm-up + cosine LR, BYOL's
tau), base.py (what a method provides), simclr.py / moco.py / byol.py / swav.py (one per
method), loop.py (the shared loop, timing, checkpoints, report), evaluate.py (kNN, linear probe),
checkpoint.py, cli.py.
"""
from .cli import METHODS, main, run

__all__ = ["METHODS", "main", "run"]
