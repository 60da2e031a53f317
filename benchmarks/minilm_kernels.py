"""The kernel choice of `sensprune.load` on a transformer, by row count: all-MiniLM-L6-v2 with
its 36 encoder Linear weights pruned to 90% by one global magnitude threshold (a stand-in for a
trained sparse model: kernel times depend on the sparsity, not on the values), exported fp16,
loaded three ways and timed at 1 and 32 sentences of 32 tokens, one thread:

  dense      plain PyTorch layers
  rows       `sensprune.load` as it is: each layer's kernel timed at 1, 64 and 1,024 rows and
             chosen by the rows a call multiplies (batch x sequence)
  batch      the earlier choice, kept here for comparison: the 64-row choice for every call
             beyond one row (32 sentences are 1,024 rows)

Predictions are checked equal before timing. Prints a table, writes JSON.

    python benchmarks/minilm_kernels.py [--json results/minilm/kernel_choice.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import minilm_task  # noqa: E402
import prune_minilm as pm  # noqa: E402
from minilm_deploy import skeleton  # noqa: E402

import sensprune  # noqa: E402
from sensprune.export import SparseLinear  # noqa: E402
from sensprune.export.engine import interleaved_medians  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.9, help="global magnitude sparsity")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    ap.add_argument("--json", default=str(ROOT / "results" / "minilm" / "kernel_choice.json"),
                    help="where to write the figures")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = pm.SentenceClassifier(pm.load_encoder(), len(minilm_task.AREAS)).eval()
    params = dict(model.named_parameters())
    names = pm.encoder_params(model)
    magnitudes = torch.cat([params[n].detach().abs().flatten() for n in names])
    threshold = magnitudes.kthvalue(int(a.sparsity * magnitudes.numel())).values
    with torch.no_grad():
        for n in names:
            params[n].mul_(params[n].abs() > threshold)
    file = Path(tempfile.mkdtemp(prefix="minilm-kernels-")) / "minilm.safetensors"
    sensprune.export(model.state_dict(), file, {"model": "minilm-sentence-classifier",
                                               "num_classes": len(minilm_task.AREAS),
                                               "input_shape": [pm.MAX_TOKENS]}, values="fp16")
    dense = sensprune.load(file, kernels="dense", model=skeleton())
    rows = sensprune.load(file, kernels="auto", model=skeleton())
    batch = copy.deepcopy(rows)
    for m in batch.modules():
        if isinstance(m, SparseLinear):  # the 64-row choice beyond one row, as before
            m.use_sparse = [(1, m.use_sparse[0][1]), (1 << 30, m.use_sparse[1][1])]
    report = rows.kernel_report
    chosen = {n: sum(v["sparse"] for k, v in report.items() if k.endswith(f"@{n}"))
              for n in (1, 64, 1024)}
    layers = sum(1 for k in report if k.endswith("@1"))
    print(f"{layers} Linear layers; CSR chosen at 1 / 64 / 1,024 rows: "
          f"{chosen[1]} / {chosen[64]} / {chosen[1024]}")
    data, _ = minilm_task.build()
    ids, mask = pm.tokenize(data["test"][0][:64])
    fns = {"dense": lambda x: dense(*x), "rows": lambda x: rows(*x),
           "batch": lambda x: batch(*x)}
    out = {"stand_in": f"pretrained all-MiniLM-L6-v2, {a.sparsity:.0%} global magnitude over "
           "the 36 encoder Linear weights, fp16 export", "threads": 1, "rounds": a.rounds,
           "torch": torch.__version__, "linear_layers": layers,
           "csr_layers_chosen_at_rows": chosen, "latency_ms": {}}
    with torch.no_grad():
        want = dense(ids, mask).argmax(1)
        for name in ("rows", "batch"):
            if not torch.equal(fns[name]((ids, mask)).argmax(1), want):
                raise SystemExit(f"{name}: predictions differ from the dense model's; not timed")
        print(f"{'sentences x 32 tokens':>22s} {'dense':>9s} {'rows':>9s} {'batch':>9s}")
        for b in (1, 32):
            t = interleaved_medians(fns, (ids[:b], mask[:b]), a.rounds)
            out["latency_ms"][f"batch {b} x 32 tokens"] = {k: v * 1e3 for k, v in t.items()}
            print(f"{b:>22d} " + " ".join(f"{t[k] * 1e3:7.2f}ms" for k in fns), flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.json)


if __name__ == "__main__":
    main()
