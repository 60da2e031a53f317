import os
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
