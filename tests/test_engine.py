"""The inference engine of a compacted chain (export/engine.py): every kernel it can choose
gives the plain layers' outputs (random masked networks, batch sizes 1 to 100), it never
changes the caller's tensor, and it stays an ordinary nn.Sequential (state_dict, deepcopy,
dtype, training, gradients)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sensprune
from sensprune.errors import CheckpointError
from sensprune.export import Select, chain_spec, compact_model, export
from sensprune.export.engine import InferenceChain, feature_major, max_pool2x2

from test_compaction import _nets, _sparsify


def _lenet_like():
    return (nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3),
                          nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(8 * 2 * 2, 20), nn.ReLU(),
                          nn.Linear(20, 5)), (1, 17, 17))


def _compacted(seed):
    nets = list(_nets()) + [_lenet_like()]
    for i, (net, shape) in enumerate(nets):
        torch.manual_seed(seed * 10 + i)
        _sparsify(net, seed * 10 + i, density=0.15, dead=0.3)
        net.eval()
        chain, _ = compact_model(net, shape)
        yield net, chain, shape


@pytest.mark.parametrize("prefer", [(), ("dense",), ("csr",), ("dense_t", "csr"), ("pool2",),
                                    ("vector",)])
@pytest.mark.parametrize("seed", range(3))
def test_every_kernel_choice_gives_the_plain_outputs(seed, prefer):
    for net, chain, shape in _compacted(seed):
        fast = InferenceChain(copy.deepcopy(chain)).plan(shape, (1, 8), rounds=2, prefer=prefer)
        for batch in (1, 3, 8, 64):
            x = torch.randn(batch, *shape)
            x_before = x.clone()
            with torch.no_grad():
                got, want = fast(x), net(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert got.is_contiguous() and got.shape == want.shape
            assert torch.equal(x, x_before)  # in-place kernels only touch the engine's tensors


def test_the_vector_plan_runs_batch_one_where_every_layer_allows_it():
    """Batch size 1 on one 1-D activation (addmv): chosen only for chains of Flatten, Select,
    Linear and elementwise layers; the same outputs as the plain layers, shape (1, out)."""
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.ReLU(), nn.Linear(12, 8), nn.Tanh(),
                        nn.Linear(8, 3))
    with torch.no_grad():
        mlp[1].weight.mul_(torch.rand(12, 36) < 0.3)
        mlp[1].weight[:, :5] = 0  # unread inputs: a Select
    chain, _ = compact_model(mlp.eval(), (1, 6, 6))
    fast = InferenceChain(chain).plan((1, 6, 6), (1, 8), rounds=2, prefer=("vector",))
    (_, steps), _ = fast.plans[torch.get_num_threads()]
    assert [k for k, _ in steps] == ["to_vec", "select_vec", "dense_vec", "relu_", "dense_vec",
                                     "module", "dense_vec", "from_vec"]
    for x in (torch.randn(1, 1, 6, 6), torch.randn(1, 36)):
        with torch.no_grad():
            got = fast(x)
        torch.testing.assert_close(got, mlp(x.reshape(1, 1, 6, 6)), rtol=1e-5, atol=1e-6)
        assert got.shape == (1, 3)
    # a Linear on the last axis of an image (no Flatten first) or a conv: no vector plan
    for net, shape in [(nn.Sequential(nn.Linear(6, 4), nn.ReLU()), (2, 6)), _lenet_like()]:
        fast = InferenceChain(net.eval()).plan(shape, (1,), rounds=2, prefer=("vector",))
        assert "to_vec" not in [k for k, _ in fast.plans[torch.get_num_threads()][0][1]]
        x = torch.randn(1, *shape)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


def test_relu_on_the_callers_input_is_not_done_in_place():
    chain = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(12, 4)).eval()
    fast = InferenceChain(copy.deepcopy(chain)).plan((12,), (1, 16), rounds=2)
    for batch in (1, 16):
        x = torch.randn(batch, 12)
        x_before = x.clone()
        with torch.no_grad():
            torch.testing.assert_close(fast(x), chain(x))
        assert torch.equal(x, x_before)


def test_plan_uses_the_csr_kernel_with_a_select_read_in_place():
    net = nn.Sequential(nn.Flatten(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        net[1].weight.mul_(torch.rand(10, 30) < 0.2)
        net[1].weight[:, :7] = 0  # unread inputs: a Select in front of the Linear
    chain, _ = compact_model(net.eval(), (30,))
    fast = InferenceChain(chain).plan((30,), (4,), rounds=2, prefer=("csr",))
    kinds = [k for k, _ in fast.plans[torch.get_num_threads()][0][1]]
    assert "csr_window" in kinds and "select" not in kinds and "select_fm" not in kinds
    x = torch.randn(4, 30)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


def test_it_stays_an_ordinary_sequential():
    net, chain, shape = next(_compacted(5))
    fast = InferenceChain(copy.deepcopy(chain)).plan(shape, (1, 8), rounds=2, prefer=("csr",))
    assert isinstance(fast, nn.Sequential)
    assert fast.state_dict().keys() == chain.state_dict().keys()
    x = torch.randn(8, *shape)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(fast)(x), chain(x), rtol=1e-5, atol=1e-5)
        # other weights loaded: the kernels (copies of the weights) are rebuilt
        other = {k: torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in chain.state_dict().items()}
        chain.load_state_dict(other)
        fast.load_state_dict(other)
        torch.testing.assert_close(fast(x), chain(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.double()(x.double()), chain.double()(x.double()))
    # training mode and parameters that want gradients run the plain layers
    fast.float(), chain.float()
    for p in fast.parameters():
        p.requires_grad_(True)
    fast(x).square().sum().backward()
    chain(x).square().sum().backward()
    for a, b in zip(fast.parameters(), chain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (2, 3)])
def test_pool2x2_is_max_pool2d(hw):
    x = torch.randn(3, 4, *hw)
    x[0, 0, 0, 0] = float("-inf")
    x[1, 1, 1, 1] = float("nan")
    torch.testing.assert_close(max_pool2x2(x), F.max_pool2d(x, 2, 2), equal_nan=True)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (64, 300), (7, 2000), (0, 4)])
def test_feature_major_is_the_transpose(shape):
    x = torch.randn(shape)
    y = feature_major(x)
    assert y.is_contiguous() and torch.equal(y, x.t())


def _export_chain(tmp_path, chain, shape, input_shape=None):
    arch = {"model": "chain", "num_classes": 3, "input_shape": list(input_shape or shape),
            "layers": chain_spec(chain)}
    f = tmp_path / "m.safetensors"
    export(chain.state_dict(), f, arch)
    return f


def test_load_plans_a_compacted_export_and_reports_the_choice(tmp_path):
    net, chain, shape = list(_compacted(2))[-1]  # LeNet-like: pools and Linear layers to time
    model = sensprune.load(_export_chain(tmp_path, chain, shape))
    assert isinstance(model, InferenceChain)
    assert model.kernel_report and all(set(v) == {"layer", "kernel", "us"}
                                       for v in model.kernel_report.values())
    x = torch.randn(64, *shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)


def test_an_input_shape_that_does_not_fit_the_layers_is_refused(tmp_path):
    net, chain, shape = next(_compacted(2))
    with pytest.raises(CheckpointError, match="input shape"):
        sensprune.load(_export_chain(tmp_path, chain, shape, input_shape=(7,)))
    with pytest.raises(CheckpointError, match="input_shape"):
        sensprune.load(_export_chain(tmp_path, chain, shape, input_shape=(0,)))


def test_script_trace_compile_and_onnx_see_the_plain_layers(tmp_path):
    net, chain, shape = next(_compacted(4))
    fast = InferenceChain(copy.deepcopy(chain)).plan(shape, (1, 8), rounds=2, prefer=("csr",))
    x = torch.randn(8, *shape)
    with torch.no_grad():
        want = net(x)
        torch.testing.assert_close(torch.jit.script(fast)(x), want, rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(fast, torch.randn(8, *shape))  # no numpy constant baked in
        torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.compile(fast, backend="eager")(x), want,
                                   rtol=1e-5, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from sensprune.export import export_onnx

    path = export_onnx(fast, tmp_path / "m.onnx", shape)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


def test_another_thread_count_gets_its_own_plan_at_its_first_call():
    net, chain, shape = list(_compacted(3))[-1]
    threads = torch.get_num_threads()
    fast = InferenceChain(copy.deepcopy(chain)).plan(shape, (1, 8), rounds=2)
    x = torch.randn(8, *shape)
    try:
        torch.set_num_threads(threads + 1)
        with torch.inference_mode():
            got = fast(x)
    finally:
        torch.set_num_threads(threads)
    assert set(fast.plans) == {threads, threads + 1}
    assert any(k.endswith(f"/{threads + 1}t") for k in fast.kernel_report)
    with torch.no_grad():
        torch.testing.assert_close(got, net(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [
    # every kernel and layout change, in plans the timing may not choose on this machine
    [("flatten", 0), ("to_fm", 1), ("select_fm", 1), ("dense_fm", 2), ("relu_", 3), ("csr", 4),
     ("module", 5), ("dense_fm", 6), ("to_rows", 6)],
    [("flatten", 0), ("to_fm", 2), ("csr", 2), ("relu_", 3), ("dense_fm", 4), ("module", 5),
     ("csr", 6), ("to_rows", 6)],
    [("flatten", 0), ("select", 1), ("dense", 2), ("relu_", 3), ("to_fm", 4), ("csr", 4),
     ("module", 5), ("dense_t", 6)],
    [("flatten", 0), ("to_fm_window", 2), ("csr_window", 2), ("relu_", 3), ("dense_fm", 4),
     ("module", 5), ("dense_t", 6)],
])
def test_hand_made_plans_give_the_plain_outputs(steps):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(60, 40), nn.ReLU(), nn.Linear(40, 30), nn.Tanh(),
                        nn.Linear(30, 12))
    with torch.no_grad():
        for m in (net[1], net[3], net[5]):
            m.weight.mul_(torch.rand(m.weight.shape) < 0.15)
            # every unit fed and every input of the next layer read: compaction keeps them
            k = torch.arange(max(m.out_features, m.in_features))
            m.weight[k % m.out_features, k % m.in_features] = 1.0
        net[1].weight[:, :7] = 0  # unread inputs: a Select in front of the first Linear
        net[1].weight[torch.arange(40), torch.arange(40) % 53 + 7] = 1.0
    chain, _ = compact_model(net.eval(), (60,))
    assert [type(m) for m in chain] == [nn.Flatten, Select, nn.Linear, nn.ReLU, nn.Linear,
                                        nn.Tanh, nn.Linear]
    fast = InferenceChain(chain).plan((60,), (4,), rounds=2)
    assert all(fast._entries[i]["csr"] is not None for i in (2, 4, 6))  # below 30% density
    fast.plans = {torch.get_num_threads(): [(1 << 62, steps)]}
    fast._compile()
    for batch in (1, 5, 64):
        x = torch.randn(batch, 60)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefer", [(), ("csr",), ("dense",)])
@pytest.mark.parametrize("batch", [8, 128])  # 128 x 36 values take numpy's transpose
def test_a_chain_that_flattens_first_runs_its_plan_on_flat_inputs(monkeypatch, prefer, batch):
    """(N, 1, 28, 28) or the same images as (N, 784): the same kernels, the same outputs (a
    flat input used to fall back to the plain layers, at half the speed). Unread inputs at
    both ends: the CSR kernel transposes only the window between the first and last read."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        net[1].weight.mul_(torch.rand(12, 36) < 0.1)
        net[1].weight[:, :5] = 0
        net[1].weight[:, -4:] = 0
        net[1].weight[torch.arange(12), torch.arange(12) + 6] = 1.0  # every unit fed
    chain, _ = compact_model(net.eval(), (1, 6, 6))
    assert isinstance(chain[1], Select)
    fast = InferenceChain(chain).plan((1, 6, 6), (1, 8), rounds=2, prefer=prefer)
    if prefer == ("csr",):
        kinds = [k for k, _ in fast.plans[torch.get_num_threads()][-1][1]]
        assert kinds[:3] == ["flatten", "to_fm_window", "csr_window"]
        run = [f.__name__ for f, _ in fast._compiled[torch.get_num_threads()][-1][1]]
        assert run[0] == "_flatten_window_fm" and "_flatten" not in run  # one fused step
    plain_calls = []
    real = nn.Sequential.forward
    monkeypatch.setattr(nn.Sequential, "forward",
                        lambda self, x: plain_calls.append(1) or real(self, x))
    x = torch.randn(batch, 1, 6, 6)
    with torch.no_grad():
        image, flat = fast(x), fast(x.reshape(batch, 36))
        torch.testing.assert_close(image, net(x), rtol=1e-5, atol=1e-5)
    plain_calls.clear()
    with torch.no_grad():
        image, flat = fast(x), fast(x.reshape(batch, 36))
    assert plain_calls == []  # both took the planned kernels
    torch.testing.assert_close(flat, image)
