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
from .methods.sensitivity import INSPECT
from .regularizer import insensitivity
from .plots import plot_histograms
from .sensitivity_engines import sensitivity

QUANTILES = (0.5, 0.9, 0.99, 0.999)


def _layer_stats(s: torch.Tensor, d: torch.Tensor, decay_floor: float = 0.0) -> dict:
    """Quantiles of S and the decay d over the kept weights; share_not_decayed counts the
    weights at the least decay (d = 0, or d = decay_floor)."""
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
        "share_not_decayed": float((d <= decay_floor).double().mean()) if d.numel() else math.nan,
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
    sens_source: str = "outputs",
    decay_floor: float = 0.0,
) -> dict:
    """Per-layer statistics of S and of the decay factor it drives (see the module doc);
    also returns the raw per-layer S and decay of the kept weights under ``"_values"``."""
    weights = prunable_weights(model)
    if sens_source == "loss":
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
        d = insensitivity(s, normalize, beta, quantile, decay_floor=decay_floor)
        kept = p.detach() != 0
        layers[n] = _layer_stats(s_all[n][kept], d[kept], decay_floor)
        values[n] = (s_all[n][kept], d[kept])
    return {"settings": {"kind": kind, "reduction": reduction, "outputs": outputs,
                         "normalize": normalize, "beta": beta, "quantile": quantile,
                         "decay_floor": decay_floor, "times_weight": times_weight,
                         "sens_source": sens_source,
                         "images": int(len(targets))},
            "layers": layers, "_values": values}


def inspect_run(path: str | Path, images: int = 100, png: str | Path | None = None,
                data_dir: str | None = None, **settings) -> dict:
    """``inspect_sensitivity`` of a trained run on its first ``images`` training images.
    Settings left out take the run's own (kind, outputs, normalize, ...)."""
    cfg, model = load_run_model(path)
    own = {k: getattr(cfg, k) for k in INSPECT}  # the sensitivity method's declaration
    own.update({k: v for k, v in settings.items() if v is not None})
    splits = load_dataset(cfg.dataset, data_dir or cfg.data_dir, cfg.val_size)
    x, t = splits.train[0][:images], splits.train[1][:images]
    model.eval()  # S of the trained network as it is used (BatchNorm with running statistics)
    result = inspect_sensitivity(model, x, t, **own)
    if png:
        plot_histograms(result, png, title=f"{cfg.model}: {Path(path).name}")
        result["png"] = str(png)
    return result
