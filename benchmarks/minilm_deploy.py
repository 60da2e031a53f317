"""The pruned all-MiniLM-L6-v2 shipped small and timed: export a fine-tuned, pruned
SentenceClassifier (examples/prune_minilm.py --save) in fp32, fp16 and int8 (the last two also
LZMA-packed); keep the
smallest whose test accuracy is within 0.2 point of the model's own; then CPU
latency (one thread), batch 1 and 32 sentences of 32 tokens, of the file's weights run three
ways: plain PyTorch (dense kernels), `sensprune.load(file, model=...)` (CSR kernels where they
measure faster), and ONNX Runtime. Their predictions are checked equal before timing.

    python benchmarks/minilm_deploy.py runs/minilm/sensitivity-90-lam0.01-s0.safetensors \\
        [--json results/minilm/deploy.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import minilm_task  # noqa: E402
import prune_minilm as pm  # noqa: E402

import sensprune  # noqa: E402
from sensprune.export.engine import interleaved_medians  # noqa: E402


def skeleton(attn: str = "sdpa") -> pm.SentenceClassifier:
    """The architecture with no weights read (the export fills it)."""
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(pm.model_dir())
    cfg._attn_implementation = attn
    return pm.SentenceClassifier(transformers.AutoModel.from_config(
        cfg, add_pooling_layer=False), len(minilm_task.AREAS))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("state", help="a SentenceClassifier state_dict (safetensors) to ship")
    ap.add_argument("--json", default=str(ROOT / "results" / "minilm" / "deploy.json"),
                    help="where to write the figures")
    ap.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    data, _ = minilm_task.build()
    test = (*pm.tokenize(data["test"][0]), torch.tensor(data["test"][1]))
    model = skeleton()
    model.load_state_dict(load_file(a.state))
    model.eval()
    base = pm.accuracy(model, test)
    dense_file = pm.model_dir() / "model.safetensors"
    tmp = Path(tempfile.mkdtemp(prefix="minilm-deploy-"))
    exports = []
    # LZMA on fp32 is left out: it takes minutes on the 53 MB file and fp16 already halves it
    for values, compress in (("fp32", "none"), ("fp16", "none"), ("fp16", "lzma"),
                             ("int8", "none"), ("int8", "lzma")):
        if True:
            path = tmp / f"minilm-{values}-{compress}.safetensors"
            rep = sensprune.export(model.state_dict(), path,
                                   {"model": "minilm-sentence-classifier",
                                    "num_classes": len(minilm_task.AREAS),
                                    "input_shape": [pm.MAX_TOKENS]},
                                   values=values, compress=compress)
            loaded = sensprune.load(path, kernels="dense", model=skeleton())
            acc = pm.accuracy(loaded, test)
            exports.append({"values": values, "compress": compress, "bytes": rep["file_bytes"],
                            "test_accuracy": acc, "path": path})
            print(f"{values:5s} {compress:5s} {rep['file_bytes'] / 1e6:7.2f} MB  "
                  f"test accuracy {100 * acc:.2f}% (model's own {100 * base:.2f}%)", flush=True)
    ok = [e for e in exports if base - e["test_accuracy"] <= 0.002 + 1e-12]
    chosen = min(ok, key=lambda e: e["bytes"])
    print(f"chosen: {chosen['values']} + {chosen['compress']}, {chosen['bytes'] / 1e6:.2f} MB "
          f"against the dense fp32 model file {dense_file.stat().st_size / 1e6:.2f} MB")

    # latency: the chosen file's weights three ways
    plain = sensprune.load(chosen["path"], kernels="dense", model=skeleton())
    engine = sensprune.load(chosen["path"], kernels="auto", model=skeleton())
    from sensprune.export import SparseLinear
    csr_layers = sum(isinstance(m, SparseLinear) for m in engine.modules())
    onnx_path = tmp / "minilm.onnx"
    eager = sensprune.load(chosen["path"], kernels="dense", model=skeleton("eager"))
    ids, mask = test[0][:32], test[1][:32]
    torch.onnx.export(eager, (ids, mask), str(onnx_path), input_names=["ids", "mask"],
                      output_names=["logits"], dynamic_axes={"ids": {0: "b", 1: "t"},
                      "mask": {0: "b", 1: "t"}, "logits": {0: "b"}}, dynamo=False)
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

    def run_ort(i, m):
        return torch.from_numpy(sess.run(None, {"ids": i.numpy(), "mask": m.numpy()})[0])

    with torch.no_grad():  # the same predictions on the whole test split before any timing
        agree = {}
        p_plain = torch.cat([plain(test[0][i:i + 64], test[1][i:i + 64]).argmax(1)
                             for i in range(0, len(test[0]), 64)])
        for name, f in (("sensprune.load", engine), ("onnxruntime", run_ort)):
            p = torch.cat([f(test[0][i:i + 64], test[1][i:i + 64]).argmax(1)
                           for i in range(0, len(test[0]), 64)])
            agree[name] = float((p == p_plain).float().mean())
        print("prediction agreement with plain PyTorch:", agree)
        if min(agree.values()) < 1.0:
            raise SystemExit("the three ways disagree on some predictions: not timed")
        timings = {}
        for b in (1, 32):
            x = (ids[:b], mask[:b])
            fns = {"pytorch dense": lambda x: plain(*x), "sensprune.load": lambda x: engine(*x),
                   "onnxruntime": lambda x: run_ort(*x)}
            t = interleaved_medians(fns, x, a.rounds)
            timings[b] = {k: v * 1e3 for k, v in t.items()}
            print(f"batch {b:2d} x 32 tokens: " + ", ".join(
                f"{k} {v:.2f} ms" for k, v in timings[b].items()), flush=True)
    result = {
        "state": os.path.relpath(a.state, ROOT) if Path(a.state).is_absolute() else a.state,
        "model_test_accuracy": base,
        "exports": [{k: v for k, v in e.items() if k != "path"} for e in exports],
        "chosen": {k: v for k, v in chosen.items() if k != "path"},
        "dense_fp32_model_file_bytes": dense_file.stat().st_size,
        "size_ratio": dense_file.stat().st_size / chosen["bytes"],
        "csr_layers": csr_layers, "linear_layers": 37,
        "latency_ms": {f"batch {b} x 32 tokens": v for b, v in timings.items()},
        "prediction_agreement": agree, "threads": 1, "torch": torch.__version__,
        "onnxruntime": ort.__version__}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", a.json)


if __name__ == "__main__":
    main()
