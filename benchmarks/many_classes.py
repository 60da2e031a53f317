"""Unspecific sensitivity with many classes (C = 1000): cost and accuracy of the options.

On a LeNet-300-shaped MLP with 1000 outputs (batch 100, synthetic inputs), compares the exact
computation (chunked, 1000 output rows) with the unbiased estimator that samples K outputs per
step: seconds per sensitivity computation, relative error of S, and the effect on what the
method uses, the insensitivity max(0, 1 - S) (mean absolute difference, and the fraction of
weights whose decay changes by more than 0.05). Prints a table and writes JSON.

    python benchmarks/many_classes.py [--threads 1] [--json results/many_classes.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sensprune import sensitivity
from sensprune.models import LeNet300


def timed(fn, reps):
    out, ts = None, []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--samples", default="10,50,100,250")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="results/many_classes.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LeNet300(num_classes=args.classes)
    x = torch.randn(100, 1, 28, 28)
    names = [n for n in dict(model.named_parameters()) if n.endswith("weight")]
    exact, t_exact = timed(lambda: sensitivity(model, x, kind="unspecific", params=names),
                           args.reps)
    rows = [{"mode": "exact (chunked)", "outputs_used": args.classes, "seconds": t_exact,
             "relative_error_S": 0.0, "mean_abs_diff_insensitivity": 0.0,
             "frac_decay_changed_gt_0.05": 0.0}]
    gen = torch.Generator().manual_seed(1)
    for k in (int(v) for v in args.samples.split(",")):
        est, t = timed(lambda: sensitivity(model, x, kind="unspecific", params=names,
                                           output_samples=k, generator=gen), args.reps)
        num = sum(float((est[n] - exact[n]).norm() ** 2) for n in names) ** 0.5
        den = sum(float(exact[n].norm() ** 2) for n in names) ** 0.5
        ins_e = torch.cat([(1 - exact[n]).clamp(min=0).flatten() for n in names])
        ins_s = torch.cat([(1 - est[n]).clamp(min=0).flatten() for n in names])
        d = (ins_e - ins_s).abs()
        rows.append({"mode": f"sampled K={k}", "outputs_used": k, "seconds": t,
                     "relative_error_S": num / den, "mean_abs_diff_insensitivity": float(d.mean()),
                     "frac_decay_changed_gt_0.05": float((d > 0.05).float().mean())})
    print(f"\nLeNet-300 shape with C={args.classes}, batch 100, {args.threads} thread(s)")
    print("| mode | outputs | s / computation | x faster | rel. error of S | "
          "mean abs diff of max(0,1-S) | weights with decay changed > 0.05 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['outputs_used']} | {r['seconds']:.3f} | "
              f"{t_exact / r['seconds']:.1f} | {r['relative_error_S']:.3f} | "
              f"{r['mean_abs_diff_insensitivity']:.2e} | {100 * r['frac_decay_changed_gt_0.05']:.3f}% |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"classes": args.classes, "batch": 100, "threads": args.threads,
                               "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
