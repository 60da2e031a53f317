"""Exact compaction (export/compaction.py), the compacted export, and the structured methods.

References: the uncompacted network's own outputs (random nets, random masks, brute force
over seeds), a hand-computed bias fold, and per-sample autograd for the neuron sensitivity.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sensprune
from sensprune.errors import CheckpointError
from sensprune.export import (NotCompactable, Select, build_chain, chain_spec, compact_model,
                              export, read)
from sensprune.methods.neuron import GroupLasso, NeuronSensitivity
from sensprune.models import build_model
from sensprune.sensitivity_engines import unit_sensitivity


def _sparsify(model: nn.Module, seed: int, density: float = 0.3, dead: float = 0.3) -> None:
    """Random weight masks, plus whole units with no incoming or no outgoing weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) < density).float())
                rows = torch.rand(m.weight.shape[0], generator=g) < dead
                m.weight[rows] = 0  # no incoming weight: a constant (its bias)
                cols = torch.rand(m.weight.shape[1], generator=g) < dead / 2
                m.weight[:, cols] = 0  # nobody reads these inputs
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


class ConvNet(nn.Module):
    def __init__(self, act=nn.ReLU, pad=0):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = act()
        self.c2 = nn.Conv2d(8, 6, 3, padding=pad)
        self.fc1 = nn.Linear(6 * 2 * 2 if pad == 0 else 6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        x = F.max_pool2d(self.act(self.bn(self.c1(x))), 2)
        x = torch.tanh(self.c2(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _nets():
    yield (nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12),
                         nn.Sigmoid(), nn.Linear(12, 3)), (20,))
    yield ConvNet(), (2, 10, 10)
    yield ConvNet(nn.Tanh, pad=1), (2, 10, 10)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("which", range(3))
def test_compaction_keeps_outputs_and_removes_every_dead_unit(seed, which):
    torch.manual_seed(seed)
    model, shape = list(_nets())[which]
    _sparsify(model, seed)
    model.eval()
    chain, rep = compact_model(model, shape)
    x = torch.randn(32, *shape)
    with torch.no_grad():
        torch.testing.assert_close(chain(x), model(x), rtol=1e-5, atol=1e-5)
    # nothing removable is left: every unit between two unit layers is read by the next one,
    # and one with no incoming weight is kept only in front of a zero-padded conv
    units = [m for m in chain if isinstance(m, (nn.Linear, nn.Conv2d))]
    for p, q in zip(units, units[1:]):
        per = q.weight.shape[1] // p.weight.shape[0]
        wq = q.weight.detach().reshape(q.weight.shape[0], p.weight.shape[0], -1) \
            if isinstance(q, nn.Linear) else q.weight.detach().flatten(2)
        if p.weight.shape[0] == 1:
            continue  # a layer keeps one unit even when nothing reads it (the shape stays valid)
        assert ((wq != 0).any(2).any(0)).all(), "a unit nobody reads survived"
        dead_in = ~(p.weight.detach().flatten(1) != 0).any(1)
        if isinstance(q, nn.Linear) or all(v == 0 for v in q.padding):
            assert not dead_in.any() or per == 0, "a constant unit was not folded"
    assert rep["after"]["macs"] <= rep["before"]["macs"]


def test_constant_unit_folded_into_next_bias_by_hand():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 0.0]]))
        net[0].bias.copy_(torch.tensor([0.5, 3.0]))
        net[2].weight.copy_(torch.tensor([[4.0, 5.0]]))
        net[2].bias.copy_(torch.tensor([-1.0]))
    chain, rep = compact_model(net, (2,))
    lin = [m for m in chain if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in lin] == [(1, 2), (1, 1)]
    assert float(lin[1].bias) == -1.0 + 5.0 * 3.0  # relu(3) * 5 folded in
    assert rep["removed"]["0"] == {"unread": 0, "constant": 1}


def test_unused_inputs_are_dropped_by_a_select():
    net = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight[:, [1, 4]] = 0
    chain, rep = compact_model(net, (6,))
    sel = [m for m in chain if isinstance(m, Select)]
    assert len(sel) == 1 and sel[0].index.tolist() == [0, 2, 3, 5]
    assert rep["inputs_kept"] == 4


def test_a_residual_network_is_refused_with_the_reason():
    with pytest.raises(NotCompactable, match="chain"):
        compact_model(build_model("resnet32", 10, (3, 32, 32)), (3, 32, 32))


def test_compacted_lenet5_export_loads_as_plain_layers_scripts_and_matches(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5", 10, (1, 28, 28))
    _sparsify(model, 1, density=0.2, dead=0.4)
    model.eval()
    chain, _ = compact_model(model, (1, 28, 28))
    arch = {"model": "chain", "num_classes": 10, "input_shape": [1, 28, 28],
            "layers": chain_spec(chain)}
    x = torch.randn(16, 1, 28, 28)
    for compress in ("none", "lzma"):
        f = tmp_path / f"m-{compress}.safetensors"
        export(chain.state_dict(), f, arch, compress=compress)
        loaded = sensprune.load(f, kernels="dense")
        assert type(loaded) is nn.Sequential
        assert {type(m) for m in loaded} <= {nn.Conv2d, nn.MaxPool2d, nn.Flatten, nn.Linear,
                                             nn.ReLU, Select}
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.jit.script(loaded)(x), model(x), rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(torch.compile(loaded, backend="eager")(x), model(x),
                                       rtol=1e-5, atol=1e-5)
            auto = sensprune.load(f)  # CSR where measured faster: the same predictions
            torch.testing.assert_close(auto(x), model(x), rtol=1e-4, atol=1e-4)


def test_compacted_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from sensprune.export import export_onnx

    net = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        net[1].weight[:, :5] = 0
        net[1].weight[3:9] = 0
    chain, _ = compact_model(net, (20,))
    path = export_onnx(chain, tmp_path / "m.onnx", (20,))
    x = torch.randn(7, 20)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), net(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [
    [{"type": "linear", "in": 0, "out": 3, "bias": True}],
    [{"type": "linear", "in": 2 ** 40, "out": 3, "bias": True}],
    [{"type": "conv2d", "in": 1, "out": 2, "kernel": [3], "stride": [1, 1], "padding": [0, 0],
      "dilation": [1, 1], "bias": True}],
    [{"type": "eval"}],
    [{"type": "select", "in": 4, "count": 9}],
    "linear",
])
def test_malformed_layer_lists_are_refused(spec):
    with pytest.raises(CheckpointError):
        build_chain(spec)


def test_select_index_out_of_range_is_refused(tmp_path):
    net = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight[:, [1, 4]] = 0
    chain, _ = compact_model(net, (6,))
    arch = {"model": "chain", "num_classes": 2, "input_shape": [6], "layers": chain_spec(chain)}
    state = chain.state_dict()
    state["0.index"] = torch.tensor([0, 2, 3, 9])  # beyond the 6 inputs
    f = tmp_path / "bad.safetensors"
    export(state, f, arch)
    with pytest.raises(CheckpointError, match="selection"):
        sensprune.load(f, kernels="dense")


def test_packed_payload_declaring_a_bomb_is_refused(tmp_path):
    import json

    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    net = nn.Sequential(nn.Linear(6, 3))
    f = tmp_path / "m.safetensors"
    export(net.state_dict(), f, {"model": "x", "num_classes": 3, "input_shape": [6]},
           compress="lzma")
    header, _ = read(f)
    header["packed"][0][2] = 1 << 30  # declares a gigabyte inside a tiny file
    with safe_open(str(f), framework="numpy") as fh:
        arrays = load_file(str(f))
    g = tmp_path / "bomb.safetensors"
    save_file(arrays, str(g), metadata={"sensprune": json.dumps(header)})
    with pytest.raises(CheckpointError, match="far more|size"):
        read(g)


# -- the structured methods ---------------------------------------------------------------------
def _unit_sensitivity_brute_force(model, x, targets, kind):
    """S_n by one autograd call per sample and output, on hooked layer outputs."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    out = {n: torch.zeros(m.weight.shape[0]) for n, m in layers.items()}
    for i in range(len(x)):
        zs = {}
        hooks = [m.register_forward_hook(lambda mod, a, z, n=n: zs.__setitem__(n, z))
                 for n, m in layers.items()]
        y = model(x[i:i + 1])
        for h in hooks:
            h.remove()
        classes = [int(targets[i])] if kind == "specific" else range(y.shape[1])
        for k in classes:
            grads = torch.autograd.grad(y[0, k], list(zs.values()), retain_graph=True)
            w = 1.0 if kind == "specific" else 1.0 / y.shape[1]
            for n, g in zip(zs, grads):
                out[n] += w * g[0].abs().reshape(g.shape[1], -1).sum(1) / len(x)
    return out


@pytest.mark.parametrize("kind", ["specific", "unspecific"])
def test_unit_sensitivity_matches_per_sample_autograd(kind):
    torch.manual_seed(0)
    model = ConvNet().eval()
    x, t = torch.randn(5, 2, 10, 10), torch.tensor([0, 3, 1, 1, 2])
    got = unit_sensitivity(model, x, t, kind=kind)
    want = _unit_sensitivity_brute_force(model, x, t, kind)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


def test_neuron_method_decays_units_as_groups_and_spares_the_output_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    before = copy.deepcopy(model)
    method = NeuronSensitivity(model, lam=0.1)
    x, t = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with method.observe(t):
        model(x)
    method.step()
    s = unit_sensitivity(before, x, t)["0"]
    factor = 1 - 0.1 * (1 - s).clamp(min=0)
    torch.testing.assert_close(model[0].weight, before[0].weight * factor[:, None])
    torch.testing.assert_close(model[0].bias, before[0].bias * factor)
    torch.testing.assert_close(model[2].weight, before[2].weight)  # the outputs: untouched


def test_group_lasso_proximal_step_by_hand():
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.01, 0.0, 0.0, 0.0]]))
    GroupLasso(model, lam=0.5).step()
    # row 1: norm 5, shrink by 1 - 0.5 * sqrt(4) / 5 = 0.8; row 2: norm 0.01 -> exactly 0
    torch.testing.assert_close(model[0].weight, torch.tensor([[2.4, 3.2, 0, 0], [0.0, 0, 0, 0]]))
