"""CIFAR-10 and ImageFolder (ImageNet) code paths on small synthetic data in the real formats."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from sensprune.data import batches, load_dataset
from sensprune.errors import DataError
from sensprune.vision_data import crop_flip


def write_cifar(root, per_batch=20, seed=0, protocol=4):
    d = root / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        blob = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(),
                b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with open(d / name, "wb") as f:
            pickle.dump(blob, f, protocol=protocol)
    return root


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote the published files (protocol 2, str keys, the
    array's buffer a BINSTRING inside numpy's _reconstruct/BUILD), assembled opcode by opcode."""
    import struct
    raw = data.tobytes()
    array = (b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85"
             b"U\x01b\x87Rq\x03(K\x01" + b"M" + struct.pack("<H", data.shape[0]) + b"M\x00\x0c\x86"
             b"cnumpy\ndtype\nq\x04U\x02u1K\x00K\x01\x87Rq\x05(K\x03U\x01|NNNJ\xff\xff\xff\xff"
             b"J\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<I", len(raw)) + raw + b"tb")
    label_ops = b"]q\x06(" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (b"\x80\x02}q\x00(U\x04dataq\x07" + array + b"U\x06labelsq\x08" + label_ops
            + b"U\x0bbatch_labelq\tU\x0btest batch u.")


def write_imagefolder(root, classes=("ant", "bee", "cat"), n_train=4, n_val=2):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / "imagenet" / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / "imagenet" / split / c / f"{i}.png")
    return root


def test_cifar_pickles_load_and_augment(tmp_path):
    write_cifar(tmp_path)
    s = load_dataset("cifar10", data_dir=tmp_path, val_size=10)
    assert s.train[0].shape == (90, 3, 32, 32) and s.test[0].shape == (20, 3, 32, 32)
    assert s.augment
    # the normalization is per channel with CIFAR-10's statistics
    raw = pickle.load(open(tmp_path / "cifar10/cifar-10-batches-py/test_batch", "rb"),
                      encoding="bytes")[b"data"].reshape(-1, 3, 32, 32)
    expected = (raw[0, 1].astype(np.float32) / 255 - 0.4822) / 0.2435
    assert np.allclose(s.test[0][0, 1].numpy(), expected, atol=1e-5)
    xb, yb = next(batches(s.train, 8, shuffle_seed=1, augment=True))
    assert xb.shape == (8, 3, 32, 32)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = crop_flip(x, torch.Generator().manual_seed(0))
    # every output row is a (possibly flipped) shifted window of the zero-padded input
    assert out.shape == x.shape and set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches_are_read_exactly_without_unpickling(tmp_path, protocol, monkeypatch):
    """Every pickle protocol's batch gives the written pixels and labels; pickle's loaders are
    never called (they are replaced by a function that fails)."""
    from sensprune.vision_data import _read_cifar_batch
    write_cifar(tmp_path, per_batch=7, seed=protocol, protocol=protocol)
    path = tmp_path / "cifar10/cifar-10-batches-py/test_batch"
    want = pickle.load(open(path, "rb"), encoding="bytes")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("unpickled"))
    data, labels = _read_cifar_batch(path)
    assert np.array_equal(data, want[b"data"].reshape(-1, 3, 32, 32))
    assert labels.tolist() == want[b"labels"]


def test_a_python2_cifar_batch_is_read(tmp_path):
    from sensprune.vision_data import _read_cifar_batch
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    labels = [3, 9, 0, 1, 7]
    raw = _py2_batch(data, labels)
    decoded = pickle.loads(raw, encoding="bytes")  # the reference: what unpickling would give
    assert np.array_equal(decoded[b"data"], data) and decoded[b"labels"] == labels
    (tmp_path / "test_batch").write_bytes(raw)
    got, got_labels = _read_cifar_batch(tmp_path / "test_batch")
    assert np.array_equal(got, data.reshape(-1, 3, 32, 32)) and got_labels.tolist() == labels


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        load_dataset("cifar10", data_dir=tmp_path)
    write_cifar(tmp_path)
    (tmp_path / "cifar10/cifar-10-batches-py/data_batch_3").write_bytes(b"junk")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR-10 python batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_imagefolder_loads(tmp_path):
    write_imagefolder(tmp_path)
    s = load_dataset("imagenet", data_dir=tmp_path, val_size=3)
    assert len(s.train) == 9 and len(s.val) == 3 and len(s.test) == 6
    x, y = s.test[0]
    assert x.shape == (3, 224, 224) and y == 0
    xb, yb = next(batches(s.train, 4, shuffle_seed=0))
    assert xb.shape == (4, 3, 224, 224) and yb.dtype == torch.int64


@pytest.mark.e2e
def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="ImageFolder layout"):
        load_dataset("imagenet", data_dir=tmp_path)


def train_synthetic(tmp_path, dataset, val_size, batch_size):
    """One epoch of ResNet-32 with the sensitivity method and a threshold, through the CLI."""
    args = ["--model", "resnet32", "--dataset", dataset, "--data-dir", str(tmp_path),
            "--val-size", str(val_size), "--batch-size", str(batch_size), "--epochs", "1",
            "--lam", "1e-3", "--threshold", "0.01", "--no-progress", "--out", str(tmp_path / "run")]
    r = subprocess.run([sys.executable, "-m", "sensprune", "train", *args], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.e2e
def test_train_resnet32_on_synthetic_cifar(tmp_path):
    write_cifar(tmp_path)
    r = train_synthetic(tmp_path, "cifar10", 20, 20)
    assert "conv.weight" in r.stdout


@pytest.mark.e2e
def test_train_on_synthetic_imagefolder(tmp_path):
    write_imagefolder(tmp_path)
    train_synthetic(tmp_path, "imagenet", 3, 3)
    assert (tmp_path / "run" / "summary.json").exists()


def test_random_shift_moves_each_image_by_its_own_offset():
    """Each output image is its input translated by some (dy, dx) in [-2, 2]^2, the uncovered
    border holding the fill: checked against a brute-force pixel loop over all 25 offsets."""
    from sensprune.vision_data import random_shift
    torch.manual_seed(0)
    x = torch.rand(40, 2, 6, 7)
    fill = torch.tensor([-0.5, -2.0])
    out = random_shift(x, torch.Generator().manual_seed(3), 2, fill)
    seen = set()
    for i in range(len(x)):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = fill.view(2, 1, 1).expand(2, 6, 7).clone()
                for r in range(6):
                    for c in range(7):
                        if 0 <= r + dy < 6 and 0 <= c + dx < 7:
                            ref[:, r, c] = x[i, :, r + dy, c + dx]
                if torch.allclose(out[i], ref, rtol=0, atol=1e-6):  # x - fill + fill
                    matches.append((dy, dx))
        assert len(matches) == 1, f"image {i}: {matches}"
        seen.add(matches[0])
    assert len(seen) > 10  # the offsets vary between images


def test_shift_augment_batches_are_seeded_and_background_filled():
    from sensprune.data import background, dataset_info
    x = torch.full((30, 1, 8, 8), 5.0)
    y = torch.arange(30)
    fill = background(dataset_info("mnist"))
    assert fill[0] == pytest.approx(-0.1307 / 0.3081, rel=1e-3)  # a black pixel, normalized
    one = list(batches((x, y), 10, shuffle_seed=4, shift=3, fill=fill))
    two = list(batches((x, y), 10, shuffle_seed=4, shift=3, fill=fill))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, two))  # resume sees the same epoch
    values = torch.cat([b[0] for b in one]).unique().tolist()  # sorted
    assert len(values) == 2 and values[1] == 5.0 and values[0] == pytest.approx(fill[0])
    plain = next(batches((x, y), 10, shuffle_seed=4))[0]
    assert torch.equal(plain, x[:10])  # shift 0: untouched


def test_shift_augment_is_refused_where_the_dataset_has_its_own(tmp_path):
    from sensprune.config import TrainConfig
    from sensprune.errors import ConfigError
    from sensprune.train import train
    write_cifar(tmp_path)
    cfg = TrainConfig(model="lenet300", dataset="cifar10", data_dir=str(tmp_path), val_size=10,
                      epochs=1, shift_augment=2, out=str(tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError, match="shift_augment"):
        train(cfg.validate())
