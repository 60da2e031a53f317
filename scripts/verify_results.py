"""Check every committed result independently of the code that produced it.

For each ``table.json`` under ``results/`` (or the directories given), loads each run's
committed model (``model.safetensors``, the compact export, or a ``model.pt`` state dict read
with ``weights_only=True``) into a fresh network, counts its zero weights and recomputes its test error on
the test set read straight from the IDX files (own reader, no sensprune data code), then
compares with the row. Prints one line per row; exits 1 on any mismatch, and on any committed
model that could not be checked because its test set was not found (MNIST is embedded; the
others need ``--data-dir`` or ``SENSPRUNE_DATA``).

    python scripts/verify_results.py [results/lenet5 ...] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from sensprune.data import dataset_info
from sensprune.models import build_model

EMBEDDED = Path(__file__).resolve().parents[1] / "src" / "sensprune" / "datasets"


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=None)  # read each dataset once, not once per row
def test_set(dataset: str, data_dir: Path | None):
    for root in ([data_dir / dataset] if data_dir else []) + [EMBEDDED / dataset]:
        if (root / "t10k-images-idx3-ubyte.gz").exists():
            x = read_idx(root / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
            y = read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
            info = dataset_info(dataset)
            x = (x - info.mean[0]) / info.std[0]
            return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)
    return None


def load_weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's committed weights: the compact export if there is one, else model.pt."""
    if (run / "model.safetensors").exists():
        from sensprune.export import read
        return read(run / "model.safetensors")[1]
    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)


def default_data_dir() -> Path | None:
    """SENSPRUNE_DATA, else the project layout's ../shared/data beside the checkout."""
    if os.environ.get("SENSPRUNE_DATA"):
        return Path(os.environ["SENSPRUNE_DATA"])
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    return beside if beside.is_dir() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", default=["results"])
    ap.add_argument("--include-quick", action="store_true", help="also check --quick tables")
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(),
                    help="directory holding <dataset>/t10k-*.gz (default: $SENSPRUNE_DATA, "
                         "else ../shared/data beside the checkout; MNIST is embedded)")
    args = ap.parse_args()
    tables = sorted(p for d in args.dirs for p in Path(d).rglob("table.json"))
    bad = checked = 0
    missing: dict[str, int] = {}  # dataset -> committed models left unchecked for lack of data
    for table in tables:
        result = json.loads(table.read_text())
        if result.get("quick") and not args.include_quick:
            continue
        if not all("run_dir" in row for row in result.get("rows", [])):
            # results/minilm/table.json: its rows are checked by benchmarks/minilm.py, not here
            print(f"--  {table}: not a reproduce table (rows without a run directory), not checked")
            continue
        for row in result["rows"]:
            run = table.parent / row["run_dir"]
            if not (run / "model.safetensors").exists() and not (run / "model.pt").exists():
                print(f"--  {run}: model not committed (summary only), not checked")
                continue
            cfg = json.loads((run / "summary.json").read_text())["config"]
            data = test_set(cfg["dataset"], args.data_dir)
            if data is None:
                missing[cfg["dataset"]] = missing.get(cfg["dataset"], 0) + 1
                print(f"--  {run}: no {cfg['dataset']} test set found, not checked")
                continue
            x, y = data
            model = build_model(cfg["model"], 10, tuple(x.shape[1:]))
            model.load_state_dict(load_weights(run))
            model.eval()
            with torch.no_grad():
                wrong = sum(int((model(xb).argmax(1) != yb).sum())
                            for xb, yb in zip(x.split(1000), y.split(1000)))
            err = 100.0 * wrong / len(y)
            state = model.state_dict()
            counts = {name: (int((state[name] != 0).sum()), state[name].numel())
                      for name in row["remaining_per_layer"]}
            layers_ok = all(abs(100.0 * nz / n - row["remaining_per_layer"][name]) < 1e-6
                            for name, (nz, n) in counts.items())
            ratio = sum(n for _, n in counts.values()) / max(sum(nz for nz, _ in counts.values()), 1)
            ok = (layers_ok and abs(err - row["test_error"]) < 1e-9
                  and abs(ratio - row["compression_ratio"]) < 1e-6 * ratio)
            checked += 1
            bad += not ok
            print(f"{'OK ' if ok else 'BAD'} {run}: {ratio:7.1f}x (table {row['compression_ratio']:.1f}x)"
                  f"  test err {err:.2f}% (table {row['test_error']:.2f}%)")
    print(f"{checked} rows checked, {bad} mismatches")
    if missing:
        names = ", ".join(f"{n} ({k} models)" for n, k in sorted(missing.items()))
        print(f"not checked for lack of a test set: {names}; pass --data-dir DIR holding "
              f"<dataset>/t10k-images-idx3-ubyte.gz, or set SENSPRUNE_DATA")
    return 1 if bad or missing or not checked else 0


if __name__ == "__main__":
    sys.exit(main())
