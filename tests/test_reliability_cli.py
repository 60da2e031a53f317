"""Reliability round 4 (issue 35): no output option replaces a file the command reads or a
run's own files; every fault is one clean line with a meaningful exit code; library misuse is
caught where it happens. Each test builds its case and checks what the user sees and keeps."""
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from sensprune import Pruner, SensitivityRegularizer
from sensprune.checkpoint import save_atomic
from sensprune.errors import ConfigError

from conftest import QUICK_TRAIN as QUICK


def _cli(*args, preexec_fn=None, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "sensprune", *map(str, args)],
                          stdout=stdout, stderr=subprocess.PIPE, text=True,
                          preexec_fn=preexec_fn, timeout=300)


def _one_line(r, code, needle):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


# -- 2. no output option names what the command reads or a run's own files ------------------
@pytest.mark.e2e
@pytest.mark.parametrize("case", [
    lambda run, tmp: ("export", run, "-o", run / "checkpoint.pt"),
    lambda run, tmp: ("export", run, "-o", run / "summary.json"),
    lambda run, tmp: ("export", run, "-o", tmp / "m.safetensors", "--json", tmp / "m.safetensors"),
    lambda run, tmp: ("export", run, "-o", tmp / "m.safetensors", "--onnx", tmp / "m.safetensors"),
    lambda run, tmp: ("inspect", run, "--png", run / "model.pt", "--images", "20"),
    lambda run, tmp: ("inspect", run, "--json", run / "summary.json", "--images", "20"),
    lambda run, tmp: ("inspect", run / "model.pt", "--json", run / "model.pt", "--images", "20"),
], ids=["export-o-checkpoint", "export-o-summary", "export-json-is-o", "export-onnx-is-o",
        "inspect-png-model", "inspect-json-summary", "inspect-json-is-input"])
def test_outputs_that_would_replace_what_the_user_needs_are_refused(finished_run, tmp_path, case):
    before = _digests(finished_run)
    r = _cli(*case(finished_run, tmp_path))
    _one_line(r, 2, "error: -")
    assert _digests(finished_run) == before  # nothing of the run changed
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.e2e
def test_export_into_a_read_only_folder_or_past_a_file_size_limit_is_one_line(finished_run, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")  # the file-size case below still runs
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    _one_line(_cli("export", finished_run, "-o", ro / "m.safetensors"), 2, "cannot write")


@pytest.mark.e2e
def test_export_under_a_file_size_limit_leaves_no_torn_file(finished_run, tmp_path):
    old = tmp_path / "m.safetensors"
    old.write_bytes(b"the user's older export")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    r = _cli("export", finished_run, "-o", old, preexec_fn=limit)
    _one_line(r, 2, "cannot write")
    assert old.read_bytes() == b"the user's older export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp left


@pytest.mark.e2e
def test_onnx_under_a_file_size_limit_is_not_written_in_place(finished_run, tmp_path):
    pytest.importorskip("onnx")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the export fits
    r = _cli("export", finished_run, "-o", tmp_path / "m.safetensors", "--onnx",
             tmp_path / "m.onnx", preexec_fn=limit)
    _one_line(r, 2, "cannot write")
    assert not (tmp_path / "m.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- 3. one clean line and a meaningful exit code ----------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("args,needle", [
    (["--threads", "100000"], "threads must be in [0, 1024]"),
    (["--lam", "1e300"], "lam must be"),
    (["--lr", "1e300"], "lr must be"),
    (["--momentum", "1e300"], "momentum must be at most 1e30"),
])
def test_absurd_numbers_are_usage_errors_with_the_range(args, needle, tmp_path):
    _one_line(_cli("train", *QUICK, *args, "--out", tmp_path / "r"), 2, needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_malformed_recipes_give_a_bounded_line(tmp_path):
    many = tmp_path / "many.toml"
    many.write_text("".join(f"key{i} = 1\n" for i in range(50_000)))
    r = _cli("train", "--recipe", many, "--out", tmp_path / "a")
    _one_line(r, 2, "and 49995 more")
    assert len(r.stderr) < 2000
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    _one_line(_cli("train", "--recipe", deep, "--out", tmp_path / "b"), 2, "recipe")
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    _one_line(_cli("train", "--recipe", big, "--out", tmp_path / "c"), 2, "larger than")
    if os.path.exists("/dev/zero"):
        _one_line(_cli("train", "--recipe", "/dev/zero", "--out", tmp_path / "d"), 2,
                  "not a regular file")


@pytest.mark.e2e
def test_report_on_an_empty_summary_object_is_one_line(finished_run, tmp_path):
    rep = tmp_path / "rep"
    shutil.copytree(finished_run, rep)
    (rep / "summary.json").write_text("{}")
    _one_line(_cli("report", rep), 2, "summary.json")


@pytest.mark.e2e
def test_a_closed_stdout_is_quiet(finished_run):
    p = subprocess.Popen([sys.executable, "-m", "sensprune", "evaluate", str(finished_run)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader leaves at once, as `| head -0` would
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert "Exception ignored" not in err and "Traceback" not in err and "error" not in err


def test_an_interrupt_during_a_checkpoint_write_leaves_no_temp_file(tmp_path, monkeypatch):
    """Ctrl-C while a checkpoint is written: it stays an interrupt (exit 130 in the CLI), not a
    failed disk write, and leaves neither a torn file nor a temporary one."""
    import sensprune.checkpoint as checkpoint

    def interrupted(obj, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_tree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.ones(3)}, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_an_interrupt_during_the_first_checkpoint_write_leaves_a_clean_start(tmp_path,
                                                                             monkeypatch, capsys):
    """Ctrl-C while the first checkpoint is written: exit 130, no torn or temporary file, and
    the command the message names (the same again) works."""
    import sensprune.checkpoint as checkpoint
    from sensprune import cli

    out = tmp_path / "r"
    real_save = checkpoint.save_tree

    def interrupted(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_tree", interrupted)
    assert cli.main(["train", *QUICK, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted before any checkpoint was written" in err and "disk" not in err
    assert not list(out.glob(".checkpoint.pt.tmp*")) and not (out / "checkpoint.pt").exists()
    monkeypatch.setattr(checkpoint, "save_tree", real_save)
    again = ["train", *QUICK, "--out", str(out)] + (["--overwrite"] if "--overwrite" in err else [])
    assert cli.main(again) == 0
    assert (out / "checkpoint.pt").exists()


@pytest.mark.e2e
def test_resume_does_not_need_the_init_from_folder_it_never_reads(tmp_path):
    src = tmp_path / "src"
    assert _cli("train", *QUICK, "--epochs", "1", "--warmup-epochs", "0",
                "--out", src).returncode == 0
    out = tmp_path / "r"
    from sensprune import make_config
    from sensprune.train import train
    cfg = make_config(None, model="lenet300", limit_train=300, val_size=100, epochs=2,
                      warmup_epochs=1, threads=1, progress=False, out=str(out),
                      init_from=str(src))
    train(cfg, stop_after_epoch=1, log=lambda *a, **k: None)
    shutil.rmtree(src)
    summary = train(cfg, resume=True, log=lambda *a, **k: None)
    assert "test_error" in summary
    with pytest.raises(ConfigError, match="init_from"):  # a fresh run still needs it
        train(make_config(None, **{**cfg.__dict__, "out": str(tmp_path / "new")}))


@pytest.mark.e2e
def test_overwrite_of_a_copied_run_says_that_copying_is_why(finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy, copy_function=shutil.copy)  # like cp -r: new mtimes
    r = _cli("train", *QUICK, "--out", copy, "--overwrite")
    _one_line(r, 2, "looks copied")


# -- 4. library misuse is caught where it happens ----------------------------------------------
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_a_layer_added_after_construction_is_named_in_a_warning():
    m = _net()
    reg, pruner = SensitivityRegularizer(m, 1e-2), Pruner(m)
    m.append(nn.Linear(3, 3))  # a new head, used from now on
    x, t = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    with pytest.warns(UserWarning, match=r"SensitivityRegularizer .*3\.weight"):
        with reg.observe(t):
            m(x)
    with pytest.warns(UserWarning, match=r"Pruner .*3\.weight"):
        pruner.prune_to(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough: no warning on every step
        with reg.observe(t):
            m(x)
        pruner.prune_to(0.6)


def test_masks_and_regularizer_state_of_another_model_are_refused_by_name():
    m = _net()
    pruner = Pruner(m)
    with pytest.raises(ConfigError, match=r"'0\.weight' has shape \[6\], the parameter \[5, 6\]"):
        pruner.load_state_dict({"masks": {"0.weight": torch.ones(6, dtype=torch.bool)}})
    with pytest.raises(ConfigError, match=r"'0\.weight' has shape \[5\]"):
        pruner.load_state_dict({"masks": {"0.weight": torch.ones(5, dtype=torch.bool)}})
    assert all(bool(mk.all()) for mk in pruner.masks.values())  # nothing was applied
    reg = SensitivityRegularizer(m, 1e-2)
    other = SensitivityRegularizer(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)),
                                   1e-2)
    with other.observe(torch.tensor([0, 1])):
        other.model(torch.randn(2, 6))
    with pytest.raises(ConfigError, match=r"'0\.weight' has shape \[4, 6\].*another model"):
        reg.load_state_dict(other.state_dict())
    with pytest.raises(ConfigError, match="not one"):
        reg.load_state_dict({"steps": 1})
