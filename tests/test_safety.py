"""Opening a file never runs code from it, nothing of the user's is deleted, a damaged file is
refused, faults leave a resumable run, and every user mistake is one clean error (issue 23).
Each test builds the hostile or damaged input itself and checks the observable outcome."""

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sensprune.checkpoint as checkpoint
import sensprune.train  # noqa: F401  (the module, for monkeypatching its train())
from sensprune import Pruner, SensitivityRegularizer
from sensprune.checkpoint import (load_checkpoint, load_run_model, load_tree, save_atomic,
                                  save_tree)
from sensprune.errors import CheckpointError, ConfigError, DataError

from conftest import QUICK_TRAIN as QUICK


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sensprune", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


class _Payload:
    """Unpickling this object calls Path.touch(marker): the marker proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# -- 1. no code runs from a file -----------------------------------------------------------------
@pytest.mark.e2e
def test_a_checkpoint_carrying_a_pickle_payload_is_refused_everywhere(finished_run, tmp_path):
    marker = tmp_path / "PWNED"
    run = tmp_path / "shared-run"
    run.mkdir()
    ckpt = load_tree(finished_run / "checkpoint.pt")
    ckpt["state"]["note"] = _Payload(marker)
    torch.save(ckpt, run / "checkpoint.pt")  # a pickle carrying code, as torch.save writes it
    for args in (["evaluate", run / "checkpoint.pt"], ["inspect", run, "--images", "10"],
                 ["export", run / "checkpoint.pt", "-o", tmp_path / "x.safetensors"],
                 ["train", *QUICK, "--out", run, "--resume"],
                 ["train", *QUICK, "--out", tmp_path / "new", "--init-from", run / "checkpoint.pt"]):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "never unpickles" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not marker.exists(), f"{args[0]} ran code from the file"
    # a user who opts in to reading an older pickle run file: the payload still never runs
    r = subprocess.run([sys.executable, "-m", "sensprune", "evaluate", str(run / "checkpoint.pt")],
                       capture_output=True, text=True,
                       env={**os.environ, "SENSPRUNE_READ_LEGACY_PICKLE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()
    # a model.pt carrying one, beside a summary.json
    (run / "checkpoint.pt").unlink()
    torch.save({"fc1.weight": _Payload(marker)}, run / "model.pt")
    (run / "summary.json").write_text((finished_run / "summary.json").read_text())
    r = _cli("evaluate", run)
    assert r.returncode == 2 and not marker.exists(), r.stderr


def test_a_cifar_batch_carrying_a_payload_is_refused(tmp_path):
    from sensprune.vision_data import _read_cifar_batch

    marker = tmp_path / "PWNED"
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}))
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        _read_cifar_batch(batch)
    assert not marker.exists()
    # a valid batch with a payload riding along: read (its opcodes are only walked), and the
    # payload never runs
    blob = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [4], b"x": _Payload(marker)}
    batch.write_bytes(pickle.dumps(blob))
    data, labels = _read_cifar_batch(batch)
    assert labels.tolist() == [4] and data.shape == (1, 3, 32, 32)
    assert not marker.exists()


# -- 2. nothing of the user's is deleted ---------------------------------------------------------
def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.name != ".sensprune.lock"}


@pytest.mark.e2e
def test_overwrite_checks_everything_before_touching_the_old_run(finished_run, tmp_path):
    run = tmp_path / "r"
    subprocess.run(["cp", "-a", str(finished_run), str(run)], check=True)
    before = _snapshot(run)
    bad = [["--data-dir", tmp_path / "typo", "--dataset", "fashion-mnist"],
           ["--device", "cuda"] if not torch.cuda.is_available() else ["--lr", "-1"]]
    for extra in bad:
        r = _cli("train", *QUICK, "--out", run, "--overwrite", *extra)
        assert r.returncode == 2, r.stderr
        assert _snapshot(run) == before, f"{extra}: the old run was touched"


@pytest.mark.e2e
def test_overwrite_never_deletes_what_sensprune_did_not_write(finished_run, tmp_path):
    run = tmp_path / "r"
    subprocess.run(["cp", "-a", str(finished_run), str(run)], check=True)
    (run / "notes.txt").write_text("mine")
    (run / ".data.tmp1").write_text("mine too")  # a user's file with a temp-looking name
    r = _cli("train", *QUICK, "--out", run, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / ".data.tmp1").read_text() == "mine too"
    # a model.pt the user copied over the run's: not the run's file any more, so refused
    torch.save({"w": torch.ones(1)}, run / "model.pt")
    mine = (run / "model.pt").read_bytes()
    r = _cli("train", *QUICK, "--out", run, "--overwrite")
    assert r.returncode == 2 and "did not write" in r.stderr, r.stderr
    assert (run / "model.pt").read_bytes() == mine


@pytest.mark.e2e
def test_a_replacing_run_that_fails_early_puts_the_old_run_back(finished_run, tmp_path):
    from sensprune.config import make_config
    from sensprune.train import train

    run = tmp_path / "r"
    subprocess.run(["cp", "-a", str(finished_run), str(run)], check=True)
    before = _snapshot(run)
    cfg = make_config(model="lenet300", limit_train=300, val_size=100, epochs=2, threads=1,
                      out=str(run), progress=False)
    with pytest.raises(TrainingAborted):
        train(cfg, overwrite=True, log=_abort_on_first_epoch_line)
    assert _snapshot(run) == before
    assert not (run / ".sensprune-previous").exists()


class TrainingAborted(Exception):
    pass


def _abort_on_first_epoch_line(msg):  # the log of epoch 1 comes before its checkpoint
    if msg.startswith("epoch"):
        raise TrainingAborted


# -- 3. damaged or foreign files are refused -----------------------------------------------------
@pytest.mark.e2e
def test_a_changed_value_in_a_checkpoint_is_caught_by_its_checksum(finished_run, tmp_path):
    ckpt = load_tree(finished_run / "checkpoint.pt")
    ckpt["model"]["fc1.weight"].view(-1)[0] = -1.7e38  # what one flipped byte did
    save_tree(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    r = _cli("evaluate", tmp_path / "checkpoint.pt")
    assert r.returncode == 2 and "damaged" in r.stderr


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0), bit=st.integers(0, 7), cut=st.booleans())
def test_random_flips_and_cuts_of_a_checkpoint_load_correctly_or_are_refused(
        finished_run, tmp_path_factory, pos, bit, cut):
    from sensprune.checkpoint import state_digest

    raw = (finished_run / "checkpoint.pt").read_bytes()
    reference = state_digest(load_checkpoint(finished_run / "checkpoint.pt"))
    blob = bytearray(raw)
    pos %= len(blob)
    if cut:
        blob = blob[:pos]
    else:
        blob[pos] ^= 1 << bit
    f = tmp_path_factory.mktemp("flip") / "checkpoint.pt"
    f.write_bytes(bytes(blob))
    try:
        loaded = load_checkpoint(f)
    except CheckpointError:
        return
    assert state_digest(loaded) == reference  # a flip torch ignores (padding): same contents


@pytest.mark.e2e
def test_foreign_files_are_refused_in_one_line(finished_run, tmp_path):
    save_tree([1, 2, 3], tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a sensprune checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    torch.save({"a": torch.ones(1)}, tmp_path / "checkpoint.pt")  # PyTorch's pickle format
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    run = tmp_path / "r"
    run.mkdir()
    save_tree([torch.ones(2)], run / "model.pt")
    (run / "summary.json").write_text((finished_run / "summary.json").read_text())
    with pytest.raises(CheckpointError, match="neither"):
        load_run_model(run)
    # a torn summary.json or metrics.jsonl: report gives one line or the complete epochs
    rep = tmp_path / "rep"
    subprocess.run(["cp", "-a", str(finished_run), str(rep)], check=True)
    with open(rep / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "val_')
    r = _cli("report", rep)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    (rep / "summary.json").write_text("")
    r = _cli("report", rep)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def _export_with(tmp_path, change):
    """A valid LeNet-300 export whose arrays or header ``change`` edits; checksum redone."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from sensprune.export import export
    from sensprune.export.container import _digest
    from sensprune.models import build_model

    m = build_model("lenet300")
    with torch.no_grad():
        m.fc1.weight.mul_(torch.rand_like(m.fc1.weight) < 0.02)
    f = tmp_path / "m.safetensors"
    export(m.state_dict(), f, {"model": "lenet300", "num_classes": 10, "input_shape": [1, 28, 28]})
    with safe_open(str(f), framework="numpy") as h:
        meta = json.loads(h.metadata()["sensprune"])
        arrays = {k: h.get_tensor(k) for k in h.keys()}
    change(meta, arrays)
    meta["sha256_all"] = _digest(arrays, meta)  # an attacker recomputes the checksum
    save_file(arrays, str(f), metadata={"sensprune": json.dumps(meta)})
    return f


def test_export_reader_checks_indices_shapes_and_scales(tmp_path):
    import tracemalloc

    import numpy as np

    from sensprune.export import read

    def csr_index_past_the_end(meta, arrays):
        assert meta["layers"]["fc1.weight"]["encoding"] in ("csr", "csr-delta8", "delta8")
        meta["layers"]["fc1.weight"]["encoding"] = "csr"
        w = arrays  # rebuild fc1 as CSR with one column index out of range
        dense = np.zeros((300, 784), np.float32)
        dense[0, 5] = 1.0
        for k in [k for k in w if k.startswith("fc1.weight/")]:
            del w[k]
        w["fc1.weight/indptr"] = np.array([0] + [1] * 300, np.uint16)
        w["fc1.weight/indices"] = np.array([784], np.uint16)
        w["fc1.weight/values"] = np.array([1.0], np.float32)

    def huge_shape(meta, arrays):
        meta["arch"]["model"] = "someone-elses-net"  # no architecture to check it against
        meta["layers"]["fc1.weight"]["shape"] = [300000, 78400]

    def nan_scale(meta, arrays):
        meta["layers"]["fc1.weight"]["scale"] = float("nan")

    for change, match in ((csr_index_past_the_end, "out of range"),
                          (huge_shape, "declares"), (nan_scale, "not a finite number")):
        f = _export_with(tmp_path, change)
        tracemalloc.start()
        with pytest.raises(CheckpointError, match=match):
            read(f)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 << 20, f"{change.__name__}: {peak} bytes allocated before refusing"


def test_load_an_export_of_your_own_model(tmp_path):
    import sensprune
    from sensprune.export import export

    net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight[:, :4] = 0
    f = tmp_path / "mine.safetensors"
    export(net.state_dict(), f, {"model": "MyNet", "num_classes": 2, "input_shape": [8]})
    with pytest.raises(CheckpointError, match="model=YourModel"):
        sensprune.load(f)
    loaded = sensprune.load(f, model=nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x), net(x))


# -- 4. faults leave a resumable run and no litter ----------------------------------------------
def test_disk_full_during_a_checkpoint_write_keeps_the_old_one_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"a": torch.ones(3)}, path)

    def full(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_tree", full)
    with pytest.raises(CheckpointError, match="No space left.*previous file is kept.*--resume"):
        save_atomic({"a": torch.zeros(3)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    monkeypatch.undo()
    assert load_tree(path)["a"].sum() == 3


@pytest.mark.e2e
def test_interrupt_before_the_first_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    from sensprune import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["sensprune.train"], "train", interrupted)
    assert cli.main(["train", *QUICK, "--out", str(tmp_path / "r")]) == 130
    assert "before any checkpoint was written" in capsys.readouterr().err


# -- 5. library mistakes are ValueErrors, not silent ---------------------------------------------
def test_library_arguments_are_checked():
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    for lam in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="lam"):
            SensitivityRegularizer(m, lam=lam)
    with pytest.raises(ValueError, match="threshold"):
        Pruner(m).threshold(float("nan"))
    with pytest.raises(ValueError, match="no parameter"):
        SensitivityRegularizer(nn.Sequential(nn.ReLU()), lam=0.1)
    with pytest.raises(ValueError, match="no prunable"):
        Pruner(nn.Sequential(nn.ReLU()))
    reg = SensitivityRegularizer(m, lam=0.1)
    with pytest.raises(RuntimeError, match="observe"):
        reg.step()
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, ValueError)


def test_frozen_parameters_are_left_alone_and_changed_models_followed():
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    m[0].weight.requires_grad_(False)
    frozen = m[0].weight.detach().clone()
    reg = SensitivityRegularizer(m, lam=0.5, decay_floor=0.0)
    x, t = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with reg.observe(t):
        m(x)
    reg.step()
    assert torch.equal(m[0].weight, frozen) and "0.weight" not in reg.params
    # a replaced layer: the pruner prunes the model's new tensor, not the stale one
    p = Pruner(m)
    m[2] = nn.Linear(3, 2)
    p.threshold(1e9)
    assert int(torch.count_nonzero(m[2].weight)) == 0
    m.double()
    p.prune_to(0.5)
    assert m[2].weight.dtype == torch.float64 and int(torch.count_nonzero(m[2].weight)) == 0


# -- 6. fuzz: the real CLI entry point never shows a traceback ------------------------------------
OPTIONS = ["--epochs", "--lr", "--lam", "--seed", "--batch-size", "--threshold", "--model",
           "--method", "--decay-floor", "--target-sparsity", "--val-size", "--recipe",
           "--threads", "--kind", "--out", "--limit-train"]
VALUES = ["0", "-1", "nan", "inf", "1e309", "99999999999999999999", "abc", "", "0.5", "3",
          "lenet300", "auto", "schedule", "/nonexistent", "sensitivity", "-0"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(st.one_of(st.sampled_from(OPTIONS), st.sampled_from(VALUES)), max_size=8),
       recipe=st.one_of(st.none(), st.text(max_size=120),
                        st.builds(lambda k, v: f"[train]\n{k} = {v}\n[method]\n{k} = {v}\n",
                                  st.sampled_from(["epochs", "lr", "lam", "seed", "threshold",
                                                   "model", "decay_floor", "amp"]),
                                  st.sampled_from(["1", "-3", "nan", "inf", '"x"', "true",
                                                   "1e400", "99999999999999999999", "[1]"]))))
def test_fuzzed_arguments_and_recipes_give_a_clean_exit(tmp_path_factory, monkeypatch, args, recipe):
    from sensprune import cli

    class Reached(Exception):
        pass

    def stop(*a, **k):  # input handling is under test, not training
        raise Reached

    monkeypatch.setattr(sys.modules["sensprune.train"], "train", stop)
    argv = ["train", *args]
    if recipe is not None:
        f = tmp_path_factory.mktemp("recipe") / "r.toml"
        f.write_text(recipe)
        argv += ["--recipe", str(f)]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    except Reached:
        return
    assert code in (0, 2)


def test_run_files_round_trip_every_value_a_run_saves(tmp_path):
    """save_tree/load_tree (checkpoint.pt, model.pt): the structure of an optimizer's and a
    scheduler's state (int keys, tuples, None, NaN, bool masks, 0-d and empty tensors, bf16)
    comes back equal; an object that is not plain data is refused when written, and a file
    whose structure names a missing tensor is refused when read."""
    from safetensors.torch import save_file

    obj = {"state": {0: {"momentum_buffer": torch.randn(3, 2), "step": torch.tensor(7.0)}},
           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1],
                             "foreach": None, "nesterov": False}],
           "mask": torch.rand(4, 5) > 0.5, "empty": torch.zeros(0, 3), "half": torch.randn(2,
           dtype=torch.bfloat16), "nan": float("nan"), "big": 2 ** 62, "text": "ü", "deep": [[[]]]}
    save_tree(obj, tmp_path / "c.pt")
    back = load_tree(tmp_path / "c.pt")
    assert back.keys() == obj.keys() and back["param_groups"] == obj["param_groups"]
    assert isinstance(back["param_groups"][0]["betas"], tuple) and 0 in back["state"]
    for k in ("mask", "empty", "half"):
        assert back[k].dtype == obj[k].dtype and torch.equal(back[k], obj[k])
    assert torch.equal(back["state"][0]["momentum_buffer"], obj["state"][0]["momentum_buffer"])
    assert back["nan"] != back["nan"] and back["big"] == 2 ** 62 and back["deep"] == [[[]]]
    with pytest.raises(TypeError, match="cannot be stored"):
        save_tree({"f": lambda: 0}, tmp_path / "x.pt")
    save_file({"0": torch.ones(1)}, str(tmp_path / "bad.pt"),
              metadata={"sensprune.tree": '{"$dict": [["w", {"$tensor": "9"}]]}'})
    with pytest.raises(CheckpointError, match="not a sensprune file"):
        checkpoint.safe_load(tmp_path / "bad.pt")
