"""Typed results: a finished run (``RunSummary``, summary.json's contract); between reproduce
and report, one run of a comparison (``RunRow``), one row of
its table over seeds (``TableRow``, with ``Stat`` for mean ± std). ``table.json`` holds them
as plain JSON (``to_json``); ``from_json`` reads them back, also from tables written before a
field existed (the table row a run belongs to is data, never parsed from its label, except
in tables that predate the field)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any


@dataclass
class Stat:
    """Mean, sample standard deviation, min and max of one figure over a row's seeds."""
    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        mean = sum(values) / len(values)
        std = ((sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
               if len(values) > 1 else 0.0)
        return cls(mean, std, min(values), max(values))


@dataclass
class RunRow:
    """One finished run of a comparison."""
    label: str  # the run's directory name: its table row's label, "-s<seed>" for other seeds
    group: str  # the table row it belongs to
    seed: int
    method: str
    run: str  # how it was obtained: trained, resumed or reused
    lam: float | None
    compression_ratio: float
    test_error: float
    val_error: float
    nonzero_params: int
    total_params: int
    train_seconds: float
    epochs: int
    remaining_per_layer: dict[str, float]
    run_dir: str
    curve: list[dict] = field(default_factory=list)  # pruned further without retraining
    note: str = ""
    macs: int | None = None  # multiply-adds per sample, as trained
    compact_macs: int | None = None  # ... and after exact compaction

    @classmethod
    def from_json(cls, d: dict) -> "RunRow":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d.setdefault("group", re.sub(r"-s\d+$", "", d["label"].split(" lam=")[0]))  # old tables
        d.setdefault("seed", 0)
        d.setdefault("run", "")
        d.setdefault("lam", None)
        d.setdefault("run_dir", d["label"])
        return cls(**d)


@dataclass
class TableRow:
    """One row of a comparison table: a recipe row over its seeds, or why it has no run."""
    label: str
    status: str  # "run" or "not run"
    why: str = ""
    note: str = ""
    seeds: list[int] = field(default_factory=list)
    seeds_not_run: list[int] = field(default_factory=list)
    method: str | None = None
    lam: float | None = None
    epochs: int | None = None
    compression_ratio: Stat | None = None
    test_error: Stat | None = None
    val_error: Stat | None = None
    train_seconds: Stat | None = None
    compact_macs: Stat | None = None
    dense_macs: int | None = None
    remaining_per_layer: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, label: str, runs: list[RunRow], why: str = "", note: str = "",
           seeds_not_run: list[int] | None = None) -> "TableRow":
        if not runs:
            return cls(label, "not run", why=why, note=note)
        row = cls(label, "run", why=why, note=note, seeds=[r.seed for r in runs],
                  seeds_not_run=seeds_not_run or [], method=runs[0].method, lam=runs[0].lam,
                  epochs=runs[0].epochs,
                  **{k: Stat.of([float(getattr(r, k)) for r in runs]) for k in
                     ("compression_ratio", "test_error", "val_error", "train_seconds")})
        if all(r.compact_macs for r in runs):
            row.compact_macs = Stat.of([float(r.compact_macs) for r in runs])
            row.dense_macs = runs[0].macs
        row.remaining_per_layer = {n: sum(r.remaining_per_layer[n] for r in runs) / len(runs)
                                   for n in runs[0].remaining_per_layer}
        return row

    @classmethod
    def from_json(cls, d: dict) -> "TableRow":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("compression_ratio", "test_error", "val_error", "train_seconds"):
            if isinstance(d.get(k), dict):
                d[k] = Stat(**{s: d[k][s] for s in ("mean", "std", "min", "max")})
        macs = d.get("compact_macs")
        if isinstance(macs, dict):  # tables of this session's first form kept dense beside
            d.setdefault("dense_macs", macs.get("dense"))
            d["compact_macs"] = Stat(macs["mean"], macs.get("std", 0.0), macs.get("min", macs["mean"]),
                                     macs.get("max", macs["mean"]))
        return cls(**d)


def to_json(obj: Any) -> Any:
    """Dataclasses (nested in dicts and lists) as plain JSON values; None fields kept."""
    if dataclasses.is_dataclass(obj):
        return {k: to_json(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    return obj


def table_rows(result: dict) -> tuple[list[RunRow], list[TableRow]]:
    """The runs and table rows of a comparison result (typed, or read from table.json); a
    table without rows computes them from its runs."""
    runs = [r if isinstance(r, RunRow) else RunRow.from_json(r) for r in result["rows"]]
    groups = result.get("groups")
    if groups is None:
        order = list(dict.fromkeys(r.group for r in runs))
        return runs, [TableRow.of(g, [r for r in runs if r.group == g]) for g in order]
    return runs, [g if isinstance(g, TableRow) else TableRow.from_json(g) for g in groups]


@dataclass
class RunSummary(Mapping):
    """What a finished run is: the contract of ``summary.json``, returned by ``train()`` and
    read by ``report``, ``reproduce`` and the CLI. A read-only mapping too
    (``summary["test_error"]``), so code written against the earlier dict keeps working.
    ``from_dict`` checks the keys every reader needs; keys it does not know are kept in
    ``extra`` and written back unchanged."""
    model: str
    dataset: str
    method: str
    epochs: int
    test_error: float  # % on the test split
    val_error: float  # % on the validation split
    compression_ratio: float  # prunable weights / nonzero prunable weights
    nonzero_params: int
    total_params: int
    train_seconds: float
    layers: dict[str, dict]  # per prunable weight: total, nonzero, remaining_percent
    remaining_per_layer: dict[str, float] = field(default_factory=dict)
    all_params: int | None = None
    thresholds: list = field(default_factory=list)
    reference_val_error: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    model_sha256: str | None = None  # of model.pt, checked when it is read
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("model", "dataset", "method", "epochs", "test_error", "val_error",
                "compression_ratio", "nonzero_params", "total_params", "train_seconds", "layers")

    @classmethod
    def from_dict(cls, d: Any) -> "RunSummary":
        """A summary read from JSON; a ValueError naming the missing keys if it is not one."""
        if not isinstance(d, dict):
            raise ValueError(f"a run summary is a JSON object, not {type(d).__name__}")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"not a run summary (no {', '.join(missing[:3])})")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra"}
        if out["model_sha256"] is None:
            del out["model_sha256"]
        return {**out, **self.extra}

    # the read-only mapping view (summary["test_error"], "config" in summary, dict(summary))
    def __getitem__(self, key: str) -> Any:
        d = self.to_dict()
        return d[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
