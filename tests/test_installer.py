"""The file installer's mechanics, on stand-in "upstream" files with their own fingerprints and diffs."""
import concurrent.futures
import multiprocessing
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import FILENAME, STANDIN, load_file, standin_catalog
from klass_patch import cli, installer
from klass_patch.installer import BACKUP, InstallError, Target
from klass_patch.toy.models import ToyDenoiser, dream_model
from klass_patch.versions import KNOWN, sha256

FAMILIES = ["llada", "dream"]
COMMITS = ("c1" * 20, "c2" * 20)  # hub commit hashes: 40 hex digits, as transformers names a hub model's copy


def copy_standin(family, folder, data=None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME[family]
    path.write_bytes(data if data is not None else STANDIN[family].read_bytes())
    return Target(family, path)


def listing(folder):
    return sorted((p.name, p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p))
                  for p in Path(folder).iterdir())


def run_klass(module, family):
    """A KLASS call on the toy model: returns (sequences, forwards)."""
    prompt = torch.tensor([[3, 4, 5, 6]])
    knobs = dict(alg="klass", conf_threshold=0.6, kl_threshold=0.015, kl_history_length=2, return_dict_in_generate=True)
    if family == "llada":
        out = module.generate(ToyDenoiser(), prompt, steps=32, gen_length=32, block_length=8, mask_id=63, **knobs)
    else:
        special = dict(mask_token_id=63, pad_token_id=62, eos_token_id=62, bos_token_id=62)
        model = dream_model(module.DreamGenerationMixin, module.DreamGenerationConfig(**special))
        out = model.diffusion_generate(prompt, max_new_tokens=32, steps=32, **knobs)
    return out.sequences, int(out.used_steps[0])


def run_upstream(module, family):
    prompt = torch.tensor([[3, 4, 5, 6]])
    torch.manual_seed(0)
    if family == "llada":
        return module.generate(ToyDenoiser(noise=2.0), prompt, steps=8, gen_length=8, block_length=8, mask_id=63,
                               temperature=0.5)
    special = dict(mask_token_id=63, pad_token_id=62, eos_token_id=62, bos_token_id=62)
    model = dream_model(module.DreamGenerationMixin, module.DreamGenerationConfig(**special), noise=2.0)
    return model.diffusion_generate(prompt, max_new_tokens=8, steps=8, alg="entropy", temperature=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_install_status_revert_round_trip(family, tmp_path):
    catalog = standin_catalog(tmp_path / "diffs")
    target = copy_standin(family, tmp_path / "model")
    original = target.path.read_bytes()
    before = installer.state(target, catalog)
    assert (before.kind, before.version) == ("original", f"standin-{family}")

    result = installer.install(target, catalog=catalog)
    assert result.action == "installed"
    during = installer.state(target, catalog)
    assert (during.kind, during.version) == ("patched", f"standin-{family}")
    assert during.record["original_sha256"] == sha256(original)
    assert during.record["patched_sha256"] == sha256(target.path.read_bytes())
    backup = target.path.with_name(target.path.name + BACKUP)
    assert backup.read_bytes() == original
    text = target.path.read_text()
    assert text.startswith(original.decode()) and f'_klass_patch(globals(), "{family}", "standin-{family}")' in text

    module = load_file(target.path)  # no klass_patch.apply(): the file itself takes alg="klass"
    tokens, forwards = run_klass(module, family)
    assert forwards < 32 and not (tokens == 63).any()
    assert torch.equal(run_upstream(module, family), run_upstream(load_file(STANDIN[family]), family))

    result = installer.revert(target, catalog=catalog)
    assert result.action == "reverted"
    assert target.path.read_bytes() == original
    assert listing(target.path.parent) == [(target.path.name, original)]  # backup and record gone
    assert installer.state(target, catalog).kind == "original"


def test_each_version_gets_its_own_diff(tmp_path):
    a = STANDIN["llada"].read_bytes()
    b = b"# a later upstream revision\n" + a.replace(b"def get_num_transfer_tokens", b"def get_num_transfer_tokens", 1)
    catalog = standin_catalog(tmp_path / "diffs", {"llada": {"llada-a": a, "llada-b": b}})
    for vid, data in (("llada-a", a), ("llada-b", b)):
        target = copy_standin("llada", tmp_path / vid, data)
        assert installer.install(target, catalog=catalog).version == vid
        assert f'"llada", "{vid}")' in target.path.read_text()
        assert load_file(target.path).__klass_patch_installed__ == vid


@pytest.mark.parametrize("variant", ["crlf", "no final newline", "trailing spaces"])
def test_whitespace_variants_are_recognised_and_keep_their_style(variant, tmp_path):
    catalog = standin_catalog(tmp_path / "diffs")
    data = STANDIN["llada"].read_bytes()
    data = {"crlf": data.replace(b"\n", b"\r\n"), "no final newline": data.rstrip(b"\n"),
            "trailing spaces": data.replace(b"import torch\n", b"import torch   \n")}[variant]
    target = copy_standin("llada", tmp_path / "m", data)
    assert installer.state(target, catalog).kind == "original"
    installer.install(target, catalog=catalog)
    new = target.path.read_bytes()
    if variant == "crlf":
        assert new.count(b"\n") == new.count(b"\r\n")
    assert new.startswith(data)  # every original byte kept, the block appended
    assert run_klass(load_file(target.path), "llada")[1] < 32
    installer.revert(target, catalog=catalog)
    assert target.path.read_bytes() == data


def test_unknown_version_is_refused_and_nothing_is_written(tmp_path):
    catalog = standin_catalog(tmp_path / "diffs")
    target = copy_standin("llada", tmp_path / "m", STANDIN["llada"].read_bytes() + b"\nx = 1\n")
    before = listing(target.path.parent)
    with pytest.raises(InstallError) as err:
        installer.install(target, catalog=catalog)
    message = str(err.value)
    assert str(target.path) in message and sha256(target.path.read_bytes()) in message
    assert "standin-llada" in message and "klass_patch.apply()" in message
    assert listing(target.path.parent) == before


def test_the_real_catalog_refuses_a_stand_in(tmp_path):
    target = copy_standin("dream", tmp_path / "m")
    with pytest.raises(InstallError, match="dream-v1, dream-v2"):
        installer.install(target)


def test_dry_run_shows_the_diff_and_writes_nothing(tmp_path):
    catalog = standin_catalog(tmp_path / "diffs")
    target = copy_standin("dream", tmp_path / "m")
    before = listing(target.path.parent)
    result = installer.install(target, dry_run=True, catalog=catalog)
    assert result.action == "would install"
    assert '+_klass_patch(globals(), "dream", "standin-dream")' in result.diff
    assert listing(target.path.parent) == before


def test_installing_twice_changes_nothing(tmp_path):
    catalog = standin_catalog(tmp_path / "diffs")
    target = copy_standin("llada", tmp_path / "m")
    installer.install(target, catalog=catalog)
    before = listing(target.path.parent)
    assert installer.install(target, catalog=catalog).action == "already patched"
    assert listing(target.path.parent) == before


def test_a_diff_with_a_wrong_result_is_refused(tmp_path):
    catalog = standin_catalog(tmp_path / "diffs")
    diff = catalog.diffs / "llada" / "standin-llada.patch"
    diff.write_text(diff.read_text().replace("+_klass_patch(globals()", "+_klass_patch( globals()"))
    target = copy_standin("llada", tmp_path / "m")
    before = listing(target.path.parent)
    with pytest.raises(InstallError, match="unexpected result"):
        installer.install(target, catalog=catalog)
    assert listing(target.path.parent) == before


def test_read_only_file_is_refused(tmp_path):
    catalog = standin_catalog(tmp_path / "diffs")
    target = copy_standin("llada", tmp_path / "m")
    target.path.chmod(0o444)
    before = listing(target.path.parent)
    with pytest.raises(InstallError, match="read-only"):
        installer.install(target, catalog=catalog)
    assert listing(target.path.parent) == before


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_interrupted_install_leaves_original_or_complete_file(fail_at, tmp_path, monkeypatch):
    """Writes go backup (1), file (2), record (3); a failure at any of them (inside the write, after the
    temporary file is complete) leaves a file that is the original or the complete patched one."""
    catalog = standin_catalog(tmp_path / "diffs")
    target = copy_standin("llada", tmp_path / "m")
    original = target.path.read_bytes()
    patched = catalog.diff("llada", "standin-llada").apply(original.decode()).encode()
    calls = []
    real_replace = os.replace

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return real_replace(src, dst)

    monkeypatch.setattr(installer.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        installer.install(target, catalog=catalog)
    monkeypatch.setattr(installer.os, "replace", real_replace)
    assert target.path.read_bytes() == (original if fail_at <= 2 else patched)
    assert not list(target.path.parent.glob("*.klass-tmp"))  # no temporary file left behind
    st = installer.state(target, catalog)
    assert st.kind == ("original" if fail_at <= 2 else "patched")
    if st.kind == "original":  # a retry completes
        assert installer.install(target, catalog=catalog).action == "installed"
    assert installer.revert(target, catalog=catalog).action == "reverted"
    assert target.path.read_bytes() == original


def test_revert_refuses_a_backup_that_is_not_the_original(tmp_path):
    catalog = standin_catalog(tmp_path / "diffs")
    target = copy_standin("llada", tmp_path / "m")
    installer.install(target, catalog=catalog)
    target.path.with_name(target.path.name + BACKUP).write_bytes(b"something else\n")
    patched = target.path.read_bytes()
    with pytest.raises(InstallError, match="not the original"):
        installer.revert(target, catalog=catalog)
    assert target.path.read_bytes() == patched


def test_installs_serialise_on_the_folder_lock(tmp_path):
    catalog = standin_catalog(tmp_path / "diffs")
    target = copy_standin("llada", tmp_path / "m")
    original = target.path.read_bytes()
    done = threading.Event()
    with installer._locked(target.path.parent):  # another install holds the folder
        worker = threading.Thread(target=lambda: (installer.install(target, catalog=catalog), done.set()))
        worker.start()
        assert not done.wait(0.5), "install ran while the folder was locked"
        assert target.path.read_bytes() == original
    worker.join(10)
    assert done.is_set() and installer.state(target, catalog).kind == "patched"


def _install_in_child(args):
    folder, diffs = args
    catalog = standin_catalog(diffs)
    return installer.install(Target("llada", Path(folder) / "generate.py"), catalog=catalog).action


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX folder lock")
def test_two_concurrent_installs_one_wins(tmp_path):
    target = copy_standin("llada", tmp_path / "m")
    original = target.path.read_bytes()
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        actions = list(pool.map(_install_in_child, [(tmp_path / "m", tmp_path / f"d{i}") for i in range(2)]))
    assert sorted(actions) == ["already patched", "installed"]
    assert target.path.read_bytes().startswith(original)
    assert target.path.with_name("generate.py" + BACKUP).read_bytes() == original


def make_hub(tmp_path, data):
    """A fake hub cache: one blob shared by two snapshots, as the hub lays it out; and a modules cache."""
    repo = tmp_path / "hf" / "hub" / "models--Org--Dream-Tiny"
    blob = repo / "blobs" / sha256(data)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMITS[1])
    links = []
    for commit in COMMITS:
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        (snap / "generation_utils.py").symlink_to(Path("..", "..", "blobs", blob.name))
        links.append(snap / "generation_utils.py")
    modules = tmp_path / "hf" / "modules" / "transformers_modules"
    stale = modules / "Org" / "Dream-Tiny" / COMMITS[0] / "generation_utils.py"
    other = modules / "other-model" / "generation_utils.py"  # a local folder's copy (no commit folder)
    for copy, content in ((stale, data), (other, data + b"\n# another model's own copy\n")):
        copy.parent.mkdir(parents=True)
        copy.write_bytes(content)
    return blob, links, stale, other


def test_hub_snapshot_link_is_replaced_never_written_through(tmp_path):
    catalog = standin_catalog(tmp_path / "diffs")
    data = STANDIN["dream"].read_bytes()
    blob, (c1, c2), stale, other = make_hub(tmp_path, data)
    env = {"HF_HOME": str(tmp_path / "hf")}
    link = os.readlink(c1)
    result = installer.install(Target("dream", c1, "hub cache"), catalog=catalog, env=env)
    assert result.action == "installed"
    assert not c1.is_symlink() and "_klass_patch(globals()" in c1.read_text()
    assert blob.read_bytes() == data and c2.is_symlink() and c2.read_bytes() == data  # the shared blob is intact
    assert not stale.exists()  # transformers would have kept importing the stale copy
    assert other.read_bytes() == data + b"\n# another model's own copy\n"
    assert any("removed stale copy" in n for n in result.notes)
    installer.revert(Target("dream", c1), catalog=catalog, env=env)
    assert c1.is_symlink() and os.readlink(c1) == link and c1.read_bytes() == data
    assert sorted(p.name for p in c1.parent.iterdir()) == ["generation_utils.py"]


def test_discovery_honours_the_cache_variables(tmp_path, monkeypatch):
    data = STANDIN["dream"].read_bytes()
    blob, links, stale, other = make_hub(tmp_path, data)
    cwd = tmp_path / "work"
    copy_standin("llada", cwd)
    (cwd / "unrelated").mkdir()
    found = installer.discover({"HF_HOME": str(tmp_path / "hf")}, cwd=cwd)
    assert [(t.family, t.origin) for t in found] == [("dream", "modules cache"), ("dream", installer.LOCAL_COPY)] + [
        ("dream", "hub cache")] * 2 + [("llada", "current directory")]
    assert [t.path for t in found[:2]] == [stale, other]
    assert set(t.path for t in found) == {stale, other, *links, cwd / "generate.py"}
    split = {"HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_MODULES_CACHE": str(tmp_path / "nowhere")}
    assert [t.origin for t in installer.discover(split, cwd=tmp_path)] == ["hub cache"] * 2
    assert installer.discover({"HF_HOME": str(tmp_path / "empty")}, cwd=tmp_path) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_installed_file_without_klass_patch(family, tmp_path, monkeypatch):
    """Used from an environment without klass_patch: upstream calls work, alg="klass" says what to install."""
    catalog = standin_catalog(tmp_path / "diffs")
    target = copy_standin(family, tmp_path / "m")
    installer.install(target, catalog=catalog)
    monkeypatch.setitem(sys.modules, "klass_patch", None)  # `import klass_patch` now fails
    module = load_file(target.path)
    assert not hasattr(module, "__klass_patch_installed__")
    assert torch.equal(run_upstream(module, family), run_upstream(load_file(STANDIN[family]), family))
    with pytest.raises(ImportError, match=r"install it from a klass-patch checkout \(pip install /path/to/klass-patch"
                                          r", or bash install.sh there\)"):
        run_klass(module, family)


def test_vendored_diffs_match_the_known_versions_and_the_shim():
    """Every known version has a diff recording a result for each of its files, made from today's shim."""
    catalog = installer.Catalog()
    for v in KNOWN:
        diff = catalog.diff(v.family, v.id)
        assert v.normalized_sha256 in diff.results, (v.id, v.note)
        added = [line for _, old, new in diff.hunks for line in new[len(old):]]
        assert "".join(line + "\n" for line in added) == installer.shim(v.family, v.id)


def test_cli_install_status_revert(tmp_path, monkeypatch, capsys):
    catalog = standin_catalog(tmp_path / "diffs")
    monkeypatch.setattr(installer, "KNOWN", catalog.versions)
    monkeypatch.setattr(installer, "DIFFS", catalog.diffs)
    target = copy_standin("llada", tmp_path / "repo")
    original = target.path.read_bytes()
    assert cli.main(["status", "--llada", str(tmp_path / "repo")]) == 0
    assert "standin-llada, not patched" in capsys.readouterr().out
    assert cli.main(["install", "--llada", str(target.path), "--dry-run"]) == 0
    assert "+_klass_patch(globals()" in capsys.readouterr().out and target.path.read_bytes() == original
    assert cli.main(["install", "--llada", str(target.path)]) == 0
    assert "installed (standin-llada)" in capsys.readouterr().out
    assert cli.main(["status", "--llada", str(target.path)]) == 0
    assert "patched by klass-patch (standin-llada, installed" in capsys.readouterr().out
    assert cli.main(["revert", "--llada", str(target.path)]) == 0
    assert target.path.read_bytes() == original
    monkeypatch.chdir(tmp_path / "repo")
    for name in ("HF_HOME", "HF_MODULES_CACHE", "HF_HUB_CACHE"):  # empty caches: other tests' copies are not found
        monkeypatch.setenv(name, str(tmp_path / "hf" / name))
    assert cli.main(["status"]) == 0
    assert "found 1 file(s)" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["install", "--dream", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    target = copy_standin("llada", tmp_path / "m", b"def generate(): pass\n")
    assert cli.main(["install", "--llada", str(target.path)]) == 1
    err = capsys.readouterr().err
    assert "not a known llada version" in err and "llada-2025-10" in err
    assert target.path.read_bytes() == b"def generate(): pass\n"


# ------------------------------------------------------------------------------ discovery, messages, shims
def test_discovery_skips_unknown_versions_and_goes_on(tmp_path, monkeypatch, capsys):
    """No --dream/--llada: an unknown Dream-derived file in the caches (a fine-tune's copy, an edited file) is
    reported (path, sha256, why) and left alone; the known files are installed and the exit status is 0."""
    catalog = standin_catalog(tmp_path / "diffs")
    monkeypatch.setattr(installer, "KNOWN", catalog.versions)
    monkeypatch.setattr(installer, "DIFFS", catalog.diffs)
    modules = tmp_path / "hf" / "modules" / "transformers_modules"
    edited = copy_standin("dream", modules / "Org" / "Fine-Tune" / COMMITS[0],
                          STANDIN["dream"].read_bytes() + b"\n# edited\n")
    known = copy_standin("dream", modules / "Org" / "Dream-Tiny" / COMMITS[0])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "HF_MODULES_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    before = edited.path.read_bytes()
    assert cli.main(["install"]) == 0
    out = capsys.readouterr().out
    assert f"{edited.path} [modules cache]: skipped (sha256 {sha256(before)}): not a known dream version" in out
    assert "skipped 1 file(s)" in out and f"{known.path}: installed (standin-dream)" in out
    assert edited.path.read_bytes() == before and installer.state(known, catalog).kind == "patched"
    assert cli.main(["install", "--dream", str(edited.path)]) == 1  # named: still a failure
    assert "not a known dream version" in capsys.readouterr().err


def test_discovery_still_fails_on_a_known_file_that_cannot_be_installed(tmp_path, monkeypatch, capsys):
    catalog = standin_catalog(tmp_path / "diffs")
    monkeypatch.setattr(installer, "KNOWN", catalog.versions)
    monkeypatch.setattr(installer, "DIFFS", catalog.diffs)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    for name in ("HF_HUB_CACHE", "HF_MODULES_CACHE"):
        monkeypatch.delenv(name, raising=False)
    target = copy_standin("llada", tmp_path / "work")
    target.path.chmod(0o444)
    monkeypatch.chdir(tmp_path / "work")
    assert cli.main(["install"]) == 1
    assert "read-only" in capsys.readouterr().err


@pytest.mark.parametrize("named,actual", [("dream", "llada"), ("llada", "dream")])
def test_a_file_of_the_other_family_is_named_as_such(named, actual, tmp_path, capsys):
    target = copy_standin(actual, tmp_path / "m")
    target = Target(named, target.path)
    label = {"llada": "LLaDA's generate.py", "dream": "Dream's generation_utils.py"}[actual]
    with pytest.raises(InstallError, match=f"looks like {label}: pass it with --{actual}, not --{named}"):
        installer.install(target)  # the real catalog: an unknown version of the other family
    catalog = standin_catalog(tmp_path / "diffs")  # a known version of the other family is named
    with pytest.raises(InstallError, match=rf"looks like {label} \(standin-{actual}\)"):
        installer.install(target, catalog=catalog)
    assert cli.main(["install", f"--{named}", str(target.path)]) == 1
    assert f"pass it with --{actual}" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_installed_file_with_a_broken_klass_patch_says_so(family, tmp_path):
    """klass_patch importable but broken (here: wrapt missing): the rewritten file raises that error instead of
    quietly falling back to upstream's code and blaming a missing klass_patch."""
    import subprocess
    from conftest import installed_copy
    path = installed_copy(STANDIN[family], family, tmp_path / "m")
    code = ("import sys, importlib.util; sys.modules['wrapt'] = None\n"
            f"spec = importlib.util.spec_from_file_location('installed', {str(path)!r})\n"
            "module = importlib.util.module_from_spec(spec); sys.modules['installed'] = module\n"
            "spec.loader.exec_module(module)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr and "wrapt" in out.stderr, out.stderr


def test_catalog_and_versions_identify_alike(tmp_path):
    from klass_patch import versions
    catalog = standin_catalog(tmp_path / "diffs")
    for family in FAMILIES:
        data = STANDIN[family].read_bytes()
        assert catalog.identify(data, family) is versions.identify_bytes(data, family, catalog.versions)
        assert versions.identify_bytes(data, family) is None and catalog.identify(data, "llada" if family == "dream"
                                                                                   else "dream") is None


# The shim klass-patch 0.1.0 appended (before its message named how to install from a checkout and before
# a broken klass_patch stopped being hidden): files it rewrote must stay recognised as patched.
OLD_SHIM = {
    "llada": '''

# --- klass-patch {version}: generate() also takes alg="klass" (KL-Adaptive Stability Sampling). ---
# Added by `klass-patch install`; `klass-patch revert` restores the original. Other calls are upstream's.
try:
    from klass_patch import patch_installed as _klass_patch
except ImportError:  # no klass_patch here: upstream's generate, and a clear error for alg="klass"
    def _klass_patch(namespace, family, version):
        import functools
        upstream = namespace["generate"]

        @functools.wraps(upstream)
        def generate(*args, alg=None, **kwargs):
            if alg not in (None, "default"):
                raise ImportError(f"generate(alg={{alg!r}}) needs the klass_patch package in this environment "
                                  "(pip install klass-patch); this file was rewritten by `klass-patch install`")
            return upstream(*args, **kwargs)
        namespace["generate"] = generate
_klass_patch(globals(), "llada", "{version}")
''',
    "dream": '''

# --- klass-patch {version}: diffusion_generate() also takes alg="klass" (KL-Adaptive Stability Sampling). ---
# Added by `klass-patch install`; `klass-patch revert` restores the original. Other calls are upstream's.
try:
    from klass_patch import patch_installed as _klass_patch
except ImportError:  # no klass_patch here: upstream's algorithms, and a clear error for alg="klass"
    def _klass_patch(namespace, family, version):
        import functools
        upstream = DreamGenerationMixin.diffusion_generate

        @functools.wraps(upstream)
        def diffusion_generate(self, *args, **kwargs):
            config = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
            alg = kwargs.get("alg", getattr(config or getattr(self, "generation_config", None), "alg", None))
            if alg == "klass":
                raise ImportError("diffusion_generate(alg='klass') needs the klass_patch package in this "
                                  "environment (pip install klass-patch); this file was rewritten by "
                                  "`klass-patch install`")
            return upstream(self, *args, **kwargs)
        DreamGenerationMixin.diffusion_generate = diffusion_generate
_klass_patch(globals(), "dream", "{version}")
''',
}


def old_install(target: Target, version: str) -> bytes:
    """What klass-patch 0.1.0's install left: the old shim appended, the backup, no record (e.g. lost)."""
    original = target.path.read_bytes()
    text = original.decode().replace("\r\n", "\n")
    patched = ((text if text.endswith("\n") else text + "\n") + OLD_SHIM[target.family].format(version=version)).encode()
    target.path.with_name(target.path.name + BACKUP).write_bytes(original)
    target.path.write_bytes(patched)
    return original


@pytest.mark.parametrize("family", FAMILIES)
def test_files_patched_by_an_earlier_shim_stay_recognised(family, tmp_path, monkeypatch):
    """Regenerating the diffs after a shim change keeps the old results as 'earlier result' lines: files the
    old shim wrote are still 'patched' (no record needed) and revert; a second regeneration changes nothing."""
    upstream = tmp_path / "upstream" / family / "v"
    upstream.mkdir(parents=True)
    (upstream / FILENAME[family]).write_bytes(STANDIN[family].read_bytes())
    catalog = standin_catalog(tmp_path / "unused")
    monkeypatch.setattr(installer, "KNOWN", catalog.versions)
    out = tmp_path / "diffs"
    monkeypatch.setattr(installer, "SHIM", OLD_SHIM)
    assert installer.main([str(tmp_path / "upstream"), "--out", str(out)]) == 0  # the diffs as released
    monkeypatch.undo()
    monkeypatch.setattr(installer, "KNOWN", catalog.versions)
    installer.main([str(tmp_path / "upstream"), "--out", str(out)])  # today's shim
    diff_file = out / family / f"standin-{family}.patch"
    regenerated = diff_file.read_text()
    assert regenerated.count("# earlier result ") == 1 and regenerated.count("# result ") == 1
    installer.main([str(tmp_path / "upstream"), "--out", str(out)])
    assert diff_file.read_text() == regenerated

    catalog = installer.Catalog(catalog.versions, out)
    target = copy_standin(family, tmp_path / "m")
    original = old_install(target, f"standin-{family}")
    st = installer.state(target, catalog)
    assert (st.kind, st.version, st.record) == ("patched", f"standin-{family}", None)
    assert installer.install(target, catalog=catalog).action == "already patched"
    assert installer.revert(target, catalog=catalog).action == "reverted"
    assert target.path.read_bytes() == original and installer.state(target, catalog).kind == "original"
