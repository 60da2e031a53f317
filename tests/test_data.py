import gzip
import shutil

import numpy as np
import pytest
import torch

from sensprune.data import EMBEDDED_DIR, load_dataset, load_split, read_idx
from sensprune.errors import DataError

MNIST_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_embedded_mnist_matches_known_statistics():
    x, y = load_split("mnist", "train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y, minlength=10).tolist() == MNIST_COUNTS
    pixels = x.double() / 255.0
    assert abs(pixels.mean().item() - 0.1307) < 5e-5
    assert abs(pixels.std().item() - 0.3081) < 5e-5
    xt, yt = load_split("mnist", "test")
    assert xt.shape == (10000, 28, 28) and len(yt) == 10000


def test_validation_split_is_deterministic_and_disjoint(mnist):
    again = load_dataset("mnist", val_size=5000)
    assert torch.equal(mnist.val[1], again.val[1])
    assert torch.equal(mnist.val[0], again.val[0])
    assert len(mnist.train[1]) == 55000 and len(mnist.val[1]) == 5000
    # disjoint: no validation image occurs in the training split (compare exact rows)
    tr = {hash(r.numpy().tobytes()) for r in mnist.train[0][:, 0].flatten(1)}
    va = [hash(r.numpy().tobytes()) for r in mnist.val[0][:, 0].flatten(1)]
    assert sum(h in tr for h in va) <= 5  # MNIST has a handful of exact duplicate images
    # normalization: train pixels have about zero mean, unit std
    assert abs(mnist.train[0].mean().item()) < 0.01
    assert abs(mnist.train[0].std().item() - 1.0) < 0.01


def test_limit_train_keeps_first_n():
    s = load_dataset("mnist", limit_train=1234)
    assert len(s.train[1]) == 1234
    with pytest.raises(DataError, match="limit-train"):
        load_dataset("mnist", limit_train=0)


def test_fashion_mnist_from_data_dir(shared_data):
    s = load_dataset("fashion-mnist", data_dir=shared_data, val_size=1000)
    assert len(s.train[1]) == 59000 and len(s.test[1]) == 10000
    assert torch.bincount(s.test[1]).tolist() == [1000] * 10


def test_fashion_mnist_from_env(shared_data, monkeypatch):
    monkeypatch.setenv("SENSPRUNE_DATA", str(shared_data))
    x, y = load_split("fashion-mnist", "test")
    assert len(y) == 10000


def test_missing_dataset_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("SENSPRUNE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataError, match="--data-dir"):
        load_split("fashion-mnist", "train")


def _copy_mnist(tmp_path):
    d = tmp_path / "mnist"
    shutil.copytree(EMBEDDED_DIR / "mnist", d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def test_truncated_file(tmp_path):
    d = _copy_mnist(tmp_path)
    raw = gzip.decompress((d / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: truncated"):
        load_split("mnist", "test", data_dir=tmp_path)


def test_corrupt_gzip(tmp_path):
    d = _copy_mnist(tmp_path)
    blob = bytearray((d / "t10k-images-idx3-ubyte.gz").read_bytes())
    blob[len(blob) // 2: len(blob) // 2 + 100] = b"\x00" * 100
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: corrupt"):
        load_split("mnist", "test", data_dir=tmp_path)


def test_wrong_magic(tmp_path):
    d = _copy_mnist(tmp_path)
    # a labels file where an images file is expected
    shutil.copy(d / "t10k-labels-idx1-ubyte.gz", d / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="wrong magic"):
        load_split("mnist", "test", data_dir=tmp_path)


def test_count_mismatch(tmp_path):
    d = _copy_mnist(tmp_path)
    shutil.copy(d / "train-labels-idx1-ubyte.gz", d / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="10000 images but 60000 labels"):
        load_split("mnist", "test", data_dir=tmp_path)


def test_uncompressed_idx(tmp_path):
    f = tmp_path / "labels-idx1-ubyte"
    f.write_bytes((0x801).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 1, 2]))
    assert read_idx(f, 1).tolist() == [7, 1, 2]
    assert isinstance(read_idx(f, 1), np.ndarray)


def test_one_line_errors():
    with pytest.raises(DataError) as info:
        load_split("nope", "train")
    assert "\n" not in str(info.value) and "choose one of" in str(info.value)
