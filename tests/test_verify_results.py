import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.e2e  # end-to-end: training runs or subprocesses (make test)


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "verify_results.py"


def _verify(path):
    return subprocess.run([sys.executable, str(SCRIPT), str(path), "--include-quick"],
                          capture_output=True, text=True)


def test_verify_script_accepts_true_rows_and_catches_a_wrong_one(quick_lenet300, tmp_path):
    shutil.copytree(quick_lenet300[0], tmp_path, dirs_exist_ok=True)
    ok = _verify(tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{len(quick_lenet300[1]['rows'])} rows checked, 0 mismatches" in ok.stdout
    table = json.loads((tmp_path / "table.json").read_text())
    table["rows"][1]["test_error"] -= 0.01  # a figure edited by hand
    (tmp_path / "table.json").write_text(json.dumps(table))
    bad = _verify(tmp_path)
    assert bad.returncode == 1 and "1 mismatches" in bad.stdout


def test_verify_script_names_a_missing_test_set_and_fails(tmp_path):
    # a Fashion-MNIST table with no Fashion-MNIST files anywhere: not a silent pass
    src = Path(__file__).resolve().parents[1] / "results" / "lenet5-fashion"
    env = dict(os.environ, SENSPRUNE_DATA=str(tmp_path))
    out = subprocess.run([sys.executable, str(SCRIPT), str(src)], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "0 rows checked" in out.stdout
    assert "not checked for lack of a test set: fashion-mnist" in out.stdout
    assert "Traceback" not in out.stderr
