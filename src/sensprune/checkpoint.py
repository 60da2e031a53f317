"""Run files on disk: atomic writes, reading checkpoints, and rebuilding a trained model from
a run directory (model.pt + summary.json, or checkpoint.pt) or a checkpoint file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

CHECKPOINT = "checkpoint.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over ``path``:
    a crash leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {p} not found; give a run directory or its "
                              f"{CHECKPOINT}") from None
    except Exception as exc:  # torch raises several types for torn/corrupt files
        raise CheckpointError(f"checkpoint {p} is unreadable ({type(exc).__name__}); it is "
                              "corrupt or not a sensprune checkpoint") from None


def save_run(path: Path, cfg, model, optimizer, scheduler, method, pruner, state: dict) -> None:
    """Everything a run needs to continue exactly where it stopped, written atomically."""
    from ._version import __version__

    save_atomic({
        "version": __version__, "config": cfg.to_dict(), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "method": method.state_dict(), "pruner": pruner.state_dict(), "state": state,
    }, path)


def restore_run(path: Path, cfg, model, optimizer, scheduler, method, pruner,
                map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_run` into the run's objects and return its
    loop state; refuses (naming the setting) a checkpoint written with other settings."""
    from .config import differing_settings
    from .errors import ConfigError

    ckpt = load_checkpoint(path, map_location=map_location)
    differ = differing_settings(cfg.to_dict(), ckpt.get("config", {}))
    if differ:
        k = differ[0]
        raise ConfigError(
            f"--resume: {path} was written with other settings ({k} = "
            f"{ckpt['config'].get(k)!r} there, {getattr(cfg, k, None)!r} now"
            + (f"; also {', '.join(differ[1:4])}" if len(differ) > 1 else "")
            + "); resume with the same settings, or start over with --overwrite")
    method.load_state_dict(ckpt["method"])  # first: it may change the layers (Sparse VD)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    pruner.load_state_dict(ckpt["pruner"])
    return ckpt["state"]


def load_run_model(path: str | Path):
    """(TrainConfig, model with the trained weights) from a run directory (summary.json +
    model.pt, or checkpoint.pt), a checkpoint.pt, or a run's model.pt."""
    from .config import TrainConfig, saved_settings
    from .data import dataset_info
    from .models import build_model

    p = Path(path)
    if p.is_dir():
        if (p / "summary.json").exists() and (p / "model.pt").exists():
            p = p / "model.pt"
        elif not (p / CHECKPOINT).exists():
            raise CheckpointError(f"{p} holds neither model.pt + summary.json nor {CHECKPOINT}; "
                                  "give a run directory written by `sensprune train`")
    obj = load_checkpoint(p)
    if isinstance(obj, dict) and "config" in obj and "model" in obj:
        config, state = obj["config"], obj["model"]
    else:  # a bare state_dict (model.pt): its settings are in the run's summary.json
        summary = (p if p.is_dir() else p.parent) / "summary.json"
        try:
            config = json.loads(summary.read_text())["config"]
        except (OSError, ValueError, KeyError):
            raise CheckpointError(f"{p} holds weights only and no summary.json beside it says "
                                  "which model they belong to; give the run directory or its "
                                  f"{CHECKPOINT}") from None
        state = obj
    known = set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(**{k: v for k, v in saved_settings(config).items() if k in known})
    info = dataset_info(cfg.dataset)  # the shapes only: no data is read here
    model = build_model(cfg.model, info.num_classes, info.input_shape)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{p}: the weights do not fit a {cfg.model} ({str(exc)[:80]})") from None
    return cfg, model
