import json
import shutil

import pytest
import torch
import torch.nn as nn

from sensprune.methods import L1Decay, L2Decay
from sensprune.methods import GradualMagnitude
from sensprune.methods import SparseVD
from sensprune.models import LeNet5
from sensprune.results import to_json
from sensprune.pruning import Pruner
from sensprune.reproduce import reproduce
from sensprune.checkpoint import load_tree


@pytest.mark.e2e
def test_quick_reproduce_writes_consistent_files(quick_lenet300):
    tmp_path, result = quick_lenet300
    from conftest import QUICK_ROWS

    labels = [r.label for r in result["rows"]]
    assert labels == QUICK_ROWS  # quick mode: seed 0 only, in the order asked
    on_disk = json.loads((tmp_path / "table.json").read_text())
    assert on_disk["rows"] == to_json(result["rows"])
    md = (tmp_path / "table.md").read_text()
    assert all(f"| {label} |" in md for label in labels)
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    for r in result["rows"]:
        # every row agrees with the zeros in its saved model
        state = load_tree(tmp_path / r.run_dir / "model.pt")
        # and its compact export holds exactly the same weights
        from sensprune.export import read
        exported = read(tmp_path / r.run_dir / "model.safetensors")[1]
        for layer in r.remaining_per_layer:
            assert torch.equal(exported[layer], state[layer])
        for layer, pct in r.remaining_per_layer.items():
            w = state[layer]
            assert pct == pytest.approx(100.0 * int((w != 0).sum()) / w.numel())
        assert r.compression_ratio == pytest.approx(r.total_params / r.nonzero_params)
    dense = next(r for r in result["rows"] if r.label == "dense")
    assert dense.compression_ratio == 1.0


def test_l1_l2_steps_match_formulas():
    m = nn.Linear(6, 4)
    w0 = m.weight.detach().clone()
    L2Decay(m, 0.1).step()
    torch.testing.assert_close(m.weight.detach(), w0 * 0.9)
    w0 = m.weight.detach().clone()
    L1Decay(m, 0.05).step()
    torch.testing.assert_close(m.weight.detach(), torch.sign(w0) * (w0.abs() - 0.05).clamp(min=0))
    assert torch.equal(m.bias.detach() == 0, torch.zeros(4, dtype=torch.bool))  # bias untouched


def test_gmp_follows_cubic_schedule_and_reaches_target():
    m = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
    p = Pruner(m)
    g = GradualMagnitude(p, 0.9, total_steps=100, gmp_every=10)
    assert g.sparsity_at(0) == 0.0 and g.sparsity_at(100) == pytest.approx(0.9)
    assert g.sparsity_at(50) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    for t in range(1, 101):
        g.step()
        if t == 50:
            assert 1 - p.nonzero() / 5500 == pytest.approx(g.sparsity_at(50), abs=1e-3)
    assert 1 - p.nonzero() / 5500 == pytest.approx(0.9, abs=1e-3)


@pytest.mark.e2e
def test_sparse_vd_round_trip_to_plain_layers():
    m = LeNet5()
    names = [n for n, _ in m.named_parameters()]
    vd = SparseVD(m, n_train=1000)
    assert len(vd.extra_params()) == 4
    x = torch.randn(3, 1, 28, 28)
    m.train()
    loss = m(x).sum() + vd.penalty()
    loss.backward()
    assert all(p.grad is not None for p in vd.extra_params())
    with torch.no_grad():  # make some weights have large log alpha: they must be pruned
        m.fc1.log_sigma2[:10] = 5.0
        m.fc1.weight[:10] = 1e-3
    vd.end_phase()
    assert [n for n, _ in m.named_parameters()] == names
    assert type(m.fc1) is nn.Linear and type(m.conv1) is nn.Conv2d
    assert torch.count_nonzero(m.fc1.weight[:10]) == 0


@pytest.mark.e2e
def test_reproduce_split_over_calls_reuses_finished_runs(quick_lenet300, tmp_path):
    quiet = lambda *_: None  # noqa: E731
    shutil.copytree(quick_lenet300[0], tmp_path, dirs_exist_ok=True)
    first = {r.label: r for r in quick_lenet300[1]["rows"]}
    both = reproduce("lenet300", tmp_path, methods=["dense", "l2-50x"], quick=True, log=quiet)
    assert [r.run for r in both["rows"]] == ["reused", "reused"]
    assert [r.test_error for r in both["rows"]] == [first["dense"].test_error,
                                                       first["l2-50x"].test_error]
    assert [r["label"] for r in json.loads((tmp_path / "table.json").read_text())["rows"]] == \
        ["dense", "l2-50x"]
    # different settings in the same directory: trained again, not silently reused
    again = reproduce("lenet300", tmp_path, methods=["dense"], quick=True, seed=1, log=quiet)
    assert [r.run for r in again["rows"]] == ["trained"]


@pytest.mark.e2e
def test_prune_further_curve_matches_an_independent_count(quick_lenet300):
    tmp_path, result = quick_lenet300
    row = next(r for r in result["rows"] if r.label == "dense")
    assert [round(p["compression_ratio"], 1) for p in row.curve] == [1.5, 2.0, 3.0, 5.0, 8.0]
    # recompute the 8x point by hand: keep the largest 1/8 of the weights, evaluate
    from sensprune.data import load_dataset
    from sensprune.models import build_model
    from sensprune.train import evaluate
    from sensprune.reproduce import QUICK
    splits = load_dataset("mnist", None, QUICK["val_size"], QUICK["limit_train"])
    model = build_model("lenet300")
    model.load_state_dict(load_tree(tmp_path / "dense" / "model.pt"))
    ws = [model.fc1.weight, model.fc2.weight, model.fc3.weight]
    mags = torch.cat([w.detach().abs().flatten() for w in ws])
    keep = int(mags.numel() / 8)
    t = mags.sort(descending=True).values[keep - 1]
    with torch.no_grad():
        for w in ws:
            w.mul_(w.abs() >= t)
    assert row.curve[-1]["test_error"] == evaluate(model, splits.test)[0]
    assert "without retraining" in (tmp_path / "table.md").read_text()


@pytest.mark.e2e
def test_reproduce_seeds_adds_runs_and_their_mean_and_std(tmp_path):
    res = reproduce("lenet300", tmp_path, methods=["dense", "l2-50x"], quick=True, seeds=[0, 1],
                    log=lambda *_: None)
    labels = [r.label for r in res["rows"]]
    assert labels == ["dense", "dense-s1", "l2-50x", "l2-50x-s1"]
    assert [r.seed for r in res["rows"]] == [0, 1, 0, 1]
    s0 = json.loads((tmp_path / "l2-50x" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "l2-50x-s1" / "summary.json").read_text())
    assert s0["config"]["seed"] == 0 and s1["config"]["seed"] == 1
    group = next(g for g in res["groups"] if g.label == "l2-50x")
    mean_err = (s0["test_error"] + s1["test_error"]) / 2
    std = abs(s0["test_error"] - s1["test_error"]) / 2 ** 0.5  # sample std of two values
    assert group.seeds == [0, 1]
    assert group.test_error.mean == pytest.approx(mean_err)
    assert group.test_error.std == pytest.approx(std)
    md = (tmp_path / "table.md").read_text()
    assert f"| {mean_err:.2f} ± {std:.2f} |" in md or std == 0


@pytest.mark.e2e
def test_skipped_and_assembled_rows_are_listed_as_not_run(tmp_path):
    """A row the recipe marks ``skip`` is never trained, and --assemble trains nothing: both
    stay in the table as "not run" with their reason, beside the rows that have runs."""
    recipe = tmp_path / "exp.toml"
    recipe.write_text('''[common]
model = "lenet300"
epochs = 2
warmup_epochs = 1
limit_train = 500
val_size = 200
threads = 1
[methods.dense]
method = "none"
[methods.costly]
method = "l2"
skip = "too long for this machine"
''')
    res = reproduce(str(recipe), tmp_path / "out", log=lambda *_: None)
    by = {g.label: g for g in res["groups"]}
    assert by["dense"].status == "run" and by["costly"].status == "not run"
    assert by["costly"].why == "too long for this machine"
    assert not (tmp_path / "out" / "costly" / "summary.json").exists()
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| costly | | | not run: too long for this machine |" in md
    empty = reproduce(str(recipe), tmp_path / "empty", assemble=True, log=lambda *_: None)
    assert [g.status for g in empty["groups"]] == ["not run", "not run"]
    assert empty["rows"] == []


def test_settings_a_method_does_not_read_do_not_block_reuse():
    """L2 ignores the sensitivity's decay floor and GMP the threshold policy: a finished run
    that differs only there is the same run; a setting the method reads is not."""
    from sensprune.config import differing_settings, make_config

    l2 = make_config(method="l2", decay_floor=0.0).to_dict()
    assert differing_settings(l2, {**l2, "decay_floor": 0.5}) == []
    assert differing_settings(l2, {**l2, "lam": 0.5}) == ["lam"]
    sens = make_config(method="sensitivity", decay_floor=0.0).to_dict()
    assert differing_settings(sens, {**sens, "decay_floor": 0.5}) == ["decay_floor"]
    gmp = make_config(method="gmp", threshold="auto").to_dict()
    assert differing_settings(gmp, {**gmp, "threshold": "schedule"}) == []
    assert differing_settings(gmp, {**gmp, "threshold_mode": "layer"}) == ["threshold_mode"]


def test_a_removed_setting_never_makes_two_runs_differ():
    """Runs saved before a setting was removed (TrainConfig.extra) still match today's, on
    either side of the comparison (make run's --compare reads old summaries)."""
    from sensprune.config import differing_settings, make_config

    today = make_config(model="lenet300", lam=1e-3).to_dict()
    old = {**today, "extra": {}}
    assert differing_settings(today, old) == []
    assert differing_settings(old, today) == []
    assert differing_settings(old, {**today, "lam": 2e-3}) == ["lam"]


def test_run_summary_is_the_typed_contract_of_summary_json():
    """Every committed summary.json reads into a RunSummary and writes back unchanged; the
    mapping view keeps dict-style readers working; a summary without its keys is refused by
    name."""
    import json
    from pathlib import Path

    from sensprune import RunSummary
    root = Path(__file__).resolve().parents[1] / "results"
    files = sorted(root.glob("lenet*/*/summary.json"))
    assert len(files) > 30
    for f in files:
        d = json.loads(f.read_text())
        s = RunSummary.from_dict(d)
        assert s.to_dict() == d
        assert s["test_error"] == s.test_error == d["test_error"] and "config" in s
    with pytest.raises(ValueError, match="no model, dataset, method"):
        RunSummary.from_dict({})
    with pytest.raises(ValueError, match="JSON object"):
        RunSummary.from_dict([1])
