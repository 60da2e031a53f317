"""CIFAR-10 (the standard python batches, read from their pickle opcodes without unpickling)
and ImageNet (ImageFolder layout).

CIFAR-10 is read into memory (150 MB) and augmented per batch (4-pixel padded random crop and
horizontal flip). ImageNet is a lazily decoded ``Dataset`` over ``<dir>/train/<class>/*`` and
``<dir>/val/<class>/*`` with the standard transforms (RandomResizedCrop 224 + flip for
training; resize 256 + center crop 224 for evaluation), through torchvision when it imports
and through a small PIL implementation of the same transforms otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")


# -- CIFAR-10 --------------------------------------------------------------------------------------
def _cifar_dir(root: Path) -> Path:
    for d in (root, root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py",
              root / "cifar10"):
        if (d / "data_batch_1").exists():
            return d
    raise DataError(f"CIFAR-10 not found under {root}; pass --data-dir DIR holding "
                    "cifar-10-batches-py/ (data_batch_1..5, test_batch)")


_CIFAR_MAX_BYTES = 64 << 20  # a CIFAR-10 python batch is about 31 MB
_INT_OPS = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4"}
# bookkeeping between a key and its list (memo, framing; protocol 2 from Python 3 spells a
# bytes key as _codecs.encode(str, 'latin1'): a tuple and a call), and inside the list
_MEMO_OPS = {"BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE", "FRAME", "BINGET", "LONG_BINGET", "GET"}
_BEFORE_LIST_OPS = _MEMO_OPS | {"TUPLE2", "REDUCE", "GLOBAL", "STACK_GLOBAL"}
_IN_LIST_OPS = _MEMO_OPS | {"MARK", "APPEND", "APPENDS"}


def _cifar_arrays(raw: bytes) -> tuple[bytes, list[int]]:
    """The image bytes and the label list of a CIFAR-10 python batch, read from its pickle
    opcodes (``pickletools.genops``) without unpickling it: nothing in the file is called or
    built. The images are the longest byte string (the uint8 array's buffer), the labels the
    integers of the list that follows the key 'labels'."""
    import io
    import pickletools

    blob, labels, state = b"", [], "none"  # state: none, key (labels seen), list (inside it)
    for op, arg, _ in pickletools.genops(io.BytesIO(raw)):
        name = op.name
        if state == "key":
            if name in ("EMPTY_LIST", "LIST"):
                state = "list"
                continue
            if name in _BEFORE_LIST_OPS or arg == "latin1":
                continue
            state = "none"
        elif state == "list":
            if name in _INT_OPS:
                labels.append(int(arg))
                continue
            if name in _IN_LIST_OPS:
                continue
            state = "none"
        if isinstance(arg, (str, bytes, bytearray)):
            if arg in ("labels", b"labels"):
                state, labels = "key", []
            elif len(arg) > len(blob):  # a py2 str (BINSTRING) or py3 bytes: the array's buffer
                blob = arg.encode("latin-1", "replace") if isinstance(arg, str) else bytes(arg)
    return blob, labels


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        size = path.stat().st_size
        if size > _CIFAR_MAX_BYTES:
            raise DataError(f"{path}: {size} bytes, larger than a CIFAR-10 batch (about 31 MB); "
                            "re-download cifar-10-python.tar.gz")
        blob, labels = _cifar_arrays(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; the CIFAR-10 folder is incomplete") from None
    except DataError:
        raise
    except Exception as exc:  # not a pickle stream, truncated, an unknown opcode
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}); "
                        "re-download cifar-10-python.tar.gz") from None
    if not labels or len(blob) != len(labels) * 3072:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({len(labels)} labels, "
                        f"{len(blob)} image bytes, want 3072 per label); re-download "
                        "cifar-10-python.tar.gz")
    data = np.frombuffer(blob, dtype=np.uint8).reshape(-1, 3, 32, 32).copy()
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels outside 0-9; not a CIFAR-10 batch")
    return data, labels


def load_cifar10(root: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images uint8 (N,3,32,32), labels), (test images, labels))."""
    d = _cifar_dir(root)
    parts = [_read_cifar_batch(d / f"data_batch_{i}") for i in range(1, 6)]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(d / "test_batch")
    return ((torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
            (torch.from_numpy(x_te), torch.from_numpy(y_te)))


def normalize_images(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, per-channel normalized."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (after zero padding) and horizontal flip of a batch, per sample."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def random_shift(x: torch.Tensor, generator: torch.Generator, pad: int,
                 fill: torch.Tensor) -> torch.Tensor:
    """Translate each image of a batch by its own random offset in [-pad, pad]^2, the
    uncovered border filled with ``fill`` (per channel: the normalized background)."""
    n, c, h, w = x.shape
    fill = fill.to(x.dtype).view(1, c, 1, 1)
    padded = torch.nn.functional.pad(x - fill, (pad, pad, pad, pad)) + fill
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


# -- ImageFolder (ImageNet) ------------------------------------------------------------------------
def _try_torchvision():
    try:  # PyPI's torchvision may fail to import beside some torch builds: then use PIL
        from torchvision import transforms
        return transforms
    except Exception:
        return None


def _uniform(a: float, b: float) -> float:
    return a + (b - a) * float(torch.rand(()))


class _PilTransforms:
    """RandomResizedCrop(size) + flip for training, Resize(256) + CenterCrop(size) for eval.
    The draws come from torch's generator, as torchvision's do: seeded by the training loop
    for every epoch, and per worker by the DataLoader."""

    def __init__(self, train: bool, size: int, mean, std):
        self.train, self.size, self.mean, self.std = train, size, mean, std

    def _random_resized_crop(self, img):
        w, h = img.size
        area = w * h
        for _ in range(10):
            target = area * _uniform(0.08, 1.0)
            ratio = math.exp(_uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x0 = int(torch.randint(0, w - cw + 1, ()))
                y0 = int(torch.randint(0, h - ch + 1, ()))
                return img.resize((self.size, self.size), box=(x0, y0, x0 + cw, y0 + ch))
        s = min(w, h)
        return img.resize((self.size, self.size), box=((w - s) // 2, (h - s) // 2,
                                                       (w - s) // 2 + s, (h - s) // 2 + s))

    def __call__(self, img):
        from PIL import Image
        if self.train:
            img = self._random_resized_crop(img)
            if float(torch.rand(())) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            w, h = img.size
            scale = 256 / min(w, h)
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))))
            w, h = img.size
            x0, y0 = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((x0, y0, x0 + self.size, y0 + self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return normalize_images(x.unsqueeze(0), self.mean, self.std)[0]


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/<image>`` files; classes sorted by name, as torchvision's ImageFolder."""

    def __init__(self, root: Path, train: bool, size: int = 224, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, classes: list[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: not a directory; expected an ImageFolder layout "
                            "(<dir>/train/<class>/*.JPEG and <dir>/val/<class>/*.JPEG)")
        self.classes = classes or sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise DataError(f"{root}: no class folders; expected {root}/<class>/<image files>")
        self.samples = [(p, i) for i, c in enumerate(self.classes) if (root / c).is_dir()
                        for p in sorted((root / c).iterdir())
                        if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        tv = _try_torchvision()
        if tv is not None:
            norm = tv.Normalize(mean, std)
            self.transform = tv.Compose(
                [tv.RandomResizedCrop(size), tv.RandomHorizontalFlip(), tv.ToTensor(), norm]
                if train else [tv.Resize(256), tv.CenterCrop(size), tv.ToTensor(), norm])
        else:
            self.transform = _PilTransforms(train, size, mean, std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), label
        except OSError as exc:
            raise DataError(f"{path}: unreadable image ({exc})") from None

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor([s[1] for s in self.samples])
