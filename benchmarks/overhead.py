"""Training-step overhead of the sensitivity regularizer, as a ratio to a plain SGD step.

For LeNet-300 and LeNet-5 at batch 100 on MNIST: seconds per step (median over interleaved
rounds) of plain SGD+momentum training, of the four sensitivity modes (specific/unspecific x
sample/batch), and of the naive reference that computes S with one autograd pass per
(sample, output) pair. Prints a table and writes JSON.

    python benchmarks/overhead.py [--steps 30] [--threads 1] [--json results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sensprune
from sensprune.data import batches, load_dataset
from sensprune.models import build_model, prunable_weights

MODES = [("specific", "sample"), ("unspecific", "sample"), ("specific", "batch"),
         ("unspecific", "batch")]
TARGETS = {("lenet300", "specific", "sample"): 1.5, ("lenet300", "unspecific", "sample"): 2.5,
           ("lenet5", "specific", "sample"): 2.0, ("lenet5", "unspecific", "sample"): 5.0}


def naive_sensitivity(model, x, t, kind):
    """One autograd pass per (sample, output) with non-zero alpha: the textbook computation."""
    params = list(prunable_weights(model).values())
    y = model(x)
    b, c = y.shape
    s = [torch.zeros_like(p) for p in params]
    for n in range(b):
        ks = [int(t[n])] if kind == "specific" else range(c)
        for k in ks:
            gs = torch.autograd.grad(y[n, k], params, retain_graph=True)
            for acc, g in zip(s, gs):
                acc.add_(g.abs(), alpha=(1.0 if kind == "specific" else 1.0 / c) / b)
    return s


def make_step(model_name, mode, data):
    torch.manual_seed(0)
    model = build_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reg = None
    if mode not in ("plain", "naive-specific", "naive-unspecific"):
        kind, red = mode
        reg = sensprune.SensitivityRegularizer(model, 1e-4, kind=kind, reduction=red)
    it = iter(batches(data, 100, shuffle_seed=0))

    def step():
        x, t = next(it)
        opt.zero_grad(set_to_none=True)
        if reg is not None:
            with reg.observe(t):
                out = model(x)
        else:
            out = model(x)
            if isinstance(mode, str) and mode.startswith("naive"):
                naive_sensitivity(model, x, t, mode.split("-")[1])
        F.cross_entropy(out, t).backward()
        opt.step()
        if reg is not None:
            reg.step()
    return step


def time_steps(step, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per mode per model")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (drift control)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="lenet300,lenet5")
    ap.add_argument("--naive-steps", type=int, default=2)
    ap.add_argument("--json", default="results/overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", limit_train=20000).train
    rows = []
    for model_name in args.models.split(","):
        modes = ["plain"] + MODES
        steps = {m: make_step(model_name, m, data) for m in modes}
        times = {m: [] for m in modes}
        for m in modes:
            time_steps(steps[m], 3)  # warm-up
        per_round = max(1, args.steps // args.rounds)
        for _ in range(args.rounds):
            for m in modes:
                times[m] += time_steps(steps[m], per_round)
        for m in ("naive-specific", "naive-unspecific"):
            times[m] = time_steps(make_step(model_name, m, data), args.naive_steps)
        plain = statistics.median(times["plain"])
        for m, ts in times.items():
            label = m if isinstance(m, str) else f"{m[0]}/{m[1]}"
            med = statistics.median(ts)
            target = TARGETS.get((model_name, *m)) if isinstance(m, tuple) else None
            rows.append({"model": model_name, "mode": label, "seconds_per_step": med,
                         "ratio_to_plain": med / plain, "steps_timed": len(ts),
                         "target_ratio": target,
                         "meets_target": None if target is None else med / plain <= target})
    print(f"\nbatch 100, {args.threads} thread(s), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"| model | mode | ms/step | x plain | target |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        tgt = "" if r["target_ratio"] is None else (
            f"<= {r['target_ratio']}x {'met' if r['meets_target'] else 'MISSED'}")
        print(f"| {r['model']} | {r['mode']} | {1000 * r['seconds_per_step']:.2f} | "
              f"{r['ratio_to_plain']:.2f} | {tgt} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch_size": 100, "threads": args.threads,
                               "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
