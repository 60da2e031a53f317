"""Datasets: the IDX reader, the embedded MNIST, the dataset registry, splits and batching.

Owns everything between files on disk and (inputs, targets) batches. MNIST ships inside the
package; other datasets (Fashion-MNIST as IDX, CIFAR-10 as python pickles, ImageNet as an
ImageFolder tree; see ``vision_data``) are found in ``--data-dir``, then the ``SENSPRUNE_DATA``
environment variable, then ``~/.cache/sensprune``. A deterministic validation split is carved
out of the training set (it chooses thresholds); the test set is only used for reporting.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import DataError

EMBEDDED_DIR = Path(__file__).parent / "datasets"

# IDX magic numbers: 0x0801 = uint8 vector (labels), 0x0803 = uint8 rank-3 tensor (images).
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embedded: bool = False
    layout: str = "idx"  # idx | cifar | imagefolder


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), embedded=True),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), layout="cifar"),
    "imagenet": DatasetInfo("imagenet", 1000, (3, 224, 224), (0.485, 0.456, 0.406),
                            (0.229, 0.224, 0.225), layout="imagefolder"),
}


def read_idx(path: Path, rank: int) -> np.ndarray:
    """Read one (optionally gzip-compressed) IDX file of uint8 values with the given rank."""
    fix = "re-copy the file from the original dataset (e.g. ../shared/data/)"
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; put the IDX files there or pass --data-dir") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc}); {fix}") from None
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes); {fix}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[rank]:
        raise DataError(
            f"{path}: wrong magic number 0x{magic:08x} (expected 0x{_IDX_MAGIC[rank]:08x}, "
            f"a uint8 IDX file of rank {rank}); is this the right file? {fix}"
        )
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: truncated or padded data ({len(raw) - header} bytes, expected {expected} "
            f"for shape {tuple(dims)}); {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def data_base(data_dir: str | os.PathLike | None = None) -> Path:
    """The one data root: --data-dir, then $SENSPRUNE_DATA, then ~/.cache/sensprune."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("SENSPRUNE_DATA"):
        return Path(os.environ["SENSPRUNE_DATA"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sensprune"


def find_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where the IDX files of dataset ``name`` live (see the module docstring for the order):
    under the data root (``data_base``), in ``<root>/<name>``, ``<root>`` or their ``raw/``;
    the embedded MNIST when no root was given and none holds it."""
    info = dataset_info(name)
    explicit = data_dir is not None or bool(os.environ.get("SENSPRUNE_DATA"))
    if info.embedded and not explicit:
        return EMBEDDED_DIR / name
    base = data_base(data_dir)
    candidates = [base / name, base] if explicit else [base / name]
    for c in candidates:
        for sub in (c, c / "raw"):
            if any((sub / (f + ext)).exists() for f in _FILES["train"] for ext in ("", ".gz")):
                return sub
    if info.embedded and data_dir is None:
        return EMBEDDED_DIR / name
    where = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"dataset '{name}' not found (looked in {where}); pass --data-dir DIR holding "
        f"{name}/train-images-idx3-ubyte.gz and the other IDX files, or set SENSPRUNE_DATA"
    )


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def _idx_path(directory: Path, stem: str) -> Path:
    for ext in (".gz", ""):
        if (directory / (stem + ext)).exists():
            return directory / (stem + ext)
    return directory / (stem + ".gz")


def load_split(name: str, split: str, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw uint8 images (N, 28, 28) and int64 labels (N,) of ``split`` ('train' or 'test')."""
    directory = find_data_dir(name, data_dir)
    img_stem, lab_stem = _FILES[split]
    images = read_idx(_idx_path(directory, img_stem), 3)
    labels = read_idx(_idx_path(directory, lab_stem), 1)
    if len(images) != len(labels):
        raise DataError(
            f"{directory}: {len(images)} images but {len(labels)} labels in the {split} split; "
            "the files come from different datasets"
        )
    info = dataset_info(name)
    if tuple(images.shape[1:]) != tuple(info.input_shape[-2:]):
        raise DataError(f"{directory}: {split} images are {images.shape[1]}x{images.shape[2]}, a "
                        f"{name} model takes {info.input_shape[-2]}x{info.input_shape[-1]}; "
                        "pass the right --data-dir or --dataset")
    if len(labels) and int(labels.max()) >= info.num_classes:
        raise DataError(f"{directory}: {split} labels go up to {int(labels.max())}, {name} has "
                        f"{info.num_classes} classes (0-{info.num_classes - 1}); these files are "
                        "not that dataset")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


Data = "tuple[torch.Tensor, torch.Tensor] | torch.utils.data.Dataset"


@dataclass
class Splits:
    """Train / validation / test data, plus the dataset's facts. Each split is either a pair
    of in-memory tensors (normalized inputs, labels) or a ``Dataset`` (ImageNet)."""

    info: DatasetInfo
    train: Data
    val: Data
    test: Data
    augment: bool = False  # random crop + flip of in-memory training batches (CIFAR-10)


def _normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    from .vision_data import normalize_images
    if images.dim() == 3:
        images = images.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
    return normalize_images(images, info.mean, info.std)


def background(info: DatasetInfo) -> tuple[float, ...]:
    """The normalized value of a black pixel, per channel: what a translated image's
    uncovered border is filled with."""
    return tuple(-m / s for m, s in zip(info.mean, info.std))


def num_samples(data: Data) -> int:
    return len(data[1]) if isinstance(data, tuple) else len(data)


def _root(name: str, data_dir) -> Path:
    """Root folder of a non-IDX dataset under the data root (``data_base``)."""
    base = data_base(data_dir)
    return base / name if (base / name).is_dir() else base


def _split_indices(n: int, val_size: int, limit_train, split_seed: int):
    if not 0 <= val_size < n:
        raise DataError(f"val_size={val_size} must be in [0, {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if limit_train is not None:
        if limit_train <= 0:
            raise DataError(f"--limit-train must be a positive number of samples, got {limit_train}")
        train_idx = train_idx[:limit_train]
    return train_idx, val_idx


def load_dataset(
    name: str = "mnist",
    data_dir=None,
    val_size: int = 5000,
    limit_train: int | None = None,
    split_seed: int = 0,
) -> Splits:
    """Load a dataset and split it: a fixed, seeded ``val_size`` held out of the training set.

    The split depends only on ``split_seed`` (not the training seed), so every run and every
    method sees the same validation samples. ``limit_train`` keeps the first N training
    samples after the split (for quick runs).
    """
    info = dataset_info(name)
    if info.layout == "imagefolder":
        return _load_imagefolder(info, data_dir, val_size, limit_train, split_seed)
    if info.layout == "cifar":
        from .vision_data import load_cifar10
        (x_tr, y_tr), (x_te, y_te) = load_cifar10(_root(name, data_dir))
    else:
        x_tr, y_tr = load_split(name, "train", data_dir)
        x_te, y_te = load_split(name, "test", data_dir)
    train_idx, val_idx = _split_indices(len(x_tr), val_size, limit_train, split_seed)
    return Splits(
        info=info,
        train=(_normalize(x_tr[train_idx], info), y_tr[train_idx]),
        val=(_normalize(x_tr[val_idx], info), y_tr[val_idx]),
        test=(_normalize(x_te, info), y_te),
        augment=info.layout == "cifar",
    )


def _load_imagefolder(info, data_dir, val_size, limit_train, split_seed) -> Splits:
    from torch.utils.data import Subset

    from .vision_data import ImageFolderDataset
    root = _root(info.name, data_dir)
    size = info.input_shape[-1]
    train_aug = ImageFolderDataset(root / "train", True, size, info.mean, info.std)
    train_eval = ImageFolderDataset(root / "train", False, size, info.mean, info.std,
                                    classes=train_aug.classes)
    test = ImageFolderDataset(root / "val", False, size, info.mean, info.std,
                              classes=train_aug.classes)
    train_idx, val_idx = _split_indices(len(train_aug), val_size, limit_train, split_seed)
    return Splits(info=info, train=Subset(train_aug, train_idx.tolist()),
                  val=Subset(train_eval, val_idx.tolist()), test=test)


def batches(
    data: Data,
    batch_size: int,
    shuffle_seed: int | None = None,
    augment: bool = False,
    workers: int = 0,
    shift: int = 0,
    fill: tuple[float, ...] = (0.0,),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches, shuffled by a generator seeded with ``shuffle_seed``.

    A seeded permutation per epoch (seed = run seed + epoch) makes an epoch reproducible on
    its own, which is what makes resume-from-checkpoint exact. In-memory tensors are sliced
    directly (optionally augmented: ``augment`` crops and flips, ``shift`` > 0 translates by
    up to that many pixels, the border filled with ``fill`` per channel); a ``Dataset`` goes
    through a ``DataLoader``.
    """
    n = num_samples(data)
    order = None
    if shuffle_seed is not None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    if not isinstance(data, tuple):
        loader = torch.utils.data.DataLoader(
            data, batch_size=batch_size, num_workers=workers,
            sampler=order.tolist() if order is not None else None)
        yield from loader
        return
    x, y = data
    gen = torch.Generator().manual_seed((shuffle_seed or 0) + 7) if augment or shift else None
    from .vision_data import crop_flip, random_shift
    fill_values = torch.tensor(fill)  # once per epoch, not per batch
    for start in range(0, n, batch_size):
        idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
        xb = x[idx]
        if augment:
            xb = crop_flip(xb, gen)
        if shift:
            xb = random_shift(xb, gen, shift, fill_values)
        yield xb, y[idx]
