"""A run directory: created (and proven writable) before any work, locked while a run writes
to it, never silently shared by two runs, and cleaned of the temp files of killed writes.

A new run into a directory that holds another run is refused unless ``overwrite``; ``resume``
continues the run that is there (the loop checks that its settings are the same). A failed
start leaves no empty directory behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import ConfigError

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json", "summary.md", "model.pt")
LOCK = ".sensprune.lock"

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the other guards still hold
    fcntl = None


@contextlib.contextmanager
def claim(out: str | Path, resume: bool = False, overwrite: bool = False, main: bool = True):
    """Hold ``out`` for one run (see the module doc). ``main=False`` (DDP ranks other than 0)
    only checks: rank 0 owns the lock and the files."""
    out = Path(out)
    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {out} ({exc.strerror}); choose another "
                          "directory") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} is not writable; choose another directory")
    existing = [n for n in RUN_FILES if (out / n).exists()]
    if existing and not resume and not overwrite:
        raise ConfigError(f"{out} holds another run ({', '.join(existing)}); continue it with "
                          "--resume, replace it with --overwrite, or choose another --out")
    lock = None
    try:
        if main:
            lock = _lock(out)
            for stale in out.glob(".*.tmp*"):  # torn writes of a killed run
                stale.unlink(missing_ok=True)
            if overwrite and not resume:
                for n in existing:
                    (out / n).unlink(missing_ok=True)
        yield out
    except BaseException:
        if main and created:
            _release(out, lock)
            lock = None
            with contextlib.suppress(OSError):
                out.rmdir()  # only when nothing was written
        raise
    finally:
        if lock is not None:
            _release(out, lock)


def _lock(out: Path):
    f = open(out / LOCK, "a+")
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise ConfigError(f"another sensprune run (pid {pid}) is writing to {out}; wait "
                              "for it to finish or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _release(out: Path, f) -> None:
    if f is None:
        return
    with contextlib.suppress(OSError):
        (out / LOCK).unlink()
    f.close()  # closing releases the flock
