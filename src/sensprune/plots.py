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
    fig, axes = plt.subplots(3 if decay else 1, 1, figsize=(6.4, 9.5 if decay else 3.5),
                             squeeze=False, sharex=True)
    ax1 = axes[0][0]
    ax1.set_title("errors and remaining weights", fontsize=9)
    ax1.plot(ep, [m["val_error"] for m in metrics], label="val error %")
    ax1.plot(ep, [m["test_error"] for m in metrics], label="test error %")
    ax1.set_ylabel("error %")
    ax2 = ax1.twinx()
    ax2.plot(ep, [m["remaining_percent"] for m in metrics], "k--", label="remaining weights %")
    ax2.set_yscale("log")
    ax2.set_ylabel("remaining weights % (log)")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=7, framealpha=0.85)
    if decay:
        layers = list(decay[-1]["decay"])
        panels = ((axes[1][0], "mean_decay", "mean decay factor d of the kept weights\n"
                   "(1 everywhere = plain weight decay)", "mean d"),
                  (axes[2][0], "undecayed", "share of the kept weights the rule spares\n"
                   "(d at its least: S >= 1 - floor)", "share"))
        for ax, key, title, ylabel in panels:
            for i, layer in enumerate(layers):
                rows = [m for m in decay if layer in m["decay"]]
                ax.plot([m["epoch"] for m in rows], [m["decay"][layer][key] for m in rows],
                        color=f"C{i % 10}", marker="o", markersize=2.5,
                        label=layer.removesuffix(".weight"))
            ax.set_title(title, fontsize=9)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=min(4, len(layers)), loc="best", framealpha=0.85)
        axes[1][0].set_ylim(0, 1.05)
        top = max(m["decay"][layer]["undecayed"] for m in decay for layer in m["decay"])
        axes[2][0].set_ylim(0, max(0.05, 1.15 * top))
    axes[-1][0].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _family(label: str) -> str:
    """A row's series in the Pareto plot: its label without the compression target
    (``l2-100x`` and ``l2-150x`` are one line)."""
    return re.sub(r"-\d+x(?=$|-)", "", label)


def plot_pareto(result: dict, path: Path) -> Path | None:
    """Test error against compression (log axis), zoomed on the sparse rows: per row its mean
    over seeds with the standard deviation as error bars (both axes), one line per method
    across its compression targets, the dense error as a dashed line, and the published
    points as black markers named in the legend (no labels on the plot to overlap). The
    further-pruned curves (no retraining) are in table.md, not here."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs, groups = table_rows(result)
    groups = [g for g in groups if g.status == "run"]
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    series: dict[str, list] = {}
    for g in groups:
        series.setdefault(_family(g.label), []).append(g)
    dense = series.pop("dense", None)
    if dense:
        d = dense[0].test_error
        ax.axhline(d.mean, color="0.4", linestyle="--", linewidth=1,
                   label=f"dense ({d.mean:.2f}%)")
    markers = "osD^v<>pXhP"
    palette = [plt.cm.tab10(i) for i in range(10)] + [plt.cm.Dark2(i) for i in range(8)]
    for i, (fam, gs) in enumerate(series.items()):
        gs = sorted(gs, key=lambda g: g.compression_ratio.mean)
        notes = {g.note for g in gs}  # a short note the family shares names it (decay_floor 0)
        note = notes.pop() if len(notes) == 1 else ""
        label = f"{fam} ({note})" if note and len(note) <= 24 else fam
        ax.errorbar([g.compression_ratio.mean for g in gs], [g.test_error.mean for g in gs],
                    yerr=[g.test_error.std for g in gs],
                    xerr=[g.compression_ratio.std for g in gs],
                    marker=markers[i % len(markers)], linestyle="-" if len(gs) > 1 else "none",
                    capsize=2, label=label, color=palette[i % len(palette)], markersize=5)
    for k, p in enumerate(result["published"]):
        ax.scatter([p["compression_ratio"]], [p["test_error"]], marker="*PXdp"[k % 5], s=70,
                   c="k", zorder=5,
                   label=f"{p['label']}: {p['compression_ratio']:g}x at {p['test_error']:.2f}%")
    # the sparse rows and the published points set the view; a collapsed row (error far above
    # the rest) must not squash the others
    xs = [g.compression_ratio.mean for gs in series.values() for g in gs] + \
        [p["compression_ratio"] for p in result["published"]]
    errors = sorted([g.test_error.mean for gs in series.values() for g in gs] +
                    [p["test_error"] for p in result["published"]] +
                    ([dense[0].test_error.mean] if dense else []))
    if errors:
        # the view ends just above the highest row within twice the median; rows above it
        # (collapsed ones) are named in a corner, so they do not squash the others
        near = [e for e in errors if e <= 2.0 * errors[len(errors) // 2]]
        top = min(1.35 * errors[-1], 1.15 * near[-1])
        ax.set_ylim(0.9 * errors[0], top)
        off = [g.label for gs in series.values() for g in gs if g.test_error.mean > top]
        if off:
            ax.text(0.01, 0.98, "above the plot: " + ", ".join(off), transform=ax.transAxes,
                    fontsize=7, va="top")
    if xs:
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
    ax.set_xscale("log")
    ax.set_xlabel("compression: all weights / nonzero weights (log)")
    ax.set_ylabel("test error % (mean ± std over seeds)")
    ax.set_title(result["experiment"] + (" (quick)" if result["quick"] else ""))
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
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
