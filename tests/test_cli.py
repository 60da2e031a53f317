import json
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sensprune", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def assert_usage_error(r, needle):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needle", [
    (["train", "--epochs", "0"], "positive integer"),
    (["train", "--model", "lenet"], "invalid choice"),
    (["train", "--lr", "fast"], "expected a number"),
    (["train", "--recipe", "no/such.toml"], "recipe file no/such.toml not found"),
    (["train", "--threshold", "big"], "threshold must be"),
    (["train", "--warmup-epochs", "5", "--epochs", "2"], "exceed epochs"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "--data-dir"),
    (["train", "--resume", "--out", "/tmp/sensprune-no-such-run"], "no checkpoint"),
    (["evaluate", "/tmp/sensprune-no-such-run"], "not found"),
    (["report", "/tmp"], "summary.json not found"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_are_one_line(args, needle):
    assert_usage_error(run(*args), needle)


def test_bad_recipe_contents(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text("epochs = 3\nlearning_rate = 0.1\n")
    assert_usage_error(run("train", "--recipe", str(bad)), "unknown setting(s) learning_rate")
    bad.write_text("epochs = [\n")
    assert_usage_error(run("train", "--recipe", str(bad)), "invalid TOML")


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert_usage_error(run("evaluate", str(tmp_path)), "unreadable")


def test_train_evaluate_report_roundtrip(tmp_path):
    out = tmp_path / "run"
    r = run("train", "--model", "lenet300", "--epochs", "2", "--limit-train", "2000",
            "--val-size", "500", "--warmup-epochs", "1", "--lam", "1e-3", "--out", str(out),
            "--no-progress", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "| fc1.weight |" in r.stdout and "compression" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seed"] == 3 and summary["epochs"] == 2
    e = run("evaluate", str(out / "checkpoint.pt"), "--json")
    assert e.returncode == 0, e.stderr
    ev = json.loads(e.stdout)
    assert ev["test_error"] == summary["test_error"]
    assert ev["nonzero_params"] == summary["nonzero_params"]
    rep = run("report", str(out))
    assert rep.returncode == 0 and "fc1.weight" in rep.stdout
    # resume after the end is a no-op that still writes the summary
    again = run("train", "--model", "lenet300", "--epochs", "2", "--limit-train", "2000",
                "--val-size", "500", "--warmup-epochs", "1", "--lam", "1e-3", "--out",
                str(out), "--no-progress", "--seed", "3", "--resume")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "summary.json").read_text())["test_error"] == summary["test_error"]


def test_help_everywhere():
    for args in ([], ["train"], ["evaluate"], ["report"]):
        r = run(*args, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout


def test_export_and_bench_infer(tmp_path):
    out = tmp_path / "run"
    r = run("train", "--epochs", "2", "--limit-train", "2000", "--val-size", "500",
            "--warmup-epochs", "1", "--lam", "1e-3", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    f = tmp_path / "m.safetensors"
    e = run("export", str(out), "-o", str(f), "--values", "fp16", "--json", str(tmp_path / "e.json"))
    assert e.returncode == 0, e.stderr
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["file_bytes"] == f.stat().st_size
    assert set(rep["formats"]) == {"fp32", "fp16", "int8"}
    summary = json.loads((out / "summary.json").read_text())
    assert rep["formats"]["fp32"]["test_error"] == summary["test_error"]  # fp32 is lossless
    b = run("bench-infer", str(f), "--reps", "5", "--json", str(tmp_path / "b.json"))
    assert b.returncode == 0, b.stderr
    assert "whole model" in b.stdout
    assert_usage_error(run("export", str(out), "-o", str(f), "--values", "int4"), "invalid choice")
    f.write_bytes(f.read_bytes()[:-50])
    assert_usage_error(run("bench-infer", str(f)), "truncated or corrupt")


def test_reproduce_cli_errors():
    assert_usage_error(run("reproduce", "alexnet"), "no experiment 'alexnet'")
    assert_usage_error(run("reproduce", "lenet300", "--methods", "magic"), "unknown method label")


def test_every_setting_has_one_train_option_and_every_option_is_a_setting():
    """The CLI's overrides are read by field name (cmd_train), so an option whose dest is not a
    setting would be dropped silently, and a setting without an option is unreachable from
    the command line; the choices come from config.CHOICES."""
    import dataclasses

    from sensprune.cli import build_parser
    from sensprune.config import CHOICES, TrainConfig

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values()
                 if a.prog.endswith(" train"))
    dests = {a.dest: a for a in train._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    not_settings = {"recipe", "resume", "overwrite", "no_progress"}
    assert set(dests) - fields == not_settings
    internal = {"extra", "progress"}  # progress: --no-progress; extra: library use only
    assert fields - set(dests) == internal
    for key, allowed in CHOICES.items():
        assert tuple(dests[key].choices) == allowed, key
