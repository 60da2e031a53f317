"""The method interface: the registry drives the loop, and a new method is one class plus one
registry entry (the README's example, run end to end)."""

import pytest
import torch

from sensprune import make_config, train
from sensprune.data import load_dataset
from sensprune.methods import REGISTRY, Method, make_method
from sensprune.methods.base import MethodContext
from sensprune.models import build_model, select_params
from sensprune.pruning import Pruner
from sensprune.checkpoint import load_tree


class SmallFirst(Method):  # the README's "writing a new method" example, verbatim in spirit
    name = "small_first"
    uses_threshold = True
    uses_lam = True

    def __init__(self, model, lam):
        self.lam, self.params = lam, select_params(model)
        self.steps = 0

    @classmethod
    def from_config(cls, cfg, ctx):
        return cls(ctx.model, cfg.lam)

    @torch.no_grad()
    def step(self):
        self.steps += 1
        for p in self.params.values():
            p.mul_(1 - self.lam / (1 + p.abs() / p.abs().mean()))

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_registry_builds_every_method_with_its_flags():
    model = build_model("lenet300")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = MethodContext(model, opt, Pruner(model, optimizer=opt), steps_per_epoch=10, n_train=100)
    for name, cls in REGISTRY.items():
        m = make_method(make_config(method=name, epochs=3, warmup_epochs=1), ctx)
        assert type(m) is cls and m.name == name
        model = build_model("lenet300")  # Sparse VD converts the layers in place
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctx = MethodContext(model, opt, Pruner(model, optimizer=opt), 10, 100)
    assert not REGISTRY["none"].sparsifies and REGISTRY["sensitivity"].uses_threshold
    assert {n for n, c in REGISTRY.items() if c.uses_lam} == {"sensitivity", "l2", "l1", "neuron",
                                                              "group_lasso"}


@pytest.mark.e2e
def test_a_new_method_is_one_class_and_one_registry_entry(tmp_path):
    REGISTRY["small_first"] = SmallFirst
    try:
        splits = load_dataset("mnist", val_size=500, limit_train=1000)
        cfg = make_config(model="lenet300", method="small_first", lam=1e-3, epochs=3,
                          warmup_epochs=1, lr=0.03, out=str(tmp_path / "run"), progress=False)
        s = train(cfg, splits=splits, log=lambda *_: None)
        assert s["method"] == "small_first" and s["compression_ratio"] > 1.2
        ckpt = load_tree(tmp_path / "run" / "checkpoint.pt")
        assert ckpt["method"] == {"steps": 2 * 10}  # 2 sparsification epochs of 10 steps
        assert len(s["thresholds"]) == 2  # the loop's threshold policy ran for it
    finally:
        del REGISTRY["small_first"]


@pytest.mark.e2e
def test_sensitivity_epoch_stats_hand_computed_and_in_the_metrics(tmp_path):
    """The per-epoch decay statistics: mean, CV and share of d = 0 over the weights still in
    the network (pruned weights left out), checked on a hand-made insensitivity; and a
    short run writes them on its sparsification lines only."""
    import json

    model = build_model("lenet300")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = MethodContext(model, opt, Pruner(model, optimizer=opt), 10, 100)
    m = make_method(make_config(method="sensitivity", epochs=3, warmup_epochs=1,
                                decay_floor=0.0), ctx)
    w = model.fc3.weight  # 10 x 100
    with torch.no_grad():
        w.zero_()
        w.view(-1)[:4] = 1.0  # four kept weights
    d = torch.full_like(w, 0.7)  # the pruned weights' d must not count
    d.view(-1)[:4] = torch.tensor([0.0, 0.5, 1.0, 0.5])
    m.insensitivity = {"fc3.weight": d}
    got = m.epoch_stats()["decay"]["fc3.weight"]
    mean = 0.5
    std = ((0.25 + 0 + 0.25 + 0) / 4) ** 0.5
    assert abs(got["mean_decay"] - mean) < 1e-6
    assert abs(got["cv_decay"] - std / mean) < 1e-6
    assert abs(got["undecayed"] - 0.25) < 1e-6
    m.decay_floor = 0.5  # with a decay floor, the weights at the floor are the least decayed
    assert abs(m.epoch_stats()["decay"]["fc3.weight"]["undecayed"] - 0.75) < 1e-6

    splits = load_dataset("mnist", val_size=500, limit_train=1000)
    cfg = make_config(model="lenet300", method="sensitivity", lam=1e-3, epochs=4,
                      warmup_epochs=1, finetune_epochs=1, lr=0.03, out=str(tmp_path / "run"),
                      progress=False)
    train(cfg, splits=splits, log=lambda *_: None)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "decay" not in lines[0]  # warm-up: no sensitivity yet
    assert "decay" not in lines[3]  # fine-tuning: the method is off
    for line in lines[1:3]:
        stats = line["decay"]
        assert set(stats) == {"fc1.weight", "fc2.weight", "fc3.weight"}
        assert all(0 <= v["mean_decay"] <= 1 and 0 <= v["undecayed"] <= 1 for v in stats.values())


def test_register_method_makes_a_new_method_trainable(tmp_path):
    """The GUIDE's example method, registered from outside the package, trains by name."""
    import torch
    from sensprune import make_config, train
    from sensprune.data import load_dataset
    from sensprune.errors import ConfigError
    from sensprune.methods import REGISTRY, Method, register_method
    from sensprune.models import select_params

    class SmallFirst(Method):
        name = "small_first_test"
        uses_threshold = True
        uses_lam = True

        def __init__(self, model, lam):
            self.lam, self.params = lam, select_params(model)

        @classmethod
        def from_config(cls, cfg, ctx):
            return cls(ctx.model, cfg.lam)

        @torch.no_grad()
        def step(self):
            for p in self.params.values():
                p.mul_(1 - self.lam / (1 + p.abs() / p.abs().mean()))

    register_method(SmallFirst)
    try:
        with pytest.raises(ConfigError, match="taken"):
            register_method(type("Other", (SmallFirst,), {}))
        with pytest.raises(ConfigError, match="subclass"):
            register_method(object)
        cfg = make_config(model="lenet300", method="small_first_test", epochs=2, lam=1e-3,
                          threshold="schedule", target_sparsity=0.5, limit_train=500,
                          val_size=100, out=str(tmp_path / "r"), progress=False)
        s = train(cfg, splits=load_dataset("mnist", val_size=100, limit_train=500),
                  log=lambda *_: None)
        assert s["compression_ratio"] == pytest.approx(2.0, rel=1e-3)
    finally:
        REGISTRY.pop("small_first_test", None)


def test_each_method_declares_the_settings_only_it_reads_and_config_derives_them():
    """config.read_by() comes from the methods' own `reads`; it is the table the code had
    before the declarations moved (behaviour kept), every name is a real setting, and a method
    registered later counts at once."""
    import dataclasses

    from sensprune.config import TrainConfig, differing_settings, read_by
    from sensprune.methods import REGISTRY, Method, register_method
    expected = {
        "kind": {"sensitivity", "neuron"}, "decay_floor": {"sensitivity", "neuron"},
        "normalize": {"sensitivity", "neuron"}, "gmp_every": {"gmp"}, "unit_decay": {"neuron"},
        "vd_kl_warmup_epochs": {"sparse_vd"}, "vd_kl_delay_epochs": {"sparse_vd"},
        **{k: {"sensitivity"} for k in ("reduction", "outputs", "beta", "quantile",
                                        "times_weight", "batchnorm", "sens_source",
                                        "sens_every", "output_samples", "lam_lr_scaled")}}
    assert {k: set(v) for k, v in read_by().items()} == expected
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(k in fields for cls in REGISTRY.values() for k in cls.reads)

    @register_method
    class Probe(Method):
        name = "probe-reads"
        reads = ("gmp_every",)
    try:
        assert set(read_by()["gmp_every"]) == {"gmp", "probe-reads"}
        base = {"method": "l2", "gmp_every": 100}
        assert differing_settings({**base, "gmp_every": 5}, base) == []  # L2 ignores it
    finally:
        REGISTRY.pop("probe-reads")
