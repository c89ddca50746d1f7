"""bench/step_bench.py --baseline: the child processes measure the klass_patch of the checkout they are given."""
import shutil
from pathlib import Path

import pytest

from conftest import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sb():
    return load_file(ROOT / "bench" / "step_bench.py")


def test_baseline_must_be_a_checkout(sb, tmp_path):
    with pytest.raises(SystemExit, match="--baseline must be a checkout holding klass_patch/"):
        sb._baseline_dir(tmp_path)
    assert sb._baseline_dir(None) is None
    assert sb._baseline_dir(ROOT) == ROOT


def test_child_measures_the_given_checkout(sb, tmp_path):
    """A child given another checkout imports that checkout's klass_patch (child() checks the file it reports and
    raises otherwise)."""
    shutil.copytree(ROOT / "klass_patch", tmp_path / "klass_patch", ignore=shutil.ignore_patterns("__pycache__"))
    times, peak = sb.child("llada", "forward", 1, 3, "cpu", code=tmp_path)
    assert len(times) == 5 and all(t > 0 for t in times) and peak > 0
