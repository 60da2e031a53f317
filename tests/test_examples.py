"""The README's library example is examples/quickstart.py; it must run as written and do what
it says (20x, a sensible error), with its figures recomputed from its own output."""
import re
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.e2e  # end-to-end: training runs or subprocesses (make test)

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_as_written_and_prunes_to_its_target():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = re.search(r"compression ([\d.]+)x, test error ([\d.]+)%", r.stdout)
    assert m, r.stdout
    compression, error = float(m.group(1)), float(m.group(2))
    assert 19.5 <= compression <= 20.5  # 95% of the weights removed by the schedule
    assert error < 5.0  # a dense LeNet-300 on 20k samples is near 3%; chance is 90%


def test_the_readme_snippet_is_the_example():
    """The README shows the example's loop; a line changed in one and not the other fails."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart.py").read_text()
    snippet = readme.split("```python", 1)[1].split("```", 1)[0]
    loop = [ln.strip() for ln in snippet.splitlines() if ln.strip().startswith(
        ("reg =", "pruner =", "with reg.observe", "reg.step()", "pruner.apply()", "model =",
         "optimizer ="))]
    assert len(loop) >= 7
    assert all(ln in example for ln in loop), [ln for ln in loop if ln not in example]


def test_hf_bert_example_prunes_a_raw_transformer_and_learns():
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_bert.py")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = re.search(r"weights pruned ([\d.]+)% \(([\d.]+)x\), test accuracy ([\d.]+)%", r.stdout)
    assert m, r.stdout
    pruned, accuracy = float(m.group(1)), float(m.group(3))
    assert 79.5 <= pruned <= 80.5  # the schedule's target
    assert accuracy > 90.0  # chance is 50%


def _run_example(name):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_lightning_example_prunes_lenet300_in_a_plain_lightning_fit():
    pytest.importorskip("lightning")
    m = re.search(r"compression ([\d.]+)x, test error ([\d.]+)%", _run_example("lightning_mnist.py"))
    assert m
    assert 19.5 <= float(m.group(1)) <= 20.5 and float(m.group(2)) < 5.0


def test_hf_trainer_example_prunes_bert_with_a_plain_trainer():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = _run_example("hf_trainer.py")
    m = re.search(r"weights pruned ([\d.]+)% \(([\d.]+)x\), test accuracy ([\d.]+)%", out)
    assert m, out
    assert 79.5 <= float(m.group(1)) <= 80.5 and float(m.group(3)) > 90.0
