import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def mnist():
    from sensprune.data import load_dataset
    return load_dataset("mnist")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "fashion-mnist").exists():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def quick_lenet300(tmp_path_factory):
    """One quick reproduce of every LeNet-300 method, shared by the reproduce and verify
    tests (read-only: a test that changes files works on a copy)."""
    from sensprune.reproduce import reproduce
    out = tmp_path_factory.mktemp("quick-lenet300")
    return out, reproduce("lenet300", out, quick=True, log=lambda *_: None, methods=QUICK_ROWS)


# one row of each method of the canonical LeNet-300 recipe (quick mode: seconds each)
QUICK_ROWS = ["dense", "sensitivity-100x", "sensitivity-auto", "l2-50x", "l1-auto",
              "gmp-layer-100x", "magnitude", "sparse_vd"]


# a quick LeNet-300 training run from the CLI (seconds), shared by the safety and reliability
# tests; read-only: a test that changes files works on a copy
QUICK_TRAIN = ["--model", "lenet300", "--limit-train", "300", "--val-size", "100", "--epochs",
               "2", "--warmup-epochs", "1", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    r = subprocess.run([sys.executable, "-m", "sensprune", "train", *QUICK_TRAIN, "--out",
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out
