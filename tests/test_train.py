import json

import pytest
import torch
import torch.nn.functional as F

from sensprune import build_model, evaluate, make_config, train
from sensprune.data import load_dataset
from sensprune.checkpoint import load_tree

pytestmark = pytest.mark.e2e  # end-to-end: training runs or subprocesses (make test)


def small_cfg(tmp_path, **kw):
    base = dict(model="lenet300", limit_train=3000, val_size=1000, epochs=3, warmup_epochs=1,
                finetune_epochs=0, lr=0.03, lam=1e-3, out=str(tmp_path / "run"), progress=False)
    base.update(kw)
    return make_config(**base)


def test_short_run_reaches_sane_accuracy_and_sparsity(tmp_path, mnist):
    cfg = small_cfg(tmp_path, epochs=4, warmup_epochs=2, limit_train=10000)
    s = train(cfg, log=lambda *_: None)
    assert s["test_error"] < 10.0  # 10000 samples, 4 epochs: about 6% expected
    assert s["compression_ratio"] > 1.5  # the method pruned something
    for key in ("test_error", "val_error", "total_params", "nonzero_params", "compression_ratio",
                "remaining_per_layer", "epochs", "train_seconds", "config"):
        assert key in s
    # independent check of the summary against the saved weights and the MNIST test set
    state = load_tree(tmp_path / "run" / "model.pt")
    weights = [v for k, v in state.items() if k.endswith("weight")]
    total = sum(w.numel() for w in weights)
    nonzero = sum(int((w != 0).sum()) for w in weights)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["total_params"] == total == 266_200
    assert on_disk["nonzero_params"] == nonzero
    assert abs(on_disk["compression_ratio"] - total / nonzero) < 1e-9
    m = build_model("lenet300")
    m.load_state_dict(state)
    m.eval()
    x, y = mnist.test
    with torch.no_grad():
        err = 100.0 * int((m(x).argmax(1) != y).sum()) / len(y)
    assert abs(err - on_disk["test_error"]) < 1e-9
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "summary.md").read_text().count("fc1.weight") == 1


def test_resume_equals_uninterrupted(tmp_path):
    splits = load_dataset("mnist", val_size=500, limit_train=1000)
    kw = dict(optimizer="adam", lr=1e-3, epochs=3, warmup_epochs=1, sens_every=2)
    full = train(small_cfg(tmp_path / "a", **kw), splits=splits, log=lambda *_: None)
    cfg_b = small_cfg(tmp_path / "b", **kw)
    assert train(cfg_b, splits=splits, stop_after_epoch=2, log=lambda *_: None) == {
        "stopped_at_epoch": 2}
    resumed = train(cfg_b, resume=True, splits=splits, log=lambda *_: None)
    a = load_tree(tmp_path / "a" / "run" / "model.pt")
    b = load_tree(tmp_path / "b" / "run" / "model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["test_error"] == resumed["test_error"]
    assert full["thresholds"] == resumed["thresholds"]
    assert len((tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_seeded_runs_are_deterministic(tmp_path):
    splits = load_dataset("mnist", val_size=500, limit_train=600)
    kw = dict(epochs=2, warmup_epochs=0, threshold=0.01, method="sensitivity")
    s1 = train(small_cfg(tmp_path / "1", **kw), splits=splits, log=lambda *_: None)
    s2 = train(small_cfg(tmp_path / "2", **kw), splits=splits, log=lambda *_: None)
    assert s1["nonzero_params"] == s2["nonzero_params"]
    assert s1["test_error"] == s2["test_error"]


def test_scheduled_threshold_reaches_its_target_for_any_regularizer(tmp_path):
    """threshold 'schedule': the sparsification phase ends at exactly the target fraction
    pruned (the summary counts the saved zeros), whichever method; fine-tuning keeps it."""
    splits = load_dataset("mnist", val_size=500, limit_train=600)
    for method in ("sensitivity", "l2"):
        s = train(small_cfg(tmp_path / method, epochs=4, warmup_epochs=1, finetune_epochs=1,
                            method=method, threshold="schedule", target_sparsity=0.9),
                  splits=splits, log=lambda *_: None)
        assert s["nonzero_params"] == 266_200 - int(0.9 * 266_200)
        lines = [json.loads(x) for x in (tmp_path / method / "run" / "metrics.jsonl")
                 .read_text().splitlines()]
        # after sparsification epoch 1 of 2: 0.9 * (1 - 1/8) of the weights pruned
        assert abs(lines[1]["remaining_percent"] - 100 * (1 - int(0.9 * 0.875 * 266_200)
                                                         / 266_200)) < 1e-9


def test_evaluate_helper(mnist):
    m = build_model("lenet300")
    err, loss = evaluate(m, mnist.val)
    assert 80.0 < err < 95.0 and loss > 2.0  # an untrained net is near chance


def test_finetune_cosine_rate_hand_computed():
    from sensprune.train import finetune_lr
    cfg = make_config(epochs=10, warmup_epochs=2, finetune_epochs=4, finetune_lr=0.02,
                      finetune_schedule="cosine")
    # fine-tuning epochs 6..9: 0.02 * (1 + cos(pi * k / 4)) / 2 for k = 0..3
    assert [round(finetune_lr(cfg, e), 12) for e in range(6, 10)] == [
        0.02, round(0.01 * (1 + 2 ** -0.5), 12), 0.01, round(0.01 * (1 - 2 ** -0.5), 12)]
    const = make_config(epochs=10, finetune_epochs=4, finetune_lr=0.02)
    assert {finetune_lr(const, e) for e in range(6, 10)} == {0.02}


def test_init_from_keeps_the_zeros_and_starts_from_the_weights(tmp_path):
    splits = load_dataset("mnist", val_size=500, limit_train=1000)
    src = train(small_cfg(tmp_path / "src", epochs=2, warmup_epochs=1, threshold=0.02),
                splits=splits, log=lambda *_: None)
    assert src["compression_ratio"] > 2
    before = load_tree(tmp_path / "src" / "run" / "model.pt")
    # lr 0: the fine-tuning run must reproduce the source model exactly
    frozen = train(small_cfg(tmp_path / "ft0", method="none", epochs=1, lr=0.0,
                             init_from=str(tmp_path / "src" / "run")),
                   splits=splits, log=lambda *_: None)
    after0 = load_tree(tmp_path / "ft0" / "run" / "model.pt")
    assert all(torch.equal(before[k], after0[k]) for k in before)
    assert frozen["test_error"] == src["test_error"]
    # a real fine-tuning: the weights move, the zeros stay exactly zero
    train(small_cfg(tmp_path / "ft", method="none", epochs=2, lr=0.05, schedule="cosine",
                    init_from=str(tmp_path / "src" / "run" / "model.pt")),
          splits=splits, log=lambda *_: None)
    after = load_tree(tmp_path / "ft" / "run" / "model.pt")
    for k, w in before.items():
        if k.endswith("weight"):
            assert torch.equal(after[k] == 0, w == 0), k
    assert not torch.equal(after["fc1.weight"], before["fc1.weight"])


def test_init_from_another_model_is_refused(tmp_path):
    import pytest
    from sensprune.errors import ConfigError
    splits = load_dataset("mnist", val_size=500, limit_train=500)
    train(small_cfg(tmp_path / "src", epochs=1, warmup_epochs=1), splits=splits,
          log=lambda *_: None)
    with pytest.raises(ConfigError, match="holds a lenet300"):
        train(small_cfg(tmp_path / "x", model="lenet5", method="none", epochs=1,
                        init_from=str(tmp_path / "src" / "run")), splits=splits,
              log=lambda *_: None)


def test_distillation_objective_against_a_hand_computed_case():
    """(1 - a) CE + a tau^2 KL(teacher || student), summed over the batch, at softened outputs."""
    from sensprune.train import _distilled
    cfg = make_config(distill_weight=0.25, distill_temperature=2.0)
    teacher = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    logits = torch.randn(4, 2, requires_grad=True)
    ce = F.cross_entropy(logits, torch.tensor([0, 1, 1, 0]), reduction="sum")
    got = _distilled(cfg, teacher, x, logits, ce)
    p = torch.softmax(teacher(x).detach() / 2, 1)
    q = torch.softmax(logits.detach() / 2, 1)
    kl = float((p * (p.log() - q.log())).sum())
    assert float(got) == pytest.approx(0.75 * float(ce) + 0.25 * 4 * kl, rel=1e-5)
    # the student that equals its teacher gets no gradient from the soft term
    same = teacher(x).detach().requires_grad_(True)
    _distilled(make_config(distill_weight=1.0), teacher, x, same, torch.zeros(())).backward()
    assert float(same.grad.abs().max()) < 1e-6
