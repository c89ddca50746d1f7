"""install.sh run from a user's folder: paths are the user's, discovery does not stop it, torch stays.

PYTHON is a wrapper around this interpreter that logs each call (with its folder) and skips pip (no network
in the tests; the checkout is put on PYTHONPATH instead), so the script runs as written, demo included.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FILENAME, SKIP_MSG, STANDIN, real_files

REPO = Path(__file__).resolve().parents[1]
WRAPPER = """#!/bin/sh
printf '%s :: %s\\n' "$PWD" "$*" >> "{log}"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 0; fi
if [ "$1" = "-c" ] && [ "$2" = "import numpy" ] && [ -n "${{FAKE_NO_NUMPY:-}}" ]; then exit 1; fi
PYTHONPATH="{repo}" exec "{python}" "$@"
"""


def install_sh(cwd, *args, no_numpy=False):
    """Run install.sh from ``cwd``; returns (completed process, the wrapper's log lines)."""
    log = cwd.parent / "python-calls.log"
    wrapper = cwd.parent / "python"
    wrapper.write_text(WRAPPER.format(log=log, repo=REPO, python=sys.executable))
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_MODULES_CACHE", "PYTHONPATH")}
    env.update(PYTHON=str(wrapper), HF_HOME=str(cwd.parent / "empty-hf"))  # no caches: only ./generate.py
    if no_numpy:
        env["FAKE_NO_NUMPY"] = "1"
    out = subprocess.run(["bash", str(REPO / "install.sh"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    return out, log.read_text().splitlines()


def user_folder(tmp_path, data):
    work = tmp_path / "somewhere"
    work.mkdir()
    (work / FILENAME["llada"]).write_bytes(data)
    return work


def test_named_paths_are_the_users(tmp_path):
    work = user_folder(tmp_path, STANDIN["llada"].read_bytes())  # not a known version: refused, by its path
    out, calls = install_sh(work, "--llada", "generate.py")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{work / 'generate.py'} (sha256 " in out.stderr and "not a known llada version" in out.stderr
    assert "klass-patch demo" not in out.stdout  # a named target that fails stops the script
    assert all(line.startswith(f"{work} :: ") for line in calls), calls  # every command ran in the user's folder
    assert f"{work} :: -m pip install -q {REPO}" in calls  # the checkout, by its path


def test_discovery_in_the_users_folder_skips_unknown_files_and_runs_the_demo(tmp_path):
    work = user_folder(tmp_path, STANDIN["llada"].read_bytes())
    out, calls = install_sh(work, no_numpy=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"and {work}: found 1 file(s)" in out.stdout
    assert f"{work / 'generate.py'} [current directory]: skipped (sha256 " in out.stdout
    assert "klass-patch demo:" in out.stdout and "Failed to initialize NumPy" not in out.stdout + out.stderr
    pips = [line.split(" :: ", 1)[1] for line in calls if " :: -m pip" in line]
    assert pips == ["-m pip install -q numpy", f"-m pip install -q {REPO}"]  # the torch there is kept


@pytest.mark.skipif(not real_files("llada"), reason=SKIP_MSG)
def test_install_sh_rewrites_the_users_generate_py(tmp_path):
    """The acceptance command: cd ~/somewhere && bash /path/to/install.sh --llada generate.py."""
    from klass_patch import installer
    source = real_files("llada")[-1]
    work = user_folder(tmp_path, source.read_bytes())
    out, _ = install_sh(work, "--llada", "generate.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{work / 'generate.py'}: installed (" in out.stdout and "klass-patch demo:" in out.stdout
    assert installer.state(installer.Target("llada", work / "generate.py")).kind == "patched"
    assert not (REPO / "generate.py").exists()
