"""What the sensitivity looks like on a trained model, and how far the decay it drives is from
plain weight decay (``sensprune inspect``).

For every prunable layer, over its kept (nonzero) weights: quantiles of S, the share of
weights with S > 0.1, and the decay factor d = max(0, 1 - beta * S / norm) that the
regularizer would apply: its mean, the share of weights it leaves alone (d = 0) and the share
it decays at the full rate (d > 0.99), and its coefficient of variation std(d) / mean(d).
Plain weight decay is d = 1 for every weight, so a CV near 0 with mean near 1 means the
method is weight decay; histograms of log10 S and of d go to a PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import load_run_model
from .data import load_dataset
from .models import prunable_weights
from .regularizer import insensitivity
from .sensitivity import sensitivity

QUANTILES = (0.5, 0.9, 0.99, 0.999)


def _layer_stats(s: torch.Tensor, d: torch.Tensor) -> dict:
    s, d = s.double(), d.double()
    q = torch.quantile(s, torch.tensor(QUANTILES, dtype=torch.float64)) if s.numel() else None
    mean_d = float(d.mean()) if d.numel() else float("nan")
    return {
        "kept": int(s.numel()),
        **{f"S_q{qq:g}": float(v) for qq, v in zip(QUANTILES, q if q is not None else [math.nan] * 4)},
        "S_mean": float(s.mean()) if s.numel() else math.nan,
        "share_S_above_0.1": float((s > 0.1).double().mean()) if s.numel() else math.nan,
        "decay_mean": mean_d,
        "decay_cv": float(d.std() / mean_d) if d.numel() > 1 and mean_d > 0 else 0.0,
        "share_not_decayed": float((d == 0).double().mean()) if d.numel() else math.nan,
        "share_full_decay": float((d > 0.99).double().mean()) if d.numel() else math.nan,
    }


def inspect_sensitivity(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: str = "specific",
    reduction: str = "sample",
    outputs: str = "logits",
    normalize: str = "none",
    beta: float = 1.0,
    quantile: float = 0.5,
    times_weight: bool = False,
    source: str = "outputs",
) -> dict:
    """Per-layer statistics of S and of the decay factor it drives (see the module doc);
    also returns the raw per-layer S and decay of the kept weights under ``"_values"``."""
    weights = prunable_weights(model)
    if source == "loss":
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        s_all = {n: p.grad.detach().abs() for n, p in weights.items()}
        model.zero_grad(set_to_none=True)
    else:
        s_all = sensitivity(model, inputs, targets, kind=kind, reduction=reduction,
                            outputs=outputs, params=list(weights))
    layers, values = {}, {}
    for n, p in weights.items():
        s = s_all[n] * p.detach().abs() if times_weight else s_all[n]
        d = insensitivity(s, normalize, beta, quantile)
        kept = p.detach() != 0
        layers[n] = _layer_stats(s_all[n][kept], d[kept])
        values[n] = (s_all[n][kept], d[kept])
    return {"settings": {"kind": kind, "reduction": reduction, "outputs": outputs,
                         "normalize": normalize, "beta": beta, "quantile": quantile,
                         "times_weight": times_weight, "source": source,
                         "images": int(len(targets))},
            "layers": layers, "_values": values}


def inspect_run(path: str | Path, images: int = 100, png: str | Path | None = None,
                data_dir: str | None = None, **settings) -> dict:
    """``inspect_sensitivity`` of a trained run on its first ``images`` training images.
    Settings left out take the run's own (kind, outputs, normalize, ...)."""
    cfg, model = load_run_model(path)
    own = {"kind": cfg.kind, "reduction": cfg.reduction, "outputs": cfg.outputs,
           "normalize": cfg.normalize, "beta": cfg.beta, "quantile": cfg.quantile,
           "times_weight": cfg.times_weight, "source": cfg.sens_source}
    own.update({k: v for k, v in settings.items() if v is not None})
    splits = load_dataset(cfg.dataset, data_dir or cfg.data_dir, cfg.val_size)
    x, t = splits.train[0][:images], splits.train[1][:images]
    model.eval()  # S of the trained network as it is used (BatchNorm with running statistics)
    result = inspect_sensitivity(model, x, t, **own)
    if png:
        plot_histograms(result, png, title=f"{cfg.model}: {Path(path).name}")
        result["png"] = str(png)
    return result


def table_markdown(result: dict) -> str:
    st = result["settings"]
    form = "max(0, 1 - " + (f"{st['beta']:g}*" if st["beta"] != 1 else "") + \
        ("|w|*S" if st["times_weight"] else "S") + \
        (f" / {st['normalize']}_layer" if st["normalize"] != "none" else "") + ")"
    lines = [f"S: {st['kind']}, {st['outputs']}, {st['reduction']} reduction, source "
             f"{st['source']}, {st['images']} images; decay factor d = {form}; kept weights only.",
             "", "| layer | kept | median S | 99.9th pct S | share S > 0.1 | mean d | CV of d | "
             "d = 0 | d > 0.99 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, v in result["layers"].items():
        lines.append(f"| {n} | {v['kept']:,} | {v['S_q0.5']:.2e} | {v['S_q0.999']:.2e} | "
                     f"{100 * v['share_S_above_0.1']:.1f}% | {v['decay_mean']:.3f} | "
                     f"{v['decay_cv']:.3f} | {100 * v['share_not_decayed']:.1f}% | "
                     f"{100 * v['share_full_decay']:.1f}% |")
    lines += ["", "Plain weight decay is d = 1 everywhere (CV 0); the further the CV from 0, "
              "the more the decay picks among weights."]
    return "\n".join(lines)


def plot_histograms(result: dict, path: str | Path, title: str = "") -> Path | None:
    """Per layer: histogram of log10 S (left) and of the decay factor d (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    values = result["_values"]
    fig, axes = plt.subplots(len(values), 2, figsize=(8, 1.9 * len(values) + 0.6), squeeze=False)
    for (n, (s, d)), (a1, a2) in zip(values.items(), axes):
        s = s.double()
        a1.hist(torch.log10(s[s > 0]).numpy(), bins=60, color="tab:blue")
        a1.set_ylabel(n, fontsize=7)
        a2.hist(d.double().numpy(), bins=50, range=(0, 1), color="tab:orange")
        a2.set_yscale("log")
    axes[-1][0].set_xlabel("log10 S")
    axes[-1][1].set_xlabel("decay factor d = max(0, 1 - beta*S/norm)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
