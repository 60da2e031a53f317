"""DDP through torchrun on CPU (gloo): 2 processes must give the weights of 1 process on the
same global batches, for the sensitivity method with SGD+momentum and a thresholding step."""

import subprocess
import sys

import pytest
import torch
from sensprune.checkpoint import load_tree

pytestmark = pytest.mark.e2e  # end-to-end: training runs or subprocesses (make test)

ARGS = ["--model", "lenet300", "--limit-train", "651", "--val-size", "500", "--batch-size", "100",
        "--epochs", "2", "--warmup-epochs", "0", "--method", "sensitivity", "--lam", "1e-3",
        "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--threshold", "0.02",
        "--no-progress", "--threads", "1", "--seed", "5"]


def train(out, nproc, *extra):
    if nproc == 1:
        cmd = [sys.executable, "-m", "sensprune", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "sensprune", "train"]
    r = subprocess.run(cmd + ARGS + list(extra) + ["--out", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


THRESHOLD = 0.02  # ARGS' --threshold


def assert_same_training(a: dict, b: dict) -> None:
    """One process and two give the same weights up to float summation order. Two ranks sum
    a batch's gradient in halves, so a weight that lands within about 1e-6 of the threshold
    can be pruned in one run and kept in the other (seen with AVX2 kernels: 4 of 266,200
    weights). Such a flip must be marginal (the kept value within 1e-3 of the threshold) and
    rare; without flips the weights agree to 1e-5, with them (the runs fork slightly) to
    1e-3."""
    flips = 0
    for k in a:
        if k.endswith("weight"):
            flip = (a[k] == 0) != (b[k] == 0)
            kept = torch.where(a[k] == 0, b[k], a[k])[flip].abs()
            assert (kept < THRESHOLD + 1e-3).all(), (k, kept.max())  # marginal decisions only
            flips += int(flip.sum())
    assert flips <= 1e-4 * sum(v.numel() for v in a.values()), flips
    for k in a:
        both = (a[k] != 0) & (b[k] != 0)
        assert (a[k] - b[k])[both].abs().max() <= (1e-5 if flips == 0 else 1e-3), k


@pytest.mark.parametrize("reduction", ["sample", "batch"])
def test_two_gloo_processes_equal_one(tmp_path, reduction):
    train(tmp_path / "one", 1, "--reduction", reduction)
    r = train(tmp_path / "two", 2, "--reduction", reduction)
    assert r.stdout.count("epoch   2/2") == 1  # only rank 0 reports
    a = load_tree(tmp_path / "one" / "model.pt")
    b = load_tree(tmp_path / "two" / "model.pt")
    assert_same_training(a, b)
    assert any((a[k] == 0).any() for k in a)  # the threshold pruned something


def test_resume_under_ddp(tmp_path):
    train(tmp_path / "one", 1)
    r = train(tmp_path / "two", 2)  # full run, then resume (a no-op past the end) under DDP
    r = train(tmp_path / "two", 2, "--resume")
    assert "resumed" in r.stdout
    a = load_tree(tmp_path / "one" / "model.pt")
    b = load_tree(tmp_path / "two" / "model.pt")
    assert_same_training(a, b)


def _run(out, *extra, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sensprune", "train"]
    return subprocess.run(cmd + ARGS + list(extra) + ["--out", str(out)], capture_output=True,
                          text=True, timeout=timeout)  # a rank left waiting would time out


def test_divergence_stops_every_rank(tmp_path):
    r = _run(tmp_path / "nan", "--lr", "1e6")
    assert r.returncode != 0
    assert "training diverged" in r.stderr


def test_a_directory_rank_0_cannot_claim_stops_every_rank(tmp_path):
    """Rank 1 stops by itself, with a reason, instead of going on into its first collective
    (torchrun's agent would then kill it; launchers that run one process per rank without an
    agent would leave it waiting until the collective's timeout)."""
    import fcntl

    out = tmp_path / "held"
    out.mkdir()
    with open(out / ".sensprune.lock", "a+") as held:  # another run holds the directory
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = _run(out, timeout=120)
    assert r.returncode != 0
    assert "is writing to" in r.stderr  # rank 0's reason
    assert "another rank could not claim" in r.stderr  # rank 1 stopped too, not left waiting
