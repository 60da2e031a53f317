import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e  # end-to-end: training runs or subprocesses (make test)


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
    (["train", "--threshold", "schedule", "--target-sparsity", "1"], "target_sparsity must be below 1"),
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
    assert set(rep["formats"]) == {"fp32", "fp16", "int8", "int8-row"}
    summary = json.loads((out / "summary.json").read_text())
    assert rep["formats"]["fp32"]["test_error"] == summary["test_error"]  # fp32 is lossless
    b = run("bench-infer", str(f), "--reps", "5", "--json", str(tmp_path / "b.json"))
    assert b.returncode == 0, b.stderr
    assert "whole model" in b.stdout
    # compacted and packed, from the export itself: a smaller file, the same test error
    c = tmp_path / "c.safetensors"
    e = run("export", str(f), "-o", str(c), "--compact", "--compress", "lzma", "--values",
            "int8", "--json", str(tmp_path / "c.json"))
    assert e.returncode == 0, e.stderr
    assert "compacted:" in e.stdout
    rep_c = json.loads((tmp_path / "c.json").read_text())
    assert rep_c["formats"]["fp32"]["test_error"] == rep["formats"]["fp16"]["test_error"]
    assert c.stat().st_size < f.stat().st_size
    assert_usage_error(run("export", str(out), "-o", str(f), "--values", "int4"), "invalid choice")
    f.write_bytes(f.read_bytes()[:-50])
    assert_usage_error(run("bench-infer", str(f)), "truncated or corrupt")


def test_reproduce_cli_errors():
    assert_usage_error(run("reproduce", "alexnet"), "no experiment 'alexnet'")
    assert_usage_error(run("reproduce", "lenet300", "--methods", "magic"), "unknown method label")


def test_every_setting_has_one_train_option_and_every_option_is_a_setting():
    """The train options are generated from TrainConfig's declarations and read back by field
    name (cmd_train): every setting has exactly one option, no
    option is something else, and the choices come from config.CHOICES."""
    import dataclasses

    from sensprune.cli import build_parser
    from sensprune.config import CHOICES, TrainConfig

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values()
                 if a.prog.endswith(" train"))
    dests = {a.dest: a for a in train._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(dests) - fields == {"recipe", "resume", "overwrite", "compare", "quick"}
    assert fields - set(dests) == set()
    for key, allowed in CHOICES.items():
        assert tuple(dests[key].choices) == allowed, key


def _a_value_other_than_the_default(f, action):
    """A legal command-line value for setting ``f`` and what it must parse to."""
    if action.choices:
        v = [c for c in action.choices if c != f.default][0]
        return [v], v
    if action.nargs == 0:  # a switch: it flips the default
        return [], not f.default
    if f.name == "threshold":
        return ["0.02"], "0.02"  # parsed to a float by the config's own validation
    kinds = str(f.type)
    if "int" in kinds:
        return ["7"], 7
    if "float" in kinds:
        return ["0.25"], 0.25
    return ["some/path"], "some/path"


def test_each_train_option_reaches_its_setting(tmp_path):
    """Parse every generated option alone, build the config the way cmd_train does, and check
    the setting got the value (and nothing else moved): an option wired to the wrong field or
    the wrong type fails here."""
    import dataclasses

    from sensprune.cli import build_parser
    from sensprune.config import TrainConfig

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values()
                 if a.prog.endswith(" train"))
    actions = {a.dest: a for a in train._actions}
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        action = actions[f.name]
        argv, expected = _a_value_other_than_the_default(f, action)
        args = parser.parse_args(["train", action.option_strings[0], *argv])
        got = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)}
        assert got[f.name] == expected, f.name
        assert all(v is None for k, v in got.items() if k != f.name), f.name
        assert expected != getattr(defaults, f.name), f.name


def test_every_command_line_argument_has_help_text():
    import argparse
    from sensprune.cli import build_parser
    missing = []

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, f"{path} {name}")
            elif not a.help and a.dest != "help":
                missing.append(f"{path}: {a.dest}")
    walk(build_parser(), "sensprune")
    assert not missing, missing


@pytest.mark.e2e
def test_train_quick_runs_any_recipe_in_seconds(tmp_path):
    """`train --quick` shrinks the recipe's phases (a first try that a 64-epoch recipe with 5
    warm-up and 12 fine-tuning epochs would otherwise refuse at --epochs 3)."""
    r = subprocess.run([sys.executable, "-m", "sensprune", "train", "--recipe", "lenet300",
                        "--quick", "--out", str(tmp_path / "q"), "--threads", "1",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert s["epochs"] == 3 and s["config"]["limit_train"] == 5000
    assert s["config"]["warmup_epochs"] == 1 and s["config"]["finetune_epochs"] == 1
    assert s["compression_ratio"] == pytest.approx(100.0, rel=1e-3)  # the recipe's target
