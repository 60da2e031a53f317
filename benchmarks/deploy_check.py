"""The README's inference figures, measured the way a user gets them: a committed model is
exported as the README says (`--compact`, int8, LZMA), read back with `sensprune.load(file)`,
and timed against the network as trained (the committed export's weights in the bundled
architecture, plain PyTorch layers), one thread, batch 1 and 64, on both input layouts a
LeNet accepts: flat (N, 784) and image (N, 1, 28, 28). Predictions are compared on 2,000 test
images before timing (the same class for every image). Prints a table, writes JSON.

    python benchmarks/deploy_check.py [--rounds 31] [--json results/deploy_check.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

import sensprune
from sensprune.data import load_dataset
from sensprune.export import build_from_export, export_checkpoint, read
from sensprune.export.engine import interleaved_medians

ROOT = Path(__file__).resolve().parents[1]
MODELS = [("LeNet-300, 100x", "results/lenet300/sensitivity-100x/model.safetensors"),
          ("LeNet-5, 150x", "results/lenet5/sensitivity-150x/model.safetensors")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=31, help="interleaved timing rounds")
    ap.add_argument("--json", default=str(ROOT / "results" / "deploy_check.json"),
                    help="where to write the rows")
    a = ap.parse_args()
    torch.set_num_threads(1)
    test = load_dataset("mnist").test
    images = test[0][:2000]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="deploy-check-"))
    for label, source in MODELS:
        header, state = read(ROOT / source)
        trained = build_from_export(header, state).eval()  # plain layers, zeros included
        file = tmp / (Path(source).parent.name + ".safetensors")
        rep = export_checkpoint(ROOT / source, file, values="int8", compact=True,
                                compress="lzma")
        loaded = sensprune.load(file)  # exactly as a user calls it
        quantized = build_from_export(*read(file)).eval()  # the file's weights, plain layers
        with torch.inference_mode():
            same = bool((loaded(images).argmax(1) == quantized(images).argmax(1)).all())
            agree_trained = float((loaded(images).argmax(1) == trained(images).argmax(1))
                                  .float().mean())
        if not same:
            raise SystemExit(f"{label}: the loaded engine's predictions differ from the file's "
                             "own network; not timed")
        for batch in (1, 64):
            x_img = images[:batch].contiguous()
            x_flat = x_img.reshape(batch, -1).contiguous()
            fns = {"trained, image": lambda x: trained(x[0]),
                   "loaded, image": lambda x: loaded(x[0])}
            flat = header["arch"]["model"] == "lenet300"  # LeNet-5 takes images only
            if flat:
                fns.update({"trained, flat": lambda x: trained(x[1]),
                            "loaded, flat": lambda x: loaded(x[1])})
            t = interleaved_medians(fns, (x_img, x_flat), a.rounds)
            base = t["trained, image"]
            row = {"model": label, "source": source, "batch": batch,
                   "file_bytes": rep["file_bytes"],
                   "us": {k: v * 1e6 for k, v in t.items()},
                   "speedup_image": base / t["loaded, image"],
                   "speedup_flat": (t["trained, flat"] / t["loaded, flat"]) if flat else None,
                   "predictions_equal_to_file": same,
                   "agreement_with_trained_fp32": agree_trained}
            rows.append(row)
            print(f"{label:16s} batch {batch:2d}: trained {base * 1e6:8.1f} us; loaded image "
                  f"{t['loaded, image'] * 1e6:7.1f} us ({row['speedup_image']:.2f}x)"
                  + (f"; flat: trained {t['trained, flat'] * 1e6:7.1f} us, loaded "
                     f"{t['loaded, flat'] * 1e6:7.1f} us ({row['speedup_flat']:.2f}x)"
                     if flat else ""), flush=True)
    out = {"threads": 1, "rounds": a.rounds, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "rows": rows}
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.json)


if __name__ == "__main__":
    main()
