"""`klass-patch --help` (one line per command), `--version`, and the demo's timing (after a warm-up call)."""
import re
import subprocess
import sys
import time

import pytest

import klass_patch
from klass_patch import cli
from klass_patch.toy import models


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_help_lists_each_command_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, _, err = _run(["no-such-command"], capsys)
    assert code == 2
    choices = re.findall(r"'([a-z-]+)'", err.split("choose from", 1)[1])  # argparse's own list of the commands
    code, out, _ = _run(["--help"], capsys)
    assert code == 0 and out.startswith("usage: klass-patch [-h] [--version] COMMAND ...\n")
    assert "``" not in out and "Command line" not in out  # not the module docstring
    lines = out.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    listed = [re.fullmatch(r"  ([a-z-]+) +(\S.*)", line) for line in lines]
    assert all(listed), lines  # each command on one line, its text on the same line
    assert [m.group(1) for m in listed] == choices
    assert all(len(line) < 80 for line in out.splitlines())


def test_version_prints_the_package_version(capsys):
    code, out, _ = _run(["--version"], capsys)
    assert (code, out) == (0, f"klass-patch {klass_patch.__version__}\n")
    code = ("import sys\nsys.modules['torch'] = None  # `import torch` now fails\n"
            "from klass_patch.cli import main\nsys.exit(main(['--version']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (run.returncode, run.stdout, run.stderr) == (0, f"klass-patch {klass_patch.__version__}\n", "")


def test_demo_times_a_call_after_a_warm_up_call(capsys, monkeypatch):
    """A first call's one-off cost (here: 100 s on a fake clock, at each toy model's first forward) is not in the
    ms column, and the output says how the time was taken."""
    class Clock:
        offset = 0.0

        def perf_counter(self):
            return time.perf_counter() + self.offset
    clock = Clock()
    monkeypatch.setattr(cli, "time", clock)
    forward = models.ToyDenoiser.__call__

    def first_call_is_slow(self, *args, **kwargs):
        if self.calls == 0:
            clock.offset += 100.0
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(models.ToyDenoiser, "__call__", first_call_is_slow)
    assert cli.main(["demo", "--gen-length", "8", "--steps", "8", "--block-length", "8"]) == 0
    out = capsys.readouterr().out
    times = [float(t) for t in re.findall(r"correct \w+ +([0-9.]+) ms", out)]
    assert len(times) == 4 and clock.offset == 200.0  # four rows; the two toy models each paid once
    assert all(t < 100e3 for t in times), out
    assert "ms: the wall time of one call, timed after an untimed warm-up call of the same sampler." in out
