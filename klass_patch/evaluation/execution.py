"""Running model-written code against a benchmark's tests, in a separate process.

Each program runs as ``python -I -c PROLOGUE program.py`` (``sys.executable``, isolated mode: no user
site, no environment variables of ours, no current directory on the path) in a fresh temporary
directory, with a wall-clock timeout. The prologue sets, on POSIX, the ``resource`` limits (address
space, CPU seconds, size of files it writes, no core dumps), then runs ``program.py`` as ``__main__``
(``runpy.run_path``). The limits are set by the child itself, not by a ``preexec_fn``: that runs Python
between fork and exec, which can deadlock in a parent with threads (torch's, a tokenizer's). Its whole
process group is killed on timeout. This contains accidents (endless loops, memory blow-ups, stray
files), not a determined attacker: run untrusted models in a container or VM.

The programs are built as the authors' harnesses build them: HumanEval as ``human_eval/execution.py``
(prompt + completion + tests + ``check(entry_point)``); MBPP as ``evaluate_task`` of their
``src/utils.py`` (the code, then each ``assert`` of ``test_list``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_MB = 2048


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # "passed", "failed: <last line of stderr>", "timed out"


# What the child runs first: set the limits ((name, value) pairs; a hard limit is kept and caps the
# value), then run the program as __main__, with its own namespace and sys.argv == [program.py].
PROLOGUE = """\
import runpy, sys
limits = {limits!r}
if limits:
    import resource
for name, value in limits:
    limit = getattr(resource, name)
    _, hard = resource.getrlimit(limit)
    resource.setrlimit(limit, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _limits(timeout: float, memory_mb: int) -> list:
    """(``resource`` name, soft limit) pairs; none off POSIX."""
    if os.name != "posix":
        return []
    return [("RLIMIT_AS", memory_mb * 1024 * 1024), ("RLIMIT_CPU", int(timeout) + 1),
            ("RLIMIT_FSIZE", 16 * 1024 * 1024), ("RLIMIT_CORE", 0)]


def run_program(program: str, timeout: float = 3.0, memory_mb: int = MEMORY_MB) -> ExecResult:
    """Run ``program`` in a child Python; passed when it exits with status 0 within ``timeout`` seconds."""
    posix = os.name == "posix"
    # Forking after a Rust tokenizer has used threads makes it print a warning in every child; say once,
    # for this process and its children, that it should not use threads (what it does after a fork anyway).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="klass_eval_") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
        prologue = PROLOGUE.format(limits=_limits(timeout, memory_mb))
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", prologue, path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=posix)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc, posix)
            return ExecResult(False, "timed out")
        finally:
            if proc.poll() is None:  # e.g. KeyboardInterrupt while waiting
                _kill(proc, posix)
    if proc.returncode == 0:
        return ExecResult(True, "passed")
    if posix and proc.returncode == -signal.SIGXCPU:
        return ExecResult(False, "timed out")
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return ExecResult(False, f"failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")


def _kill(proc, posix):
    try:
        if posix:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.communicate()


def humaneval_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def mbpp_program(task: dict, code: str) -> str:
    # The reference execs the code, then evaluates each test's expression; running the asserts is the same.
    # Unlike the reference, the dataset's ``test_imports`` (sanitized MBPP) are run first, so that a test
    # that calls e.g. math.isclose does not fail whatever the answer.
    imports = "\n".join(task.get("test_imports") or [])
    tests = "\n".join(t.strip() for t in task["test_list"])
    return f"{imports}\n{code}\n{tests}\n"
