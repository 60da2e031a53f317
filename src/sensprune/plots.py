"""The plots (matplotlib, optional: each returns None without it): a run's curves, the
comparison's Pareto plot, the sensitivity histograms of ``inspect``."""

from __future__ import annotations

import re
from pathlib import Path

from .results import table_rows


def plot_run(metrics: list[dict], path: str | Path) -> Path | None:
    """Error and remaining-weights curves per epoch and, for the sensitivity method, how its
    decay d = max(floor, 1 - S) departs from weight decay per layer (mean d, share at the
    least d);
    None if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ep = [m["epoch"] for m in metrics]
    # sparsification epochs only (older runs also copied the last values into fine-tuning lines)
    decay = [m for m in metrics if m.get("decay") and m.get("phase") == "sparsify"]
    fig, axes = plt.subplots(2 if decay else 1, 1, figsize=(6, 6.5 if decay else 3.5),
                             squeeze=False)
    ax1 = axes[0][0]
    ax1.plot(ep, [m["val_error"] for m in metrics], label="val error %")
    ax1.plot(ep, [m["test_error"] for m in metrics], label="test error %")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("error %")
    ax2 = ax1.twinx()
    ax2.plot(ep, [m["remaining_percent"] for m in metrics], "k--", label="remaining %")
    ax2.set_yscale("log")
    ax2.set_ylabel("remaining weights % (log)")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3,
               fontsize=7, frameon=False)  # below the axes: never over the curves
    if decay:
        ax = axes[1][0]
        for i, layer in enumerate(decay[-1]["decay"]):
            rows = [m for m in decay if layer in m["decay"]]
            x = [m["epoch"] for m in rows]
            color = f"C{i % 10}"
            ax.plot(x, [m["decay"][layer]["mean_decay"] for m in rows], color=color,
                    label=f"{layer}: mean d")
            ax.plot(x, [m["decay"][layer]["undecayed"] for m in rows], "--", color=color,
                    label=f"{layer}: share at the least d")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("epoch")
        ax.set_ylabel("kept weights (weight decay: d = 1)")
        ax.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _family(label: str) -> str:
    """A row's series in the Pareto plot: its label without the compression target
    (``l2-100x`` and ``l2-150x`` are one line)."""
    return re.sub(r"-\d+x(?=$|-)", "", label)


def plot_pareto(result: dict, path: Path) -> Path | None:
    """Test error against compression (log axis): per row its mean over seeds with the
    standard deviation as error bars (both axes), one line per method across its compression
    targets, a dotted further-pruned curve (no retraining) from each seed-0 point, and the
    published points as labelled black stars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs, groups = table_rows(result)
    groups = [g for g in groups if g.status == "run"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list] = {}
    for g in groups:
        series.setdefault(_family(g.label), []).append(g)
    markers = "os^Dv<>pXh*P"
    colors = {}
    for i, (fam, gs) in enumerate(series.items()):
        gs = sorted(gs, key=lambda g: g.compression_ratio.mean)
        x = [g.compression_ratio.mean for g in gs]
        y = [g.test_error.mean for g in gs]
        bars = ax.errorbar(x, y, yerr=[g.test_error.std for g in gs],
                           xerr=[g.compression_ratio.std for g in gs],
                           marker=markers[i % len(markers)], linestyle="-" if len(gs) > 1 else "none",
                           capsize=2, label=fam, color=plt.cm.tab20(i % 20))
        colors[fam] = bars[0].get_color()
    for r in runs:  # pruned further without retraining: dotted, the row's colour
        fam = _family(r.group)
        if r.curve and fam in colors and r.label == r.group:  # the recipe seed's run only
            pts = [{"compression_ratio": r.compression_ratio, "test_error": r.test_error}] + r.curve
            ax.plot([p["compression_ratio"] for p in pts], [p["test_error"] for p in pts],
                    linestyle=":", linewidth=1, color=colors[fam])
    for k, p in enumerate(result["published"]):
        ax.scatter([p["compression_ratio"]], [p["test_error"]], marker="*", s=90, c="k", zorder=5)
        ax.annotate(p["label"], (p["compression_ratio"], p["test_error"]), fontsize=7,
                    xytext=(6, 8 if k % 2 == 0 else -12), textcoords="offset points",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    # the further-pruned curves climb to chance level; keep the trained points readable
    errors = sorted([g.test_error.mean for g in groups] +
                    [p["test_error"] for p in result["published"]])
    if errors:  # a collapsed row (error far above the rest) must not squash the others
        top = min(1.35 * errors[-1], 2.0 * errors[len(errors) // 2])
        ax.set_ylim(0.75 * errors[0], top)
        off = [g.label for g in groups if g.test_error.mean > top]
        if off:
            ax.text(0.01, 0.98, "above the plot: " + ", ".join(off), transform=ax.transAxes,
                    fontsize=7, va="top")
    ax.set_xscale("log")
    ax.set_xlabel("compression |θ| / |θ≠0| (log)")
    ax.set_ylabel("test error % (mean ± std over seeds)")
    ax.set_title(result["experiment"] + (" (quick)" if result["quick"] else ""))
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_histograms(result: dict, path: str | Path, title: str = "") -> Path | None:
    """Per layer: histogram of log10 S (left) and of the decay factor d (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import torch

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
