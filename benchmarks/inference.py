"""Inference latency of pruned models: dense vs each engine, before and after compaction.

For each model (committed compact exports of `results/`, or any exports given), at batch 1
and 64, with one thread and with all threads, the median latency over interleaved rounds of
  dense        the network as trained (zeros included), plain nn.Linear / nn.Conv2d
  csr          the same network, every Linear layer on torch's CSR kernel
  compact      the exactly compacted network (``sensprune export --compact``), plain layers
  loaded       the compacted network as ``sensprune.load`` returns it: the engine
               (export/engine.py) runs each layer on the kernel measured fastest (CSR via
               embedding_bag, 2x2 max pooling as two maxima, dense)
  dense+engine the network as trained, run by the same engine with every Linear layer dense:
               how much of the speed-up the engine's other kernels (pooling) give without
               pruning
and, as deployed on other runtimes, the dense and the compacted network under TorchScript
(``torch.jit.freeze(torch.jit.script(m))``) and under ONNX Runtime (when installed; one
session per thread count), each one's speed-up over the eager dense network, the baseline. Before timing, every variant's predictions are checked
against the dense network on 2,000 test images (they must agree exactly: the same argmax).
Prints a table, writes JSON.

    python benchmarks/inference.py [--rounds 21] [--json results/inference.json] [FILES...]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from sensprune.data import load_dataset
from sensprune.export import build_from_export, compact_model, read, to_sparse_inference
from sensprune.export.compaction import to_chain
from sensprune.export.engine import InferenceChain, interleaved_medians

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [  # (label, export): about 50x, 100x, 150x / 200x of each network
    ("lenet300 50x", "results/lenet300/sensitivity-50x/model.safetensors"),
    ("lenet300 100x", "results/lenet300/sensitivity-100x/model.safetensors"),
    ("lenet300 150x", "results/lenet300/sensitivity-150x/model.safetensors"),
    ("lenet300 200x", "results/lenet300/sensitivity-200x/model.safetensors"),
    ("lenet300 neuron 50x", "results/lenet300/neuron-group-50x/model.safetensors"),
    ("lenet300 neuron 100x", "results/lenet300/neuron-group-100x/model.safetensors"),
    ("lenet5 100x", "results/lenet5/l2-100x/model.safetensors"),
    ("lenet5 150x", "results/lenet5/sensitivity-150x/model.safetensors"),
    ("lenet5 200x", "results/lenet5/sensitivity-200x/model.safetensors"),
]


def variants(path: Path) -> tuple[dict[str, torch.nn.Module], dict, tuple[int, ...]]:
    header, state = read(path)
    shape = tuple(header["arch"]["input_shape"])
    dense = build_from_export(header, state).eval()
    chain, rep = compact_model(dense, shape)
    torch.set_num_threads(1)  # kernel choices measured at one thread
    scripted = {f"{k} script": torch.jit.freeze(torch.jit.script(copy.deepcopy(m).eval()))
                for k, m in (("dense", dense), ("compact", chain))}
    dense_chain = to_chain(copy.deepcopy(dense), torch.zeros(1, *shape))
    engine_dense = InferenceChain(dense_chain).plan(shape, prefer=("dense",))
    return ({"dense": dense, "dense+engine": engine_dense,
             "csr": to_sparse_inference(copy.deepcopy(dense), "sparse"),
             "compact": chain, "loaded": InferenceChain(copy.deepcopy(chain)).plan(shape),
             **scripted},
            {"macs": rep["before"]["macs"], "compact_macs": rep["after"]["macs"],
             "shapes": [layer["shape"] for layer in rep["after"]["layers"]],
             "dataset": header.get("dataset", "mnist")}, shape)


def onnx_runners(vs: dict, shape, threads: int, x_check: torch.Tensor) -> dict:
    """The dense and the compacted network as ONNX Runtime sessions (empty without it); each
    checked against its torch module's predictions first."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    import tempfile

    from sensprune.export import export_onnx

    runners = {}
    for name in ("dense", "compact"):
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(copy.deepcopy(vs[name]), Path(tmp) / "m.onnx", shape)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            # idle ORT threads spin by default, taking the cores from the torch candidates
            # timed in the same rounds
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def run(x, sess=sess):
            return sess.run(None, {"input": x.numpy()})[0]
        with torch.inference_mode():
            want = vs["dense"](x_check).argmax(1).numpy()
        if not (run(x_check).argmax(1) == want).all():
            raise SystemExit(f"ONNX Runtime's {name} network predicts differently")
        runners[f"{name} onnxruntime"] = run
    return runners


def timed(models: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median microseconds per call, candidates interleaved within every round; in each round
    a candidate runs back to back for about 2 ms of its own time (so a fast model is not
    timed on its first, cold call alone)."""
    inner = {}
    with torch.inference_mode():
        for k, m in models.items():
            m(x)
            t0 = time.perf_counter()
            m(x)
            inner[k] = max(1, int(2e-3 / max(1e-6, time.perf_counter() - t0)))
    return {k: 1e6 * v for k, v in interleaved_medians(models, x, rounds, inner).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="exports to time (default: the committed models)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    models = ([(Path(f).parent.name, f) for f in args.files] if args.files else
              [(label, ROOT / f) for label, f in DEFAULT_MODELS if (ROOT / f).exists()])
    all_threads = torch.get_num_threads()
    rows = []
    for label, path in models:
        vs, info, shape = variants(Path(path))
        test = load_dataset(info["dataset"]).test
        x_test = test[0][:2000]
        with torch.inference_mode():
            want = vs["dense"](x_test).argmax(1)
            agree = {k: bool((m(x_test).argmax(1) == want).all()) for k, m in vs.items()}
        if not all(agree.values()):
            raise SystemExit(f"{label}: predictions differ from the dense network: {agree}")
        for threads in sorted({1, all_threads}):
            torch.set_num_threads(threads)
            runners = {**vs, **onnx_runners(vs, shape, threads, x_test)}
            for batch in (1, 64):
                t = timed(runners, torch.randn(batch, *shape), args.rounds)
                rows.append({"model": label, "file": str(path), "threads": threads,
                             "batch": batch, "us": t,
                             "speedup": {k: t["dense"] / v for k, v in t.items()},
                             "macs": info["macs"], "compact_macs": info["compact_macs"],
                             "compact_shapes": info["shapes"],
                             "kernels": {k: v["kernel"] for k, v in
                                         vs["loaded"].kernel_report.items()}})
                r = rows[-1]
                print(f"{label:16s} threads {threads} batch {batch:2d}  " + "  ".join(
                    f"{k} {v:8.1f} us ({r['speedup'][k]:4.1f}x)" for k, v in t.items()),
                    flush=True)
    names = [k for k in rows[0]["speedup"] if k != "dense"] if rows else []
    print("\n| model | threads | batch | dense µs | " + " | ".join(names)
          + " | multiply-adds dense → compact |")
    print("|---|---|---|---|" + "---|" * (len(names) + 1))
    for r in rows:
        print(f"| {r['model']} | {r['threads']} | {r['batch']} | {r['us']['dense']:.0f} | "
              + " | ".join(f"{r['speedup'][k]:.2f}x" for k in names)
              + f" | {r['macs']:,} → {r['compact_macs']:,} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rows": rows, "rounds": args.rounds, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpus": all_threads}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
