"""klass_patch.compat: transformers-5 shims for Dream's and LLaDA's remote code.

Here (transformers 4.x): the registry is well-formed, version gating picks the right entries, apply() changes
nothing transformers-related, and the shims' mechanics (apply, idempotence, revert by identity) on look-alike classes.

With the real remote code and a transformers 5.x python (KLASS_PATCH_UPSTREAM, KLASS_PATCH_LLADA_MODEL,
KLASS_PATCH_TF5_PYTHON, KLASS_PATCH_TF4_PYTHON; see SKIP_*): tiny Dream and LLaDA models compute bitwise the same on
transformers 5.x with klass_patch.apply() as on 4.x; a native model is unchanged by apply(); revert() restores
every attribute. The other pythons run tests/compat_worker.py in subprocesses.
"""
import importlib.machinery
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import klass_patch
from klass_patch import compat, patching

transformers = pytest.importorskip("transformers")

HERE = Path(__file__).parent
REPO = HERE.parent
WORKER = HERE / "compat_worker.py"
UPSTREAM = os.environ.get("KLASS_PATCH_UPSTREAM")
LLADA_MODEL = os.environ.get("KLASS_PATCH_LLADA_MODEL")
TF5_PYTHON = os.environ.get("KLASS_PATCH_TF5_PYTHON")
# the reference is Dream's documented 4.46.2 (on 4.57, Dream's own save_pretrained already fails: validate(strict=))
TF4_PYTHON = os.environ.get("KLASS_PATCH_TF4_PYTHON") or (sys.executable if transformers.__version__.startswith("4.46.")
                                                          else None)
SKIP_UPSTREAM = ("Dream's real remote code not given: set KLASS_PATCH_UPSTREAM=<folder> holding dream-model/*.py and "
                 "dream/<version>/generation_utils.py")
SKIP_TF5 = "no transformers 5.x python given: set KLASS_PATCH_TF5_PYTHON=<python with transformers 5.x and torch>"
SKIP_TF4 = ("no transformers 4.x python: set KLASS_PATCH_TF4_PYTHON=<python with transformers 4.46.2 and torch> "
            "(this one has transformers " + transformers.__version__ + ")")
SKIP_LLADA_MODEL = ("LLaDA's model code not given: set KLASS_PATCH_LLADA_MODEL=<folder with modeling_llada.py and "
                    "configuration_llada.py> (and KLASS_PATCH_UPSTREAM with llada/<version>/generate.py)")


def _touched_by_apply(module):
    """A module that ``klass_patch.apply()`` (no argument) looks into: compat's class names, or a KLASS target."""
    namespace = getattr(module, "__dict__", None)
    return isinstance(namespace, dict) and (any(name in namespace for name in compat._CLASS_NAMES) or
                                            patching._family_of(module) is not None)


@pytest.fixture(autouse=True)
def _no_lookalike_left_behind():
    """A look-alike module (the shims' class names, not upstream's code) left in sys.modules makes every later
    ``apply()`` in the session warn about it, in other files' tests too (issue 18, item 12g: 30 to 78
    RuntimeWarnings). The test that leaves one fails here; the module is removed all the same."""
    before = set(sys.modules)
    yield
    left = sorted(name for name in set(sys.modules) - before if _touched_by_apply(sys.modules[name]))
    for name in left:
        del sys.modules[name]
    assert left == [], f"left in sys.modules, where every later klass_patch.apply() would warn about them: {left}"


# --------------------------------------------------------------------------------- here, transformers 4.x
def test_registry_is_well_formed():
    names = [shim.name for shim in compat.SHIMS]
    assert len(names) == len(set(names)) == 12
    for shim in compat.SHIMS:
        assert isinstance(shim.versions, SpecifierSet) and str(shim.versions)
        assert shim.family in ("dream", "llada") and shim.name[0] == shim.family[0].upper()
        assert shim.fixes and "\n" not in shim.fixes and callable(shim.applies_to) and callable(shim.replacements)


@pytest.mark.parametrize("version, expected", [
    ("4.46.2", []),
    ("4.57.6", []),
    ("5.0.0", [s.name for s in compat.SHIMS]),
    ("5.13.0", [s.name for s in compat.SHIMS if not s.name.startswith("D8")]),
    ("5.23.0", [s.name for s in compat.SHIMS if not s.name.startswith("D8")]),
    ("5.24.0", [s.name for s in compat.SHIMS if not s.name.startswith("D8")]),
    ("5.25.0", [s.name for s in compat.SHIMS if not s.name.startswith("D8")]),
])
def test_version_gating_chooses_the_entries(version, expected):
    assert [s.name for s in compat.shims_for(version)] == expected
    assert [s.name for s in compat.shims_for(Version(version))] == expected


def test_import_klass_patch_imports_neither_transformers_nor_torch():
    code = ("import sys, klass_patch, klass_patch.compat; "
            "print(sorted(m for m in ('transformers', 'torch', 'wrapt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


def _lookalike_module(name="transformers_modules.fake.modeling_fake"):
    """A module with the class names and bases the shims look for (not upstream's code: just their shapes)."""
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    module = types.ModuleType(name)

    def cls(class_name, bases=(), **attrs):
        made = type(class_name, bases, {"__module__": name, **attrs})
        setattr(module, class_name, made)
        return made

    cls("DreamRotaryEmbedding", (torch.nn.Module,))
    cls("DreamGenerationConfig", (GenerationConfig,), validate=lambda self, is_init=False: None)
    pretrained = cls("DreamPreTrainedModel", (PreTrainedModel,), _init_weights=lambda self, module: None)
    mixin = cls("DreamGenerationMixin")
    cls("DreamModel", (mixin, pretrained), _tied_weights_keys=["lm_head.weight"])
    cls("LLaDAModelLM", (PreTrainedModel,), __init__=lambda self, config: None, tie_weights=lambda self: None)
    cls("LLaDAConfig", (PretrainedConfig,), model_type="llada", __init__=lambda self, use_cache=False, **kw: None)
    module.ROPE_INIT_FUNCTIONS = {k: v for k, v in ROPE_INIT_FUNCTIONS.items() if k != "default"}
    return module


def _snapshot(module):
    out = {("module", k): v for k, v in vars(module).items()}
    for name, value in vars(module).items():
        if isinstance(value, type):
            out.update({(name, k): v for k, v in vars(value).items()})
    return out


def _transformers_snapshot():
    """Every attribute of every transformers module imported, and of the classes they define, by identity."""
    out = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "transformers" and isinstance(module, types.ModuleType):
            for k, v in list(vars(module).items()):
                out[(name, k)] = v
                if isinstance(v, type) and v.__module__ == name:
                    out.update({(name, k, a): x for a, x in list(vars(v).items())})
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")  # about other tests' stand-ins
@pytest.mark.skipif(not transformers.__version__.startswith("4."), reason="for transformers 4.x (here: 5.x)")
def test_apply_changes_nothing_on_transformers_4():
    module = _lookalike_module()
    sys.modules[module.__name__] = module
    try:
        before, before_module = _transformers_snapshot(), _snapshot(module)
        klass_patch.apply()
        assert compat.applied() == {}
        assert _snapshot(module) == before_module
        after = _transformers_snapshot()
        assert [k for k in before if k in after and after[k] is not before[k]] == []
    finally:
        sys.modules.pop(module.__name__)


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")  # about other tests' stand-ins
def test_shims_apply_once_and_revert_by_identity(monkeypatch):
    """As if on transformers 5.0.0: every shim applies to the look-alike classes, twice is once, revert() puts
    back every object (and removes those it added)."""
    from transformers import modeling_rope_utils
    module = _lookalike_module()
    before, rope = _snapshot(module), dict(modeling_rope_utils.ROPE_INIT_FUNCTIONS)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.0.0")
    assert compat.apply_to(module) == [s.name for s in compat.SHIMS]
    shimmed = _snapshot(module)
    assert compat.apply_to(module) == [s.name for s in compat.SHIMS]
    assert _snapshot(module) == shimmed and all(shimmed[k] is v for k, v in _snapshot(module).items())
    assert compat.applied() == {module.__name__: [s.name for s in compat.SHIMS]}
    changed = {k for k in before.keys() | shimmed.keys() if before.get(k, "absent") is not shimmed.get(k, "absent")}
    assert changed == {("module", "ROPE_INIT_FUNCTIONS"), ("DreamGenerationConfig", "validate"),
                       ("DreamGenerationConfig", "from_model_config"), ("DreamGenerationConfig", "from_pretrained"),
                       ("DreamGenerationConfig", "_tf4_legacy_generation_defaults"),
                       ("DreamPreTrainedModel", "_init_weights"), ("DreamModel", "_tied_weights_keys"),
                       ("DreamGenerationMixin", "__init_subclass__"),
                       ("LLaDAModelLM", "__init__"), ("LLaDAModelLM", "tie_weights"), ("LLaDAConfig", "__init__")}
    assert modeling_rope_utils.ROPE_INIT_FUNCTIONS == rope  # transformers' own table is left alone
    klass_patch.revert()  # KLASS's patch only: the shims stay (what is loaded needs them)
    assert compat.applied() == {module.__name__: [s.name for s in compat.SHIMS]}
    assert _snapshot(module).keys() == shimmed.keys() and all(_snapshot(module)[k] is v for k, v in shimmed.items())
    with pytest.warns(RuntimeWarning, match=r"revert\(compat=True\) removed transformers 5\.0\.0's"):
        assert klass_patch.revert(compat=True) == {module.__name__: [s.name for s in compat.SHIMS]}
    assert compat.applied() == {}
    after = _snapshot(module)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")  # about other tests' stand-ins
def test_modeling_module_shimmed_when_it_derives_from_a_shimmed_mixin(monkeypatch):
    """The installed route: once a generation_utils-like module is shimmed, a module that is being executed gets its
    shims when it defines a class on the mixin (modeling_dream.py's DreamModel, its last class), before it ends."""
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.0.0")
    generation = _lookalike_module("transformers_modules.fake.generation_utils")
    compat.apply_to(generation)
    modeling = types.ModuleType("transformers_modules.fake.modeling_late")
    monkeypatch.setitem(sys.modules, modeling.__name__, modeling)
    parts = _lookalike_module(modeling.__name__)  # the classes modeling_dream.py defines before DreamModel
    modeling.__dict__.update({k: v for k, v in vars(parts).items() if k.startswith(("Dream", "ROPE")) and
                              k not in ("DreamModel", "DreamGenerationMixin", "DreamGenerationConfig")})
    seen = {}
    exec("class DreamModel(DreamGenerationMixin, DreamPreTrainedModel):\n"
         "    _tied_weights_keys = ['lm_head.weight']\n"
         "seen['applied'] = dict(compat.applied())\n",
         {**vars(modeling), "DreamGenerationMixin": generation.DreamGenerationMixin, "compat": compat, "seen": seen})
    assert {"D1-rope-default", "D3-rotary-init", "D6-tied-weights-mapping"} <= set(seen["applied"][modeling.__name__])
    assert isinstance(modeling.DreamModel._tied_weights_keys, dict)
    klass_patch.revert()  # kept: an installed generation_utils.py's models need them
    assert "__init_subclass__" in vars(generation.DreamGenerationMixin)
    klass_patch.revert(compat=True)
    assert "__init_subclass__" not in vars(generation.DreamGenerationMixin) and compat.applied() == {}


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")  # about other tests' stand-ins
def test_through_the_import_hook_on_transformers_5(monkeypatch, tmp_path):
    """apply()'s one exec_module hook applies the shims to a module executed later; revert() removes both."""
    source = tmp_path / "lookalike.py"
    source.write_text("import sys\nglobals().update(sys.modules['_compat_test_maker'].make(__name__))\n")
    maker = types.ModuleType("_compat_test_maker")
    maker.make = lambda name: {k: v for k, v in vars(_lookalike_module(name)).items() if not k.startswith("__")}
    monkeypatch.setitem(sys.modules, "_compat_test_maker", maker)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.23.0")
    loader = importlib.machinery.SourceFileLoader
    own, inherited = loader.__dict__.get("exec_module"), loader.exec_module
    klass_patch.apply()
    klass_patch.apply()
    assert loader.exec_module.__wrapped__ is inherited  # one hook, not two
    from conftest import load_file
    name = "_klass_test_lookalike_hook"
    monkeypatch.setitem(sys.modules, name, None)  # load_file puts it there; removed after the test (item 12g)
    module = load_file(source, name)
    assert compat.applied()[module.__name__] == [s.name for s in compat.shims_for("5.23.0")]  # (others: other tests' modules)
    assert "default" in module.ROPE_INIT_FUNCTIONS
    klass_patch.revert()  # the shims, and the hook for them, stay: a module imported now is still shimmed
    assert loader.exec_module.__wrapped__ is inherited and "default" in module.ROPE_INIT_FUNCTIONS
    monkeypatch.setitem(sys.modules, name + "_later", None)
    later = load_file(source, name + "_later")
    assert "default" in later.ROPE_INIT_FUNCTIONS and later.__name__ in compat.applied()
    klass_patch.revert(compat=True)
    assert "default" not in module.ROPE_INIT_FUNCTIONS and compat.applied() == {}
    assert loader.__dict__.get("exec_module") is own


# ----------------------------------------------------------- the real remote code, transformers 4.x vs 5.x
def _python_path(python, tmp):
    """PYTHONPATH for ``python``: the repository, and klass-patch's own dependencies (wrapt) from this python when
    that one lacks them and runs the same Python version (a folder holding a link to them)."""
    paths = [str(REPO)]
    probe = "import sys, wrapt, packaging; print(sys.version_info[:2])"
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        version = subprocess.run([python, "-c", "import sys; print(tuple(sys.version_info[:2]))"],
                                 capture_output=True, text=True).stdout.strip()
        if version != str(tuple(sys.version_info[:2])):
            pytest.skip(f"{python} lacks wrapt (klass-patch's dependency) and runs another Python: pip install wrapt")
        import wrapt
        deps = tmp / "deps"
        deps.mkdir(exist_ok=True)
        if not (deps / "wrapt").exists():
            (deps / "wrapt").symlink_to(Path(wrapt.__file__).parent)
        paths.append(str(deps))
    return os.pathsep.join(paths)


def _worker(python, tmp, *args, env=()):
    env = {**os.environ, "PYTHONPATH": _python_path(python, tmp), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", **dict(env)}
    done = subprocess.run([python, str(WORKER), *map(str, args)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{python} {WORKER.name} {' '.join(map(str, args))}:\n{done.stderr[-4000:]}"
    return done


def _version_of(python):
    done = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _newest(paths):
    return sorted(paths, key=lambda p: ("head" in p.parent.name, p.parent.name))[-1] if paths else None


def _llada_generate():
    """LLaDA's newest generate.py, the one that takes attention_mask."""
    if not UPSTREAM:
        return None
    files = [p for p in Path(UPSTREAM).glob("llada/*/generate.py")
             if "attention_mask" in p.read_text().split("def generate(", 1)[-1].split(")", 1)[0]]
    return _newest(files)


def _bitwise_equal(x, y):
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        # dtype, shape and bytes (torch.equal alone would call -0.0 and 0.0 equal)
        return x.dtype == y.dtype and x.shape == y.shape and \
            bytes(x.contiguous().view(torch.uint8).numpy()) == bytes(y.contiguous().view(torch.uint8).numpy())
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_bitwise_equal(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(map(_bitwise_equal, x, y))
    return type(x) is type(y) and x == y


@pytest.fixture(scope="module")
def tf5():
    if not TF5_PYTHON:
        pytest.skip(SKIP_TF5)
    version = _version_of(TF5_PYTHON)
    if version is None or Version(version).major < 5:
        pytest.skip(f"KLASS_PATCH_TF5_PYTHON={TF5_PYTHON} has transformers {version}, not 5.x")
    return TF5_PYTHON


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny Dream (and LLaDA) folders from the real remote code, built on transformers 4.x; and what 4.x computes
    with them (klass_patch.apply()'d, for KLASS)."""
    if not UPSTREAM:
        pytest.skip(SKIP_UPSTREAM)
    if not TF4_PYTHON or not (_version_of(TF4_PYTHON) or "").startswith("4.46."):
        pytest.skip(SKIP_TF4)
    root = Path(UPSTREAM)
    dream = sorted((root / "dream-model").glob("*.py")) + [_newest(sorted(root.glob("dream/*/generation_utils.py")))]
    if len(dream) < 3 or None in dream:
        pytest.skip(f"{SKIP_UPSTREAM} (found {dream})")
    llada = sorted(Path(LLADA_MODEL).glob("*_llada.py")) if LLADA_MODEL else []
    tmp = tmp_path_factory.mktemp("compat")
    models = tmp / "models"
    models.mkdir()
    _worker(TF4_PYTHON, tmp, "build", models, *dream, *(["--llada", *llada] if llada else []))
    generate = _llada_generate() if llada else None
    extra = ["--llada-generate", generate] if generate else []
    _worker(TF4_PYTHON, tmp, "run", models, tmp / "tf4.pt", "--apply", *extra)
    return types.SimpleNamespace(tmp=tmp, models=models, extra=extra, llada=bool(generate), llada_model=bool(llada),
                                 tf4=torch.load(tmp / "tf4.pt", weights_only=False))


def _report(a, b):
    return {k: ("EQUAL" if _bitwise_equal(a.get(k), b.get(k)) else "DIFFERS") for k in sorted(a.keys() | b.keys())}


@pytest.fixture(scope="module")
def report(tiny, tf5):
    """transformers 4.x against 5.x with klass_patch.apply(): 'EQUAL' or 'DIFFERS' (bitwise), per check."""
    _worker(tf5, tiny.tmp, "run", tiny.models, tiny.tmp / "tf5.pt", "--apply", *tiny.extra)
    report = _report(tiny.tf4, torch.load(tiny.tmp / "tf5.pt", weights_only=False))
    print(f"\ntransformers {_version_of(TF4_PYTHON)} vs {_version_of(tf5)}:", report)
    return report


def test_dream_on_transformers_5_equals_4_bitwise(report):
    dream = {k: v for k, v in report.items() if k.startswith("dream/") or k == "rng_state_after"}
    assert {"dream/logits", "dream/maskgit_plus_greedy", "dream/topk_margin_greedy", "dream/entropy_greedy",
            "dream/origin_t0.2", "dream/klass_greedy", "dream/klass_t0.2_p0.95"} <= set(dream)
    assert [k for k, v in dream.items() if v != "EQUAL"] == [], dream


def test_installed_dream_on_transformers_5_equals_4_bitwise_without_apply(tiny, tf5, tmp_path):
    """A Dream folder whose generation_utils.py `klass-patch install` rewrote loads, runs and generates (KLASS too) on
    5.x in a fresh process that never calls apply(), bitwise as 4.x with apply()."""
    import shutil
    from klass_patch import installer
    folder = tmp_path / "models" / "dream"
    shutil.copytree(tiny.models / "dream", folder)
    result = installer.install(installer.resolve("dream", folder), env={"HF_HOME": str(tmp_path / "hf")})
    assert result.action == "installed", result.describe()
    # a modules cache of its own: the original folder's copy of generation_utils.py (also "dream") would shadow it
    _worker(tf5, tiny.tmp, "run", folder.parent, tmp_path / "installed.pt",
            env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    installed = torch.load(tmp_path / "installed.pt", weights_only=False)
    report = _report({k: v for k, v in tiny.tf4.items() if k.startswith("dream/")},
                     {k: v for k, v in installed.items() if k.startswith("dream/")})
    assert {"dream/logits", "dream/klass_greedy", "dream/klass_t0.2_p0.95"} <= set(report)
    assert [k for k, v in report.items() if v != "EQUAL"] == [], report


def test_installed_llada_generate_imported_first_on_transformers_5_without_apply(tiny, tf5, tmp_path):
    """LLaDA's scripts import generate.py, then load the model: with generate.py rewritten by `klass-patch install`
    that is enough on 5.x (no apply()), bitwise as 4.x with apply()."""
    if not tiny.llada:
        pytest.skip(SKIP_LLADA_MODEL)
    import shutil
    from klass_patch import installer
    generate = tmp_path / "generate.py"
    shutil.copy(tiny.extra[1], generate)
    assert installer.install(installer.resolve("llada", generate)).action == "installed"
    shutil.copytree(tiny.models / "llada", tmp_path / "models" / "llada")  # LLaDA only
    _worker(tf5, tiny.tmp, "run", tmp_path / "models", tmp_path / "installed.pt", "--llada-generate", generate,
            env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    installed = torch.load(tmp_path / "installed.pt", weights_only=False)
    report = _report({k: v for k, v in tiny.tf4.items() if k.startswith("llada/")},
                     {k: v for k, v in installed.items() if k.startswith("llada/")})
    assert {"llada/logits", "llada/default", "llada/klass", "llada/klass_t0.7"} <= set(report)
    assert [k for k, v in report.items() if v != "EQUAL"] == [], report


def test_llada_on_transformers_5_equals_4_bitwise(tiny, report):
    if not tiny.llada:
        pytest.skip(SKIP_LLADA_MODEL)
    llada = {k: v for k, v in report.items() if k.startswith("llada/") or k == "rng_state_after"}
    assert {"llada/logits", "llada/default", "llada/random", "llada/klass", "llada/klass_t0.7"} <= set(llada)
    assert [k for k, v in llada.items() if v != "EQUAL"] == [], llada


def test_native_model_on_transformers_5_unchanged_by_apply(tf5, tmp_path):
    _worker(tf5, tmp_path, "native", tmp_path / "plain.pt")
    _worker(tf5, tmp_path, "native", tmp_path / "applied.pt", "--apply")
    report = _report(torch.load(tmp_path / "plain.pt", weights_only=False),
                     torch.load(tmp_path / "applied.pt", weights_only=False))
    assert [k for k, v in report.items() if v != "EQUAL"] == [], report


def test_revert_restores_every_attribute_on_transformers_5(tiny, tf5):
    import json
    _worker(tf5, tiny.tmp, "revert", tiny.models, tiny.tmp / "revert.json")
    result = json.loads((tiny.tmp / "revert.json").read_text())
    names = {n for shims in result["shimmed"].values() for n in shims}
    assert {s.name for s in compat.shims_for(_version_of(tf5)) if s.family == "dream"} <= names
    if tiny.llada_model:
        assert {s.name for s in compat.shims_for(_version_of(tf5)) if s.family == "llada"} <= names
    assert set(result["ran"]) == ({"dream", "llada"} if tiny.llada_model else {"dream"})
    # revert() (issue 18, item 2): the loaded models and new loads still run as before; KLASS is gone
    kept = result["kept"]
    assert kept.pop("returned") == {} and kept.pop("dream/klass_error").startswith("RuntimeError: Unknown alg")
    assert kept == {"applied_after": True, **{f"{family}/{check}": True for family in result["ran"]
                                              for check in ("same_logits", "new_load_same_logits")},
                    "dream/maskgit_plus": True}
    # revert(compat=True): every attribute as before apply(), and it says what stops working
    assert set(result["shimmed"]) <= set(result["removed"]) and len(result["warned"]) == 1
    assert "compat=True" in result["warned"][0]
    if Version(_version_of(tf5)) >= Version("5.23"):  # update() calls validate(user_set_attributes=...) from 5.23
        assert "validate() got an unexpected keyword argument" in result["broken"]["dream/maskgit_plus"]
    assert result["changed"] == [] and result["loader_restored"] and result["applied_after"] == {}
