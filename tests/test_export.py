import numpy as np
import pytest
import torch

from sensprune.errors import CheckpointError
from sensprune.export import (SparseLinear, candidate_encodings, export, index_dtype, load, read,
                              to_sparse_inference)
from sensprune.models import MODELS, build_model
from sensprune.pruning import Pruner

SHAPES = {"vgg16": (3, 224, 224), "vgg16_cifar": (3, 32, 32), "resnet32": (3, 32, 32)}


def pruned(name, frac=0.9):
    torch.manual_seed(0)
    shape = SHAPES.get(name, (1, 28, 28))
    m = build_model(name, 10, shape)
    p = Pruner(m)
    scores = torch.cat([w.detach().abs().flatten() for w in p.params.values()])
    k = int(frac * scores.numel())
    t = float(scores.kthvalue(k).values) if scores.numel() < 2 ** 24 else \
        float(scores[torch.randperm(scores.numel())[:1_000_000]].quantile(frac))
    p.threshold(t)
    return m.eval(), shape


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.e2e) if n == "vgg16" else n
                                  for n in sorted(MODELS)])  # VGG-16: 138 M parameters
@pytest.mark.parametrize("values", ["fp32", "fp16"])
def test_round_trip_every_registry_model(name, values, tmp_path):
    if name == "vgg16" and values == "fp16":
        pytest.skip("one VGG-16 round trip is enough (138 M parameters)")
    m, shape = pruned(name)
    arch = {"model": name, "num_classes": 10, "input_shape": list(shape)}
    f = tmp_path / "m.safetensors"
    rep = export(m.state_dict(), f, arch, values=values)
    header, state = read(f)
    for k, v in m.state_dict().items():
        if not v.is_floating_point():
            continue
        want = v if values == "fp32" else v.half().float()
        assert torch.equal(state[k], want), k  # bit-exact (fp16: exactly the fp16 rounding)
    # payload never exceeds min(CSR, bitmask) per tensor; the rest is the container's header
    assert rep["payload_bytes"] <= rep["min_csr_bitmask_bytes"]
    assert rep["file_bytes"] - rep["payload_bytes"] <= 4096 + 600 * len(state)
    if name != "vgg16":
        loaded = load(f, kernels="density")
        x = torch.randn(3, *shape)
        with torch.no_grad():
            diff = (loaded(x) - m(x)).abs().max().item()
        assert diff <= (1e-5 if values == "fp32" else 0.1)


def test_int8_values_within_half_a_step(tmp_path):
    m, shape = pruned("lenet300", 0.95)
    f = tmp_path / "q.safetensors"
    export(m.state_dict(), f, {"model": "lenet300", "num_classes": 10,
                               "input_shape": [1, 28, 28]}, values="int8")
    header, state = read(f)
    for k, v in m.state_dict().items():
        if v.dim() > 1:
            step = float(v.abs().max()) / 127
            assert (state[k] - v).abs().max() <= step / 2 + 1e-7
            assert torch.equal(state[k] == 0, (v == 0) | (v.abs() < step / 2))
        else:
            assert torch.equal(state[k], v.half().float())  # biases: fp16


@pytest.mark.parametrize("compress", ["none", "lzma"])
def test_int8_row_values_within_half_a_step_of_their_row(tmp_path, compress):
    m, shape = pruned("lenet5", 0.95)
    with torch.no_grad():  # rows of very different scales: one scale per tensor would lose them
        m.fc1.weight[::7] *= 1e-3
    f = tmp_path / "q.safetensors"
    export(m.state_dict(), f, {"model": "lenet5", "num_classes": 10, "input_shape": [1, 28, 28]},
           values="int8-row", compress=compress)
    _, state = read(f)
    for k, v in m.state_dict().items():
        if v.dim() > 1:
            rows = v.reshape(v.shape[0], -1)
            # the fp16 scale each row was quantized with, as the decoder reads it
            step = (rows.abs().amax(1) / 127).half().float()
            err = (state[k].reshape(rows.shape) - rows).abs()
            assert (err <= step[:, None] / 2 * (1 + 1e-3) + 1e-9).all(), k
            assert torch.equal(state[k] == 0, (v == 0) | (state[k] == 0)), k  # zeros stay zeros


def test_index_dtype_boundaries():
    assert index_dtype(0) == np.uint8 and index_dtype(255) == np.uint8
    assert index_dtype(256) == np.uint16 and index_dtype(65535) == np.uint16
    assert index_dtype(65536) == np.uint32 and index_dtype(2 ** 32 - 1) == np.uint32
    assert index_dtype(2 ** 32) == np.uint64
    for cols, want in ((256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)):
        w = torch.zeros(2, cols)
        w[0, -1] = 1.0
        arrays, _ = candidate_encodings(w, "fp32")["csr"]
        assert arrays["indices"].dtype == want, cols
        assert arrays["indptr"].dtype == np.uint8


def test_delta_encoding_with_long_gaps(tmp_path):
    w = torch.zeros(3, 2000)
    w[0, [0, 1, 700, 1999]] = torch.tensor([1.0, -2.0, 3.0, 4.0])
    w[2, 1000] = 5.0
    arrays, _ = candidate_encodings(w, "fp32")["delta8"]
    assert arrays["gaps"].dtype == np.uint8
    # flattened positions 0, 1, 700, 1999, 5000: gaps 1, 1, 699 (= 255 + 255 + 189), 1299, 3001
    assert arrays["gaps"].tolist()[:5] == [1, 1, 255, 255, 189]
    assert int(arrays["gaps"].astype(np.int64).sum()) == 5001
    f = tmp_path / "d.safetensors"
    rep = export({"fc.weight": w}, f, {"model": "x", "num_classes": 1, "input_shape": [1]})
    assert rep["layers"]["fc.weight"]["encoding"] in ("delta8", "csr")
    assert torch.equal(read(f)[1]["fc.weight"], w)


def _exported(tmp_path):
    m, _ = pruned("lenet300")
    f = tmp_path / "m.safetensors"
    export(m.state_dict(), f, {"model": "lenet300", "num_classes": 10, "input_shape": [1, 28, 28]})
    return f


def test_corrupted_file_fails_checksum(tmp_path):
    f = _exported(tmp_path)
    blob = bytearray(f.read_bytes())
    blob[-10] ^= 0xFF  # a value byte
    f.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read(f)


def test_truncated_file_rejected(tmp_path):
    f = _exported(tmp_path)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read(f)
    f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        read(f)


def test_sparse_linear_kernels_agree():
    w = torch.randn(50, 80) * (torch.rand(50, 80) < 0.05)
    b = torch.randn(50)
    sl = SparseLinear(w, b)
    for batch in (1, 7, 64):
        x = torch.randn(batch, 80)
        ref = x @ w.t() + b
        torch.testing.assert_close(sl.sparse_forward(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sl.dense_forward(x), ref, atol=1e-5, rtol=1e-5)
    # with an input selection absorbed: the CSR kernel reads the selected columns in place
    idx = torch.tensor([1, 5, 6, 30, 79])
    sel = SparseLinear(w[:, :5], b, index=idx, in_size=80)
    x = torch.randn(9, 80)
    ref = x[:, idx] @ w[:, :5].t() + b
    torch.testing.assert_close(sel.sparse_forward(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sel.dense_forward(x), ref, atol=1e-5, rtol=1e-5)
    # 'auto' keeps a plain nn.Linear unless CSR was measured faster at 1, 64 or 1,024 rows
    lin = torch.nn.Linear(80, 50)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(50, 80) < 0.05)
    m = to_sparse_inference(torch.nn.Sequential(lin), kernels="auto")
    faster = [v["sparse"] for v in m.kernel_report.values()]
    assert len(faster) == 3
    assert isinstance(m[0], SparseLinear) == any(faster)
    assert type(to_sparse_inference(torch.nn.Sequential(lin), "dense")[0]) is torch.nn.Linear


def test_sparse_linear_chooses_by_rows_not_by_the_first_dimension(monkeypatch):
    """A transformer's (batch, sequence, features) input is batch x sequence rows: 2 sentences
    of 40 tokens take the kernel chosen for 80 rows, not the one for batch size 2."""
    w = torch.randn(30, 16) * (torch.rand(30, 16) < 0.1)
    sl = SparseLinear(w, None)
    sl.use_sparse = [(64, True), (1 << 30, False)]  # CSR up to 64 rows, dense above
    calls = []
    for kind in ("sparse_forward", "dense_forward"):
        real = getattr(sl, kind)
        monkeypatch.setattr(sl, kind, lambda x, real=real, kind=kind: calls.append(kind)
                            or real(x))
    for shape, kernel in [((2, 40, 16), "dense_forward"), ((2, 30, 16), "sparse_forward"),
                          ((100, 16), "dense_forward"), ((16,), "sparse_forward")]:
        x = torch.randn(shape)
        torch.testing.assert_close(sl(x), x @ w.t(), atol=1e-5, rtol=1e-5)
        assert calls.pop() == kernel, shape


def _rewrite_header(f, edit):
    """Re-save the file with its JSON header changed by ``edit`` (arrays untouched)."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file
    with safe_open(str(f), framework="numpy") as h:
        meta = json.loads(h.metadata()["sensprune"])
        arrays = {k: h.get_tensor(k) for k in h.keys()}
    edit(meta)
    save_file(arrays, str(f), metadata={"sensprune": json.dumps(meta)})


def _first_scaled_layer(meta):
    return next(m for m in meta["layers"].values() if m.get("scale") is not None)


@pytest.mark.parametrize("edit", [
    lambda m: m["layers"]["fc1.weight"].__setitem__("shape", [784, 300]),
    lambda m: m["layers"].pop("fc2.weight"),
    lambda m: m["arch"].__setitem__("num_classes", 11),
    lambda m: m.pop("sha256_all"),
])
def test_header_edits_are_caught(tmp_path, edit):
    f = _exported(tmp_path)
    _rewrite_header(f, edit)
    with pytest.raises(CheckpointError, match="checksum|no checksum|declares shape|has \\["):
        read(f)


def test_int8_scale_edit_is_caught(tmp_path):
    m, _ = pruned("lenet300")
    f = tmp_path / "q.safetensors"
    export(m.state_dict(), f, {"model": "lenet300", "num_classes": 10, "input_shape": [1, 28, 28]},
           values="int8")
    _rewrite_header(f, lambda meta: _first_scaled_layer(meta).__setitem__(
        "scale", _first_scaled_layer(meta)["scale"] * 1.1))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read(f)


def test_malformed_header_with_a_valid_checksum_gives_a_package_error(tmp_path):
    """Someone who recomputes the checksum by hand still gets a one-line package error."""
    from sensprune.export import _digest, load

    f = _exported(tmp_path)

    def break_it(meta):
        meta["layers"]["fc1.weight"]["shape"] = "not a shape"
        meta["arch"]["model"] = "no-such-model"
        from safetensors import safe_open
        with safe_open(str(f), framework="numpy") as h:
            arrays = {k: h.get_tensor(k) for k in h.keys()}
        meta["sha256_all"] = _digest(arrays, meta)
    _rewrite_header(f, break_it)
    with pytest.raises(CheckpointError):
        load(f)


def test_fuzzed_bytes_never_raise_raw_errors(tmp_path):
    """Random byte flips anywhere in the file: either a CheckpointError or (a flip that
    changes nothing the loader reads) an intact model; never another exception type."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sensprune.export import load
    good = _exported(tmp_path).read_bytes()
    target = tmp_path / "fuzz.safetensors"

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)),
                    min_size=1, max_size=4), st.booleans())
    def check(flips, cut):
        blob = bytearray(good)
        for i, x in flips:
            blob[i] ^= x
        if cut:
            blob = blob[: flips[0][0]]
        target.write_bytes(bytes(blob))
        try:
            load(target)
        except CheckpointError:
            pass
    check()


def test_export_file_mode_follows_the_umask(tmp_path):
    import os
    f = _exported(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert (f.stat().st_mode & 0o777) == 0o666 & ~umask


def test_kernel_report_names_each_layer_by_its_path():
    """Layers of the same name in different blocks (a transformer's 'query' in every layer)
    each get their own entry."""
    def block():
        lin = torch.nn.Linear(20, 20)
        with torch.no_grad():
            lin.weight.mul_(torch.rand(20, 20) < 0.1)
        return torch.nn.Sequential(lin)
    m = to_sparse_inference(torch.nn.Sequential(block(), block()), kernels="auto")
    assert {k.split("@")[0] for k in m.kernel_report} == {"0.0", "1.0"}
    x = torch.randn(3, 20)
    plain = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(20, 20)) for _ in "ab"))
    for i in (0, 1):
        w = m[i][0].weight
        plain[i][0].weight.data.copy_(w)
        plain[i][0].bias.data.copy_(m[i][0].bias)
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x), atol=1e-5, rtol=1e-5)
