"""Run files on disk: atomic writes, reading checkpoints safely, and rebuilding a trained model
from a run directory (model.pt + summary.json, or checkpoint.pt) or a checkpoint file.

Every file is untrusted, and none is unpickled: ``checkpoint.pt`` and ``model.pt`` are
safetensors files (the tensors) whose metadata holds the structure around them as JSON (dicts,
lists, tuples, numbers, strings; :func:`save_tree` / :func:`load_tree`), so reading one builds
tensors and plain values and nothing else. A checkpoint also carries a SHA-256 of its contents
(:func:`state_digest`), checked on every read, so a damaged file is named, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CheckpointError

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_KEYS = ("config", "model", "optimizer", "method", "pruner", "state")


def state_digest(obj: Any) -> str:
    """SHA-256 over a nested structure of dicts, lists, tensors and scalars: every tensor's
    dtype, shape and bytes, every key and value. A flipped bit anywhere changes it."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if torch.is_tensor(o):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(f"D{len(o)}".encode())
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)}".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"V{type(o).__name__}:{o!r}".encode())

    walk(obj)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to: renamed over ``path`` when the block ends,
    removed when it raises (anything, Ctrl-C included). A crash leaves the old file or the new
    one, never a torn one, and no temporary file once the block is left."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


TREE_KEY = "sensprune.tree"  # the safetensors metadata entry that holds the structure
LEGACY_ENV = "SENSPRUNE_READ_LEGACY_PICKLE"  # opt-in: read an older PyTorch-pickle run file
_MAX_DEPTH = 64


def _encode(obj: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise TypeError("the structure is nested too deeply to store")
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))  # a copy: safetensors stores no shared or strided storage
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"$tensor": key}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"a {type(k).__name__} dict key cannot be stored")
        return {"$dict": [[k if isinstance(k, str) else int(k), _encode(v, tensors, depth + 1)]
                          for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors, depth + 1) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, depth + 1) for v in obj]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    raise TypeError(f"a {type(obj).__name__} cannot be stored in a sensprune file")


def _decode(node: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    if isinstance(node, list):
        return [_decode(v, tensors, depth + 1) for v in node]
    if isinstance(node, dict):
        if node.keys() == {"$tensor"}:
            return tensors[node["$tensor"]]  # KeyError: a reference to no tensor
        if node.keys() == {"$tuple"} and isinstance(node["$tuple"], list):
            return tuple(_decode(v, tensors, depth + 1) for v in node["$tuple"])
        if node.keys() == {"$dict"} and isinstance(node["$dict"], list):
            out = {}
            for pair in node["$dict"]:
                if (not isinstance(pair, list) or len(pair) != 2
                        or isinstance(pair[0], bool) or not isinstance(pair[0], (str, int))):
                    raise ValueError("a dict entry is not a [key, value] pair")
                out[pair[0]] = _decode(pair[1], tensors, depth + 1)
            return out
        raise ValueError(f"unknown node {sorted(node)[:3]}")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise ValueError(f"unknown value {type(node).__name__}")


def save_tree(obj: Any, path: Path) -> None:
    """``obj`` (dicts, lists, tuples, tensors, numbers, strings, None) as one safetensors file:
    the tensors as its tensors, the structure as JSON in its metadata. Not atomic by itself
    (:func:`save_atomic` is)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(obj, tensors), separators=(",", ":"))
    save_file(tensors, str(path), metadata={TREE_KEY: tree})


def load_tree(path: Path, device="cpu") -> Any:
    """What :func:`save_tree` wrote, its tensors on ``device``, read without unpickling
    anything: safetensors checks every declared tensor size against the file before reading
    it. ValueError: not such a file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
        meta = f.metadata() or {}
        if TREE_KEY not in meta:
            raise ValueError("a safetensors file without sensprune's structure")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _decode(json.loads(meta[TREE_KEY]), tensors)


def save_atomic(obj: Any, path: Path) -> None:
    """:func:`save_tree` to a temporary file in the same directory, fsync, then rename over
    ``path``. A failed write (disk full, a file-size limit, the directory gone) keeps the old
    file and says so in one line."""
    try:
        with atomic_path(path) as tmp:
            save_tree(obj, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    except TypeError:  # an object that cannot be stored: a bug, not the disk
        raise
    except Exception as exc:  # OSError, or safetensors' own error for a failed write
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:80]
        kept = "the previous file is kept" if path.exists() else "nothing was written"
        raise CheckpointError(f"cannot write {path} ({why}); {kept}; free space (or fix the "
                              "directory) and run again with --resume") from None


def write_text_atomic(text: str, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path} ({exc.strerror}); free space (or fix the "
                              "directory) and run again") from None


def safe_load(path: str | Path, map_location="cpu", what: str = "file") -> Any:
    """A run file (checkpoint.pt, model.pt) read by :func:`load_tree`: tensors and plain values,
    nothing unpickled. Anything else is refused with one line naming the file; a run file in
    PyTorch's pickle format (older sensprune releases wrote those) is read only where
    ``SENSPRUNE_READ_LEGACY_PICKLE=1`` says the user trusts it (``torch.load(weights_only=
    True)``: PyTorch's restricted unpickler)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {p} not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{what} {p} is a directory; give the file") from None
    except OSError as exc:
        raise CheckpointError(f"{what} {p} cannot be read ({exc.strerror})") from None
    if magic == b"PK\x03\x04":  # a torch.save zip archive: a pickle inside
        if os.environ.get(LEGACY_ENV) != "1":
            raise CheckpointError(
                f"{what} {p} is refused: it is in PyTorch's pickle format (written by an older "
                "sensprune or by torch.save), which sensprune never unpickles (a pickle can run "
                f"code); if you wrote it yourself and trust it, run once with {LEGACY_ENV}=1")
        try:
            obj = torch.load(p, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{what} {p} is refused: not readable as plain tensors and "
                                  f"values ({type(exc).__name__})") from None
        return obj
    try:
        return load_tree(p, map_location)
    except Exception as exc:  # torn, corrupt, foreign, or a reference to no tensor
        raise CheckpointError(f"{what} {p} is refused: it is unreadable: truncated, corrupt or "
                              f"not a sensprune file ({type(exc).__name__})") from None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint written by :func:`save_run`, checked: readable without running code, of the
    expected layout, and equal to its SHA-256 (a damaged file is refused, naming it)."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} not found; give a run directory or its "
                              f"{CHECKPOINT}")
    return _checked(safe_load(p, map_location, "checkpoint"), p)


def _checked(obj: Any, p: Path) -> dict:
    """``obj``, read from ``p``, as a checkpoint: the expected layout and its SHA-256."""
    if not isinstance(obj, dict) or any(k not in obj for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{p} is not a sensprune checkpoint (it lacks "
                              f"{', '.join(CHECKPOINT_KEYS)}); give the checkpoint.pt of a run")
    if not isinstance(obj["config"], dict) or not isinstance(obj["model"], dict):
        raise CheckpointError(f"{p} is not a sensprune checkpoint (config and model must be "
                              "tables)")
    digest = obj.pop("sha256", None)
    if digest is not None and digest != state_digest(obj):
        raise CheckpointError(f"checkpoint {p} is damaged (its SHA-256 does not match its "
                              "contents); restore it from a copy or train again")
    return obj


def save_run(path: Path, cfg, model, optimizer, scheduler, method, pruner, state: dict) -> None:
    """Everything a run needs to continue exactly where it stopped, written atomically."""
    from ._version import __version__

    ckpt = {
        "version": __version__, "config": cfg.to_dict(), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": _plain_scheduler_state(scheduler),
        "method": method.state_dict(), "pruner": pruner.state_dict(), "state": state,
    }
    ckpt["sha256"] = state_digest(ckpt)
    save_atomic(ckpt, path)


def _plain_scheduler_state(scheduler) -> dict | None:
    """The scheduler's state without callables (LambdaLR keeps its lambdas as None entries):
    a checkpoint holds tensors and plain values only."""
    if scheduler is None:
        return None
    return {k: v for k, v in scheduler.state_dict().items() if not callable(v)}


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
        elif (p / CHECKPOINT).exists():
            p = p / CHECKPOINT
        else:
            raise CheckpointError(f"{p} holds neither model.pt + summary.json nor {CHECKPOINT}; "
                                  "give a run directory written by `sensprune train`")
    if p.name == CHECKPOINT or not p.exists():
        obj = load_checkpoint(p)
    else:
        obj = safe_load(p, what="model")
    if isinstance(obj, dict) and "config" in obj and "model" in obj:
        obj = _checked(obj, p)  # a checkpoint, whatever its name: checked as one
        config, state = obj["config"], obj["model"]
    elif not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{p} is neither a sensprune checkpoint nor a model state_dict "
                              "(a table of tensors); give a run directory or its checkpoint.pt")
    else:  # a bare state_dict (model.pt): its settings are in the run's summary.json
        summary = (p if p.is_dir() else p.parent) / "summary.json"
        try:
            saved = json.loads(summary.read_text())
            config = saved["config"]
            if not isinstance(config, dict):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{p} holds weights only and no summary.json beside it says "
                                  "which model they belong to; give the run directory or its "
                                  f"{CHECKPOINT}") from None
        state = obj
        expected = saved.get("model_sha256")
        if expected is not None and expected != state_digest(state):
            raise CheckpointError(f"{p} is damaged (its SHA-256 does not match the one "
                                  f"{summary.name} recorded); restore it or train again")
    known = set(TrainConfig.__dataclass_fields__)
    try:
        cfg = TrainConfig(**{k: v for k, v in saved_settings(config).items() if k in known})
        info = dataset_info(cfg.dataset)  # the shapes only: no data is read here
        model = build_model(cfg.model, info.num_classes, info.input_shape)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{p}: its saved settings do not describe a model sensprune can "
                              f"build ({str(exc)[:80]})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{p}: the weights do not fit a {cfg.model} ({str(exc)[:80]})") from None
    return cfg, model
