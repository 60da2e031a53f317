"""Datasets: the IDX reader, the embedded MNIST, the dataset registry, splits and batching.

Owns everything between files on disk and (inputs, targets) batches. MNIST ships inside the
package; other IDX datasets (Fashion-MNIST) are found in ``--data-dir``, then the
``SENSPRUNE_DATA`` environment variable, then ``~/.cache/sensprune``. A deterministic
validation split is carved out of the training set (it chooses thresholds); the test set is
only ever used for reporting.
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
    mean: float
    std: float
    embedded: bool = False
    train_size: int = 60_000
    test_size: int = 10_000


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), 0.1307, 0.3081, embedded=True),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), 0.2860, 0.3530),
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


def find_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where the IDX files of dataset ``name`` live (see the module docstring for the order)."""
    info = dataset_info(name)
    candidates: list[Path] = []
    if data_dir is not None:
        candidates += [Path(data_dir) / name, Path(data_dir)]
    elif os.environ.get("SENSPRUNE_DATA"):
        env = Path(os.environ["SENSPRUNE_DATA"])
        candidates += [env / name, env]
    else:
        if info.embedded:
            return EMBEDDED_DIR / name
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sensprune"
        candidates += [cache / name]
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
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


@dataclass
class Splits:
    """Normalized float tensors for train / validation / test, plus the dataset's facts."""

    info: DatasetInfo
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def _normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    x = images.float().div_(255.0).sub_(info.mean).div_(info.std)
    return x.unsqueeze(1)  # (N, 1, 28, 28)


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
    x_tr, y_tr = load_split(name, "train", data_dir)
    x_te, y_te = load_split(name, "test", data_dir)
    if not 0 <= val_size < len(x_tr):
        raise DataError(f"val_size={val_size} must be in [0, {len(x_tr)})")
    perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if limit_train is not None:
        if limit_train <= 0:
            raise DataError(f"--limit-train must be a positive number of samples, got {limit_train}")
        train_idx = train_idx[:limit_train]
    return Splits(
        info=info,
        train=(_normalize(x_tr[train_idx], info), y_tr[train_idx]),
        val=(_normalize(x_tr[val_idx], info), y_tr[val_idx]),
        test=(_normalize(x_te, info), y_te),
    )


def batches(
    data: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    shuffle_seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of in-memory tensors; shuffled by a generator seeded with ``shuffle_seed``.

    A seeded permutation per epoch (seed = run seed + epoch) makes an epoch reproducible on
    its own, which is what makes resume-from-checkpoint exact.
    """
    x, y = data
    n = len(x)
    if shuffle_seed is None:
        order = None
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    for start in range(0, n, batch_size):
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
