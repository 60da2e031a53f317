"""Divergence stops the run (exit 1, last good checkpoint kept), and bad values are refused
before any work starts (exit 2, one line): issue 12."""

import json

import pytest
import torch

from sensprune import make_config
from sensprune.errors import ConfigError

from test_cli import assert_usage_error, run
from sensprune.checkpoint import load_tree, save_tree

SMALL = ["--model", "lenet300", "--limit-train", "2000", "--val-size", "500", "--no-progress"]


@pytest.mark.e2e
def test_divergence_stops_at_once_with_exit_1(tmp_path):
    r = run("train", *SMALL, "--epochs", "3", "--lr", "1e6", "--out", str(tmp_path / "a"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "diverged at epoch 1" in lines[0] and "--lr" in lines[0]
    assert not (tmp_path / "a" / "model.pt").exists()  # no NaN model is written


@pytest.mark.e2e
def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "b"
    r = run("train", *SMALL, "--epochs", "3", "--warmup-epochs", "1", "--lam", "1e9",
            "--out", str(out))
    assert r.returncode == 1 and "diverged at epoch 2" in r.stderr, r.stderr
    ckpt = load_tree(out / "checkpoint.pt")
    assert ckpt["state"]["epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values())
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-finite {c} in metrics"))
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("args,needle", [
    (["--lr", "nan"], "finite"),
    (["--lr", "inf"], "finite"),
    (["--momentum", "nan"], "finite"),
    (["--lam=-inf"], "finite"),
    (["--threshold", "nan"], "threshold"),
    (["--val-size", "0"], "validation set"),
    (["--threads", "-1"], "threads"),
    (["--gamma", "0"], "gamma must be > 0"),
    (["--vd-kl-warmup-epochs", "-3", "--method", "sparse_vd"], "vd_kl_warmup_epochs"),
    (["--step-size", "0"], "step-size"),
    (["--init-from", "/nonexistent/run"], "does not exist"),
])
@pytest.mark.e2e
def test_non_finite_and_out_of_range_options(args, needle):
    assert_usage_error(run("train", *args), needle)


@pytest.mark.parametrize("line,needle", [
    ('epochs = "ten"', "epochs must be int"),
    ('lr = "0.1"', "lr must be float"),
    ("batch_size = 100.5", "batch_size must be int"),
    ('amp = "yes"', "amp must be bool"),
])
@pytest.mark.e2e
def test_recipe_values_of_the_wrong_type(tmp_path, line, needle):
    recipe = tmp_path / "r.toml"
    recipe.write_text(line + "\n")
    assert_usage_error(run("train", "--recipe", str(recipe)), needle)


def test_default_learning_rate_per_model_and_optimizer():
    assert make_config(model="lenet5").lr == 0.02
    assert make_config(model="lenet300").lr == 0.05
    assert make_config(model="lenet5", optimizer="adam").lr == 1e-3
    assert make_config(model="lenet5", lr=0.3).lr == 0.3
    with pytest.raises(ConfigError, match="finite"):
        make_config(beta=float("inf"))


@pytest.mark.e2e
def test_run_directory_is_protected(tmp_path):
    out = str(tmp_path / "run")
    args = ["train", *SMALL, "--epochs", "1", "--limit-train", "600", "--out", out]
    assert run(*args).returncode == 0
    assert_usage_error(run(*args), "holds another run")
    assert_usage_error(run(*args, "--resume", "--lr", "0.3"), "lr = 0.05 there, 0.3 now")
    first = (tmp_path / "run" / "metrics.jsonl").read_text()
    r = run(*args, "--overwrite", "--seed", "7")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and lines[0] != first.strip()  # replaced, not interleaved
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["seed"] == 7


def test_lock_stale_temp_files_and_failed_start(tmp_path):
    from sensprune.rundir import claim
    d = tmp_path / "d"
    d.mkdir()
    (d / ".checkpoint.pt.tmp4242").write_bytes(b"x" * 100)  # a killed checkpoint write
    with claim(d):
        assert not (d / ".checkpoint.pt.tmp4242").exists()
        with pytest.raises(ConfigError, match="another sensprune run"):
            with claim(d, resume=True):
                pass
    with claim(d):  # released at exit
        pass
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with claim(fresh):
            raise RuntimeError("the data could not be read")
    assert not fresh.exists()  # no empty directory left behind


@pytest.mark.e2e
def test_evaluate_export_and_bench_infer_take_what_a_run_holds(tmp_path):
    out = tmp_path / "run"
    assert run("train", *SMALL, "--epochs", "1", "--limit-train", "600", "--out", str(out)).returncode == 0
    (out / "checkpoint.pt").unlink()  # as committed under results/: model.pt + summary.json
    summary = json.loads((out / "summary.json").read_text())
    for target in (out, out / "model.pt"):
        e = run("evaluate", str(target), "--json")
        assert e.returncode == 0, e.stderr
        assert json.loads(e.stdout)["test_error"] == summary["test_error"]
    assert_usage_error(run("export", str(out), "-o", str(tmp_path / "no" / "x.safetensors")),
                       "does not exist")
    assert_usage_error(run("export", str(out), "-o", str(tmp_path)), "is a directory")
    assert_usage_error(run("bench-infer", str(out / "model.pt")), "not an export")
    lone = tmp_path / "lone.pt"
    lone.write_bytes((out / "model.pt").read_bytes())
    assert_usage_error(run("evaluate", str(lone)), "weights only")


def test_a_setting_missing_from_an_old_run_takes_its_earlier_default(monkeypatch):
    """A run saved before a setting existed ran with the setting's earlier default, not with
    today's: reproduce must not reuse it as if it had today's value. decay_floor ran at 0 then
    and its default is 0 again; a changed earlier default is checked by patching it."""
    from sensprune import config

    now = config.make_config(method="sensitivity").to_dict()
    assert now["decay_floor"] == 0.0
    old_run = {k: v for k, v in now.items() if k != "decay_floor"}
    assert config.differing_settings(now, old_run) == []
    monkeypatch.setattr(config, "EARLIER_DEFAULTS", {"decay_floor": 0.5})
    assert config.differing_settings(now, old_run) == ["decay_floor"]
    assert config.saved_settings(old_run)["decay_floor"] == 0.5
    assert config.differing_settings(now, {**old_run, "decay_floor": 0.0}) == []  # saved key wins


def test_a_run_saved_before_the_floor_existed_loads_with_floor_zero(tmp_path):
    """A summary.json written before decay_floor existed has no key for it: it ran with the
    paper's literal max(0, 1 - S), not with today's default of 0.5."""
    import json

    from sensprune.checkpoint import load_run_model
    from sensprune.config import make_config
    from sensprune.models import build_model

    cfg = make_config(method="sensitivity").to_dict()
    del cfg["decay_floor"]
    (tmp_path / "summary.json").write_text(json.dumps({"config": cfg}))
    save_tree(build_model("lenet300").state_dict(), tmp_path / "model.pt")
    loaded, _ = load_run_model(tmp_path)
    assert loaded.method == "sensitivity" and loaded.decay_floor == 0.0