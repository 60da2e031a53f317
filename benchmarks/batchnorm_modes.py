"""BatchNorm in the sensitivity: the frozen mode (batch statistics as constants, per-sample
gradients, fast path) against the exact coupled computation. Prints, per model: seconds per
sensitivity computation of each mode, the relative L1 difference of S, and the share of
weights whose insensitivity max(0, 1 - S) changes by more than 0.05; then one training step
(SGD, batch --step-batch) plain and with the specific sensitivity regularizer in the frozen
mode, medians of --reps. Writes JSON.

    python benchmarks/batchnorm_modes.py --models resnet32,vgg16_cifar --batch 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch

from sensprune import build_model, sensitivity
from sensprune.models import prunable_weights


def measure(name: str, batch: int, seed: int = 0, reps: int = 3) -> dict:
    torch.manual_seed(seed)
    model = build_model(name, 10, (3, 32, 32)).train()
    x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    params = list(prunable_weights(model))
    out, times = {}, {}
    for mode in ("frozen", "exact"):
        runs = []
        for _ in range(reps if mode == "frozen" else 1):
            t0 = time.perf_counter()
            out[mode] = sensitivity(model, x, t, params=params, batchnorm=mode)
            runs.append(time.perf_counter() - t0)
        times[mode] = sorted(runs)[len(runs) // 2]
    t0 = time.perf_counter()
    with torch.no_grad():
        model(x)
    forward = time.perf_counter() - t0
    fz, ex = out["frozen"], out["exact"]
    diff = sum(float((fz[n] - ex[n]).abs().sum()) for n in params)
    norm = sum(float(ex[n].abs().sum()) for n in params)
    changed = sum(int((((1 - fz[n]).clamp(min=0) - (1 - ex[n]).clamp(min=0)).abs() > 0.05).sum())
                  for n in params)
    total = sum(fz[n].numel() for n in params)
    return {"model": name, "batch": batch, "seconds_frozen": times["frozen"],
            "seconds_exact": times["exact"], "speedup": times["exact"] / times["frozen"],
            "seconds_forward": forward, "relative_l1_difference": diff / norm,
            "share_insensitivity_changed_over_0.05": changed / total}


def step_times(name: str, batch: int, reps: int) -> dict:
    import torch.nn.functional as F

    from sensprune import SensitivityRegularizer
    torch.manual_seed(0)
    model = build_model(name, 10, (3, 32, 32)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reg = SensitivityRegularizer(model, 1e-4, batchnorm="frozen")
    x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step(with_reg: bool) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        ctx = reg.observe(t) if with_reg else contextlib.nullcontext()
        with ctx:
            out = model(x)
        F.cross_entropy(out, t).backward()
        opt.step()
        if with_reg:
            reg.step()
        return time.perf_counter() - t0

    step(False), step(True)  # warm-up
    times = {True: [], False: []}
    for _ in range(reps):  # interleaved: drift hits both alike
        for mode in (False, True):
            times[mode].append(step(mode))
    plain, sens = (sorted(times[m])[reps // 2] for m in (False, True))
    return {"model": name, "step_batch": batch, "plain_step_s": plain,
            "frozen_specific_step_s": sens, "ratio": sens / plain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet32,vgg16_cifar")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--step-batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="results/batchnorm_modes.json")
    args = ap.parse_args()
    rows = [measure(m, args.batch) for m in args.models.split(",")]
    steps = [step_times(m, args.step_batch, args.reps) for m in args.models.split(",")]
    print("| model | batch | frozen s | exact s | speedup | rel. L1 diff of S | d changed > 0.05 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['seconds_frozen']:.3f} | {r['seconds_exact']:.2f} | "
              f"{r['speedup']:.0f}x | {r['relative_l1_difference']:.3f} | "
              f"{100 * r['share_insensitivity_changed_over_0.05']:.2f}% |")
    print()
    print("| model | batch | plain step s | frozen specific step s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in steps:
        print(f"| {r['model']} | {r['step_batch']} | {r['plain_step_s']:.3f} | "
              f"{r['frozen_specific_step_s']:.3f} | {r['ratio']:.2f}x |")
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "steps": steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "machine": platform.machine(), "note": "random initialization, CPU"}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
