"""The test session's own caches, and the quick command line (install/status/revert without torch or wrapt)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FILENAME, HF_TEMP, STANDIN

REPO = Path(__file__).resolve().parents[1]
HF_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_MODULES_CACHE", "HF_DATASETS_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE")


def _inside(path, folder):
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def test_hugging_face_caches_are_the_sessions_own():
    """Models loaded with trust_remote_code copy their code into HF_MODULES_CACHE: the tests' copies go to a
    temporary folder, in this process and in the subprocesses tests start, never into the user's caches."""
    assert "klass-patch-tests-" in str(HF_TEMP) and not _inside(HF_TEMP, Path.home() / ".cache")
    for name in HF_VARIABLES:
        assert _inside(os.environ[name], HF_TEMP), name
    for name in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE"):
        assert name not in os.environ
    hub = pytest.importorskip("huggingface_hub.constants")
    assert _inside(hub.HF_HOME, HF_TEMP) and _inside(hub.HF_HUB_CACHE, HF_TEMP)
    transformers = pytest.importorskip("transformers.utils")
    assert _inside(transformers.HF_MODULES_CACHE, HF_TEMP)
    code = "import transformers.utils as t, huggingface_hub.constants as h; print(t.HF_MODULES_CACHE); print(h.HF_HUB_CACHE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert all(_inside(p, HF_TEMP) for p in out), out


def _run(args, cwd=None, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or REPO, **kw)


@pytest.mark.parametrize("command", ["status", "install", "revert"])
def test_file_commands_import_neither_torch_nor_wrapt(command, tmp_path):
    target = tmp_path / FILENAME["llada"]
    target.write_bytes(STANDIN["llada"].read_bytes())
    out = _run(["-X", "importtime", "-m", "klass_patch", command, "--llada", str(target)])
    assert out.returncode == (1 if command == "install" else 0), out.stderr[-2000:]  # install: unknown version
    assert str(target) in out.stdout + out.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "klass_patch.installer" in imported
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "wrapt", "numpy", "transformers")]
    assert not heavy, heavy


def test_status_works_where_torch_and_wrapt_cannot_be_imported(tmp_path):
    target = tmp_path / FILENAME["dream"]
    target.write_bytes(STANDIN["dream"].read_bytes())
    code = ("import sys\nsys.modules['torch'] = sys.modules['wrapt'] = None  # `import torch` now fails\n"
            "from klass_patch.cli import main\nsys.exit(main(sys.argv[1:]))")
    for command in ("status", "revert"):
        out = _run(["-c", code, command, "--dream", str(target)])
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"{target}: " in out.stdout and "Traceback" not in out.stderr


def test_import_klass_patch_is_light_and_its_names_still_work():
    out = _run(["-c", "import sys, klass_patch; print(klass_patch.__version__, 'torch' in sys.modules)"])
    assert out.stdout.split() == ["0.1.0", "False"], out.stderr
    import klass_patch
    from klass_patch import patching
    from klass_patch.core import GenerateOutput
    for name in klass_patch.__all__:
        assert getattr(klass_patch, name) is not None and name in dir(klass_patch)
    assert klass_patch.apply is patching.apply and klass_patch.GenerateOutput is GenerateOutput
    from klass_patch import IncompatibleUpstreamError, patch_installed  # noqa: F401  (the rewritten files do this)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        klass_patch.nothing
