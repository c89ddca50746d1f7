"""The installer on the real upstream files (KLASS_PATCH_UPSTREAM; see README). Without them these skip.

Golden replay and pass-through on installed files run in test_golden.py / test_passthrough.py ("installed
file" cases); here: the command line on every version and its whitespace variants, status before, during
and after, byte-identical revert, and Dream end to end through ``AutoModel.from_pretrained``.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV, FILENAME, SKIP_MSG, real_files
from klass_patch.versions import sha256

VARIANTS = {
    "as published": lambda d: d,
    "crlf": lambda d: d.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
    "final newline toggled": lambda d: d.rstrip(b"\n") if d.endswith(b"\n") else d + b"\n",
}


def _cases():
    cases = [pytest.param(f, p, v, id=f"{f}-{p.parent.name}-{v}") for f in FILENAME for p in real_files(f)
             for v in VARIANTS]
    return cases or [pytest.param(None, None, None, id="upstream", marks=pytest.mark.skip(reason=SKIP_MSG))]


def klass_patch_cli(*args, cwd=None, env=None, rc=0):
    out = subprocess.run([sys.executable, "-m", "klass_patch", *args], capture_output=True, text=True, cwd=cwd,
                         env={**os.environ, **(env or {})})
    assert out.returncode == rc, out.stdout + out.stderr
    return out.stdout if rc == 0 else out.stderr


@pytest.mark.parametrize("family,path,variant", _cases())
def test_cli_installs_every_version(family, path, variant, tmp_path, capsys):
    from klass_patch import cli, installer
    target = tmp_path / FILENAME[family]
    data = VARIANTS[variant](path.read_bytes())
    target.write_bytes(data)
    version = installer.Catalog().identify(data, family).id

    def status():
        assert cli.main(["status", f"--{family}", str(target)]) == 0
        return capsys.readouterr().out

    assert f"{version}, not patched" in status()
    if variant == "as published":  # the command as users type it, in its own process
        assert f"installed ({version})" in klass_patch_cli("install", f"--{family}", str(target))
    else:
        assert cli.main(["install", f"--{family}", str(target)]) == 0
    assert f"patched by klass-patch ({version}, installed" in status()
    assert cli.main(["install", f"--{family}", str(tmp_path)]) == 0
    assert "already patched" in capsys.readouterr().out
    assert cli.main(["revert", f"--{family}", str(target)]) == 0
    assert f"reverted ({version})" in capsys.readouterr().out
    assert sha256(target.read_bytes()) == sha256(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME[family]]
    assert f"{version}, not patched" in status()


MODEL_FILES = ("modeling_dream.py", "configuration_dream.py")
CONFIG = dict(architectures=["DreamModel"], auto_map={"AutoConfig": "configuration_dream.DreamConfig",
                                                       "AutoModel": "modeling_dream.DreamModel"},
              model_type="Dream", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=False, mask_token_id=255, pad_token_id=254, bos_token_id=254,
              eos_token_id=254, torch_dtype="float32", use_cache=False)

BUILD = """
import sys, torch
from transformers import AutoConfig, AutoModel
folder = sys.argv[1]
torch.manual_seed(0)
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
AutoModel.from_config(config, trust_remote_code=True).save_pretrained(folder)
"""

RUN = """
import json, sys, torch
if sys.argv[2] == "apply":
    import klass_patch
    klass_patch.apply()
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
special = dict(mask_token_id=255, pad_token_id=254, eos_token_id=254, bos_token_id=254)
prompt = torch.tensor([[1, 2, 3, 4, 5]])
out = {}
for alg, extra in (("klass", dict(conf_threshold=0.0, kl_threshold=10.0, kl_history_length=2)),
                   ("maskgit_plus", {})):
    try:
        r = model.diffusion_generate(prompt, max_new_tokens=16, steps=16, temperature=0.0, alg=alg,
                                     return_dict_in_generate=True, **special, **extra)
        out[alg] = dict(sequences=r.sequences.tolist(), used_steps=getattr(r, "used_steps", None))
        if out[alg]["used_steps"] is not None:
            out[alg]["used_steps"] = r.used_steps.tolist()
    except Exception as e:
        out[alg] = dict(error=f"{type(e).__name__}: {e}")
print(json.dumps(out))
"""


def _dream_cases():
    root = os.environ.get(ENV)
    model = Path(root or ".") / "dream-model"
    if not root or not all((model / f).is_file() for f in MODEL_FILES):
        reason = (f"{SKIP_MSG}; Dream end to end also needs {ENV}/dream-model/modeling_dream.py and "
                  "configuration_dream.py")
        return [pytest.param(None, id="upstream", marks=pytest.mark.skip(reason=reason))]
    return [pytest.param(p, id=p.parent.name) for p in real_files("dream")]


@pytest.mark.parametrize("generation_utils", _dream_cases())
def test_dream_end_to_end_from_pretrained(generation_utils, tmp_path):
    """A tiny random Dream folder (real remote code), installed, loaded in a fresh process without apply():
    alg="klass" gives what the runtime patch gives on the untouched folder; maskgit_plus is upstream's.
    Discovery leaves the folder's copy in the modules cache alone and says which command to run instead."""
    pytest.importorskip("transformers")
    model_files = Path(os.environ[ENV]) / "dream-model"
    pristine = tmp_path / "dream-tiny"
    pristine.mkdir()
    for name in MODEL_FILES:
        shutil.copyfile(model_files / name, pristine / name)
    shutil.copyfile(generation_utils, pristine / "generation_utils.py")
    (pristine / "config.json").write_text(json.dumps(CONFIG))
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

    def python(code, *args):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             env={**os.environ, **env})
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    python(BUILD, str(pristine))
    shutil.copyfile(generation_utils, pristine / "generation_utils.py")  # as published, whatever save_pretrained did
    untouched = json.loads(python(RUN, str(pristine), "plain").splitlines()[-1])
    runtime = json.loads(python(RUN, str(pristine), "apply").splitlines()[-1])
    assert "Unknown alg" in untouched["klass"]["error"] or "klass" in untouched["klass"]["error"]
    copies = sorted((tmp_path / "modules").rglob("generation_utils.py"))  # transformers' copy of the folder's
    assert [c.read_bytes() for c in copies] == [generation_utils.read_bytes()]
    out = klass_patch_cli("install", cwd=tmp_path, env=env)  # discovery, as install.sh runs it
    assert f"{copies[0]}: not installed, nothing written" in out and "klass-patch install --dream FOLDER" in out
    assert sorted((tmp_path / "modules").rglob("generation_utils.py*")) == copies

    installed = tmp_path / "installed" / "dream-tiny"  # same folder name: the same modules-cache entry
    shutil.copytree(pristine, installed)
    klass_patch_cli("install", "--dream", str(installed), env=env)
    rewritten = json.loads(python(RUN, str(installed), "plain").splitlines()[-1])
    assert "error" not in rewritten["klass"], rewritten["klass"]
    assert rewritten["klass"] == runtime["klass"]
    assert rewritten["klass"]["used_steps"][0] < 16  # parallel unmasking happened
    assert rewritten["maskgit_plus"]["sequences"] == untouched["maskgit_plus"]["sequences"]
    patched = [c for c in (tmp_path / "modules").rglob("generation_utils.py")
               if c.read_bytes() == (installed / "generation_utils.py").read_bytes()]
    assert len(patched) == 1  # the load copied the installed file; no backup next to it
    err = klass_patch_cli("revert", cwd=tmp_path, env=env, rc=1)
    assert f"{patched[0]}: patched (as its folder was when loaded), not reverted here" in err
    assert "klass-patch revert --dream FOLDER" in err and "is gone" not in err
    out = klass_patch_cli("revert", "--dream", str(installed), env=env)
    assert f"removed stale copy {patched[0]}" in out and not patched[0].exists()
    assert sha256((installed / "generation_utils.py").read_bytes()) == sha256(generation_utils.read_bytes())


def _files():
    files = [pytest.param(f, p, id=f"{f}-{p.parent.name}") for f in FILENAME for p in real_files(f)]
    return files or [pytest.param(None, None, id="upstream", marks=pytest.mark.skip(reason=SKIP_MSG))]


@pytest.mark.parametrize("family,path", _files())
def test_files_rewritten_by_the_previous_shim_are_patched_and_revert(family, path, tmp_path):
    """Files klass-patch 0.1.0 rewrote (its shim, the vendored diffs' 'earlier result' lines), without their
    install record: status says patched, install leaves them, revert restores the original byte for byte."""
    from klass_patch import installer
    from test_installer import old_install
    data = path.read_bytes()
    version = installer.Catalog().identify(data, family).id
    target = installer.Target(family, tmp_path / FILENAME[family])
    target.path.write_bytes(data)
    old_install(target, version)
    st = installer.state(target)
    assert (st.kind, st.version, st.record) == ("patched", version, None)
    assert installer.install(target).action == "already patched"
    assert installer.revert(target).action == "reverted"
    assert sha256(target.path.read_bytes()) == sha256(data)


@pytest.mark.parametrize("family,path", _files())
def test_a_file_named_with_the_wrong_family_says_which_it_is(family, path, tmp_path, capsys):
    from klass_patch import cli, installer
    other = "dream" if family == "llada" else "llada"
    version = installer.Catalog().identify(path.read_bytes(), family).id
    copy = tmp_path / FILENAME[other]  # the other family's file name, as a user's folder would have it
    shutil.copyfile(path, copy)
    assert cli.main(["install", f"--{other}", str(copy)]) == 1
    assert sha256(copy.read_bytes()) == sha256(path.read_bytes())
    err = capsys.readouterr().err
    assert f"looks like {installer.LABEL[family]} ({version}): pass it with --{family}, not --{other}" in err
