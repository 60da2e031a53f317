"""Time to the final model: whole training runs, phase by phase, for each method.

Trains one recipe (default: the README's main job, ``recipes/lenet300.toml``: LeNet-300-100
on MNIST, 64 epochs, a cubic schedule to 100x; a reproduce recipe such as
``reproduce-lenet5`` gives its [common] settings) once per method
with ``sensprune.train`` and reads each run's ``metrics.jsonl``: seconds spent in the warm-up,
sparsification and fine-tuning phases (each epoch's time includes its pruning decision,
a schedule step or an automatic threshold search, and its evaluation), the total, the time at which the run first came within
``--budget`` (0.1) point of the dense run's best validation error (the phase that reaches
accuracy), and the time at which it first held 90% of its final compression.
The dense row ("none") is the same recipe with no regularizer and no pruning. Prints a table
and writes JSON.

    python benchmarks/time_to_model.py [--recipe lenet300] [--methods none,l2,sensitivity,...]
        [--lam L] [--epochs N --warmup-epochs W --finetune-epochs F] [--threads 1] [--json FILE]

Method names: ``none``, ``l2``, ``sensitivity`` (the recipe's kind), ``sensitivity-unspecific``,
and any other registered method (``gmp``, ``magnitude``, ...).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import sensprune
from sensprune.config import load_recipe

PHASES = ("train", "warmup", "sparsify", "finetune")


def method_overrides(label: str) -> dict:
    if label == "sensitivity-unspecific":
        return {"method": "sensitivity", "kind": "unspecific"}
    if label == "sensitivity-specific":
        return {"method": "sensitivity", "kind": "specific"}
    return {"method": label}


def base_settings(recipe: str) -> dict:
    """A training recipe's settings; for a reproduce recipe, its [common] table.

    load_recipe flattens every table, so a reproduce recipe's [methods.<label>] tables come
    back as dict values under their labels: dropping those leaves [common]."""
    return {k: v for k, v in load_recipe(recipe).items() if not isinstance(v, dict)}


def run_one(settings: dict, label: str, args, workdir: Path) -> dict:
    given = dict(lam=args.lam, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                 finetune_epochs=args.finetune_epochs, data_dir=args.data_dir)
    # an option left out keeps the recipe's value (a None here would reset it to the default)
    overrides = dict(settings, **method_overrides(label), threads=args.threads, progress=False,
                     device="cpu", out=str(workdir / label),
                     **{k: v for k, v in given.items() if v is not None})
    cfg = sensprune.make_config(None, **overrides)
    t0 = time.perf_counter()
    summary = sensprune.train(cfg, log=lambda *_: None)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (workdir / label / "metrics.jsonl").read_text().splitlines()]
    elapsed = list(itertools.accumulate(r["seconds"] for r in rows))
    phases = {}
    for ph in PHASES:
        secs = [r["seconds"] for r in rows if r["phase"] == ph]
        if secs:
            phases[ph] = {"epochs": len(secs), "seconds": sum(secs),
                          "median_epoch_s": statistics.median(secs)}
    return {"method": label, "kind": cfg.kind if cfg.method == "sensitivity" else None,
            "lam": cfg.lam, "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs,
            "finetune_epochs": cfg.finetune_epochs, "phases": phases,
            "epoch_seconds_total": elapsed[-1], "wall_s": wall,
            "val_errors": [r["val_error"] for r in rows],
            "compressions": [r["compression_ratio"] for r in rows], "elapsed": elapsed,
            "compression": summary["compression_ratio"], "test_error": summary["test_error"]}


def first_epoch(run: dict, done: list[bool]) -> tuple[int, float] | tuple[None, None]:
    """(epoch, seconds elapsed) of the run's first epoch where ``done`` holds."""
    i = next((i for i, d in enumerate(done) if d), None)
    return (None, None) if i is None else (i + 1, run["elapsed"][i])


def time_to(run: dict, target: float) -> tuple[int, float] | tuple[None, None]:
    """When the run's validation error first reached ``target``."""
    return first_epoch(run, [v <= target for v in run["val_errors"]])


def time_to_compression(run: dict, share: float = 0.9) -> tuple[int, float] | tuple[None, None]:
    """When the run first held ``share`` of its final compression (never, for a dense run)."""
    final = run["compressions"][-1]
    return first_epoch(run, [final > 1.0 and c >= share * final for c in run["compressions"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="lenet300", help="recipe path or bundled name")
    ap.add_argument("--methods", default="none,l2,sensitivity,sensitivity-unspecific")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--warmup-epochs", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--lam", type=float, default=None, help="lambda of every regularized method")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--budget", type=float, default=0.1,
                    help="points above the dense run's best validation error that count as reached")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        settings = base_settings(args.recipe)
    except sensprune.SensPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "none" in labels:  # the dense reference first: the others are timed against it
        labels = ["none"] + [m for m in labels if m != "none"]
    torch.set_num_threads(args.threads)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in labels:
            run = run_one(settings, label, args, Path(tmp))
            runs.append(run)
            print(f"{label}: {run['epoch_seconds_total']:.0f} s, {run['compression']:.1f}x at "
                  f"{run['test_error']:.2f}%", flush=True)

    dense = next((r for r in runs if r["method"] == "none"), None)
    target = min(dense["val_errors"]) + args.budget if dense else None
    base = dense["epoch_seconds_total"] if dense else None
    print(f"\nrecipe {args.recipe}; {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {args.threads} thread(s)"
          + (f"; reached = validation error <= {target:.2f}% (dense best + {args.budget})"
             if dense else ""))
    print("| method | warm-up s (epochs) | sparsify s (epochs) | fine-tune s (epochs) | total s "
          "| vs dense | s/epoch sparsify (median) | reached at epoch (s) "
          "| 90% of final compression at epoch (s) | compression | test err % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        def cell(ph):
            p = r["phases"].get(ph)
            return f"{p['seconds']:.0f} ({p['epochs']})" if p else "–"
        warm = cell("train") if r["method"] == "none" else cell("warmup")
        sp = r["phases"].get("sparsify")
        ep, secs = time_to(r, target) if dense else (None, None)
        r["reached_epoch"], r["reached_s"] = ep, secs
        ratio = r["epoch_seconds_total"] / base if base else None
        r["vs_dense"] = ratio
        ratio_s = f"{ratio:.2f}x" if ratio else "–"
        sp_s = f"{sp['median_epoch_s']:.1f}" if sp else "–"
        reached_s = f"{ep} ({secs:.0f})" if ep else "not reached"
        cep, csecs = time_to_compression(r)
        r["compression90_epoch"], r["compression90_s"] = cep, csecs
        comp_s = f"{cep} ({csecs:.0f})" if cep else "–"
        print(f"| {r['method']} | {warm} | {cell('sparsify')} | {cell('finetune')} "
              f"| {r['epoch_seconds_total']:.0f} | {ratio_s} | {sp_s} | {reached_s} | {comp_s} "
              f"| {r['compression']:.1f}x | {r['test_error']:.2f} |")
    if args.json:
        out = {"recipe": args.recipe, "torch": torch.__version__, "threads": args.threads,
               "machine": platform.machine(), "processor": platform.processor(),
               "reached_target_val_error": target, "runs": runs}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
