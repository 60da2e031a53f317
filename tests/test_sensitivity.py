import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sensprune import sensitivity
from sensprune.errors import ConfigError
from sensprune.models import ConvBNNet, LSTMClassifier, LeNet5

from reference import brute_force_sensitivity

ACTS = {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}


class MLP(nn.Module):
    def __init__(self, act="relu"):
        super().__init__()
        self.act = ACTS[act]
        self.l1, self.l2, self.l3 = nn.Linear(12, 16), nn.Linear(16, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.l3(self.act(self.l2(self.act(self.l1(x)))))


class SeqModel(nn.Module):
    """Embedding -> GRU, a Linear applied per time step (3-D input), a Conv1d, a shared
    Linear used twice (weight sharing) and a residual connection."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.gru = nn.GRU(6, 6, batch_first=True)
        self.per_step = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 4, 3, padding=1, stride=2)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        h, _ = self.gru(self.emb(tokens))
        h = h + torch.tanh(self.per_step(h))
        z = self.conv(h.transpose(1, 2)).mean(-1)
        z = self.shared(F.gelu(self.shared(z))) + z
        return self.head(z)


class StackedLSTM(nn.Module):
    """Two LSTM layers, time-major, with a given initial state, then a head on every step's
    output averaged: the LSTM fast path beyond the one-layer, batch-first classifier."""

    def __init__(self, bias=True):
        super().__init__()
        self.lstm = nn.LSTM(5, 6, num_layers=2, bias=bias)
        self.h0 = nn.Parameter(torch.randn(2, 1, 6) * 0.5)
        self.head = nn.Linear(6, 4)

    def forward(self, x):  # x: (B, T, 5)
        b = x.shape[0]
        h0 = self.h0.expand(-1, b, -1).contiguous()
        out, _ = self.lstm(x.transpose(0, 1), (h0, torch.zeros_like(h0)))
        return self.head(out.mean(0))


class StackedGRU(nn.Module):
    """Two GRU layers, time-major, with a learned initial state; the head reads the final
    hidden state of the last layer and the mean output (both of the layer's outputs used)."""

    def __init__(self, bias=True):
        super().__init__()
        self.gru = nn.GRU(5, 6, num_layers=2, bias=bias)
        self.h0 = nn.Parameter(torch.randn(2, 1, 6) * 0.5)
        self.head = nn.Linear(6, 4)

    def forward(self, x):  # x: (B, T, 5)
        h0 = self.h0.expand(-1, x.shape[0], -1).contiguous()
        out, h_n = self.gru(x.transpose(0, 1), h0)
        return self.head(out.mean(0) + h_n[-1])


def cases():
    yield "mlp-relu", MLP("relu"), torch.randn(7, 12), 5
    yield "mlp-tanh", MLP("tanh"), torch.randn(7, 12), 5
    yield "mlp-sigmoid", MLP("sigmoid"), torch.randn(7, 12), 5
    yield "mlp-gelu", MLP("gelu"), torch.randn(7, 12), 5
    yield "lenet5", LeNet5(), torch.randn(4, 1, 28, 28), 10
    yield "cnn-bn-train-tanh", ConvBNNet(act="tanh").train(), torch.randn(4, 1, 28, 28), 10
    yield "cnn-bn-eval-gelu", ConvBNNet(act="gelu").eval(), torch.randn(4, 1, 28, 28), 10
    yield "lstm-sigmoid-tanh", LSTMClassifier(hidden=8), torch.randn(3, 1, 28, 28), 10
    yield "seq-emb-gru-conv1d", SeqModel(), torch.randint(0, 11, (5, 9)), 3
    yield "lstm-2-layers-time-major-h0", StackedLSTM(), torch.randn(4, 7, 5), 4
    yield "lstm-no-bias", StackedLSTM(bias=False), torch.randn(3, 6, 5), 4
    yield "gru-2-layers-time-major-h0", StackedGRU(), torch.randn(4, 7, 5), 4
    yield "gru-no-bias", StackedGRU(bias=False), torch.randn(3, 6, 5), 4


@pytest.mark.parametrize("name,model,x,c", list(cases()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("kind", ["specific", "unspecific"])
@pytest.mark.parametrize("reduction", ["sample", "batch"])
def test_matches_brute_force(name, model, x, c, kind, reduction):
    targets = torch.randint(0, c, (x.shape[0],))
    outputs = "probs" if hash(name) % 2 else "logits"
    for out in ("logits", "probs") if name.startswith("mlp") else (outputs,):
        # the exact mode: differentiated through BatchNorm's batch statistics, as the brute
        # force does (the frozen default has its own test below)
        s = sensitivity(model, x, targets, kind=kind, reduction=reduction, outputs=out,
                        batchnorm="exact")
        ref = brute_force_sensitivity(model, x, targets, kind, reduction, out)
        assert set(s) == set(ref)
        for n in ref:
            assert s[n].shape == ref[n].shape
            torch.testing.assert_close(s[n].double(), ref[n], rtol=1e-5, atol=1e-7,
                                       msg=f"{name} {kind} {reduction} {out} {n}")


def test_hand_computed_linear():
    # y = W x + b with C=2 outputs: dy_k/dW_kj = x_j, dy_k/db_k = 1, zero elsewhere.
    m = nn.Linear(3, 2)
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    t = torch.tensor([0, 1])
    s = sensitivity(m, x, t, kind="specific")
    expected_w = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 1.0]]) / 2
    torch.testing.assert_close(s["weight"], expected_w)
    torch.testing.assert_close(s["bias"], torch.tensor([0.5, 0.5]))
    s = sensitivity(m, x, kind="unspecific")  # alpha = 1/2 for both outputs
    torch.testing.assert_close(s["weight"], torch.tensor([[0.75, 1.0, 2.0]] * 2) / 2)
    s = sensitivity(m, x, t, kind="specific", reduction="batch")
    torch.testing.assert_close(s["weight"], expected_w)  # one sample per class: no cancellation
    s = sensitivity(m, x, torch.tensor([0, 0]), kind="specific", reduction="batch")
    torch.testing.assert_close(s["weight"][0], torch.tensor([1.5, 2.0, 2.0]) / 2)


def test_batch_reduction_lets_signs_cancel():
    m = nn.Linear(1, 2, bias=False)
    x = torch.tensor([[1.0], [-1.0]])
    t = torch.tensor([0, 0])
    assert sensitivity(m, x, t, reduction="sample")["weight"][0, 0] == 1.0
    assert sensitivity(m, x, t, reduction="batch")["weight"][0, 0] == 0.0


@pytest.mark.e2e
def test_mode_grads_and_buffers_untouched():
    m = ConvBNNet(act="tanh").train()
    x = torch.randn(4, 1, 28, 28)
    for p in m.parameters():
        p.grad = torch.full_like(p, 3.0)
    buffers = copy.deepcopy(dict(m.named_buffers()))
    sensitivity(m, x, torch.tensor([1, 2, 3, 4]), kind="unspecific")
    assert m.training
    assert all(torch.all(p.grad == 3.0) for p in m.parameters())
    for n, b in m.named_buffers():
        assert torch.equal(b, buffers[n]), n
    m.eval()
    sensitivity(m, x, torch.tensor([1, 2, 3, 4]))
    assert not m.training


def test_no_hooks_left_behind():
    m = MLP()
    sensitivity(m, torch.randn(2, 12), torch.tensor([0, 1]))
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._backward_hooks


def test_errors():
    m = MLP()
    x = torch.randn(3, 12)
    with pytest.raises(ConfigError, match="needs targets"):
        sensitivity(m, x)
    with pytest.raises(ConfigError, match=r"out of range.*\[0, 4\]"):
        sensitivity(m, x, torch.tensor([0, 1, 5]))
    with pytest.raises(ConfigError, match="integer tensor of shape"):
        sensitivity(m, x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ConfigError, match=r"shape \(batch, classes\)"):
        sensitivity(nn.Linear(12, 4), torch.randn(12), kind="unspecific")  # no batch
    with pytest.raises(ConfigError, match=r"integer tensor of shape \(3, 2\)"):
        sensitivity(nn.Linear(12, 4), torch.randn(3, 2, 12), torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError, match="kind must be"):
        sensitivity(m, x, kind="nope")
    with pytest.raises(ConfigError, match="reduction must be"):
        sensitivity(m, x, kind="unspecific", reduction="mean")


def test_many_outputs_chunked_exact():
    """C = 150 > the fast path's row chunk: still exact."""
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 150))
    x = torch.randn(3, 6)
    s = sensitivity(m, x, kind="unspecific")
    ref = brute_force_sensitivity(m, x, None, "unspecific", "sample")
    for n in ref:
        torch.testing.assert_close(s[n].double(), ref[n], rtol=1e-5, atol=1e-8)


@pytest.mark.e2e
@pytest.mark.parametrize("reduction", ["sample", "batch"])
def test_sampled_outputs_unbiased(reduction):
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 40))
    x = torch.randn(4, 5)
    exact = sensitivity(m, x, kind="unspecific", reduction=reduction)
    g = torch.Generator().manual_seed(0)
    draws, k, c = 1000, 5, 40
    mean = {n: torch.zeros_like(v) for n, v in exact.items()}
    for _ in range(draws):
        est = sensitivity(m, x, kind="unspecific", reduction=reduction, output_samples=k,
                          generator=g)
        for n in mean:
            mean[n] += est[n] / draws
    # worst case (last layer: each row depends on one output, drawn with p = K/C): the
    # relative standard deviation of the mean is sqrt((1 - p) / (p draws)); allow 4 of them
    p = k / c
    tol = 4 * ((1 - p) / (p * draws)) ** 0.5
    for n in exact:
        rel = (mean[n] - exact[n]).norm() / exact[n].norm()
        assert rel < tol, (n, float(rel), tol)
    single = sensitivity(m, x, kind="unspecific", output_samples=5, generator=g)
    assert any(not torch.allclose(single[n], exact[n]) for n in exact)


class _DetachedBN(nn.Module):
    """Independent reference for the frozen mode: BatchNorm written out by hand with the
    batch statistics detached."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        mu = x.mean(dims).detach().view(shape)
        var = x.var(dims, unbiased=False).detach().view(shape)
        return ((x - mu) / torch.sqrt(var + self.bn.eps) * self.bn.weight.view(shape)
                + self.bn.bias.view(shape))


def _bn_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 3)).train()


@pytest.mark.parametrize("kind", ["specific", "unspecific"])
@pytest.mark.parametrize("reduction", ["sample", "batch"])
def test_frozen_batchnorm_matches_detached_statistics(kind, reduction):
    m = _bn_net()
    x, t = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    ref_model = copy.deepcopy(m)
    for i in (1, 5):
        ref_model[i] = _DetachedBN(ref_model[i])
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    got = sensitivity(m, x, t, kind=kind, reduction=reduction)  # frozen is the default
    ref = {n.replace(".bn.", "."): v for n, v in
           brute_force_sensitivity(ref_model, x, t, kind, reduction).items()}
    assert set(got) == set(ref)
    for n, v in got.items():
        torch.testing.assert_close(v.double(), ref[n], rtol=1e-5, atol=1e-7, msg=n)
    assert all(mod.training for mod in m)  # modes restored
    for n, b in m.named_buffers():  # running statistics untouched
        assert torch.equal(b, buffers[n]), n
    exact = sensitivity(m, x, t, kind=kind, reduction=reduction, batchnorm="exact")
    assert any(not torch.allclose(exact[n], got[n]) for n in got)  # two different quantities


def test_frozen_observe_keeps_the_training_backward_usable():
    """The frozen mode runs a second forward inside observe(); the training forward's backward
    must still work (a buffer written in place would break it), running stats move once."""
    from sensprune import SensitivityRegularizer
    m = _bn_net()
    x, t = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    ref = sensitivity(m, x, t, params=["0.weight", "4.weight", "7.weight"])
    reg = SensitivityRegularizer(m, 1e-3, decay_floor=0.0)
    before = m[1].num_batches_tracked.clone()
    with reg.observe(t):
        out = m(x)
    F.cross_entropy(out, t).backward()
    assert int(m[1].num_batches_tracked - before) == 1
    for n in ("0.weight", "4.weight", "7.weight"):
        torch.testing.assert_close(reg.insensitivity[n], (1 - ref[n]).clamp(min=0))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, stride=2, padding=1),
    nn.Conv2d(3, 4, (3, 2), padding=(2, 1), dilation=2, bias=False),
    nn.Conv1d(3, 4, 5, stride=1, padding=2),
])
@pytest.mark.parametrize("rows", [1, 3])
def test_both_conv_engines_match_brute_force(conv, rows):
    """unfold + bmm and the grouped weight-gradient convolution give the same per-sample
    |gradient| sums as one autograd pass per sample and output row."""
    from sensprune.sensitivity_engines.engines.conv import _conv_grouped, _conv_unfold

    torch.manual_seed(0)
    shape = (5, 3, 17, 17) if isinstance(conv, nn.Conv2d) else (5, 3, 23)
    a = torch.randn(shape)
    z = conv(a)
    delta = torch.randn(rows, *z.shape)
    want_w = torch.zeros_like(conv.weight, dtype=torch.float64)
    want_b = torch.zeros(conv.out_channels, dtype=torch.float64)
    for k in range(rows):
        for n in range(shape[0]):
            gw, *gb = torch.autograd.grad(conv(a[n:n + 1]), [conv.weight] + (
                [conv.bias] if conv.bias is not None else []), delta[k, n:n + 1])
            want_w += 0.5 * gw.double().abs()
            if gb:
                want_b += 0.5 * gb[0].double().abs()
    for engine in (_conv_unfold, _conv_grouped):
        s_w, s_b = engine(conv, a, delta, 0.5)
        assert torch.allclose(s_w.double(), want_w, rtol=1e-5, atol=1e-6), engine.__name__
        if conv.bias is not None:
            assert torch.allclose(s_b.double(), want_b, rtol=1e-5, atol=1e-6), engine.__name__


def test_lstm_takes_the_fast_path_and_keeps_its_output():
    """The LSTM's weights never reach the generic engine, and the unrolled forward the
    recorder substitutes gives nn.LSTM's own output and state."""
    import sys

    engine = sys.modules["sensprune.sensitivity_engines.engines.recurrent"]
    definition = sys.modules["sensprune.sensitivity_engines.definition"]
    model = StackedLSTM()
    x = torch.randn(3, 6, 5).transpose(0, 1)
    h0 = torch.randn(2, 3, 6)
    c0 = torch.randn(2, 3, 6)
    (out, h, c), records = engine._lstm_unrolled(model.lstm, x, (h0, c0))
    ref_out, (ref_h, ref_c) = model.lstm(x, (h0, c0))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(c, ref_c)
    assert [r[0] for r in records] == [0, 1]

    seen = []
    generic = definition.generic_sensitivity

    def spy(y, alpha, params, *args, **kwargs):
        seen.extend(p.shape for p in params)
        return generic(y, alpha, params, *args, **kwargs)

    definition.generic_sensitivity = spy
    try:
        for kind in ("specific", "unspecific"):
            sensitivity(LSTMClassifier(hidden=8), torch.randn(3, 1, 28, 28),
                        torch.tensor([1, 2, 3]), kind=kind)
            sensitivity(StackedGRU(), torch.randn(3, 6, 5), torch.tensor([1, 2, 3]), kind=kind,
                        params=[n for n, _ in StackedGRU().named_parameters() if n != "h0"])
    finally:
        definition.generic_sensitivity = generic
    assert seen == []
    gru = StackedGRU().gru
    (out, h), _ = engine._gru_unrolled(gru, x, h0)
    ref_out, ref_h = gru(x, h0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h, ref_h)


def test_sensitivity_is_a_plain_documented_function():
    """help(), inspect.signature, IDEs and type checkers see the function itself."""
    import inspect
    import sensprune
    assert inspect.isfunction(sensprune.sensitivity)
    params = inspect.signature(sensprune.sensitivity).parameters
    assert list(params)[:3] == ["model", "inputs", "targets"] and "kind" in params
    assert "Sensitivity S" in inspect.getdoc(sensprune.sensitivity)
