"""Reports: the per-layer sparsity table (markdown), run summaries, and plots (matplotlib,
optional)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError


def summary_markdown(s: dict) -> str:
    """A run summary as a markdown table: per-layer remaining %, compression, errors."""
    lines = [
        f"## {s['model']} on {s['dataset']} — method: {s['method']}",
        "",
        "| layer | weights | nonzero | remaining % |",
        "|---|---:|---:|---:|",
    ]
    for name, v in s["layers"].items():
        lines.append(f"| {name} | {v['total']:,} | {v['nonzero']:,} | {v['remaining_percent']:.2f} |")
    lines += [
        f"| **total** | {s['total_params']:,} | {s['nonzero_params']:,} | "
        f"{100.0 * s['nonzero_params'] / max(s['total_params'], 1):.2f} |",
        "",
        "| compression \\|θ\\|/\\|θ≠0\\| | test error % | val error % | epochs | train seconds |",
        "|---:|---:|---:|---:|---:|",
        f"| {s['compression_ratio']:.1f}x | {s['test_error']:.2f} | {s['val_error']:.2f} | "
        f"{s['epochs']} | {s['train_seconds']:.1f} |",
        "",
    ]
    return "\n".join(lines)


def read_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    d = Path(run_dir)
    try:
        summary = json.loads((d / "summary.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{d}/summary.json not found; is {d} a finished run directory "
                              "(sensprune train --out DIR)?") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{d}/summary.json is not valid JSON ({exc})") from None
    metrics = []
    mpath = d / "metrics.jsonl"
    if mpath.exists():
        metrics = [json.loads(line) for line in mpath.read_text().splitlines() if line.strip()]
    return summary, metrics


def plot_run(metrics: list[dict], path: str | Path) -> Path | None:
    """Error and remaining-weights curves per epoch; None if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ep = [m["epoch"] for m in metrics]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(ep, [m["val_error"] for m in metrics], label="val error %")
    ax1.plot(ep, [m["test_error"] for m in metrics], label="test error %")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("error %")
    ax2 = ax1.twinx()
    ax2.plot(ep, [m["remaining_percent"] for m in metrics], "k--", label="remaining %")
    ax2.set_yscale("log")
    ax2.set_ylabel("remaining weights % (log)")
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
