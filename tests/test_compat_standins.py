"""klass_patch.compat on stand-ins of Dream's and LLaDA's remote code, in this Python's transformers (4.46.2 or 5.x).

The stand-ins (tests/standins/dream, tests/standins/llada) are written for klass-patch with upstream's interface, not
its code; they reproduce what transformers 5.x breaks in the real files. Tiny models are built from them with random
weights, saved with their code next to config.json (``auto_map``) and loaded with
``AutoModel.from_pretrained(folder, trust_remote_code=True)``, as users load Dream and LLaDA (the Hugging Face caches
are conftest.py's temporary ones).

- transformers 5.x, no ``apply()``: loading fails (the stand-ins are broken as upstream is).
- transformers 5.x, every shim but one: that shim's breakage shows (one test per shim; a shim this transformers
  does not need is skipped, saying so). This is what proves the stand-ins faithful and each shim needed.
- With ``klass_patch.apply()`` (4.x and 5.x): the loaded models compute and generate exactly as the objects that were
  saved; load draws nothing from the global RNG; save_pretrained works; ``compat.applied()`` lists the shims that
  this transformers needs (none on 4.x); ``revert(compat=True)`` puts every attribute back.
- ``revert()`` keeps the shims (issue 18, item 2): after ``apply()``, load, ``revert()`` (and through installed
  files), the loaded models still compute and generate with upstream's algorithms, KLASS is gone (but stays in
  installed files, which ``patched()`` lists), and Dream and LLaDA still load.
- L4 keeps torch.nn.init a no-op in the thread that loads LLaDA only: a model another thread builds meanwhile is
  initialised (item 13c).
- A native transformers model computes the same with and without ``apply()``.

In-process: conftest's autouse fixture calls ``klass_patch.revert(compat=True)`` around each test, and the remote-code modules,
imported once, are shimmed and unshimmed in place (and dropped from sys.modules at the end). The module's fixture
runs torch on one thread while it lasts: with matrices this small a second one only waits, seconds per test on a
busy machine.
"""
import importlib.machinery
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from packaging.version import Version  # noqa: E402

import klass_patch  # noqa: E402
from conftest import HF_TEMP, load_file, revert_everything  # noqa: E402
from klass_patch import compat  # noqa: E402
from compat_worker import _plain  # noqa: E402  (a generation output as tensors, lists and dicts)

VERSION = Version(transformers.__version__)
TF5 = VERSION.major >= 5
STANDINS = Path(__file__).parent / "standins"
TOY_LLADA_GENERATE = Path(klass_patch.__file__).parent / "toy" / "llada_generate.py"
NEEDED = [s.name for s in compat.shims_for(VERSION)]
# where each shim goes: the stand-in file whose module it patches
HOME = {"D1": "modeling_dream", "D2": "generation_utils", "D3": "modeling_dream", "D4": "generation_utils",
        "D5": "generation_utils", "D6": "modeling_dream", "D7": "generation_utils", "D8": "modeling_dream",
        "L1": "modeling_llada", "L2": "modeling_llada", "L3": "configuration_llada", "L4": "modeling_llada"}

MINE = "transformers_modules.standin_"  # the modules of this file's models (their folders' names)
FILES = {"dream": ("configuration_dream", "modeling_dream", "generation_utils"),
         "llada": ("configuration_llada", "modeling_llada")}
DREAM_CONFIG = {  # upstream's field names; tiny
    "model_type": "Dream", "architectures": ["DreamModel"],
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "vocab_size": 200, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 512, "rope_theta": 10000.0, "rope_scaling": None,
    "use_cache": False, "tie_word_embeddings": False, "mask_token_id": 199, "pad_token_id": 198,
    "bos_token_id": 197, "eos_token_id": 198, "torch_dtype": "float32",
}
DREAM_GENERATION_CONFIG = {"bos_token_id": 197, "eos_token_id": 198, "pad_token_id": 198}  # as Dream's: no sampling
LLADA_CONFIG = {
    "model_type": "llada", "architectures": ["LLaDAModelLM"],
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "d_model": 64, "n_heads": 4, "n_layers": 2, "mlp_hidden_size": 128, "vocab_size": 256, "embedding_size": 256,
    "init_device": "meta", "use_cache": False, "weight_tying": False, "mask_token_id": 255, "pad_token_id": 250,
    "eos_token_id": 250, "torch_dtype": "float32",
}
DREAM_KLASS = dict(alg="klass", conf_threshold=0.9, kl_threshold=0.001)
LLADA_KLASS = dict(alg="klass", conf_threshold=0.6, kl_threshold=0.015, kl_history_length=2)
V4_DEFAULTS = dict(temperature=1.0, top_k=50, top_p=1.0)  # what a 4.x model config gives Dream (D5)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------------------------ helpers
def _load(folder, auto="AutoModel"):
    return getattr(transformers, auto).from_pretrained(str(folder), trust_remote_code=True).eval()


def _randomise(model, seed):
    """Every parameter from a seeded generator, scaled so that the tiny models' outputs are not flat."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1
                    else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _copy_code(family, folder):
    for source in sorted((STANDINS / family).glob("*.py")):
        if not (folder / source.name).exists():  # 5.x's save_pretrained copies it, 4.46.2's does not
            shutil.copyfile(source, folder / source.name)


def _build(root, family, config, seed):
    """A tiny model object from the stand-in (through AutoConfig / AutoModel.from_config with remote code, as its
    code runs once saved), randomised and saved with its code: (model, folder)."""
    src, folder = root / f"standin_{family}_src", root / f"standin_{family}"  # names of their modules too
    src.mkdir()
    _copy_code(family, src)
    (src / "config.json").write_text(json.dumps(config))
    model_config = transformers.AutoConfig.from_pretrained(str(src), trust_remote_code=True)
    model = transformers.AutoModel.from_config(model_config, trust_remote_code=True).eval()
    _randomise(model, seed)
    model.save_pretrained(str(folder))
    _copy_code(family, folder)
    return model, folder


def _equal(x, y):
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(map(_equal, x, y))
    return type(x) is type(y) and x == y


def _rng_untouched(load):
    """``load()`` and whether it left the global RNG as it found it."""
    torch.manual_seed(99)
    expected = torch.rand(4)
    torch.manual_seed(99)
    model = load()
    return model, torch.equal(torch.rand(4), expected)


def _dream_inputs():
    ids = torch.randint(0, 190, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 198, 0  # left padding
    return ids, mask


def _dream_generate(model, seed=None, **kwargs):
    ids, mask = _dream_inputs()
    if seed is not None:
        torch.manual_seed(seed)
    return _plain(model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=8, steps=8,
                                           return_dict_in_generate=True, output_history=True, **kwargs))


def _llada_inputs():
    ids = torch.randint(0, 240, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, n in ((1, 3), (2, 6)):  # left padding
        ids[row, :n], mask[row, :n] = 250, 0
    return ids, mask


def _remote_modules():
    return [m for name, m in list(sys.modules.items()) if name.startswith(MINE) and
            isinstance(getattr(m, "__dict__", None), dict) and any(n in vars(m) for n in compat._CLASS_NAMES)]


def _snapshot(modules):
    """Every attribute of the modules and of the classes they define, by identity."""
    out = {}
    for module in modules:
        for name, value in list(vars(module).items()):
            out[(module.__name__, name)] = value
            if isinstance(value, type) and value.__module__ == module.__name__:
                out.update({(module.__name__, name, attr): v for attr, v in vars(value).items()})
    return out


def _applied_by_file(family=None):
    """{stand-in file name: set of shim names in place on this file's modules} (several modules may share a file
    name), for one family's files or all."""
    out = {}
    for module, names in compat.applied().items():
        if module.startswith(MINE):
            out.setdefault(module.rsplit(".", 1)[-1], set()).update(names)
    return {k: v for k, v in out.items() if v and (family is None or k in FILES[family])}


# ------------------------------------------------------------------------------------------------------ fixture
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny Dream and LLaDA models (objects in memory, folders on disk). Built with ``apply()`` (5.x's
    from_config needs D1 to construct Dream at all), reverted before any test runs."""
    assert Path(HF_TEMP) in Path(transformers.utils.hub.HF_MODULES_CACHE).parents, \
        "the remote code must be copied into conftest's temporary HF_MODULES_CACHE, not the user's"
    root = tmp_path_factory.mktemp("standins")
    imported, threads = set(sys.modules), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits (seconds per test on a busy machine)
    revert_everything()
    klass_patch.apply()
    try:
        dream, dream_folder = _build(root, "dream", DREAM_CONFIG, seed=1)
        (dream_folder / "generation_config.json").write_text(json.dumps(DREAM_GENERATION_CONFIG))
        llada, llada_folder = _build(root, "llada", LLADA_CONFIG, seed=2)
    finally:
        revert_everything()
    yield SimpleNamespace(root=root, dream=dream, dream_folder=dream_folder, llada=llada, llada_folder=llada_folder)
    revert_everything()
    torch.set_num_threads(threads)
    for name in set(sys.modules) - imported:  # a later apply() in this session must not meet them
        if name.startswith((MINE, "_klass_test_llada_generate")):
            del sys.modules[name]


# ------------------------------------------------------------------------------- transformers 5.x: the breakages
needs_tf5 = pytest.mark.skipif(not TF5, reason=f"transformers {VERSION} needs no shim: the stand-ins run as they are")


@needs_tf5
def test_without_apply_neither_loads_on_transformers_5(built):
    with pytest.raises(KeyError, match="default"):  # D1, the first Dream meets
        _load(built.dream_folder)
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):  # L1, the first LLaDA meets
        _load(built.llada_folder, "AutoModelForCausalLM")
    assert compat.applied() == {}


def _symptom_d1(b):
    with pytest.raises(KeyError, match="default"):
        _load(b.dream_folder)


def _symptom_d2(b):
    # 5.23: in Dream's from_pretrained (DreamGenerationConfig.from_pretrained -> update() -> validate(user_set_...));
    # 5.0: in save_pretrained (GenerationConfig.save_pretrained -> validate(strict=True))
    unexpected = r"validate\(\) got an unexpected keyword argument '(user_set_attributes|strict)'"
    with pytest.raises(TypeError, match=unexpected):
        _load(b.dream_folder).save_pretrained(str(b.root / "d2_saved"))


def _symptom_d3(b):
    model = _load(b.dream_folder)
    rotary = model.model.rotary_emb
    fresh, _ = rotary.rope_init_fn(rotary.config, torch.device("cpu"), **rotary.rope_kwargs)
    assert torch.equal(b.dream.model.rotary_emb.inv_freq, fresh)  # the saved object's is right
    assert not torch.equal(rotary.inv_freq, fresh)  # the loaded one's was left as allocated
    ids, _ = _dream_inputs()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, b.dream(ids).logits)


def _symptom_d4(b):
    model = _load(b.dream_folder)
    with pytest.raises(AttributeError, match="eps"):
        _dream_generate(model, alg="maskgit_plus", temperature=0.0)


def _symptom_d5(b):
    model = _load(b.dream_folder)
    no_temperature = _dream_generate(model, 1234, alg="maskgit_plus")
    assert _equal(no_temperature, _dream_generate(model, alg="maskgit_plus", temperature=0.0))  # greedy
    assert not _equal(no_temperature, _dream_generate(model, 1234, alg="maskgit_plus", **V4_DEFAULTS))


def _symptom_d6(b):
    model = _load(b.dream_folder)
    with pytest.raises(AttributeError, match="'list' object has no attribute 'keys'"):
        model.save_pretrained(str(b.root / "d6_saved"))


def _symptom_d7(b):
    model = _load(b.dream_folder)
    assert "resume_download" in vars(model.generation_config)
    model.save_pretrained(str(b.root / "d7_saved"))
    assert "resume_download" in json.loads((b.root / "d7_saved" / "generation_config.json").read_text())


def _symptom_d8(b):  # transformers 5.0 to 5.12 only: the loaded weights are drawn again
    model = _load(b.dream_folder)
    assert not torch.equal(model.lm_head.weight, b.dream.lm_head.weight)


def _symptom_l1(b):
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):
        _load(b.llada_folder, "AutoModelForCausalLM")


def _symptom_l2(b):
    with pytest.raises(TypeError, match="tie_weights.. got an unexpected keyword argument"):
        _load(b.llada_folder, "AutoModelForCausalLM")


def _symptom_l3(b):
    assert not hasattr(transformers.AutoConfig.from_pretrained(str(b.llada_folder), trust_remote_code=True),
                       "use_cache")
    model = _load(b.llada_folder, "AutoModelForCausalLM")
    with pytest.raises(AttributeError, match="use_cache"):
        model(_llada_inputs()[0])


def _symptom_l4(b):
    model, untouched = _rng_untouched(lambda: _load(b.llada_folder, "AutoModelForCausalLM"))
    assert not untouched  # torch's default init ran on the CPU, drawing from the global RNG
    ids, _ = _llada_inputs()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, b.llada(ids).logits)  # the checkpoint then overwrote the weights


SYMPTOMS = {"D1": _symptom_d1, "D2": _symptom_d2, "D3": _symptom_d3, "D4": _symptom_d4, "D5": _symptom_d5,
            "D6": _symptom_d6, "D7": _symptom_d7, "D8": _symptom_d8, "L1": _symptom_l1, "L2": _symptom_l2,
            "L3": _symptom_l3, "L4": _symptom_l4}


def test_every_shim_has_a_symptom_test():
    assert {s.name.split("-")[0] for s in compat.SHIMS} == set(SYMPTOMS)


@needs_tf5
@pytest.mark.parametrize("name", [s.name for s in compat.SHIMS])
def test_all_shims_but_one_the_breakage_shows(built, name, monkeypatch):
    """Every shim that this transformers needs except ``name``: its breakage shows, on the stand-ins."""
    if name not in NEEDED:
        versions = next(s.versions for s in compat.SHIMS if s.name == name)
        pytest.skip(f"{name} is for transformers {versions}, not {VERSION}: its breakage does not exist here")
    monkeypatch.setattr(compat, "SHIMS", [s for s in compat.SHIMS if s.name != name])
    klass_patch.apply()
    SYMPTOMS[name.split("-")[0]](built)
    assert all(name not in names for names in compat.applied().values())


# ----------------------------------------------------------------------------------------- with klass_patch.apply()
def _expected(family):
    out = {}
    for name in NEEDED:
        if name[0] == family[0].upper():
            out.setdefault(HOME[name.split("-")[0]], set()).add(name)
    return out


def test_dream_with_apply_loads_computes_generates_and_saves_as_the_saved_model(built):
    klass_patch.apply()
    model, untouched = _rng_untouched(lambda: _load(built.dream_folder))
    assert untouched, "loading drew from the global RNG"
    assert type(model).__name__ == "DreamModel" and model is not built.dream
    assert torch.equal(model.model.rotary_emb.inv_freq, built.dream.model.rotary_emb.inv_freq)
    ids, mask = _dream_inputs()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, built.dream(ids).logits)
    assert _applied_by_file("dream") == _expected("dream")

    runs = {"maskgit_plus greedy": dict(alg="maskgit_plus", temperature=0.0),
            "klass greedy": dict(temperature=0.0, **DREAM_KLASS),
            "klass t0.2 p0.95": dict(seed=1234, temperature=0.2, top_p=0.95, **DREAM_KLASS)}
    out = {}
    for what, kwargs in runs.items():
        out[what] = _dream_generate(model, **kwargs)
        assert _equal(out[what], _dream_generate(built.dream, **kwargs)), what
        assert out[what]["sequences"][:, 12:].ne(199).all(), what  # every mask decided
        assert ("used_steps" in out[what]) == ("klass" in what), what  # KLASS ran (not upstream's loop) or not
    # without a temperature, 4.x's model-config defaults (D5): sampled at 1.0 / top_k 50 / top_p 1.0, not greedy
    no_temperature = _dream_generate(model, 1234, alg="maskgit_plus")
    assert _equal(no_temperature, _dream_generate(model, 1234, alg="maskgit_plus", **V4_DEFAULTS))
    assert not _equal(no_temperature, out["maskgit_plus greedy"])

    assert "resume_download" not in vars(model.generation_config)  # D7
    saved = built.root / "standin_dream_resaved"
    model.save_pretrained(str(saved))
    assert "resume_download" not in json.loads((saved / "generation_config.json").read_text())
    _copy_code("dream", saved)
    again = _load(saved)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, built.dream(ids).logits)


def test_llada_with_apply_loads_computes_generates_and_saves_as_the_saved_model(built):
    klass_patch.apply()
    model, untouched = _rng_untouched(lambda: _load(built.llada_folder, "AutoModelForCausalLM"))
    assert untouched, "loading drew from the global RNG (L4)"
    assert type(model).__name__ == "LLaDAModelLM" and model.config.use_cache is False
    ids, mask = _llada_inputs()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, built.llada(ids).logits)
        assert torch.equal(model(ids, attention_mask=mask).logits, built.llada(ids, attention_mask=mask).logits)
    assert _applied_by_file("llada") == _expected("llada")

    generate = load_file(TOY_LLADA_GENERATE).generate  # klass-patch's stand-in of LLaDA's generate.py, patched
    common = dict(steps=8, gen_length=8, block_length=4, mask_id=255)
    for what, kwargs in {"default": {}, "klass": LLADA_KLASS}.items():
        mine = generate(model, ids, mask, **common, **kwargs)
        assert torch.equal(mine, generate(built.llada, ids, mask, **common, **kwargs)), what
        assert mine[:, 10:].ne(255).all(), what

    saved = built.root / "standin_llada_resaved"
    model.save_pretrained(str(saved))
    _copy_code("llada", saved)
    with torch.no_grad():
        assert torch.equal(_load(saved, "AutoModelForCausalLM")(ids).logits, built.llada(ids).logits)


def _own_code(folder):
    """Make ``folder`` load its own code: a saved config's ``auto_map`` names the folder the code came from."""
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {k: v.split("--")[-1] for k, v in config["auto_map"].items()}
    (folder / "config.json").write_text(json.dumps(config))


def test_installed_files_need_no_apply(built):
    """The installed route: a Dream folder whose generation_utils.py carries the block `klass-patch install` appends,
    and a LLaDA generate.py carrying it, imported before the model is loaded, load and generate without apply()."""
    from klass_patch import installer
    folder = built.root / "standin_dream_installed"  # its own module name: no stale copy of generation_utils
    shutil.copytree(built.dream_folder, folder)
    _own_code(folder)
    with open(folder / "generation_utils.py", "a") as f:
        f.write(installer.shim("dream", "standin"))
    dream = _load(folder)
    ids, _ = _dream_inputs()
    runs = (dict(temperature=0.0, **DREAM_KLASS), dict(seed=1234, temperature=0.2, top_p=0.95, **DREAM_KLASS))
    with torch.no_grad():
        dream_out = [dream(ids).logits] + [_dream_generate(dream, **kwargs) for kwargs in runs]

    generate_file = built.root / "installed_generate.py"
    generate_file.write_text(TOY_LLADA_GENERATE.read_text() + installer.shim("llada", "standin"))
    generate = load_file(generate_file).generate  # imported first, as LLaDA's scripts do
    folder = built.root / "standin_llada_installed"
    shutil.copytree(built.llada_folder, folder)
    _own_code(folder)
    llada = _load(folder, "AutoModelForCausalLM")
    ids, mask = _llada_inputs()
    common = dict(steps=8, gen_length=8, block_length=4, mask_id=255, **LLADA_KLASS)
    llada_out = generate(llada, ids, mask, **common)
    assert set(_applied_by_file()) == (set(_expected("dream")) | set(_expected("llada")) if TF5 else set())

    klass_patch.apply()  # for the references: the saved models' objects, patched
    ids, _ = _dream_inputs()
    with torch.no_grad():
        assert torch.equal(dream_out[0], built.dream(ids).logits)
    for out, kwargs in zip(dream_out[1:], runs):
        assert "used_steps" in out and _equal(out, _dream_generate(built.dream, **kwargs)), kwargs
    ids, mask = _llada_inputs()
    assert torch.equal(llada_out, generate(built.llada, ids, mask, **common))


def test_applied_is_empty_on_transformers_4(built):
    if TF5:
        pytest.skip(f"transformers {VERSION}: the shims apply (see the other tests)")
    klass_patch.apply()
    _load(built.dream_folder)
    _load(built.llada_folder, "AutoModelForCausalLM")
    assert compat.applied() == {}


def test_revert_puts_every_attribute_back(built):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    for folder, config in ((built.dream_folder, DREAM_CONFIG), (built.llada_folder, LLADA_CONFIG)):
        for reference in config["auto_map"].values():  # imported, not shimmed (no model is built)
            get_class_from_dynamic_module(reference, str(folder))
    modules = _remote_modules()
    assert {m.__name__.rsplit(".", 1)[-1] for m in modules} >= {"modeling_dream", "generation_utils",
                                                                 "modeling_llada", "configuration_llada"}
    loader = importlib.machinery.SourceFileLoader
    before, before_loader = _snapshot(modules), dict(vars(loader))
    klass_patch.apply()
    _load(built.dream_folder)
    _load(built.llada_folder, "AutoModelForCausalLM")
    in_place = _applied_by_file()
    assert in_place == {**_expected("dream"), **_expected("llada")}
    attributes = {attr for _, _, records in compat._applied.values() for _, attr, _ in records}
    hooked = dict(vars(loader))
    klass_patch.revert()  # KLASS's patch only: the shims stay (and the hook, for them, where there are any)
    assert _applied_by_file() == in_place and dict(vars(loader)) == (hooked if TF5 else before_loader)
    if TF5:
        with pytest.warns(RuntimeWarning, match=r"revert\(compat=True\) removed transformers .* and \d+ more: "):
            klass_patch.revert(compat=True)
    else:
        klass_patch.revert(compat=True)
    assert compat.applied() == {}
    after = _snapshot(modules)
    changed = sorted(".".join(k) for k in before.keys() | after.keys()
                     if before.get(k, "absent") is not after.get(k, "absent") and (k in before or k[-1] in attributes))
    assert changed == []
    assert dict(vars(loader)) == before_loader


# ------------------------------------------------------------------------- revert() keeps the shims (item 2)
def _fresh_copy(built, folder, name):
    """A copy of a saved model folder that loads its own code: new remote-code modules (through the import hook)."""
    copy = built.root / name
    shutil.copytree(folder, copy)
    _own_code(copy)
    return copy


def _llada_logits(model):
    with torch.no_grad():
        return model(_llada_inputs()[0]).logits


def test_revert_keeps_what_loaded_models_and_new_loads_need(built):
    """Issue 18, item 2: after apply(), load, revert(), the loaded Dream still generates with upstream's algorithms
    (maskgit_plus; on 5.x it failed: validate() got 'user_set_attributes'), KLASS is gone, and Dream and LLaDA still
    load (they failed: KeyError 'default', no 'all_tied_weights_keys'). revert(compat=True) removes the shims and
    says what stops working."""
    klass_patch.apply()
    dream = _load(built.dream_folder)
    llada = _load(built.llada_folder, "AutoModelForCausalLM")
    greedy = dict(alg="maskgit_plus", temperature=0.0)
    expected = {"maskgit": _dream_generate(dream, **greedy), "sampled": _dream_generate(dream, 1234, alg="origin"),
                "llada": _llada_logits(llada)}
    assert _equal(expected["maskgit"], _dream_generate(built.dream, **greedy))
    assert "used_steps" in _dream_generate(dream, temperature=0.0, **DREAM_KLASS)
    shimmed = _applied_by_file()

    assert klass_patch.revert() == {}
    assert _applied_by_file() == shimmed and klass_patch.patched() == []
    with pytest.raises(RuntimeError, match="Unknown alg: klass"):  # KLASS's patch is undone, as before
        _dream_generate(dream, temperature=0.0, **DREAM_KLASS)
    assert _equal(_dream_generate(dream, **greedy), expected["maskgit"])
    assert _equal(_dream_generate(dream, 1234, alg="origin"), expected["sampled"])
    assert torch.equal(_llada_logits(llada), expected["llada"])
    # new loads, of new remote-code modules too
    again = _load(_fresh_copy(built, built.dream_folder, "standin_dream_after_revert"))
    assert _equal(_dream_generate(again, **greedy), expected["maskgit"])
    again = _load(_fresh_copy(built, built.llada_folder, "standin_llada_after_revert"), "AutoModelForCausalLM")
    assert torch.equal(_llada_logits(again), expected["llada"])

    if not TF5:
        assert klass_patch.revert(compat=True) == {}  # nothing to remove on 4.x
        assert _equal(_dream_generate(dream, **greedy), expected["maskgit"])
        return
    with pytest.warns(RuntimeWarning, match=r"revert\(compat=True\) removed .* now fail"):
        removed = klass_patch.revert(compat=True)
    assert {name.rsplit(".", 1)[-1] for name in removed if name.startswith(MINE)} >= set(shimmed)
    assert compat.applied() == {}
    with pytest.raises((TypeError, AttributeError)):  # validate(user_set_attributes=...) on 5.23+, 'eps' before
        _dream_generate(dream, **greedy)
    with pytest.raises(KeyError, match="default"):
        _load(_fresh_copy(built, built.dream_folder, "standin_dream_after_revert_compat"))


def test_revert_keeps_installed_files_working_and_patched_lists_them(built):
    """Item 2 through the installed route (no apply()), and item 12e: patched() lists the installed files."""
    from klass_patch import installer
    generate_file = built.root / "installed_generate_for_revert.py"
    generate_file.write_text(TOY_LLADA_GENERATE.read_text() + installer.shim("llada", "standin"))
    generate = load_file(generate_file).generate  # imported first, as LLaDA's scripts do
    assert [(i.family, i.version, i.file) for i in klass_patch.patched()] == \
        [("llada", "standin (installed file)", str(generate_file))]
    klass_patch.revert()  # before the model is loaded: what installed generate.py put in place for it stays
    llada = _load(_fresh_copy(built, built.llada_folder, "standin_llada_installed_revert"), "AutoModelForCausalLM")

    folder = _fresh_copy(built, built.dream_folder, "standin_dream_installed_revert")
    with open(folder / "generation_utils.py", "a") as f:
        f.write(installer.shim("dream", "standin"))
    dream = _load(folder)
    infos = sorted((i.family, i.version, Path(i.file).name) for i in klass_patch.patched())
    assert infos == [("dream", "standin (installed file)", "generation_utils.py"),
                     ("llada", "standin (installed file)", generate_file.name)]

    ids, mask = _llada_inputs()
    common = dict(steps=8, gen_length=8, block_length=4, mask_id=255, **LLADA_KLASS)
    runs = (dict(alg="maskgit_plus", temperature=0.0), dict(temperature=0.0, **DREAM_KLASS))

    def outputs():
        return [_dream_generate(dream, **kwargs) for kwargs in runs] + [generate(llada, ids, mask, **common)]
    before = outputs()
    assert "used_steps" in before[1]
    klass_patch.revert()  # installed files stay patched; their models keep their shims
    assert all(map(_equal, outputs(), before))
    assert sorted((i.family, i.version, Path(i.file).name) for i in klass_patch.patched()) == infos
    again = _load(_fresh_copy(built, folder, "standin_dream_installed_revert_again"))
    assert _equal(_dream_generate(again, **runs[1]), before[1])


# ------------------------------------------------------------------ L4 is for the building thread only (item 13c)
@needs_tf5
def test_l4_leaves_torch_init_alone_in_other_threads(built, monkeypatch):
    """While one thread loads LLaDA (L4: torch.nn.init a no-op, as 4.46.2's no_init_weights()), another thread
    builds a torch model: it is initialised as usual (before: torch.nn.init was a no-op process-wide, so its weights
    were whatever torch.empty left)."""
    import threading
    klass_patch.apply()
    inner = type(_load(built.llada_folder, "AutoModelForCausalLM").model)  # the stand-in's LLaDAModel
    inside, built_meanwhile = threading.Event(), threading.Event()
    original = inner.__init__

    def pausing(self, *args, **kwargs):  # inside L4's window: let the other thread build, then go on
        original(self, *args, **kwargs)
        inside.set()
        assert built_meanwhile.wait(60)
    monkeypatch.setattr(inner, "__init__", pausing)
    torch.manual_seed(5)
    reference = torch.nn.Linear(32, 32).weight.detach().clone()
    loaded, errors, weights = [], [], []

    def load():
        try:
            loaded.append(_load(built.llada_folder, "AutoModelForCausalLM"))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
            inside.set()
    loader = threading.Thread(target=load)
    loader.start()
    try:
        assert inside.wait(60)
        torch.manual_seed(5)
        weights.append(torch.nn.Linear(32, 32).weight.detach().clone())
    finally:
        built_meanwhile.set()
        loader.join(60)
    assert errors == [] and len(loaded) == 1
    assert torch.equal(weights[0], reference), "a model built in another thread during the LLaDA load was not initialised"
    assert torch.equal(_llada_logits(loaded[0]), _llada_logits(built.llada))
    assert not any(hasattr(getattr(torch.nn.init, n), "__klass_compat_skipping__") for n in compat._TORCH_INIT_FUNCTIONS)


# ------------------------------------------------------------------------------------------------- native model
def test_native_model_is_unchanged_by_apply(tmp_path, monkeypatch):
    # transformers 5.23's processing_utils, imported with the first native model, re-executes transformers/__init__
    # (direct_transformers_import) and puts the new module in sys.modules: put back the one the session imported
    monkeypatch.setitem(sys.modules, "transformers", sys.modules["transformers"])
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))

    def run():
        model, untouched = _rng_untouched(lambda: transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)))
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.manual_seed(7)
        sampled = model.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9, pad_token_id=0)
        return {"untouched": untouched, "logits": logits, "greedy": greedy, "sampled": sampled,
                "generation_config": model.generation_config.to_dict(),
                "state": {k: v.clone() for k, v in model.state_dict().items()},
                "buffers": {k: v.clone() for k, v in model.named_buffers()}}
    plain = run()
    klass_patch.apply()
    shimmed = run()
    assert [k for k in plain if not _equal(plain[k], shimmed[k])] == []
    assert not any("llama" in name for name in compat.applied())
