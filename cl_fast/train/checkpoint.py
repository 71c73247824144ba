"""Checkpoints: everything a run needs to continue exactly where it stopped.

One file (torch.save of a dict): the method's state (networks, momentum/EMA targets, queue,
prototypes), the optimiser, the LR scheduler, the step, every RNG the run draws from (torch's
global generators, the augmentation generators, Python's and NumPy's), the loss history, the
encoder's random-init weights (to evaluate the same encoder at random init later) and the run's
settings. Written atomically (a temporary file, then a rename), so an interrupted save never
leaves a broken checkpoint behind.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

FORMAT = "cl_fast.train/1"


class CheckpointError(ValueError):
    """--resume names a file that is not a checkpoint of this method and shape."""


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(path: str, payload: dict) -> None:
    payload = dict(payload, format=FORMAT)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: str) -> dict:
    """The checkpoint's dict; CheckpointError when the file is missing or not a checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: {path} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one user error
        raise CheckpointError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"--resume: {path} is not a cl_fast.train checkpoint (format {FORMAT!r})")
    return payload


def check_compatible(payload: dict, path: str, method: str, shape: dict) -> None:
    """The checkpoint must come from the same method with the same shapes (and data set)."""
    if payload["method"] != method:
        raise CheckpointError(
            f"--resume: {path} is a {payload['method']} checkpoint, not {method}; "
            f"resume it with `python -m cl_fast train {payload['method']} --resume {path}`"
        )
    diffs = [f"{key}={payload['shape'].get(key)!r} in the checkpoint, {value!r} now"
             for key, value in shape.items() if payload["shape"].get(key) != value]
    if diffs:
        raise CheckpointError(f"--resume: {path} was trained with a different shape: " + "; ".join(diffs))
