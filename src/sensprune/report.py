"""Every table and plot the package prints or writes: run summaries, evaluate / export /
bench-infer / inspect reports, the comparison tables of `reproduce`, and the plots
(matplotlib, optional)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import CheckpointError

# the multiples of its own compression each final model is pruned further to (reproduce)
CURVE_MULTIPLES = (1.5, 2, 3, 5, 8)


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


def evaluation_text(r: dict) -> str:
    """``sensprune evaluate``'s lines: errors, nonzero count, compression, per-layer remaining."""
    lines = [f"{r['model']} on {r['dataset']}: test error {r['test_error']:.2f}%  val error "
             f"{r['val_error']:.2f}%  nonzero {r['nonzero_params']:,}/{r['total_params']:,}  "
             f"compression {r['compression_ratio']:.1f}x"]
    lines += [f"  {n:30s} {v:7.2f}% remaining" for n, v in r["remaining_per_layer"].items()]
    return "\n".join(lines)


def bench_infer_markdown(r: dict) -> str:
    """``sensprune bench-infer``'s table: dense vs sparse latency per layer and per model."""
    lines = [f"{r['file']}: median of {r['reps']} runs, {r['threads']} thread(s), torch {r['torch']}",
             "| layer | batch | density | dense us | sparse us | dense/sparse |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in r["layers"]:
        lines.append(f"| {row['layer']} | {row['batch']} | {row['density']:.4f} | "
                     f"{row['dense_us']:.1f} | {row['sparse_us']:.1f} | {row['speedup']:.2f} |")
    lines.append("| **whole model** | batch | | dense us | sparse us | auto us |")
    m = r["model_us"]
    for b in sorted({int(k.split("@")[1]) for k in m}):
        lines.append(f"| | {b} | | {m[f'dense@{b}']:.1f} | {m[f'sparse@{b}']:.1f} | "
                     f"{m[f'auto@{b}']:.1f} |")
    return "\n".join(lines)


def export_text(r: dict) -> str:
    """``sensprune export``'s report: size and test error of each value format, the file
    written, and each tensor's encoding."""
    lines = [f"{'values':6s} {'bytes':>9s} {'x smaller':>9s} {'test err %':>10s} {'change':>7s}"]
    for fmt, f in r["formats"].items():
        mark = "  <- written" if fmt == r["values"] else ""
        lines.append(f"{fmt:6s} {f['file_bytes']:9,d} {f['ratio']:9.1f} {f['test_error']:10.2f} "
                     f"{f['error_change']:+7.2f}{mark}")
    lines.append(f"dense fp32: {r['dense_fp32_bytes']:,} bytes; {r['file']}: {r['file_bytes']:,} "
                 f"bytes ({r['ratio']:.1f}x smaller); checkpoint test error "
                 f"{r['checkpoint_test_error']:.2f}%")
    for n, m in r["layers"].items():
        lines.append(f"  {n:24s} {m['encoding']:10s} nnz {m['nnz']:8,d}  {m['bytes']:9,d} B")
    if "onnx" in r:
        lines.append(f"ONNX: {r['onnx']['file']}, max |onnxruntime - torch| = "
                     f"{r['onnx']['max_abs_diff']:.2e}")
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
    ax1.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
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
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def comparison_markdown(result: dict) -> str:
    """`sensprune reproduce`'s table.md: per row the remaining % per layer, compression,
    errors and time; the mean over seeds; the further-pruning curves; published points."""
    rows = result["rows"]
    layers = list(rows[0]["remaining_per_layer"]) if rows else []
    head = ["method"] + [f"{n} %" for n in layers] + [
        "compression", "test err %", "val err %", "epochs", "train s"]
    lines = [f"## {result['experiment']}" + (" (quick mode: subset, numbers not meaningful)"
                                              if result["quick"] else ""), "",
             f"Command: `{result.get('command')}`; seed {result.get('seed')}; "
             f"wall time {result['wall_seconds'] / 60:.1f} min; torch "
             f"{result['environment']['torch']}, {result['environment']['threads']} thread(s)."
             + _reuse_note(rows) if "command" in result else "", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"]] + [f"{r['remaining_per_layer'][n]:.2f}" for n in layers] + [
            f"{r['compression_ratio']:.1f}x", f"{r['test_error']:.2f}", f"{r['val_error']:.2f}",
            str(r["epochs"]), f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    groups = seed_groups(rows)
    if any(len(g) > 1 for g in groups.values()):
        lines += ["", "Mean over seeds (rows named `<label>-s<seed>` join `<label>`; compression "
                  "as the mean and the range, test error as the mean and the sample std):", "",
                  "| method | seeds | compression | range | test err % | std |",
                  "|---|---|---|---|---|---|"]
        for label, g in groups.items():
            lines.append(f"| {label} | {','.join(str(r.get('seed', '?')) for r in g)} | "
                         f"{g_mean(g, 'compression_ratio'):.1f}x | "
                         f"{min(r['compression_ratio'] for r in g):.1f}–"
                         f"{max(r['compression_ratio'] for r in g):.1f}x | "
                         f"{g_mean(g, 'test_error'):.2f} | {g_std(g, 'test_error'):.2f} |")
    if any(r.get("curve") for r in rows):
        lines += ["", "Each final model pruned further by one global magnitude threshold, "
                  "without retraining (compression, test error %):", "",
                  "| method | " + " | ".join(f"x{m:g}" for m in CURVE_MULTIPLES) + " |",
                  "|---|" + "---|" * len(CURVE_MULTIPLES)]
        for r in rows:
            pts = [f"{p['compression_ratio']:.3g}x: {p['test_error']:.2f}" for p in r.get("curve", [])]
            pts += ["–"] * (len(CURVE_MULTIPLES) - len(pts))
            lines.append(f"| {r['label']} | " + " | ".join(pts) + " |")
    if result["published"]:
        lines += ["", "Published reference points (their own papers, not rerun here):", ""]
        lines += [f"- {p['label']}: {p['compression_ratio']}x at {p['test_error']}%"
                  for p in result["published"]]
    lines.append("")
    return "\n".join(lines)


def seed_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by label, with a trailing ``-s<seed>`` removed (in table order)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(re.sub(r"-s\d+$", "", r["label"]), []).append(r)
    return groups


def g_mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def g_std(rows: list[dict], key: str) -> float:
    if len(rows) < 2:
        return 0.0
    m = g_mean(rows, key)
    return (sum((r[key] - m) ** 2 for r in rows) / (len(rows) - 1)) ** 0.5


def _reuse_note(rows: list[dict]) -> str:
    reused = [r["label"] for r in rows if r.get("run") == "reused"]
    if not reused:
        return ""
    return (f" Rows trained by earlier calls with the same settings and reused here: "
            f"{', '.join(reused)} (their train s is their own training time).")


def plot_pareto(result: dict, path: Path) -> Path | None:
    """Test error against compression (log axis): one point per run, a dotted line from it
    for its further-pruned curve (no retraining), published points as black stars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    # one series per row label; a lambda sweep ("sensitivity lam=3e-4") joins its base row
    series: dict[str, list[dict]] = {}
    for r in result["rows"]:
        series.setdefault(r["label"].split(" lam=")[0], []).append(r)
    markers = "os^Dv<>pXh*"
    for i, (label, rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r["compression_ratio"])
        line, = ax.plot([r["compression_ratio"] for r in rs], [r["test_error"] for r in rs],
                        marker=markers[i % len(markers)], linestyle="-" if len(rs) > 1 else "none",
                        label=label)
        for r in rs:  # pruned further without retraining: dotted, same colour
            pts = [r] + r.get("curve", [])
            ax.plot([p["compression_ratio"] for p in pts], [p["test_error"] for p in pts],
                    linestyle=":", linewidth=1, color=line.get_color())
    for p in result["published"]:
        ax.scatter([p["compression_ratio"]], [p["test_error"]], marker="*", s=90, c="k")
        ax.annotate(p["label"], (p["compression_ratio"], p["test_error"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    # the further-pruned curves climb to chance level; keep the trained points readable
    errors = [r["test_error"] for r in result["rows"]] + [p["test_error"] for p in result["published"]]
    if errors:
        ax.set_ylim(0, 2 * max(errors))
    ax.set_xscale("log")
    ax.set_xlabel("compression |θ| / |θ≠0| (log)")
    ax.set_ylabel("test error %")
    ax.set_title(result["experiment"] + (" (quick)" if result["quick"] else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def inspect_markdown(result: dict) -> str:
    """`sensprune inspect`'s table: per layer the quantiles of S and the decay they drive."""
    st = result["settings"]
    form = f"max({st['floor']:g}, 1 - " + (f"{st['beta']:g}*" if st["beta"] != 1 else "") + \
        ("|w|*S" if st["times_weight"] else "S") + \
        (f" / {st['normalize']}_layer" if st["normalize"] != "none" else "") + ")"
    lines = [f"S: {st['kind']}, {st['outputs']}, {st['reduction']} reduction, source "
             f"{st['source']}, {st['images']} images; decay factor d = {form}; kept weights only.",
             "", "| layer | kept | median S | 99.9th pct S | share S > 0.1 | mean d | CV of d | "
             "d at floor | d > 0.99 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
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
