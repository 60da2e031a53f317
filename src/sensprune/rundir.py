"""A run directory: created (and proven writable) before any work, locked while a run writes
to it, never silently shared by two runs, and never a place where sensprune deletes what it
did not write.

A run records the files it writes in a manifest (``.sensprune-run.json``: name, size and
modification time of each). A new run into a directory that holds another run is refused
unless ``overwrite``; even then only the files the manifest lists, unchanged since, count as
the old run's: a file the user put there (or edited) is kept, and if such a file has a run
file's name the run is refused rather than mixing it up. The old run is not deleted at the
claim: the loop calls :meth:`RunClaim.replace_previous` once every setting, the data and the
device have been checked, which moves the old files aside, and :meth:`RunClaim.commit` after
the new run's first checkpoint, which deletes them; a run that fails before that puts them
back. ``resume`` continues the run that is there (the loop checks its settings). A failed
start leaves no empty directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from .checkpoint import write_text_atomic
from .errors import CheckpointError, ConfigError

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json", "summary.md", "model.pt",
             "curves.png", "sensitivity.png")
LOCK = ".sensprune.lock"
MANIFEST = ".sensprune-run.json"
PREVIOUS = ".sensprune-previous"  # the old run's files while a replacing run starts
_TEMP = re.compile(r"^\.(%s)\.tmp\d+$" % "|".join(re.escape(n) for n in RUN_FILES + (MANIFEST,)))

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the other guards still hold
    fcntl = None


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_manifest(out: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items() if k in RUN_FILES and isinstance(v, list)}


def record(out: str | Path, *names: str) -> None:
    """Add ``names`` (files this run just wrote in ``out``) to the manifest, atomically."""
    out = Path(out)
    files = _read_manifest(out)
    for n in names:
        if (out / n).exists():
            files[n] = _stat_key(out / n)
    write_text_atomic(json.dumps({"written_by": "sensprune", "files": files}, sort_keys=True)
                      + "\n", out / MANIFEST)


def owned_files(out: Path) -> tuple[list[str], list[str]]:
    """(run files sensprune wrote and nobody changed since, run-named files it did not)."""
    listed = _read_manifest(out)
    mine, foreign = [], []
    for n in RUN_FILES:
        p = out / n
        if not p.exists():
            continue
        try:
            (mine if listed.get(n) == _stat_key(p) else foreign).append(n)
        except OSError:
            foreign.append(n)
    return mine, foreign


def _same_size(path: Path, key: list[int]) -> bool:
    try:
        return bool(key) and path.stat().st_size == key[0]
    except OSError:
        return False


class RunClaim:
    """What :func:`claim` holds: the directory and the old run's files, if it replaces one."""

    def __init__(self, out: Path, replace: list[str], main: bool):
        self.out, self.main = out, main
        self._replace = replace
        self._moved: list[str] = []
        self.committed = not replace

    def replace_previous(self) -> None:
        """Move the old run's files aside (called once the new run has checked everything)."""
        if not self.main or not self._replace:
            return
        aside = self.out / PREVIOUS
        aside.mkdir(exist_ok=True)
        for n in self._replace:
            if (self.out / n).exists():
                os.replace(self.out / n, aside / n)
                self._moved.append(n)
        self._replace = []
        with contextlib.suppress(OSError):
            (self.out / MANIFEST).unlink()

    def commit(self) -> None:
        """The new run has its first checkpoint: the old run's files go for good."""
        if self.committed:
            return
        self.committed = True
        if self.main and self._moved:
            shutil.rmtree(self.out / PREVIOUS, ignore_errors=True)
            self._moved = []

    def restore(self) -> None:
        """The new run failed before its first checkpoint: put the old run back."""
        if not self._moved:
            return
        aside = self.out / PREVIOUS
        for n in self._moved:
            with contextlib.suppress(OSError):
                os.replace(aside / n, self.out / n)
        with contextlib.suppress(OSError):
            aside.rmdir()
        with contextlib.suppress(OSError, CheckpointError):
            record(self.out, *self._moved)
        self._moved = []


@contextlib.contextmanager
def claim(out: str | Path, resume: bool = False, overwrite: bool = False, main: bool = True):
    """Hold ``out`` for one run (see the module doc); yields a :class:`RunClaim`.
    ``main=False`` (DDP ranks other than 0) only checks: rank 0 owns the lock and the files."""
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
    lock = None
    handle = None
    try:
        if main:
            lock = _lock(out)
            _recover_previous(out)
            for stale in out.iterdir():  # torn writes of a killed run: our own names only
                if _TEMP.match(stale.name):
                    stale.unlink(missing_ok=True)
        mine, foreign = owned_files(out)
        if (mine or foreign) and not resume:
            if not overwrite:
                raise ConfigError(f"{out} holds another run ({', '.join(mine + foreign)}); "
                                  "continue it with --resume, replace it with --overwrite, or "
                                  "choose another --out")
            if foreign:
                listed = _read_manifest(out)
                copied = [n for n in foreign if n in listed and _same_size(out / n, listed[n])]
                why = (f" ({', '.join(copied)} have the sizes sensprune wrote but new "
                       "modification times: the run looks copied, e.g. by `cp -r` without -p)"
                       if copied else "")
                raise ConfigError(f"{out} holds {', '.join(foreign)} that sensprune did not "
                                  f"write (or that changed since){why}; --overwrite deletes only "
                                  "a run's own files: move them away or choose another --out")
        handle = RunClaim(out, mine if (overwrite and not resume) else [], main)
        yield handle
        handle.commit()
    except BaseException:
        if handle is not None and main:
            handle.restore()
        if main and created:
            _release(out, lock)
            lock = None
            if not any((out / n).exists() for n in RUN_FILES):
                with contextlib.suppress(OSError):
                    (out / MANIFEST).unlink()
            with contextlib.suppress(OSError):
                out.rmdir()  # only when nothing was written
        raise
    finally:
        if lock is not None:
            _release(out, lock)


def _recover_previous(out: Path) -> None:
    """A replacing run that was killed (SIGKILL, power) before its first checkpoint left the
    old run aside: put it back, unless the new run got far enough to have its own files."""
    aside = out / PREVIOUS
    if not aside.is_dir():
        return
    if (out / "checkpoint.pt").exists():
        shutil.rmtree(aside, ignore_errors=True)
        return
    restored = []
    for p in aside.iterdir():
        if p.name in RUN_FILES and not (out / p.name).exists():
            os.replace(p, out / p.name)
            restored.append(p.name)
    shutil.rmtree(aside, ignore_errors=True)
    record(out, *restored)


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


# what a run needs to resume, report and deploy (its plots are redrawn by report/inspect)
PROTECTED = ("checkpoint.pt", "metrics.jsonl", "summary.json", "summary.md", "model.pt",
             "model.safetensors", MANIFEST, LOCK)


def is_run_directory(path: Path) -> bool:
    """A directory a sensprune run wrote (its manifest, or a checkpoint and a summary)."""
    return path.is_dir() and ((path / MANIFEST).exists() or (
        (path / "checkpoint.pt").exists() and (path / "summary.json").exists()))


def check_outputs(reads: list[str | Path], writes: dict[str, str | Path | None]) -> None:
    """Refuse, before any work, an output option (``{"--json": path}``) that names a file the
    command reads, another output of the same command, or one of a run directory's own files
    (its checkpoint, model, summary, metrics, manifest or lock): such a write would
    silently replace what the user needs to resume or report."""
    def key(p: str | Path) -> Path:
        return Path(os.path.abspath(p)).resolve()

    read_keys = {}
    for r in reads:
        rp = key(r)
        read_keys[rp] = str(r)
    seen: dict[Path, str] = {}
    for flag, w in writes.items():
        if not w:
            continue
        wp = key(w)
        if wp in read_keys:
            raise ConfigError(f"{flag} {w} is a file this command reads; write to another file")
        if wp in seen:
            raise ConfigError(f"{flag} and {seen[wp]} name the same file {w}; give each its own")
        for r in read_keys:
            if r.is_dir() and wp.parent == r and wp.name in PROTECTED:
                raise ConfigError(f"{flag} {w} would replace the run's own {wp.name}; write to "
                                  "a file outside the run directory or with another name")
        if is_run_directory(wp.parent) and wp.name in PROTECTED:
            raise ConfigError(f"{flag} {w} would replace the {wp.name} of the run in "
                              f"{wp.parent}; write to another file")
        seen[wp] = flag
