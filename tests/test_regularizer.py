import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sensprune import Pruner, SensitivityRegularizer, sensitivity
from sensprune.errors import ConfigError
from sensprune.models import LeNet300, prunable_weights


def relu_mlp():
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def batch(n=16):
    return torch.randn(n, 20), torch.randint(0, 4, (n,))


def test_observe_equals_separate_forward():
    m = relu_mlp()
    x, t = batch()
    a = SensitivityRegularizer(m, 0.1)
    with a.observe(t):
        out = m(x)
    F.cross_entropy(out, t).backward()  # the training graph is still usable
    b = SensitivityRegularizer(m, 0.1)
    b.update(x, t)
    ref = sensitivity(m, x, t, params=list(prunable_weights(m)))
    for n in a.insensitivity:
        torch.testing.assert_close(a.insensitivity[n], b.insensitivity[n])
        torch.testing.assert_close(a.insensitivity[n], (1 - ref[n]).clamp(min=0))
    assert set(a.insensitivity) == {"0.weight", "2.weight", "4.weight"}  # biases not by default


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU])
def test_relu_regularizer_is_gradient_of_tikhonov_term(act):
    """With S held fixed, the decay equals lam * dR/dw for R = sum w^2/2 max(0, 1 - S); and one
    plain-SGD step with the decay is gradient descent on L + lam * R."""
    m = nn.Sequential(nn.Linear(20, 32), act(), nn.Linear(32, 4))
    x, t = batch()
    lam, lr = 0.3, 0.05
    reg = SensitivityRegularizer(m, lam, regularize="weights+biases")
    reg.update(x, t)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    # reference: autograd on L + lam * R with S frozen
    ref = copy.deepcopy(m)
    loss = F.cross_entropy(ref(x), t)
    r = sum((p ** 2 / 2 * reg.insensitivity[n]).sum() for n, p in ref.named_parameters())
    grads = torch.autograd.grad(loss + lam * r, list(ref.parameters()))
    expected = {n: w0[n] - lr * g for n, g in zip(w0, grads)}
    # sensprune: lr-scaled lambda, decay applied with the gradients of L (before the SGD step)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    reg2 = SensitivityRegularizer(m, lam, regularize="weights+biases", optimizer=opt,
                                  lam_lr_scaled=True)
    reg2.insensitivity = reg.insensitivity
    F.cross_entropy(m(x), t).backward()
    reg2.step()
    opt.step()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-7)


def test_relu_network_has_zero_second_derivative_in_each_weight():
    """Why R_ReLU is exact for ReLU networks: y is piecewise linear in each single weight, so
    the higher-order terms of the general R vanish; for tanh they do not."""
    x = torch.randn(1, 20)
    for act, zero in ((nn.ReLU(), True), (nn.Tanh(), False)):
        m = nn.Sequential(nn.Linear(20, 8), act, nn.Linear(8, 3))
        w = m[0].weight
        (g,) = torch.autograd.grad(m(x)[0, 1], w, create_graph=True)
        diag = torch.stack([torch.autograd.grad(g[i, j], w, retain_graph=True)[0][i, j]
                            for i in range(3) for j in range(3)])
        assert bool((diag.abs() < 1e-9).all()) == zero


def test_decay_after_step_matches_formula():
    m = relu_mlp()
    x, t = batch()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    reg = SensitivityRegularizer(m, 0.2)
    with reg.observe(t):
        out = m(x)
    F.cross_entropy(out, t).backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in reg.params.items()}
    reg.step()
    for n, p in reg.params.items():
        torch.testing.assert_close(p.detach(), before[n] - 0.2 * before[n] * reg.insensitivity[n])


def test_every_n_steps_reuses_sensitivity():
    m = relu_mlp()
    reg = SensitivityRegularizer(m, 0.1, sens_every=3)
    computed = []
    for i in range(6):
        x, t = batch()
        old = reg.insensitivity
        with reg.observe(t):
            m(x)
        computed.append(reg.insensitivity is not old)
        reg.step()
    assert computed == [True, False, False, True, False, False]


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_pruned_weights_stay_zero(opt_name):
    m = LeNet300()
    if opt_name == "adam":
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    reg = SensitivityRegularizer(m, 1e-3, optimizer=opt)
    pruner = Pruner(m, optimizer=opt)

    def steps(k):
        for _ in range(k):
            x, t = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
            opt.zero_grad()
            with reg.observe(t):
                out = m(x)
            F.cross_entropy(out, t).backward()
            opt.step()
            reg.step()
            pruner.apply()

    steps(3)  # the optimizer has non-zero state everywhere
    pruned = pruner.threshold(0.02)
    assert pruned > 0
    steps(5)
    for n, p in pruner.params.items():
        dead = ~pruner.masks[n]
        assert dead.any()
        assert torch.count_nonzero(p.detach()[dead]) == 0
        for v in opt.state[p].values():
            if torch.is_tensor(v) and v.shape == p.shape:
                assert torch.count_nonzero(v[dead]) == 0
    # an ordinary model: same names, deepcopy, state_dict round trip, no hooks
    assert list(dict(m.named_parameters())) == list(dict(LeNet300().named_parameters()))
    clone = copy.deepcopy(m)
    fresh = LeNet300()
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(clone(x), m(x))
    torch.testing.assert_close(fresh(x), m(x))
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_torch_compile_sees_plain_model():
    m = LeNet300()
    pruner = Pruner(m)
    pruner.threshold(0.03)
    compiled = torch.compile(m, backend="eager")
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(compiled(x), m(x))
    reg = SensitivityRegularizer(m, 0.1)  # the regularizer works on the original module
    reg.update(x, torch.tensor([0, 1, 2, 3]))
    assert reg.insensitivity


def test_bad_options():
    m = relu_mlp()
    with pytest.raises(ConfigError, match="lam must be"):
        SensitivityRegularizer(m, -1.0)
    with pytest.raises(ConfigError, match="needs the optimizer"):
        SensitivityRegularizer(m, 1.0, lam_lr_scaled=True)
    with pytest.raises(ConfigError, match="params must be"):
        SensitivityRegularizer(m, 1.0, regularize="biases")
