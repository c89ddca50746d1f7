"""Patching mechanics on stand-ins: before/after import, idempotence, revert, versions, refusal."""
import importlib
import importlib.machinery
import sys
import warnings
import textwrap
from pathlib import Path

import pytest
import torch

import klass_patch
from conftest import STANDIN, load_file

REPO = Path(__file__).resolve().parent.parent
from klass_patch import patching, versions
from klass_patch.toy.models import ToyDenoiser, dream_model

KLASS = dict(alg="klass", conf_threshold=0.6, kl_threshold=0.015, kl_history_length=2)


def _unmarked_copy(tmp_path, family, name):
    """A copy of the stand-in without its stand-in mark: an 'unknown upstream version'."""
    text = STANDIN[family].read_text().replace("KLASS_PATCH_STANDIN = True", "")
    path = tmp_path / name
    path.write_text(text)
    return path


def _is_patched(module):
    return isinstance(module.__dict__.get("generate") or module.DreamGenerationMixin.__dict__["_sample"],
                      patching._KlassWrapper)


def _reference(family):
    """The stand-in loaded by path and patched explicitly: what any other way of patching must match."""
    module = load_file(STANDIN[family])
    klass_patch.apply(module)
    return module


def _run_llada(module):
    return module.generate(ToyDenoiser(), torch.tensor([[3, 4, 5, 6]]), steps=8, gen_length=8, block_length=8,
                           mask_id=63, return_dict_in_generate=True, **KLASS)


def test_apply_patches_modules_imported_before():
    module = load_file(STANDIN["llada"])
    assert not _is_patched(module)
    infos = klass_patch.apply()
    assert _is_patched(module)
    assert any(i.module == module.__name__ and i.family == "llada" and i.version == "standin" for i in infos)
    assert _run_llada(module).sequences.shape == (1, 12)


def test_apply_patches_modules_imported_after(tmp_path, monkeypatch):
    klass_patch.apply()
    by_path = load_file(STANDIN["llada"])  # spec_from_file_location + exec_module
    assert _is_patched(by_path)
    (tmp_path / "generate.py").write_text(STANDIN["llada"].read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("generate", None)
    imported = importlib.import_module("generate")  # `import generate`, as LLaDA's users do
    try:
        assert _is_patched(imported)
        reference = _run_llada(_reference("llada"))
        out = _run_llada(imported)
        assert torch.equal(out.sequences, reference.sequences) and torch.equal(out.used_steps, reference.used_steps)
    finally:
        sys.modules.pop("generate", None)


def test_dream_loaded_like_hugging_face_remote_code(tmp_path, monkeypatch):
    """transformers_modules.<name>.modeling_x imports .generation_utils: the mixin is patched on import."""
    pkg = tmp_path / "transformers_modules_fake" / "Dream_tiny"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "generation_utils.py").write_text(STANDIN["dream"].read_text())
    (pkg / "modeling_tiny.py").write_text(textwrap.dedent("""
        from klass_patch.toy.models import ToyDenoiser
        from .generation_utils import DreamGenerationMixin

        class TinyDream(ToyDenoiser, DreamGenerationMixin):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    klass_patch.apply()
    modeling = importlib.import_module("transformers_modules_fake.Dream_tiny.modeling_tiny")
    gu = sys.modules["transformers_modules_fake.Dream_tiny.generation_utils"]
    assert _is_patched(gu)
    model = modeling.TinyDream(shift=True)
    model.generation_config = gu.DreamGenerationConfig(mask_token_id=63, eos_token_id=62, pad_token_id=62)
    kwargs = dict(max_new_tokens=8, steps=8, return_dict_in_generate=True, alg="klass", conf_threshold=0.9)
    out = model.diffusion_generate(torch.tensor([[3, 4, 5, 6]]), **kwargs)
    ref_module = _reference("dream")
    reference = dream_model(ref_module.DreamGenerationMixin, ref_module.DreamGenerationConfig(
        mask_token_id=63, eos_token_id=62, pad_token_id=62)).diffusion_generate(torch.tensor([[3, 4, 5, 6]]), **kwargs)
    assert torch.equal(out.sequences, reference.sequences) and torch.equal(out.used_steps, reference.used_steps)
    assert 1 <= int(out.used_steps[0]) < 8  # KLASS needs fewer forwards than tokens here


def test_apply_is_idempotent_and_revert_restores_originals():
    llada = load_file(STANDIN["llada"])
    dream = load_file(STANDIN["dream"])
    originals = (llada.generate, dream.DreamGenerationMixin.__dict__["_sample"],
                 dream.DreamGenerationMixin.__dict__["diffusion_generate"])
    loader_exec = importlib.machinery.SourceFileLoader.__dict__.get("exec_module")
    first = klass_patch.apply()
    wrapped = llada.generate
    assert klass_patch.apply() == first
    assert llada.generate is wrapped and llada.generate.__wrapped__ is originals[0]
    assert klass_patch.apply(llada) == [i for i in first if i.module == llada.__name__]
    klass_patch.revert()
    assert (llada.generate, dream.DreamGenerationMixin.__dict__["_sample"],
            dream.DreamGenerationMixin.__dict__["diffusion_generate"]) == originals
    # on transformers 5.x revert() keeps the hook for compat's shims while any is in place (other tests' remote-code
    # modules, shimmed by this apply()); KLASS's patch of later imports is gone either way (checked below)
    assert not patching._hook.get("targets")
    klass_patch.revert(compat=True)
    assert importlib.machinery.SourceFileLoader.__dict__.get("exec_module") is loader_exec
    assert klass_patch.patched() == []
    assert not _is_patched(load_file(STANDIN["llada"]))  # no hook left
    with pytest.raises(TypeError):  # upstream again: it does not know alg
        _run_llada(llada)


def test_apply_on_a_model_or_class_patches_its_mixin():
    dream = load_file(STANDIN["dream"])
    model = dream_model(dream.DreamGenerationMixin, dream.DreamGenerationConfig(mask_token_id=63))
    [info] = klass_patch.apply(model)
    assert info.family == "dream" and info.module == dream.__name__
    assert klass_patch.apply(type(model)) == [info]
    out = model.diffusion_generate(torch.tensor([[3, 4, 5, 6]]), max_new_tokens=8, steps=8, alg="klass",
                                   return_dict_in_generate=True)
    assert out.sequences.shape == (1, 12)


def test_known_versions_are_recognised_by_bytes_and_normalised_text(monkeypatch):
    data = STANDIN["llada"].read_bytes()
    fake = versions.UpstreamVersion("llada-fake", "llada", versions.sha256(data), versions.normalized_sha256(data))
    monkeypatch.setattr(versions, "KNOWN", [fake])
    assert versions.identify_bytes(data).id == "llada-fake"
    crlf = data.replace(b"\n", b"\r\n") + b"\r\n\r\n"
    assert versions.identify_bytes(crlf).id == "llada-fake"
    assert versions.identify_bytes(crlf, family="dream") is None
    assert versions.identify_bytes(data + b"x = 1\n") is None


def test_the_recorded_fingerprints_are_consistent():
    ids = set(versions.known_ids())
    assert ids == {"dream-v1", "dream-v2", "llada-2025-02", "llada-2025-03", "llada-2025-06", "llada-2025-10",
                   "mmada"}
    for v in versions.KNOWN:
        assert len(v.sha256) == len(v.normalized_sha256) == 64 and v.family in ("dream", "llada")
        assert (REPO / "vendored_diffs" / v.family / f"{v.id}.patch").is_file(), f"{v.id}: no vendored diff"
    by_id = {}
    for v in versions.KNOWN:  # one id, one family
        assert by_id.setdefault(v.id, v.family) == v.family


def test_unknown_but_compatible_version_is_patched_with_a_warning(tmp_path):
    path = _unmarked_copy(tmp_path, "llada", "my_generate.py")
    module = load_file(path)
    with pytest.warns(klass_patch.UnknownUpstreamWarning, match=r"unknown \(sha256 .*llada-2025-10"):
        [info] = klass_patch.apply(module)
    assert info.version.startswith("unknown") and _is_patched(module)


def test_incompatible_version_is_refused_saying_what_is_missing(tmp_path):
    path = _unmarked_copy(tmp_path, "llada", "old_generate.py")
    path.write_text(path.read_text().replace("block_length=128, ", "").replace("block_length", "gen_length"))
    module = load_file(path)
    with pytest.raises(klass_patch.IncompatibleUpstreamError, match="generate parameter 'block_length'"):
        klass_patch.apply(module)
    assert not _is_patched(module)
    with pytest.warns(RuntimeWarning, match="cannot patch .* missing generate parameter 'block_length'"):
        klass_patch.apply()
    assert not _is_patched(module)
    with pytest.raises(klass_patch.IncompatibleUpstreamError, match="neither LLaDA"):
        klass_patch.apply(torch)


def test_dream_on_transformers_5_warns(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", type(sys)("transformers"))
    sys.modules["transformers"].__version__ = "5.0.1"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        klass_patch.apply(load_file(STANDIN["dream"]))  # klass-patch's own stand-in needs no shim: no warning
    unmarked = load_file(STANDIN["dream"])
    del unmarked.KLASS_PATCH_STANDIN  # a Dream file that no shim fits
    with pytest.warns(RuntimeWarning, match="transformers 5.0.1: .* do not apply"):
        klass_patch.apply(unmarked)
