"""A real-text classification task that exists on every machine with Python, offline: sentences
from the docstrings of Python's standard library, labelled by the area of the library their
module belongs to (text, networking, files, concurrency, numbers, data formats, developer tools).

Provenance: the `.py` sources of the running interpreter's standard library, read with `ast`
(nothing is imported or run). Licence: the Python Software Foundation License (the docstrings
are CPython's). Every sentence of 6 to 40 words with no code in it is kept once; a sentence
found in two areas is dropped; each area is capped at CAP sentences (a seeded draw).

The split is a hash of the sentence's text, not a draw: 60% train, 20% validation, 20% test
(the test split is never used for a choice). The same interpreter version gives the same
sentences; `python examples/minilm_task.py` writes the manifest (counts, SHA-256 of each
split) and says whether it matches the committed one in results/minilm/task.json.
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

AREAS: dict[str, list[str]] = {
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "codecs", "locale",
             "gettext", "html", "stringprep", "shlex", "sre_parse", "sre_compile"],
    "networking": ["socket", "ssl", "http", "urllib", "email", "smtplib", "imaplib", "poplib",
                   "ftplib", "xmlrpc", "wsgiref", "ipaddress", "mailbox", "mimetypes",
                   "socketserver", "selectors", "nntplib"],
    "files": ["os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat",
              "fileinput", "zipfile", "tarfile", "gzip", "bz2", "lzma", "posixpath", "ntpath",
              "genericpath"],
    "concurrency": ["threading", "multiprocessing", "asyncio", "concurrent", "queue", "sched",
                    "subprocess", "signal"],
    "numbers": ["_pydecimal", "statistics", "fractions", "random", "numbers", "colorsys"],
    "data formats": ["json", "csv", "pickle", "pickletools", "xml", "configparser", "tomllib",
                     "plistlib", "base64", "copyreg", "shelve", "dbm", "netrc", "quopri", "uu"],
    "developer tools": ["unittest", "doctest", "pdb", "bdb", "trace", "cProfile", "profile",
                        "pstats", "timeit", "inspect", "dis", "ast", "traceback", "logging",
                        "tracemalloc", "pydoc", "warnings"],
}
CAP = 400  # sentences per area at most (the smallest area, text, holds fewer)
SPLITS = ("train", "val", "test")
TASK_MANIFEST = Path(__file__).resolve().parents[1] / "results" / "minilm" / "task.json"

_CODE = re.compile(r">>>|\.\.\.|[{}\[\]=<>_]|\(\)|::|\w\.\w+\(|`")


def _module_files(stdlib: Path, module: str) -> list[Path]:
    package = stdlib / module
    if package.is_dir():
        return sorted(p for p in package.rglob("*.py") if "test" not in p.parts
                      and "idle_test" not in p.parts)
    single = stdlib / f"{module}.py"
    return [single] if single.exists() else []


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [d for d in (ast.get_docstring(n, clean=True) for n in nodes) if d]


def _sentences(doc: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(para.split())
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = s.split()
            if 6 <= len(words) <= 40 and not _CODE.search(s) and sum(c.isalpha() for c in s) > 0.7 * len(s):
                out.append(s)
    return out


def split_of(sentence: str) -> str:
    """train / val / test from the sentence's own hash (stable under any reordering)."""
    h = int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:8], "big") % 5
    return "train" if h < 3 else ("val" if h == 3 else "test")


def build(stdlib: str | Path | None = None, cap: int = CAP, seed: int = 0):
    """{split: (sentences, labels)} and the manifest dict."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    found: dict[str, set[str]] = {area: set() for area in AREAS}
    files_read = {}
    for area, modules in AREAS.items():
        n = 0
        for module in modules:
            for f in _module_files(stdlib, module):
                n += 1
                for doc in _docstrings(f):
                    found[area].update(_sentences(doc))
        files_read[area] = n
    seen_in: dict[str, int] = {}
    for area in AREAS:
        for s in found[area]:
            seen_in[s] = seen_in.get(s, 0) + 1
    rng = random.Random(seed)
    data = {k: ([], []) for k in SPLITS}
    counts = {}
    for label, area in enumerate(AREAS):
        pool = sorted(s for s in found[area] if seen_in[s] == 1)
        if len(pool) > cap:
            pool = sorted(rng.sample(pool, cap))
        counts[area] = {k: 0 for k in SPLITS}
        for s in pool:
            k = split_of(s)
            data[k][0].append(s)
            data[k][1].append(label)
            counts[area][k] += 1
    manifest = {
        "source": "docstrings of the Python standard library's .py files (read with ast)",
        "licence": "Python Software Foundation License (CPython's docstrings)",
        "python": sys.version.split()[0],
        "classes": list(AREAS), "modules": AREAS, "files_read": files_read, "cap": cap,
        "rule": "sentences of 6-40 words without code; one area only; split = sha256 % 5 "
                "(0-2 train, 3 val, 4 test)",
        "counts": counts,
        "sizes": {k: len(data[k][0]) for k in SPLITS},
        "sha256": {k: hashlib.sha256("\n".join(f"{y}\t{s}" for s, y in zip(*data[k])).encode())
                   .hexdigest() for k in SPLITS},
    }
    return data, manifest


def check_manifest(manifest: dict, path: Path = TASK_MANIFEST) -> str:
    """'' when the built task is the committed one, else one line saying what differs."""
    if not path.exists():
        return f"no committed manifest at {path}"
    committed = json.loads(path.read_text())
    if committed.get("sha256") == manifest["sha256"]:
        return ""
    return (f"the task built here (Python {manifest['python']}, sizes {manifest['sizes']}) "
            f"differs from the committed one (Python {committed.get('python')}, sizes "
            f"{committed.get('sizes')}): figures are not comparable with results/minilm")


if __name__ == "__main__":
    data, manifest = build()
    for area, c in manifest["counts"].items():
        print(f"{area:16s} " + "  ".join(f"{k} {c[k]:4d}" for k in SPLITS))
    print("sizes", manifest["sizes"])
    if "--write" in sys.argv:
        TASK_MANIFEST.parent.mkdir(parents=True, exist_ok=True)
        TASK_MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
        print("wrote", TASK_MANIFEST)
    else:
        print(check_manifest(manifest) or "matches the committed manifest")
    for k in SPLITS:  # a few examples
        print(k, "e.g.:", data[k][0][0], "->", list(AREAS)[data[k][1][0]])
