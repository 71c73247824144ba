"""Data for the trainers: images as float tensors in [0, 1], (N, C, H, W), with integer labels.

Three sources, all read from disk that is already there (nothing is ever downloaded):
- "digits" (the default): scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
  classes), upsampled to `image_size` and split train/test with a fixed stratified split;
- CIFAR-10's python batches: a folder holding data_batch_1..5 and test_batch (or its parent,
  holding cifar-10-batches-py/);
- an image folder: one subfolder per class, images read with PIL, resized to `image_size`,
  split train/test (a `train/` and `test/` pair of such folders is used as given).

The batch order is a pure function of (seed, step), so a resumed run draws the same batches.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class DataError(ValueError):
    """--data names something that is missing or not a data set this module reads."""


@dataclass
class Dataset:
    name: str
    train_images: Tensor  # (N, C, H, W) float32 in [0, 1]
    train_labels: Tensor  # (N,) int64
    test_images: Tensor
    test_labels: Tensor
    classes: int

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    def to(self, device) -> "Dataset":
        return Dataset(
            self.name, self.train_images.to(device), self.train_labels.to(device),
            self.test_images.to(device), self.test_labels.to(device), self.classes,
        )


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): `test_fraction` of every class goes to test, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = max(1, int(round(len(members) * test_fraction))) if len(members) > 1 else 0
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)


def load_digits(image_size: int = 16) -> Dataset:
    """scikit-learn's digits (ships inside the package: offline), 80/20 stratified split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    train, test = _stratified_split(labels, 0.2, seed=0)
    images = _resize(images, image_size)
    labels = torch.from_numpy(labels)
    return Dataset("digits", images[train], labels[train], images[test], labels[test], 10)


def _read_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(f"--data: {path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None


def _cifar_batch(path: str) -> tuple[Tensor, Tensor]:
    batch = _read_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"--data: {path} is not a CIFAR-10 python batch (no b'data' / b'labels' entries)")
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataError(f"--data: {path} holds data of shape {data.shape} ({data.dtype}); CIFAR-10 has (n, 3072) uint8")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    labels = torch.as_tensor(np.asarray(batch[b"labels"], dtype=np.int64))
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"--data: {path} has {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def load_cifar10(folder: str, image_size: int = 32) -> Dataset:
    """CIFAR-10's python batches (the cifar-10-python.tar.gz layout), already extracted on disk."""
    parts = [_cifar_batch(os.path.join(folder, name)) for name in CIFAR_TRAIN]
    test_images, test_labels = _cifar_batch(os.path.join(folder, "test_batch"))
    train_images = torch.cat([images for images, _ in parts])
    train_labels = torch.cat([labels for _, labels in parts])
    return Dataset(
        "cifar10", _resize(train_images, image_size), train_labels, _resize(test_images, image_size), test_labels, 10,
    )


def _class_folders(root: str) -> list[tuple[str, list[str]]]:
    """[(class name, image paths)] for the subfolders of `root` that hold images, sorted by name."""
    classes = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        files = sorted(
            os.path.join(entry.path, name) for name in os.listdir(entry.path) if name.lower().endswith(IMAGE_SUFFIXES)
        )
        if files:
            classes.append((entry.name, files))
    return classes


def _read_images(paths: list[str], image_size: int, mode: str) -> Tensor:
    from PIL import Image

    out = np.empty((len(paths), image_size, image_size, len(mode)), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image = image.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                out[i] = np.asarray(image).reshape(image_size, image_size, len(mode))
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; all mean "not an image"
            raise DataError(f"--data: cannot read image {path} ({type(exc).__name__}: {exc})") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


def _folder_mode(classes: list[tuple[str, list[str]]]) -> str:
    """'L' when the first images are all greyscale, else 'RGB'."""
    from PIL import Image

    probe = [files[0] for _, files in classes[:8]]
    modes = set()
    for path in probe:
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"--data: cannot read image {path} ({type(exc).__name__}: {exc})") from None
    return "L" if modes <= {"L", "1", "I", "I;16"} else "RGB"


def load_image_folder(root: str, image_size: int = 32, seed: int = 0) -> Dataset:
    """One subfolder per class; or train/ and test/ each holding such subfolders (the same classes)."""
    split = [os.path.join(root, part) for part in ("train", "test")]
    if all(os.path.isdir(path) for path in split) and _class_folders(split[0]) and _class_folders(split[1]):
        train_classes, test_classes = _class_folders(split[0]), _class_folders(split[1])
        names = [name for name, _ in train_classes]
        if [name for name, _ in test_classes] != names:
            raise DataError(f"--data: {split[0]} and {split[1]} must hold the same class subfolders")
        mode = _folder_mode(train_classes)
        tensors = []
        for classes in (train_classes, test_classes):
            paths = [path for _, files in classes for path in files]
            labels = torch.tensor([c for c, (_, files) in enumerate(classes) for _ in files])
            tensors += [_read_images(paths, image_size, mode), labels]
        return Dataset(f"folder:{os.path.basename(os.path.normpath(root))}", *tensors, len(names))
    classes = _class_folders(root)
    if len(classes) < 2:
        raise DataError(
            f"--data: {root} is neither CIFAR-10 python batches (data_batch_1..5, test_batch) nor an image folder "
            f"(at least two subfolders, one per class, holding {'/'.join(IMAGE_SUFFIXES[:3])}... images); "
            f"found {len(classes)} class subfolder(s) with images"
        )
    mode = _folder_mode(classes)
    paths = [path for _, files in classes for path in files]
    labels = np.array([c for c, (_, files) in enumerate(classes) for _ in files], dtype=np.int64)
    train, test = _stratified_split(labels, 0.2, seed=seed)
    images = _read_images(paths, image_size, mode)
    labels = torch.from_numpy(labels)
    return Dataset(
        f"folder:{os.path.basename(os.path.normpath(root))}", images[train], labels[train], images[test], labels[test],
        len(classes),
    )


def load(data: str | None, image_size: int | None = None) -> Dataset:
    """The data set --data names (None or "digits": the bundled digits). Raises DataError."""
    if data is None or data == "digits":
        return load_digits(image_size or 16)
    if not os.path.exists(data):
        raise DataError(f"--data: {data} does not exist (data is never downloaded; give a folder already on disk)")
    if not os.path.isdir(data):
        raise DataError(f"--data: {data} is a file; give the folder holding CIFAR-10's python batches or an image folder")
    for folder in (data, os.path.join(data, "cifar-10-batches-py")):
        present = [name for name in CIFAR_TRAIN + ("test_batch",) if os.path.isfile(os.path.join(folder, name))]
        if present:
            missing = sorted(set(CIFAR_TRAIN + ("test_batch",)) - set(present))
            if missing:
                raise DataError(f"--data: {folder} looks like CIFAR-10's python batches but lacks {', '.join(missing)}")
            return load_cifar10(folder, image_size or 32)
    return load_image_folder(data, image_size or 32)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """The sample indices of batch `step`: a window of the endless stream of per-epoch permutations.

    Epoch e's permutation is drawn from a generator seeded with (seed, e), so the batch of any
    step is known without replaying the ones before it (exact resume); a batch larger than the
    data set spans several epochs.
    """
    start = step * batch_size
    parts, position = [], start
    while position < start + batch_size:
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(n - offset, start + batch_size - position)
        parts.append(perm[offset: offset + take])
        position += take
    return torch.cat(parts)
