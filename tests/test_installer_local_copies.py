"""transformers' modules-cache copies of local model folders: not install targets (discovery lists them and says
which folder to name), and `revert` on one says how to revert its folder. The caches are laid out by the installed
transformers' own get_cached_module_file (what from_pretrained(..., trust_remote_code=True) calls): a local
folder's copy is transformers_modules/<name>/ on 4.x and <name>/<hash of its sources>/ on 5.x; a hub model's is
transformers_modules/<org>/<repo>/<commit>/."""
import shutil
import sys
from pathlib import Path

import pytest

from conftest import FILENAME, STANDIN, standin_catalog
from klass_patch import cli, installer
from klass_patch.installer import BACKUP, RECORD

dynamic = pytest.importorskip("transformers.dynamic_module_utils")
MODEL_CODE = Path(__file__).parent / "standins" / "dream"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def load(tmp_path, monkeypatch):
    """Caches in tmp_path, the stand-in catalog, cwd tmp_path. ``load(folder or repo id)`` does to the modules
    cache what from_pretrained does, and returns the copy of generation_utils.py it made."""
    catalog = standin_catalog(tmp_path / "diffs")
    monkeypatch.setattr(installer, "KNOWN", catalog.versions)
    monkeypatch.setattr(installer, "DIFFS", catalog.diffs)
    hf = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(hf / "modules"))
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(hf / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # transformers puts its modules cache on sys.path
    monkeypatch.chdir(tmp_path)

    def _load(source):
        rel = dynamic.get_cached_module_file(str(source), "modeling_dream.py", cache_dir=str(hf / "hub"),
                                             local_files_only=True)
        return hf / "modules" / Path(rel).parent / FILENAME["dream"]
    return _load


def model_folder(folder):
    """A Dream model folder: the stand-in model code, the stand-in generation_utils.py (a known version here)."""
    folder.mkdir(parents=True)
    for name in ("modeling_dream.py", "configuration_dream.py"):
        shutil.copyfile(MODEL_CODE / name, folder / name)
    shutil.copyfile(STANDIN["dream"], folder / FILENAME["dream"])
    return folder


def test_discovery_install_leaves_a_local_folders_copy_and_names_the_folder(load, tmp_path, capsys):
    folder = model_folder(tmp_path / "models" / "dream-tiny")
    copy = load(folder)
    original = copy.read_bytes()
    assert cli.main(["install"]) == 0
    out = capsys.readouterr().out
    assert f"{copy}: not installed, nothing written: transformers' copy of a local folder named 'dream-tiny'" in out
    assert "klass-patch install --dream FOLDER, FOLDER being the folder you loaded the model from" in out
    assert "installed (" not in out
    assert copy.read_bytes() == original
    assert sorted(p.name for p in copy.parent.iterdir() if p.name.startswith(FILENAME["dream"])) == [FILENAME["dream"]]
    assert load(folder).read_bytes() == original  # what the next load imports
    assert cli.main(["install", "--dream", str(copy)]) == 1  # named: refused the same way
    assert "not installed, nothing written" in capsys.readouterr().err and copy.read_bytes() == original
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"{copy} [{installer.LOCAL_COPY}]: standin-dream, not patched" in out
    assert "klass-patch status --dream FOLDER, FOLDER being the folder you loaded the model from" in out


def test_a_hub_models_copy_stays_a_target(load, tmp_path, capsys):
    snapshot = model_folder(tmp_path / "hf" / "hub" / "models--Org--Dream-Tiny" / "snapshots" / COMMIT)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    copy = load("Org/Dream-Tiny")
    assert COMMIT in copy.parts
    assert cli.main(["install"]) == 0
    out = capsys.readouterr().out
    assert f"{snapshot / FILENAME['dream']}: installed (standin-dream)" in out and "not installed" not in out
    assert installer.state(installer.Target("dream", snapshot / FILENAME["dream"])).kind == "patched"


def test_revert_of_an_installed_folders_copy_names_the_folder_command(load, tmp_path, capsys):
    folder = model_folder(tmp_path / "models" / "dream-tiny")
    original = (folder / FILENAME["dream"]).read_bytes()
    assert cli.main(["install", "--dream", str(folder)]) == 0
    copy = load(folder)  # one load: the modules cache gets a copy of the patched file, no backup
    patched = copy.read_bytes()
    assert patched == (folder / FILENAME["dream"]).read_bytes() != original
    capsys.readouterr()
    assert cli.main(["revert"]) == 1  # the folder it came from is still patched
    err = capsys.readouterr().err
    assert f"{copy}: patched (as its folder was when loaded), not reverted here" in err
    assert ("klass-patch revert --dream FOLDER, FOLDER being the folder you loaded the model from; that also "
            "removes this copy") in err
    assert "is gone" not in err and copy.read_bytes() == patched
    assert cli.main(["revert", "--dream", str(folder)]) == 0
    assert "removed stale copy" in capsys.readouterr().out
    assert (folder / FILENAME["dream"]).read_bytes() == original and not copy.exists()
    assert load(folder).read_bytes() == original
    assert cli.main(["revert"]) == 0


def test_revert_clears_what_an_earlier_install_left_in_a_local_folders_copy(load, tmp_path, capsys):
    """klass-patch 0.1.0's discovery installed into such copies; the next load put the original back, leaving
    its backup and record there. revert removes them (and restores a copy not yet reloaded)."""
    folder = model_folder(tmp_path / "models" / "dream-tiny")
    copy = load(folder)
    original = copy.read_bytes()
    target = installer.Target("dream", copy)
    old_env = {"HF_MODULES_CACHE": str(tmp_path / "elsewhere")}  # as the old release: not seen as a copy
    installer.install(target, env=old_env)
    assert installer.revert(target).action == "reverted" and copy.read_bytes() == original
    installer.install(target, env=old_env)
    assert load(folder).read_bytes() == original  # the load undid it; the backup and record stay
    assert {p.name for p in copy.parent.iterdir()} >= {FILENAME["dream"] + BACKUP, FILENAME["dream"] + RECORD}
    result = installer.revert(target)
    assert result.action == "not patched" and "an earlier install left here" in result.notes[0]
    assert not {p.name for p in copy.parent.iterdir()} & {FILENAME["dream"] + BACKUP, FILENAME["dream"] + RECORD}
    assert copy.read_bytes() == original


@pytest.mark.parametrize("parts,name", [
    (("dream-tiny",), "dream-tiny"),  # 4.x: a local folder
    (("Dream_hyphen_v0_dot_1", "0123456789abcdef"), "Dream-v0.1"),  # 5.x: a local folder, its sources' hash
    ((), ""),  # 4.x, loaded as "folder/": no name kept
    (("Org", "Dream-Tiny", COMMIT), None),  # a hub model
    (("Dream_hyphen_org", "Dream_hyphen_v0", COMMIT), None),  # a hub model, 5.x names
])
def test_local_copy_of_reads_transformers_layout(parts, name, tmp_path):
    modules = tmp_path / "modules"
    path = modules.joinpath("transformers_modules", *parts, FILENAME["dream"])
    assert installer.local_copy_of(path, {"HF_MODULES_CACHE": str(modules)}) == name
    assert installer.local_copy_of(tmp_path / "dream-tiny" / FILENAME["dream"],
                                   {"HF_MODULES_CACHE": str(modules)}) is None
