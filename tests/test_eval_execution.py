"""Evaluation: generated code runs in a separate process with a timeout and resource limits."""
import os
import sys
import time
from pathlib import Path

import pytest

from klass_patch.evaluation import data
from klass_patch.evaluation.execution import humaneval_program, mbpp_program, run_program

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
posix_only = pytest.mark.skipif(os.name != "posix", reason="resource limits are POSIX only")


def test_passing_and_failing_programs():
    assert run_program("assert sorted([3, 1, 2]) == [1, 2, 3]\n").status == "passed"
    failed = run_program("def f(x):\n    return x + 1\nassert f(1) == 3, 'f(1) is not 3'\n")
    assert not failed.passed and failed.status == "failed: AssertionError: f(1) is not 3"
    assert run_program("def f(:\n").status.startswith("failed: SyntaxError")
    assert run_program("import sys\nsys.exit(3)\n").status == "failed: exit status 3"


def test_timeout_kills_the_program():
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout=0.5)
    assert result == type(result)(False, "timed out")
    assert time.perf_counter() - start < 5


@posix_only
def test_timeout_kills_children_too(tmp_path):
    marker = tmp_path / "child_alive"
    child = f"import time; time.sleep(1.5); open({str(marker)!r}, 'w').close()"
    program = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(30)\n"
    assert run_program(program, timeout=0.5).status == "timed out"
    time.sleep(2)
    assert not marker.exists()  # the whole process group was killed


@posix_only
def test_memory_limit():
    result = run_program("x = bytearray(4 * 1024 ** 3)\n", memory_mb=512)
    assert result.status == "failed: MemoryError"


def test_isolated_in_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program = ("import os, sys\nopen('scratch.txt', 'w').write('x')\n"
               f"assert os.getcwd() != {str(tmp_path)!r}\nassert '' not in sys.path\n")
    assert run_program(program).status == "passed"
    assert not (tmp_path / "scratch.txt").exists()
    assert sys.executable  # the child ran with this interpreter (it imports nothing of ours)


def test_humaneval_programs():
    problem = data.load_examples("humaneval", FIXTURES / "humaneval.jsonl")[0].raw
    assert run_program(humaneval_program(problem, problem["canonical_solution"])).passed
    assert run_program(humaneval_program(problem, "def add(a, b):\n    return a + b")).passed  # whole function
    assert not run_program(humaneval_program(problem, "    return a - b\n")).passed
    assert run_program(humaneval_program(problem, "    while True:\n        pass\n"), timeout=0.5).status == "timed out"


def test_mbpp_programs():
    add, root = (e.raw for e in data.load_examples("mbpp", FIXTURES / "mbpp.json"))
    assert run_program(mbpp_program(add, add["code"])).passed
    assert run_program(mbpp_program(add, "def add(a, b):\n    return a - b")).status == "failed: AssertionError"
    assert run_program(mbpp_program(root, root["code"])).passed  # test_imports (import math) run first


@posix_only
def test_limits_set_by_the_child_not_by_preexec_fn(monkeypatch):
    """No ``preexec_fn`` (Python between fork and exec can deadlock with torch's threads): the child's own
    prologue sets the limits, and the program sees them; argv and __main__ are as under ``python prog.py``."""
    import resource
    import subprocess

    calls = []
    popen = subprocess.Popen

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    expected = {}
    for name, value in (("RLIMIT_AS", 512 * 1024 ** 2), ("RLIMIT_CPU", 3), ("RLIMIT_FSIZE", 16 * 1024 ** 2),
                        ("RLIMIT_CORE", 0)):
        hard = resource.getrlimit(getattr(resource, name))[1]  # the child inherits our hard limits
        expected[name] = (value if hard == resource.RLIM_INFINITY else min(value, hard), hard)
    program = ("import os, resource, sys\n"
               f"for name, pair in {expected!r}.items():\n"
               "    assert resource.getrlimit(getattr(resource, name)) == pair, (name, pair)\n"
               "assert __name__ == '__main__' and sys.argv == [__file__]\n"
               "assert os.path.basename(__file__) == 'program.py'\n"
               "assert 'limits' not in globals() and 'runpy' not in globals()\n")
    assert run_program(program, timeout=2.5, memory_mb=512).status == "passed"
    assert len(calls) == 1 and calls[0].get("preexec_fn") is None
