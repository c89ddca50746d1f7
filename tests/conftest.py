import atexit
import importlib.util
import itertools
import os
import shutil
import sys
import tempfile
from pathlib import Path


def _private_hf_caches():
    """Point every Hugging Face cache at a temporary folder for this session, before anything imports
    transformers / huggingface_hub (they read these variables at import time); subprocesses inherit them.
    Models loaded with trust_remote_code copy their code into HF_MODULES_CACHE: never the user's."""
    root = Path(tempfile.mkdtemp(prefix="klass-patch-tests-"))
    owner = os.getpid()  # a forked child exiting must not remove it
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(root, ignore_errors=True))
    hf = root / "huggingface"
    os.environ.update(HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub"), HF_MODULES_CACHE=str(hf / "modules"),
                      HF_DATASETS_CACHE=str(hf / "datasets"), HF_ASSETS_CACHE=str(hf / "assets"),
                      HF_XET_CACHE=str(hf / "xet"))
    # older or aliased names that would win over the ones above
    for name in ("HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "TRANSFORMERS_CACHE",
                 "PYTORCH_TRANSFORMERS_CACHE", "PYTORCH_PRETRAINED_BERT_CACHE"):
        os.environ.pop(name, None)
    return hf


HF_TEMP = _private_hf_caches()

import pytest  # noqa: E402

import klass_patch  # noqa: E402

TOY = Path(klass_patch.__file__).parent / "toy"
STANDIN = {"llada": TOY / "llada_generate.py", "dream": TOY / "dream_generation.py"}
FILENAME = {"llada": "generate.py", "dream": "generation_utils.py"}
ENV = "KLASS_PATCH_UPSTREAM"
SKIP_MSG = (f"real upstream files not given: set {ENV}=<folder> holding llada/<version>/generate.py and "
            f"dream/<version>/generation_utils.py (see README, 'Testing against the real upstream files')")
_counter = itertools.count()


def load_file(path, name=None):
    """Import a file as a fresh module (a unique name unless given), as 'loaded by file path' users do."""
    name = name or f"_klass_test_{Path(path).stem}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def real_files(family):
    root = os.environ.get(ENV)
    if not root:
        return []
    return sorted((Path(root) / family).rglob(FILENAME[family]))


def sources(family):
    """pytest params: the stand-in, then every real upstream file (or one param that skips, saying why)."""
    params = [pytest.param(STANDIN[family], id="standin")]
    files = real_files(family)
    if not files:
        params.append(pytest.param(None, id="upstream", marks=pytest.mark.skip(reason=SKIP_MSG)))
    for f in files:
        params.append(pytest.param(f, id=f"{f.parent.name}"))
    return params


def needs_transformers(path):
    if path is not None and path != STANDIN["dream"]:
        pytest.importorskip("transformers", reason="the real Dream generation_utils.py imports transformers")


def revert_everything():
    """Nothing of klass-patch's left in place: KLASS's patch, and compat's shims and import hook (``revert()`` keeps
    those; ``compat=True``'s warning about what stops working is for users), and the record of installed files that
    ``patched()`` lists (the files stay patched for the process; the tests start afresh)."""
    import warnings

    from klass_patch import patching
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"klass_patch\.revert\(compat=True\)", RuntimeWarning)
        klass_patch.revert(compat=True)
    patching._installed.clear()


@pytest.fixture(autouse=True)
def _reverted():
    revert_everything()
    yield
    revert_everything()


def standin_catalog(folder, versions=None):
    """An installer catalog knowing the stand-ins (or the given ``{family: {id: bytes}}``), with diffs made
    by the same code that made the vendored ones."""
    from klass_patch import installer
    from klass_patch.versions import UpstreamVersion, normalized_sha256, sha256
    versions = versions or {f: {f"standin-{f}": STANDIN[f].read_bytes()} for f in STANDIN}
    known = []
    for family, by_id in versions.items():
        for vid, data in by_id.items():
            known.append(UpstreamVersion(vid, family, sha256(data), normalized_sha256(data)))
            out = Path(folder) / family / f"{vid}.patch"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(installer.make_diff(family, vid, [data]))
    return installer.Catalog(known, Path(folder))


def installed_copy(path, family, folder):
    """A copy of ``path`` in ``folder``, rewritten by the installer (stand-ins with their own catalog)."""
    import shutil

    from klass_patch import installer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / FILENAME[family]
    shutil.copyfile(path, dst)
    catalog = standin_catalog(folder / "diffs") if Path(path) == STANDIN[family] else installer.Catalog()
    result = installer.install(installer.Target(family, dst), catalog=catalog)
    assert result.action == "installed", result.describe()
    return dst
