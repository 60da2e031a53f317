"""File size of pruned models under every storage option, with the test error of each.

For each committed model: the export as it is and exactly compacted (``--compact``), its
arrays stored raw or packed into one LZMA stream (``--compress lzma``), with fp32, fp16 and
int8 values (one scale per tensor, or one per row: int8-row): bytes, times smaller than the
dense fp32 parameters, and the test error change against the model itself (every file is read back and evaluated on the
10,000 test images). The last columns are what an ideal coder would need for the compacted
model's int8 file: the entropy of its masks (each layer's nonzero pattern as independent
draws at the layer's density) plus the empirical entropy of its int8 values.

    python benchmarks/storage.py [--json results/storage.json] [FILES...]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from sensprune.export import compact_model, export_checkpoint, read, build_from_export

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [
    "results/lenet300/sensitivity-50x/model.safetensors",
    "results/lenet300/sensitivity-100x/model.safetensors",
    "results/lenet300/sensitivity-150x/model.safetensors",
    "results/lenet300/sensitivity-200x/model.safetensors",
    "results/lenet5/l2-100x/model.safetensors",
    "results/lenet5/sensitivity-150x/model.safetensors",
]


def entropy_bytes(path: Path) -> dict[str, float]:
    """Bytes an ideal coder needs for the compacted model's masks and int8 values."""
    header, state = read(path)
    chain, _ = compact_model(build_from_export(header, state), header["arch"]["input_shape"])
    mask_bits = value_bits = 0.0
    for name, t in chain.state_dict().items():
        if not t.is_floating_point() or t.dim() < 2:
            continue
        n, k = t.numel(), int(t.count_nonzero())
        p = k / n
        if 0 < p < 1:
            mask_bits += n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
        v = t[t != 0].numpy()
        q = np.round(v / (np.abs(v).max() / 127)).astype(np.int64)
        _, counts = np.unique(q, return_counts=True)
        freq = counts / counts.sum()
        value_bits += float(-(counts * np.log2(freq)).sum())
    return {"mask_bytes": mask_bits / 8, "value_bytes": value_bits / 8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    files = [Path(f) for f in args.files] or [ROOT / f for f in DEFAULT_MODELS
                                              if (ROOT / f).exists()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            label = f"{f.parent.parent.name}/{f.parent.name}"
            ent = entropy_bytes(f)
            for compact in (False, True):
                for compress in ("none", "lzma"):
                    r = export_checkpoint(f, Path(tmp) / "m.safetensors", values="int8",
                                          compact=compact, compress=compress)
                    for fmt, v in r["formats"].items():
                        rows.append({"model": label, "compact": compact, "compress": compress,
                                     "values": fmt, "bytes": v["file_bytes"],
                                     "ratio": v["ratio"], "test_error": v["test_error"],
                                     "error_change": v["error_change"],
                                     "dense_fp32_bytes": r["dense_fp32_bytes"], **ent})
                        print(f"{label:28s} compact {str(compact):5s} {compress:4s} {fmt:4s} "
                              f"{v['file_bytes']:8,d} B {v['ratio']:6.1f}x  "
                              f"{v['error_change']:+.2f} point", flush=True)
    formats = list(dict.fromkeys(r["values"] for r in rows))
    print("\n| model | layout | " + " | ".join(formats) + " | int8 error change | ideal int8 "
          "(mask + values entropy) |")
    print("|---|---|" + "---|" * (len(formats) + 2))
    layouts: dict[tuple, dict] = {}
    for r in rows:
        layouts.setdefault((r["model"], r["compact"], r["compress"]), {})[r["values"]] = r
    for (model, compact, compress), g in layouts.items():
        r = g["int8"]
        layout = ("compacted" if compact else "as trained") + (", LZMA" if compress == "lzma" else "")
        ideal = r["mask_bytes"] + r["value_bytes"]
        print(f"| {model} | {layout} | " + " | ".join(
            f"{g[v]['bytes']:,} B ({g[v]['ratio']:.0f}x, {g[v]['error_change']:+.2f})"
            for v in formats)
            + f" | {r['error_change']:+.2f} | {ideal:,.0f} B ({r['dense_fp32_bytes'] / ideal:.0f}x)"
            " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "torch": torch.__version__},
                                              indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
