"""What the repository ships says only what is true of any machine: no committed result
holds a path of the machine it was made on."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_machine_paths_in_committed_json():
    found = []
    for f in sorted((ROOT / "results").rglob("*.json")):
        for m in re.finditer(r'"(/(?:home|root|tmp|work|Users)/[^"]*)"', f.read_text()):
            found.append(f"{f.relative_to(ROOT)}: {m.group(1)}")
    assert not found, found[:5]


def test_deployment_does_not_stand_on_training():
    """export/ reads models and evaluates them; it never imports the training loop."""
    for f in sorted((ROOT / "src" / "sensprune" / "export").glob("*.py")):
        text = f.read_text()
        assert not re.search(r"from \.\.train import|import sensprune\.train|from \.\. import train",
                             text), f.name


def test_every_results_path_the_documents_name_exists_or_is_cited_at_a_commit():
    """A `results/...` path in README.md, docs/ or results/README.md exists in the tree, or
    is written `<commit>:results/...` (its runs stay in the history); globs are left out."""
    docs = [ROOT / "README.md", ROOT / "results" / "README.md", *(ROOT / "docs").glob("*.md")]
    missing = []
    for doc in docs:
        for m in re.finditer(r"(?<![\w:/*])(results/[\w./-]+)(?![\w*])", doc.read_text()):
            path = m.group(1).rstrip(".,)")
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing[:10]
