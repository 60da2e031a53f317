"""Every table the package prints or writes: run summaries, evaluate / export / bench-infer /
inspect reports, the comparison tables of `reproduce` (the plots: ``plots.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import CheckpointError
from .results import RunRow, RunSummary, Stat, TableRow, table_rows

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
    m = r["model_us"]
    base = r.get("baseline", "dense")
    lines.append("| **whole model** | batch | as trained, dense us | this file, dense us | "
                 "this file, CSR us | as loaded us | as loaded: x faster than as trained |")
    for b in sorted({int(k.split("@")[1]) for k in m}):
        trained = m.get(f"trained@{b}")
        lines.append(f"| | {b} | {'' if trained is None else f'{trained:.1f}'} | "
                     f"{m[f'dense@{b}']:.1f} | {m[f'sparse@{b}']:.1f} | {m[f'auto@{b}']:.1f} | "
                     f"{m[f'{base}@{b}'] / m[f'auto@{b}']:.2f} |")
    if base != "trained":
        lines.append("(the file's architecture is not a bundled one: the baseline is this "
                     "file on dense kernels)")
    if r.get("chosen"):  # what sensprune.load picked, layer@batch size, by timing
        lines.append("kernels as loaded (by measurement): " + ", ".join(
            f"{k} {v}" for k, v in r["chosen"].items()))
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
    comp = r.get("compaction")
    if comp and "not_compacted" in comp:
        lines.append(f"not compacted: {comp['not_compacted']}")
    elif comp:
        shapes = " -> ".join("x".join(str(d) for d in layer["shape"])
                             for layer in comp["after"]["layers"])
        lines.append(f"compacted: {shapes}; multiply-adds per sample {comp['before']['macs']:,} "
                     f"-> {comp['after']['macs']:,} ({comp['before']['macs'] / max(1, comp['after']['macs']):.1f}x fewer); "
                     f"max output difference {comp['max_output_difference']:.1e}")
    for n, m in r["layers"].items():
        lines.append(f"  {n:24s} {m['encoding']:10s} nnz {m.get('nnz', m['shape'][0]):8,d}  "
                     f"{m['bytes']:9,d} B")
    if "onnx" in r:
        lines.append(f"ONNX: {r['onnx']['file']}, max |onnxruntime - torch| = "
                     f"{r['onnx']['max_abs_diff']:.2e}")
    return "\n".join(lines)


def read_run(run_dir: str | Path) -> tuple[RunSummary, list[dict]]:
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
    try:
        summary = RunSummary.from_dict(summary)
    except ValueError as exc:
        raise CheckpointError(f"{d}/summary.json: {exc}; train the run again") from None
    if mpath.exists():
        for line in mpath.read_text(errors="replace").splitlines():
            try:
                m = json.loads(line)
            except ValueError:
                continue  # a torn last line (a killed write): the complete epochs still count
            if isinstance(m, dict) and all(k in m for k in ("epoch", "val_error", "test_error",
                                                            "remaining_percent")):
                metrics.append(m)
    return summary, metrics


def _pm(stat: Stat, fmt: str = ".2f", suffix: str = "") -> str:
    """mean ± std (one seed: the value alone)."""
    if stat.std == 0 and stat.min == stat.max:
        return f"{stat.mean:{fmt}}{suffix}"
    return f"{stat.mean:{fmt}}{suffix} ± {stat.std:{fmt}}"


def group_rows(rows: list[RunRow], order: list[str], missing: dict[str, str],
               notes: dict[str, str],
               not_run_seeds: dict[str, list[int]] | None = None) -> list[TableRow]:
    """One table row per recipe row, in ``order``: its seeds' mean and sample standard
    deviation (compression, errors, multiply-adds after compaction), or "not run" and why."""
    return [TableRow.of(base, [r for r in rows if r.group == base], why=missing.get(base, ""),
                        note=notes.get(base, ""),
                        seeds_not_run=(not_run_seeds or {}).get(base, []))
            for base in dict.fromkeys(order)]


def comparison_markdown(result: dict) -> str:
    """`sensprune reproduce`'s table.md: one line per method row with the mean ± standard
    deviation over its seeds (compression, test and validation error, multiply-adds after
    compaction, remaining % per layer), rows not run and why, the published points, then
    every run and the further-pruning curves."""
    rows, groups = table_rows(result)
    layers = list(rows[0].remaining_per_layer) if rows else []
    env = result.get("environment", {})
    lines = [f"## {result['experiment']}" + (" (quick mode: subset, numbers not meaningful)"
                                              if result["quick"] else ""), "",
             f"Command: `{result.get('command')}`; torch {env.get('torch')}; written "
             f"{result.get('finished', '?')}." + _reuse_note(rows), "",
             "Mean ± sample standard deviation over the seeds listed; compression = weights / "
             "nonzero weights; remaining % per layer is the mean over the seeds.", ""]
    with_macs = any(g.compact_macs for g in groups)
    head = ["method", "λ", "seeds", "compression", "test err %", "val err %"] + \
        (["multiply-adds compacted"] if with_macs else []) + [f"{n} %" for n in layers] + ["epochs"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        name = g.label + (f" ({g.note})" if g.note else "")
        if g.seeds_not_run:
            name += f" (seeds {','.join(map(str, g.seeds_not_run))} not run: {g.why})"
        if g.status != "run":
            lines.append(f"| {name} | | | not run: {g.why or 'no finished run'} |"
                         + " |" * (len(head) - 4))
            continue
        cells = [name, f"{g.lam:g}" if g.lam is not None else "",
                 ",".join(str(sd) for sd in g.seeds),
                 _pm(g.compression_ratio, ".1f", "x"), _pm(g.test_error), _pm(g.val_error)] + (
            [_macs(g)] if with_macs else []) + \
            [f"{g.remaining_per_layer.get(n, float('nan')):.2f}" for n in layers] + [str(g.epochs)]
        lines.append("| " + " | ".join(cells) + " |")
    if result["published"]:
        lines += ["", "Published reference points (their own papers and protocols, not rerun "
                  "here): " + "; ".join(f"{p['label']} {p['compression_ratio']}x at "
                                       f"{p['test_error']}%" for p in result["published"]) + "."]
    lines += ["", "### Every run", "", "| run | seed | compression | test err % | val err % | "
              "train s | how |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.seed} | {r.compression_ratio:.1f}x | "
                     f"{r.test_error:.2f} | {r.val_error:.2f} | {r.train_seconds:.0f} | "
                     f"{r.run} |")
    if any(r.curve for r in rows):
        lines += ["", "Each final model pruned further by one global magnitude threshold, "
                  "without retraining (compression: test error %):", "",
                  "| run | " + " | ".join(f"x{m:g}" for m in CURVE_MULTIPLES) + " |",
                  "|---|" + "---|" * len(CURVE_MULTIPLES)]
        for r in rows:
            pts = [f"{p['compression_ratio']:.3g}x: {p['test_error']:.2f}" for p in r.curve]
            pts += ["–"] * (len(CURVE_MULTIPLES) - len(pts))
            lines.append(f"| {r.label} | " + " | ".join(pts) + " |")
    lines.append("")
    return "\n".join(lines)


def _macs(g: TableRow) -> str:
    """Mean multiply-adds per sample after compaction, and how many times fewer than dense."""
    if not g.compact_macs:
        return ""
    ratio = (g.dense_macs or g.compact_macs.mean) / g.compact_macs.mean
    return f"{g.compact_macs.mean / 1000:.1f}k" + (f" ({ratio:.1f}x fewer)" if ratio > 1.05 else "")


def _reuse_note(rows: list[RunRow]) -> str:
    reused = [r.label for r in rows if r.run == "reused"]
    if not reused:
        return ""
    return (f" {len(reused)} of {len(rows)} runs were trained by earlier calls with the same "
            "settings and reused (their train s is their own training time).")


def inspect_markdown(result: dict) -> str:
    """`sensprune inspect`'s table: per layer the quantiles of S and the decay they drive."""
    st = result["settings"]
    form = f"max({st['decay_floor']:g}, 1 - " + (f"{st['beta']:g}*" if st["beta"] != 1 else "") + \
        ("|w|*S" if st["times_weight"] else "S") + \
        (f" / {st['normalize']}_layer" if st["normalize"] != "none" else "") + ")"
    lines = [f"S: {st['kind']}, {st['outputs']}, {st['reduction']} reduction, source "
             f"{st['sens_source']}, {st['images']} images; decay factor d = {form}; kept weights only.",
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


def compare_to_table(summary: dict, table: str | Path) -> str:
    """This run beside a reproduce table: the table's row whose runs were trained with this
    run's settings (any seed; found by comparing the saved settings, not by name), as mean ±
    std over its seeds, and the published points. What `make run` prints after training."""
    from .config import differing_settings

    path = Path(table)
    try:
        result = json.loads(path.read_text())
        rows, groups = table_rows(result)
    except (OSError, ValueError, KeyError, TypeError):
        return f"(no comparison: {path} is not a readable reproduce table.json)"
    same = None
    for r in rows:
        try:
            saved = json.loads((path.parent / r.run_dir / "summary.json").read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not [k for k in differing_settings(summary["config"], saved) if k != "seed"]:
            same = r.group
            break
    lines = ["", f"Compared with {path}:", "",
             "| | seeds | compression | test err % | val err % |", "|---|---|---|---|---|",
             f"| **this run** (seed {summary['config']['seed']}) | 1 | "
             f"{summary['compression_ratio']:.1f}x | {summary['test_error']:.2f} | "
             f"{summary['val_error']:.2f} |"]
    g = next((g for g in groups if g.label == same and g.status == "run"), None)
    if g is not None:
        lines.append(f"| committed `{g.label}` | {','.join(map(str, g.seeds))} | "
                     f"{_pm(g.compression_ratio, '.1f', 'x')} | {_pm(g.test_error)} "
                     f"(range {g.test_error.min:.2f}–{g.test_error.max:.2f}) | "
                     f"{_pm(g.val_error)} |")
    else:
        lines.append("| (no committed row has this run's settings) | | | | |")
    lines += [f"| {p['label']} (published) | | {p['compression_ratio']}x | {p['test_error']} | |"
              for p in result.get("published", [])]
    return "\n".join(lines) + "\n"
