"""Reliability round 4 (issue 35): an export's header is untrusted for sizes. Every case here
has a valid checksum (recomputed as an attacker would); each must be refused in one line
before the memory it declares is allocated."""
import json
import lzma
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from sensprune.errors import CheckpointError
from sensprune.export import export, read
from sensprune.export.chain import chain_spec
from sensprune.export.container import (_LZMA_FILTERS, _digest, DEFAULT_MAX_LOAD_BYTES,
                                        LOAD_LIMIT_ENV)


def _write(path, meta, arrays):
    from safetensors.numpy import save_file
    meta["sha256_all"] = _digest(arrays, meta)
    save_file(arrays, str(path), metadata={"sensprune": json.dumps(meta)})
    return path


def _small_export(tmp_path, model, arch, **kw):
    from safetensors import safe_open
    f = tmp_path / "m.safetensors"
    export(model.state_dict(), f, arch, **kw)
    with safe_open(str(f), framework="numpy") as h:
        meta = h.metadata()["sensprune"]
        arrays = {k: h.get_tensor(k) for k in h.keys()}
    return f, meta, arrays


def _refused_with_little_memory(f, match="declares"):
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match) as e:
            read(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(e.value)
    assert peak < 64 << 20, f"{peak} bytes allocated before refusing"
    return str(e.value)


def _empty_csr(n_rows, n_entries_dtype=np.uint16):
    return {"indptr": np.zeros(n_rows + 1, np.uint8), "indices": np.zeros(0, n_entries_dtype),
            "values": np.zeros(0, np.float32)}


def test_a_compacted_chain_declaring_a_huge_empty_layer_is_refused(tmp_path):
    # the probe's case: one 16000x16000 Linear stored as an empty CSR in a 16 KB file
    chain = nn.Sequential(nn.Flatten(), nn.Linear(16, 16))
    f, _, arrays = _small_export(tmp_path, chain, {"model": "chain", "num_classes": 16,
                                                   "input_shape": [16],
                                                   "layers": chain_spec(chain)})
    meta = json.loads(read(f)[0] and json.dumps(read(f)[0]))
    meta["arch"]["layers"][1].update({"in": 16000, "out": 16000})
    meta["arch"]["input_shape"] = [16000]
    meta["arch"]["num_classes"] = 16000
    meta["layers"]["1.weight"] = {"shape": [16000, 16000], "encoding": "csr", "values": "fp32"}
    meta["layers"]["1.bias"] = {"shape": [16000], "encoding": "dense", "values": "fp32"}
    arrays = {f"1.weight/{k}": v for k, v in _empty_csr(16000).items()}
    arrays["1.bias/values"] = np.zeros(16000, np.float32)
    _refused_with_little_memory(_write(f, meta, arrays))


def test_a_bundled_model_with_an_absurd_input_shape_is_refused(tmp_path):
    # LeNet-300 declared on [1, 2600, 2700] inputs: fc1 would be 300 x 7,020,000
    from sensprune.models import build_model
    m = build_model("lenet300")
    f, _, _ = _small_export(tmp_path, m, {"model": "lenet300", "num_classes": 10,
                                          "input_shape": [1, 28, 28]})
    meta, _ = read(f)
    _, arrays = read(f)
    meta["arch"]["input_shape"] = [1, 2600, 2700]
    meta["layers"]["fc1.weight"] = {"shape": [300, 2600 * 2700], "encoding": "csr",
                                    "values": "fp32"}
    raw = {k: v for k, v in _arrays_of(f).items() if not k.startswith("fc1.weight/")}
    raw.update({f"fc1.weight/{k}": v for k, v in _empty_csr(300).items()})
    _refused_with_little_memory(_write(f, meta, raw))


def _arrays_of(f):
    from safetensors import safe_open
    with safe_open(str(f), framework="numpy") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def test_a_long_chain_declaring_gigabytes_is_refused(tmp_path):
    # 1,023 Linear 1000x1000 layers (the most a chain holds), each an empty CSR: 4 GB declared
    layers = [nn.Flatten()] + [nn.Linear(1000, 1000, bias=False) for _ in range(2)]
    spec = chain_spec(nn.Sequential(*layers))
    meta = {"format": "sensprune-export-1", "values": "fp32", "layers": {},
            "arch": {"model": "chain", "num_classes": 1000, "input_shape": [1000],
                     "layers": [spec[0]] + [spec[1]] * 1023}}
    from sensprune.export.container import FORMAT
    meta["format"] = FORMAT
    arrays = {}
    for i in range(1, 1024):
        meta["layers"][f"{i}.weight"] = {"shape": [1000, 1000], "encoding": "csr",
                                         "values": "fp32"}
        arrays.update({f"{i}.weight/{k}": v for k, v in _empty_csr(1000).items()})
    _refused_with_little_memory(_write(tmp_path / "long.safetensors", meta, arrays))


def test_an_lzma_packed_layer_of_zeros_is_refused_before_decompressing(tmp_path):
    # a dense 14000x14000 Linear of zeros, LZMA-packed: 784 MB from a few hundred KB
    from sensprune.export.container import FORMAT
    n = 14000 * 14000
    # the refusal comes from the declared sizes before any decompression, so a stream of 16 MB
    # of zeros stands for the 784 MB one (compressing that takes half a minute)
    blob = lzma.compress(bytes(1 << 24), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    meta = {"format": FORMAT, "values": "fp32", "arch": {"model": "someone-elses-net"},
            "layers": {"w": {"shape": [14000, 14000], "encoding": "dense", "values": "fp32"}},
            "packed": [["w/values", "<f4", n]]}
    arrays = {"w/values": np.zeros(0, np.float32)}  # the digest covers the unpacked arrays;
    meta["sha256_all"] = "0" * 64  # the refusal comes before the checksum is computed
    from safetensors.numpy import save_file
    f = tmp_path / "zeros.safetensors"
    save_file({"packed": np.frombuffer(blob, np.uint8)}, str(f),
              metadata={"sensprune": json.dumps(meta)})
    assert f.stat().st_size < 1 << 20
    _refused_with_little_memory(f)


def test_the_load_limit_is_documented_and_can_be_raised(tmp_path, monkeypatch):
    m = nn.Sequential(nn.Flatten(), nn.Linear(100, 100))
    f, _, _ = _small_export(tmp_path, m, {"model": "chain", "num_classes": 100,
                                          "input_shape": [100], "layers": chain_spec(m)})
    monkeypatch.setenv(LOAD_LIMIT_ENV, "1000")  # 250 entries: the model holds 10,100
    msg = _refused_with_little_memory(f, "load limit")
    assert LOAD_LIMIT_ENV in msg
    monkeypatch.setenv(LOAD_LIMIT_ENV, "1e6")
    header, state = read(f)
    assert torch.equal(state["1.weight"], m[1].weight.detach())
    monkeypatch.setenv(LOAD_LIMIT_ENV, "lots")
    with pytest.raises(CheckpointError, match="not a number"):
        read(f)
    assert DEFAULT_MAX_LOAD_BYTES == 2 << 30


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 1 << 16), cols=st.integers(1, 1 << 16))
def test_any_declared_shape_is_read_or_refused_within_bounded_memory(tmp_path_factory, rows, cols):
    """Whatever shape a header declares for an empty CSR tensor, the reader either decodes it
    (small) or refuses it, and never allocates far beyond what the file justifies."""
    from sensprune.export.container import FORMAT
    tmp = tmp_path_factory.mktemp("h")
    meta = {"format": FORMAT, "values": "fp32", "arch": {"model": "someone-elses-net"},
            "layers": {"w": {"shape": [rows, cols], "encoding": "csr", "values": "fp32"}}}
    arrays = {f"w/{k}": v for k, v in _empty_csr(rows).items()}
    f = _write(tmp / "x.safetensors", meta, arrays)
    tracemalloc.start()
    try:
        try:
            _, state = read(f)
            assert state["w"].shape == (rows, cols) and not state["w"].any()
        except CheckpointError as e:
            assert "declares" in str(e) and "\n" not in str(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # what a load may take: the file's size times the documented bound, plus slack
    assert peak <= 4 * 1024 * f.stat().st_size + (64 << 20)
