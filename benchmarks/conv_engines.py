"""The two exact engines of the per-sample conv |gradient| in the sensitivity, and what the
choice does to a whole training step.

Part 1, per conv layer shape of ResNet-32 (CIFAR, batch 128) and LeNet-5 (MNIST, batch 100),
with one output row (specific kind) and ten (unspecific): milliseconds of unfold + bmm, of the
grouped weight-gradient convolution, and of the layer's plain (summed) weight gradient for
scale; the engine the fixed rule picks (sensitivity_engines.engines.conv._conv_engine). Part 2: a ResNet-32
training step (SGD, batch 128, specific kind, BatchNorm frozen) plain, with the sensitivity
forced onto unfold only (the engine of earlier releases), and with the rule; ratios to plain.
Part 3, the per-sample-gradient peers on the same layers (one output row): torch.func
(vmap of grad), and Opacus's and BackPACK's per-sample gradients when they import (they are
not dependencies: ``pip install --no-deps -t DIR opacus backpack-for-pytorch einops unfoldNd
opt_einsum scipy`` and PYTHONPATH=DIR), each followed by the same |.| and sum, checked against
ours. The peers' times include the layer's own forward and backward (they start from the
input); ours starts from the output gradients the sensitivity's backward already produced. Medians of repetitions. Prints tables and writes JSON.

    python benchmarks/conv_engines.py [--threads 1] [--reps 5] [--json results/conv_engines.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from sensprune import SensitivityRegularizer, build_model

# the module (the package's face re-exports a function under the same name)
sens = importlib.import_module("sensprune.sensitivity_engines.engines.conv")

# (label, Cin, Cout, kernel, stride, padding, input size, batch)
LAYERS = [
    ("resnet32 stage1 16->16 3x3", 16, 16, 3, 1, 1, 32, 128),
    ("resnet32 stage2 16->32 3x3 s2", 16, 32, 3, 2, 1, 32, 128),
    ("resnet32 stage2 32->32 3x3", 32, 32, 3, 1, 1, 16, 128),
    ("resnet32 stage3 64->64 3x3", 64, 64, 3, 1, 1, 8, 128),
    ("lenet5 conv1 1->20 5x5", 1, 20, 5, 1, 0, 28, 100),
    ("lenet5 conv2 20->50 5x5", 20, 50, 5, 1, 0, 12, 100),
]


def median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def layer_rows(reps: int) -> list[dict]:
    rows = []
    for label, cin, cout, k, st, pd, hw, b in LAYERS:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, stride=st, padding=pd)
        a = torch.randn(b, cin, hw, hw).contiguous(memory_format=torch.channels_last)
        z = conv(a)
        for rows_k in (1, 10):
            delta = torch.randn(rows_k, *z.shape)
            t_unfold = median_time(lambda: sens._conv_unfold(conv, a, delta, 1.0), reps)
            t_grouped = median_time(lambda: sens._conv_grouped(conv, a, delta, 1.0), reps)
            t_plain = median_time(lambda: torch.nn.grad.conv2d_weight(
                a, conv.weight.shape, delta[0], stride=st, padding=pd), reps)
            rows.append({"layer": label, "output_rows": rows_k, "unfold_ms": 1e3 * t_unfold,
                         "grouped_ms": 1e3 * t_grouped, "plain_weight_grad_ms": 1e3 * t_plain,
                         "rule_picks": sens._conv_engine(conv, a, delta, 1.0).__name__[6:]})
    return rows


def peer_rows(reps: int) -> list[dict]:
    """Per-sample |weight gradient| summed over the batch, one output row, by each peer."""
    from torch.func import grad, vmap

    rows = []
    for label, cin, cout, k, st, pd, hw, b in LAYERS:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, stride=st, padding=pd)
        a = torch.randn(b, cin, hw, hw)
        delta = torch.randn(1, *conv(a).shape)
        ours = sens._conv_grouped(conv, a, delta, 1.0)[0]

        def func_way():
            def f(w, x, d):
                return (F.conv2d(x[None], w, None, st, pd) * d[None]).sum()
            return vmap(grad(f), in_dims=(None, 0, 0))(conv.weight.detach(), a,
                                                       delta[0]).abs().sum(0)

        row = {"layer": label, "ours_grouped_ms": 1e3 * median_time(
            lambda: sens._conv_grouped(conv, a, delta, 1.0), reps)}
        candidates = {"torch_func": func_way}
        try:
            from opacus.grad_sample import GradSampleModule
            gsm = GradSampleModule(nn.Sequential(conv), loss_reduction="sum")

            def opacus_way():
                gsm.zero_grad()
                (gsm(a) * delta[0]).sum().backward()
                return conv.weight.grad_sample.abs().sum(0)
            candidates["opacus"] = opacus_way
        except ImportError:
            pass
        try:
            from backpack import backpack, extend
            from backpack.extensions import BatchGrad
            bp = extend(copy_conv(conv))

            def backpack_way():
                bp.zero_grad()
                with backpack(BatchGrad()):
                    (bp(a) * delta[0]).sum().backward()
                return bp.weight.grad_batch.abs().sum(0)
            candidates["backpack"] = backpack_way
        except ImportError:
            pass
        for name, fn in candidates.items():
            with warnings.catch_warnings():  # BackPACK: "full backward hook ... no inputs
                warnings.simplefilter("ignore")  # require gradients" (true, and harmless)
                got = fn()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row[f"{name}_ms"] = 1e3 * median_time(fn, reps)
            row[f"{name}_max_rel_diff"] = float((got - ours).abs().max() / ours.abs().max())
        if "opacus" in candidates:
            gsm._close()
        rows.append(row)
    return rows


def copy_conv(conv: nn.Conv2d) -> nn.Conv2d:
    c = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding)
    c.load_state_dict(conv.state_dict())
    return c


def step_rows(reps: int, batch: int = 128) -> dict:
    torch.manual_seed(0)
    model = build_model("resnet32", 10, (3, 32, 32)).train()
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reg = SensitivityRegularizer(model, 1e-4)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 10, (batch,))
    rule = sens._conv_engine

    def step(mode: str) -> float:
        sens._conv_engine = rule if mode == "rule" else (lambda *a: sens._conv_unfold)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with reg.observe(t) if mode != "plain" else contextlib.nullcontext():
            out = model(x)
        F.cross_entropy(out, t).backward()
        opt.step()
        if mode != "plain":
            reg.step()
        return time.perf_counter() - t0

    modes = ("plain", "unfold_only", "rule")
    try:
        for m in modes:
            step(m)  # warm-up
        times = {m: [] for m in modes}
        for _ in range(reps):  # interleaved: drift hits every mode alike
            for m in modes:
                times[m].append(step(m))
    finally:
        sens._conv_engine = rule
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"model": "resnet32", "batch": batch, **{f"{m}_step_s": v for m, v in med.items()},
            "ratio_unfold_only": med["unfold_only"] / med["plain"],
            "ratio_rule": med["rule"] / med["plain"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="results/conv_engines.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = layer_rows(args.reps)
    print("| layer | output rows | unfold ms | grouped ms | plain weight grad ms | rule picks |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['output_rows']} | {r['unfold_ms']:.1f} | {r['grouped_ms']:.1f} "
              f"| {r['plain_weight_grad_ms']:.1f} | {r['rule_picks']} |")
    peers = peer_rows(args.reps)
    names = [k[:-3] for k in peers[0] if k.endswith("_ms")]
    print()
    print("| layer (one output row) | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for r in peers:
        print(f"| {r['layer']} | " + " | ".join(
            f"{r[n + '_ms']:.1f}" + (f" (diff {r[n + '_max_rel_diff']:.0e})"
                                     if n + "_max_rel_diff" in r else "") for n in names) + " |")
    st = step_rows(args.reps)
    print()
    print("| model | batch | plain step s | sensitivity, unfold only | sensitivity, rule |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {st['model']} | {st['batch']} | {st['plain_step_s']:.3f} | "
          f"{st['unfold_only_step_s']:.3f} ({st['ratio_unfold_only']:.2f}x) | "
          f"{st['rule_step_s']:.3f} ({st['ratio_rule']:.2f}x) |")
    with open(args.json, "w") as f:
        json.dump({"layers": rows, "peers": peers, "step": st, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "machine": platform.machine(),
                   "processor": platform.processor()}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
