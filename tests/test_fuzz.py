"""Fuzz tests (hypothesis): the IDX reader and the recipe parser answer any input with their
own one-line errors or a correct result, never a raw Python exception."""

import gzip
import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sensprune.config import make_config
from sensprune.data import read_idx
from sensprune.errors import SensPruneError

FAST = settings(max_examples=80, deadline=None, derandomize=True, database=None)


def _idx(images: np.ndarray) -> bytes:
    return struct.pack(">I", 0x803) + b"".join(struct.pack(">I", d) for d in images.shape) + \
        images.tobytes()


@FAST
@given(st.binary(max_size=64), st.booleans())
def test_idx_reader_on_arbitrary_bytes(tmp_path_factory, blob, compress):
    f = tmp_path_factory.mktemp("idx") / "x.idx"
    f.write_bytes(gzip.compress(blob) if compress else blob)
    try:
        arr = read_idx(f, 3)
    except SensPruneError:
        return
    assert arr.ndim == 3 and arr.dtype == np.uint8  # only a well-formed file gets through


@FAST
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5),
       st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), max_size=3),
       st.integers(-1, 3), st.booleans())
def test_idx_reader_on_damaged_files(tmp_path_factory, n, h, w, flips, cut, compress):
    images = np.arange(n * h * w, dtype=np.uint8).reshape(n, h, w)
    blob = bytearray(_idx(images))
    for i, x in flips:
        if i < len(blob):
            blob[i] ^= x
    if cut >= 0:
        blob = blob[: len(blob) - 1 - cut]
    data = gzip.compress(bytes(blob)) if compress else bytes(blob)
    if compress and flips:
        data = data[:-4]  # a damaged gzip trailer too
    f = tmp_path_factory.mktemp("idx") / "x.idx.gz"
    f.write_bytes(data)
    try:
        arr = read_idx(f, 3)
    except SensPruneError:
        return
    assert arr.ndim == 3 and arr.size == len(blob) - 16  # its header agrees with its size


_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.lists(st.integers(), max_size=2))
_keys = st.sampled_from(["epochs", "lr", "lam", "batch_size", "threshold", "val_budget", "kind",
                         "normalize", "beta", "model", "amp", "seed", "momentum", "quantile",
                         "threshold_ref", "warmup_epochs", "prune_patience", "no_such_key"])


@FAST
@given(st.dictionaries(_keys, _values, max_size=4))
def test_recipe_values_never_raise_raw_errors(values):
    values = {k: v for k, v in values.items() if v is not None}
    try:
        cfg = make_config(**values)
    except SensPruneError:
        return
    assert cfg.epochs >= 1 and cfg.batch_size >= 1 and cfg.lr >= 0  # what got through is sane
