"""Reproduce the paper's tables: the sensitivity method and every baseline in one harness.

An experiment recipe (``recipes/reproduce-<name>.toml``) has a ``[common]`` table (network,
data, epoch budget, optimizer) and one ``[methods.<label>]`` table per method. Every method
gets the same data, network, seed and epoch budget; only its own settings differ.
``reproduce()`` trains each, then writes ``table.md``, ``table.json`` and ``pareto.png``.

Runs are kept in ``OUT/<label>/``. A run whose ``summary.json`` was written with the same
settings is reused, and an interrupted one resumes from its checkpoint, so an experiment can
be split over several processes (``--methods a,b`` in one, ``--methods c`` in another) and a
final ``reproduce`` over all methods only assembles the table.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import torch

from ._version import __version__
from .config import RECIPES_DIR, differing_settings, make_config
from .data import load_dataset
from .errors import CheckpointError, ConfigError
from .models import build_model, prunable_weights, use_channels_last
from .checkpoint import CHECKPOINT, load_checkpoint, safe_load, write_text_atomic
from .methods import method_class
from .plots import plot_pareto
from .report import CURVE_MULTIPLES, comparison_markdown, group_rows
from .results import RunRow, RunSummary, to_json
from .train import evaluate, train

EXPERIMENTS = ("lenet300", "lenet5", "lenet5-fashion")

# Published points (MISSION.md; each from its own paper): (label, compression, top-1 error %).
PUBLISHED = {
    "lenet300": [("Han et al. 2015", 12, 1.59), ("DNS", 56, 1.99), ("Soft weight sharing", 23, 1.94),
                 ("Sparse VD (paper)", 68, 1.92)],
    "lenet5": [("Han et al. 2015", 12, 0.77), ("DNS", 111, 0.91), ("Soft weight sharing", 200, 0.97),
               ("Sparse VD (paper)", 280, 0.75)],
    "lenet5-fashion": [],
}

QUICK = {"limit_train": 2000, "val_size": 500, "epochs": 3, "warmup_epochs": 1,
         "finetune_epochs": 1, "threads": 0}


def load_experiment(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(common settings, {method label: settings}) of a bundled or given experiment recipe."""
    path = Path(name)
    if not path.exists():
        path = RECIPES_DIR / f"reproduce-{name}.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} "
                          "or give a recipe file") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not a TOML text file; give an experiment recipe") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    common, methods = data.get("common", {}), data.get("methods", {})
    if not isinstance(common, dict) or not isinstance(methods, dict) or not all(
            isinstance(v, dict) for v in methods.values()):
        raise ConfigError(f"{path}: an experiment recipe has a [common] table and "
                          "[methods.<label>] tables")
    return common, methods


def reproduce(
    experiment: str,
    out: str | Path,
    methods: list[str] | None = None,
    quick: bool = False,
    lam_sweep: list[float] | None = None,
    data_dir: str | None = None,
    seed: int | None = None,
    seeds: list[int] | None = None,
    assemble: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train every selected method of ``experiment`` and write the comparison table.

    ``seeds``: train every selected row once per seed (default: the recipe's ``seeds``); a
    row's run for a seed other than its recipe's is labelled ``<label>-s<seed>``, and the table
    gives each row's mean and standard deviation over its seeds. A recipe row with
    ``skip = "why"`` is never trained (a cell that costs more than the machines allow); with
    ``assemble`` nothing is trained at all. Either way the row stays in the table, as "not
    run" with its reason, or with the finished runs it has."""
    if seed is not None and seeds:
        raise ConfigError("give either --seed or --seeds, not both")
    common, table = load_experiment(experiment)
    # the recipe's own seeds (its canonical table: every row per seed) unless the call says
    recipe_seeds = common.pop("seeds", None)
    if seeds is None and seed is None and recipe_seeds and not quick:
        seeds = [int(s) for s in recipe_seeds]
    chosen = list(table) if not methods else methods
    unknown = [m for m in chosen if m not in table]
    if unknown:
        raise ConfigError(f"unknown method label(s) {unknown} for {experiment}; "
                          f"available: {', '.join(table)}")
    notes = {label: str(table[label].pop("note", "")) for label in table}
    skips = {label: str(table[label].pop("skip", "")) for label in table}
    runs = _planned_runs(table, chosen, common, lam_sweep, seeds)
    harness = _Harness(common, Path(out), data_dir, seed, quick, assemble, skips, log)
    harness.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    rows = [row for label, group, settings in runs
            if (row := harness.run(label, group, settings)) is not None]
    for row in rows:
        row.note = notes.get(row.group, "")
    result = {
        "experiment": experiment, "quick": quick, "rows": rows,
        "groups": group_rows(rows, [group for _, group, _ in runs], harness.missing,
                             notes, harness.not_run_seeds),
        "command": "sensprune " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(
            ("sensprune", "__main__.py")) else None,
        "seed": seed if seed is not None else common.get("seed", 0),
        "published": [{"label": a, "compression_ratio": b, "test_error": c}
                      for a, b, c in PUBLISHED.get(experiment, [])],
        "wall_seconds": time.perf_counter() - t_all,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "environment": {"sensprune": __version__, "torch": torch.__version__,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "threads": torch.get_num_threads()},
    }
    write_text_atomic(json.dumps(to_json(result), indent=2) + "\n", harness.out / "table.json")
    write_text_atomic(comparison_markdown(result), harness.out / "table.md")
    plot_pareto(result, harness.out / "pareto.png")
    return result


def _planned_runs(table: dict, chosen: list[str], common: dict, lam_sweep: list[float] | None,
                  seeds: list[int] | None) -> list[tuple[str, str, dict[str, Any]]]:
    """(run label, table row it belongs to, settings) of every run, in table order."""
    runs: list[tuple[str, str, dict[str, Any]]] = []
    for label in chosen:
        runs.append((label, label, dict(table[label])))
        # the sweep varies the recipe's main row only: the other sensitivity rows change more
        # than lambda (an lr-scaled lambda is on another scale altogether)
        if lam_sweep and table[label].get("method", common.get("method")) == "sensitivity":
            runs += [(f"{label} lam={lam:g}", f"{label} lam={lam:g}", {**table[label], "lam": lam})
                     for lam in lam_sweep]
    if seeds:
        runs = [(label if sd == settings.get("seed", common.get("seed", 0)) else f"{label}-s{sd}",
                 group, {**settings, "seed": sd})
                for label, group, settings in runs for sd in seeds]
    return runs


class _Harness:
    """One experiment's shared run settings; trains, resumes or reuses one run at a time and
    remembers the rows that have no finished run and why."""

    def __init__(self, common: dict, out: Path, data_dir: str | None, seed: int | None,
                 quick: bool, assemble: bool, skips: dict[str, str], log):
        self.common, self.out, self.data_dir, self.seed = common, out, data_dir, seed
        self.quick, self.assemble, self.skips, self.log = quick, assemble, skips, log
        self.missing: dict[str, str] = {}  # row label -> why it has no finished run
        self.not_run_seeds: dict[str, list[int]] = {}
        self._splits = None

    def config(self, label: str, settings: dict):
        values = {**self.common, **settings, "out": str(self.out / _slug(label)),
                  "progress": False}
        if self.data_dir:
            values["data_dir"] = self.data_dir
        if self.seed is not None:
            values["seed"] = self.seed
        if self.quick:
            values.update(QUICK)
        cfg = make_config(**values)
        if self.quick and method_class(cfg.method).quick_settings:  # e.g. GMP's interval
            cfg = make_config(**{**values, **method_class(cfg.method).quick_settings})
        return cfg

    def splits(self, cfg):
        key = (cfg.dataset, cfg.data_dir, cfg.val_size, cfg.limit_train)
        if self._splits is None or self._splits[0] != key:
            self._splits = (key, load_dataset(*key))
        return self._splits[1]

    def run(self, label: str, group: str, settings: dict) -> RunRow | None:
        """The table row of one run (trained, resumed or reused), or None: not run."""
        cfg = self.config(label, settings)
        splits = self.splits(cfg)
        s, how = _finished(cfg), "reused"
        if s is None and (self.assemble or self.skips.get(group)):
            self.missing.setdefault(group, self.skips.get(group) or "no finished run in this "
                                    "directory (assembled without training)")
            self.not_run_seeds.setdefault(group, []).append(cfg.seed)
            self.log(f"== {label}: not run ({self.missing[group]})")
            return None
        if s is None:
            resume = _same_settings(cfg, _checkpoint_config(cfg))
            how = "resumed" if resume else "trained"
            self.log(f"== {label}: {cfg.method} ({cfg.epochs} epochs)"
                     + (" -- resuming" if resume else ""))
            s = train(cfg, resume=resume, overwrite=not resume, splits=splits, log=self.log)
        else:
            self.log(f"== {label}: reusing the finished run in {cfg.out}")
        state = run_weights(Path(cfg.out))
        if state is not None:
            export_compact(cfg, state, splits.info, s)
        curve = prune_further_curve(cfg, state, splits) if state is not None else []
        macs = compacted_macs(cfg, state, splits.info) if state is not None else None
        return RunRow(
            label=label, group=group, seed=cfg.seed, method=cfg.method, run=how,
            lam=cfg.lam if method_class(cfg.method).uses_lam else None,
            compression_ratio=s["compression_ratio"], test_error=s["test_error"],
            val_error=s["val_error"], nonzero_params=s["nonzero_params"],
            total_params=s["total_params"], train_seconds=s["train_seconds"],
            epochs=s["epochs"], remaining_per_layer=s["remaining_per_layer"],
            run_dir=str(Path(cfg.out).relative_to(self.out)), curve=curve,
            macs=macs[0] if macs else None, compact_macs=macs[1] if macs else None)


# Each final model is also magnitude-pruned further, without retraining, to these multiples
# of its own compression: a cheap trade-off curve per method (how much of each method's
# accuracy survives more pruning), drawn from each trained point in pareto.png.


COMPACT = "model.safetensors"  # the committed form of a run's model (sensprune export, fp32)


def run_weights(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """A finished run's weights: its compact export (fp32, lossless), else its model.pt, else
    None (older committed runs kept their summary only)."""
    if (run_dir / COMPACT).exists():
        from .export import read
        return read(run_dir / COMPACT)[1]
    if (run_dir / "model.pt").exists():
        return safe_load(run_dir / "model.pt", what="model")
    return None


def export_compact(cfg, state: dict[str, torch.Tensor], info, summary: RunSummary) -> None:
    """Write the run's model as a compact export beside it (fp32 values: lossless), the
    form results/ commits (a 100x LeNet-300 is 18 KB where its model.pt is 1 MB)."""
    from .export import export

    target = Path(cfg.out) / COMPACT
    if target.exists():
        return
    export(state, target, {"model": cfg.model, "num_classes": info.num_classes,
                           "input_shape": list(info.input_shape)},
           extra={"dataset": cfg.dataset,
                  "normalization": {"mean": info.mean, "std": info.std},
                  "summary": {k: summary[k] for k in ("test_error", "val_error",
                              "compression_ratio", "nonzero_params", "total_params")}})


def compacted_macs(cfg, state: dict[str, torch.Tensor], info) -> tuple[int, int] | None:
    """Multiply-adds per sample of the model as trained and after exact compaction (None for
    a network compaction does not handle, e.g. a residual one)."""
    from .export import NotCompactable, compact_model

    model = build_model(cfg.model, info.num_classes, info.input_shape)
    model.load_state_dict(state)
    try:
        _, rep = compact_model(model, info.input_shape)
    except NotCompactable:
        return None
    return rep["before"]["macs"], rep["after"]["macs"]


@torch.no_grad()
def prune_further_curve(cfg, state: dict[str, torch.Tensor], splits,
                        multiples: tuple[float, ...] = CURVE_MULTIPLES) -> list[dict]:
    """[{compression_ratio, test_error, val_error}] of the saved model after zeroing its
    smallest-magnitude surviving weights (one global threshold) to each multiple of its
    compression. No retraining: a lower bound on what the method reaches at that sparsity."""
    model = build_model(cfg.model, splits.info.num_classes, splits.info.input_shape)
    model.load_state_dict(state)
    use_channels_last(model, splits.info.input_shape)  # as in training
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    kept = torch.cat([w[w != 0].abs() for w in weights.values()]).sort().values
    original = {n: w.clone() for n, w in weights.items()}
    curve = []
    for m in multiples:
        keep = int(len(kept) / m)
        if keep < 1 or keep >= len(kept):
            continue
        t = float(kept[len(kept) - keep])  # the keep-th largest magnitude survives
        for n, w in weights.items():
            w.copy_(original[n] * (original[n].abs() >= t))
        nonzero = sum(int(torch.count_nonzero(w)) for w in weights.values())
        curve.append({"compression_ratio": total / max(nonzero, 1),
                      "test_error": evaluate(model, splits.test)[0],
                      "val_error": evaluate(model, splits.val)[0]})
    return curve


def _same_settings(cfg, saved: dict | None) -> bool:
    return bool(saved) and not differing_settings(cfg.to_dict(), saved)


def _finished(cfg) -> RunSummary | None:
    """The summary of a finished run of exactly these settings in cfg.out, if there is one."""
    path = Path(cfg.out) / "summary.json"
    try:
        summary = RunSummary.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError):  # absent, torn, or not a run summary: train it again
        return None
    return summary if _same_settings(cfg, summary.config) else None


def _checkpoint_config(cfg) -> dict | None:
    path = Path(cfg.out) / CHECKPOINT
    if not path.exists():
        return None
    try:
        return load_checkpoint(path).get("config")
    except CheckpointError:  # unreadable: start that run again
        return None


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
