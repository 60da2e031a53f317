import pytest
import torch
import torch.nn as nn

from sensprune import Pruner, sparsity_report
from sensprune.errors import ConfigError


def model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 10))


def test_global_threshold_hand_check():
    m = model()
    p = Pruner(m)
    w0 = {n: q.detach().clone() for n, q in p.params.items()}
    n_pruned = p.threshold(0.05)
    expected = sum(int((w.abs() < 0.05).sum()) for w in w0.values())
    assert n_pruned == expected
    for n, q in p.params.items():
        assert torch.equal(q.detach(), torch.where(w0[n].abs() < 0.05, 0.0, w0[n]))
    rep = sparsity_report(m)
    assert rep["nonzero_params"] == 50 * 40 + 40 * 10 - expected
    assert rep["compression_ratio"] == pytest.approx(2400 / rep["nonzero_params"])


def test_per_layer_threshold_scales_with_std():
    m = model()
    p = Pruner(m)
    stds = {n: float(q.detach().std()) for n, q in p.params.items()}
    w0 = {n: q.detach().clone() for n, q in p.params.items()}
    p.threshold(0.5, mode="layer")
    for n, q in p.params.items():
        assert torch.equal(q.detach() == 0, w0[n].abs() < 0.5 * stds[n])


def test_masks_only_grow():
    m = model()
    p = Pruner(m)
    p.threshold(0.05)
    kept = p.nonzero()
    with torch.no_grad():
        for q in p.params.values():
            q.add_(1.0)  # pruned entries become non-zero...
    p.apply()  # ...and the masks zero them again
    assert p.nonzero() == kept == sparsity_report(m)["nonzero_params"]
    p.threshold(0.0)
    assert p.nonzero() == kept


def test_auto_threshold_respects_budget_and_is_tight():
    """A synthetic error curve: error = fraction of weights pruned (in %), so the budget is a
    known fraction; the search must stay within it and get close to it."""
    m = model()
    p = Pruner(m)
    total = 2400

    def err():
        return 100.0 * sum(int((q == 0).sum()) for q in p.params.values()) / total

    for budget in (10.0, 37.0, 80.0):
        t = p.auto_threshold(err, budget)
        assert p.nonzero() == total  # the search changed nothing
        p_try = Pruner(m)
        saved = [q.detach().clone() for q in p.params.values()]
        p_try.threshold(t)
        got = err()
        with torch.no_grad():
            for q, s in zip(p.params.values(), saved):
                q.copy_(s)
        assert got <= budget
        assert got >= budget - 0.5  # 14 bisection steps: within 1/16384 of the kept weights


def test_auto_threshold_impossible_budget_returns_zero():
    m = model()
    p = Pruner(m)
    assert p.auto_threshold(lambda: 50.0, max_error=10.0) == 0.0


def test_bad_threshold():
    p = Pruner(model())
    with pytest.raises(ConfigError):
        p.threshold(-1.0)
    with pytest.raises(ConfigError, match="mode"):
        p.threshold(0.1, mode="neuron")


def test_prune_to_removes_the_smallest_weights_by_brute_force():
    """Global: the k = sparsity * total smallest |w| over all layers go, nothing else;
    layer mode: the same fraction of each layer."""
    m = model()
    p = Pruner(m)
    w0 = torch.cat([q.detach().abs().flatten() for q in p.params.values()])
    cut = p.prune_to(0.6)
    k = int(0.6 * 2400)
    order = w0.sort().values
    assert cut == float(order[k - 1])
    assert p.nonzero() == 2400 - k
    now = torch.cat([q.detach().flatten() for q in p.params.values()])
    assert torch.equal(now == 0, w0 <= order[k - 1])

    q = Pruner(model())
    sizes = {n: w.numel() for n, w in q.params.items()}
    w1 = {n: w.detach().abs().clone() for n, w in q.params.items()}
    q.prune_to(0.3, mode="layer")
    for n, w in q.params.items():
        kn = int(0.3 * sizes[n])
        assert int((w == 0).sum()) == kn
        assert torch.equal(w.detach() == 0, w1[n] <= w1[n].flatten().sort().values[kn - 1])


def test_prune_to_counts_what_is_already_pruned_and_never_revives():
    m = model()
    p = Pruner(m)
    p.prune_to(0.5)
    kept = p.nonzero()
    assert p.prune_to(0.4) == 0.0 and p.nonzero() == kept  # already past 40%: nothing to do
    p.prune_to(0.75)
    assert p.nonzero() == 2400 - int(0.75 * 2400)
    with pytest.raises(ConfigError, match="sparsity"):
        p.prune_to(1.0)


def test_schedule_policy_follows_the_cubic_schedule():
    """threshold 'schedule' after sparsification epoch i of n: pruned fraction
    s_f * (1 - (1 - i/n)^3), the full target at the phase's last epoch."""
    from sensprune.pruning import ThresholdPolicy

    m = model()
    p = Pruner(m)
    pol = ThresholdPolicy(p, "schedule", target_sparsity=0.9, sparsify_epochs=4)
    state = {"thresholds": [], "reference_val_error": None}

    def no_eval():
        raise AssertionError("the schedule must not evaluate")

    for i in (1, 2, 3):
        pol.end_epoch(state, i, last=False, evaluate=no_eval)
        assert p.nonzero() == 2400 - int(0.9 * (1 - (1 - i / 4) ** 3) * 2400)
    pol.end_epoch(state, 4, last=True, evaluate=no_eval)
    assert p.nonzero() == 2400 - int(0.9 * 2400)
    assert len(state["thresholds"]) == 4 and state["thresholds"] == sorted(state["thresholds"])


def test_prune_to_and_threshold_take_another_criterion():
    """scores= ranks by any tensor per parameter (larger = keep), not by |w|."""
    import torch.nn as nn
    from sensprune.errors import ConfigError
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    pr = Pruner(m)
    scores = {n: torch.rand(p.shape) for n, p in pr.params.items()}
    pr.prune_to(0.5, scores=scores)
    allv = torch.cat([s.flatten() for s in scores.values()])
    cut = allv.kthvalue(allv.numel() // 2).values
    for n, p in pr.params.items():
        assert torch.equal(pr.masks[n], scores[n] > cut)  # the lowest half by score went
        assert bool((p.detach()[~pr.masks[n]] == 0).all())
    pr2 = Pruner(m)
    pr2.threshold(0.25, scores=scores)
    assert all(torch.equal(pr2.masks[n], scores[n] >= 0.25) for n in scores)
    with pytest.raises(ConfigError, match="no entry"):
        Pruner(m).prune_to(0.5, scores={})
    with pytest.raises(ConfigError, match="shape"):
        Pruner(m).prune_to(0.5, scores={n: torch.rand(3) for n in scores})


def test_auto_threshold_with_scores_bisects_over_the_criterion():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    pr = Pruner(m)
    scores = {n: torch.rand(p.shape) for n, p in pr.params.items()}
    seen = []

    def zeros_fraction():  # "error": the share of zero weights, within budget up to 0.3
        z = sum(int((p == 0).sum()) for p in pr.params.values())
        seen.append(z)
        return 100.0 * z / sum(p.numel() for p in pr.params.values())

    t = pr.auto_threshold(zeros_fraction, max_error=30.0, scores=scores)
    pr.threshold(t, scores=scores)
    frac = zeros_fraction()
    assert 25.0 <= frac <= 30.0  # the largest cut of the score ranking within the budget
    assert all(torch.equal(pr.masks[n], scores[n] >= t) for n in scores)


def test_a_threshold_rule_of_your_own_plugs_into_the_policy():
    """The threshold choice is an object: a rule written here (prune to a fixed fraction of
    each layer, ranked by S-like scores) runs under the policy's every/last gating."""
    from sensprune.pruning import (AutoThreshold, FixedThreshold, NoThreshold,
                                   ScheduledThreshold, ThresholdPolicy, ThresholdRule,
                                   threshold_rule)

    assert isinstance(threshold_rule("auto"), AutoThreshold)
    assert isinstance(threshold_rule("schedule"), ScheduledThreshold)
    assert isinstance(threshold_rule("none"), NoThreshold)
    assert threshold_rule(0.25).t == 0.25 and isinstance(threshold_rule(0.25), FixedThreshold)

    class HalfPerLayer(ThresholdRule):
        name = "half"

        def apply(self, policy, state, index, last, before, evaluate):
            return policy.pruner.prune_to(0.5, "layer")

    m = model()
    p = Pruner(m)
    pol = ThresholdPolicy(p, HalfPerLayer(), every=2)
    state = {"thresholds": [], "reference_val_error": None}
    assert pol.end_epoch(state, 1, last=False, evaluate=None) is None  # not due (every 2)
    assert p.nonzero() == 2400
    assert pol.end_epoch(state, 2, last=False, evaluate=None) is not None
    for name, mask in p.masks.items():  # half of each layer, by hand
        assert int(mask.sum()) == mask.numel() - int(0.5 * mask.numel())
    assert len(state["thresholds"]) == 1
