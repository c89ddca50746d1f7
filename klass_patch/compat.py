"""transformers 5.x compatibility shims for Dream's and LLaDA's Hugging Face remote code.

With them, Dream (``modeling_dream.py``, ``configuration_dream.py``, ``generation_utils.py``) and LLaDA
(``modeling_llada.py``, ``configuration_llada.py``) load, run, generate and save on transformers 5.x with results
bitwise equal to transformers 4.46.2 (checked on 5.0.0, 5.23.0, 5.24.0 and 5.25.0 with torch 2.13 on the CPU:
tests/test_compat.py; 5.25.0 with ``USE_HUB_KERNELS=0``, its ``kernels`` >= 0.19.1 being out of reach there).

Scope: a shim changes only remote-code classes, found in the executed module by class name (and base class name);
no transformers function or native class is touched, so native models behave exactly as without the shims.

When: several breakages fire inside ``from_pretrained(..., trust_remote_code=True)``, which imports the remote code
and builds the model in one call, so the shims must be in place before it. ``klass_patch.apply()`` (no argument)
applies them to the matching modules already imported and, through its import hook, to every module executed later;
``klass_patch.revert()`` keeps them (the models loaded with them need them), ``klass_patch.revert(compat=True)``
undoes them; ``applied()`` says what is in place. On transformers < 5 nothing is applied.

Installed route (a ``generation_utils.py`` rewritten by ``klass-patch install``, no ``apply()``): Dream's
``modeling_dream.py`` imports that file before it defines its own classes, so no import hook can be in place before
it runs. Instead, shimming a module that defines ``DreamGenerationMixin`` also gives the mixin an
``__init_subclass__``: when ``modeling_dream.py`` defines ``DreamModel(DreamGenerationMixin, ...)``, its last class,
the shims are applied to that module, before any model is built.

Each entry of ``SHIMS``: name, family, the transformers versions that need it (a ``SpecifierSet``), what it fixes
(one line), ``applies_to(module)`` and ``apply(module) -> undo records``; ``undo(records)`` is shared.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["SHIMS", "Shim", "shims_for", "transformers_version", "apply_to", "applied", "revert", "undo"]

_MISSING = object()
_TAG = "__klass_compat__"  # set on every function a shim puts in place: the shim's name


# ------------------------------------------------------------------------------------------------- helpers
def _tags(obj) -> set:
    """The shim names on ``obj`` and on everything it wraps (``functools.wraps``' ``__wrapped__`` chain)."""
    tags = set()
    for _ in range(50):  # a bound on the chain
        obj = getattr(obj, "__func__", obj)  # classmethod / staticmethod
        tags.add(getattr(obj, _TAG, None))
        obj = getattr(obj, "__wrapped__", None)
        if obj is None:
            break
    return tags - {None}


def undo(records) -> None:
    """Undo ``(owner, attribute, previous value)`` records, last first (an attribute that was absent is removed)."""
    for owner, attr, old in reversed(records):
        if old is not _MISSING:
            setattr(owner, attr, old)
        elif attr in owner.__dict__:
            delattr(owner, attr)


def _cls(module, name, base=None):
    """The class ``name`` that ``module`` defines itself, and (if ``base`` is given) that derives from a class so
    named; else None."""
    obj = module.__dict__.get(name)
    if isinstance(obj, type) and obj.__module__ == module.__name__ and \
            (base is None or any(b.__name__ == base for b in obj.__mro__[1:])):
        return obj
    return None


def _takes_no_var_kwargs(function) -> bool:
    return not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())


# -------------------------------------------------------------------------------------------- Dream shims
def _v4_default_rope(config=None, device=None, seq_len=None, **rope_kwargs):
    """transformers 4.46.2's ``_compute_default_rope_parameters``: (inverse frequencies, attention factor 1.0)."""
    import torch
    if config is not None and rope_kwargs:
        raise ValueError("`**rope_kwargs` and `config` are mutually exclusive in `_compute_default_rope_parameters`")
    if rope_kwargs:
        base, dim = rope_kwargs["base"], rope_kwargs["dim"]
    else:
        base = config.rope_theta
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim)), 1.0


def _d1_rope_default(m):
    # 5.x's ROPE_INIT_FUNCTIONS has no "default" entry (default rope moved into each model). Give the Dream module
    # its own copy of the table with 4.46.2's entry; transformers' table (used by native models) is left alone.
    return [(m, "ROPE_INIT_FUNCTIONS", {**m.ROPE_INIT_FUNCTIONS, "default": _v4_default_rope})]


def _d2_validate_kwargs(m):
    # 5.x calls validate(strict=...) from save_pretrained() and, in later versions (5.23), validate(user_set_attributes=
    # ...) from update() while loading; Dream's validate(self, is_init=False) is a no-op: keep it one for any arguments.
    cls = m.DreamGenerationConfig
    original = cls.__dict__["validate"]

    @functools.wraps(original)
    def validate(self, is_init=False, *args, **kwargs):
        return original(self, is_init)
    return [(cls, "validate", validate)]


def _d3_rotary_init(m):
    # 5.x builds the model on the meta device, then replaces every non-persistent buffer with torch.empty_like;
    # only _init_weights can refill them, and Dream's knows only Linear/Embedding. Recompute inv_freq as 4.46.2 did
    # in __init__ (on the CPU, then moved) and re-point original_inv_freq at it (as Dream's reset_parameters does).
    import torch
    cls, rotary = m.DreamPreTrainedModel, m.DreamRotaryEmbedding
    original = cls.__dict__["_init_weights"]

    @functools.wraps(original)
    def _init_weights(self, module):
        if not isinstance(module, rotary):
            return original(self, module)
        device = module.inv_freq.device
        inv_freq, module.attention_scaling = module.rope_init_fn(module.config, torch.device("cpu"),
                                                                 **module.rope_kwargs)
        module.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        module.original_inv_freq = module.inv_freq
    return [(cls, "_init_weights", _init_weights)]


# The generation parameters a 4.x PretrainedConfig always carried (4.46.2's _get_global_generation_defaults);
# 5.x configs drop them. 4.x's GenerationConfig.from_model_config(model.config) read them: this is where Dream's
# temperature 1.0 / top_k 50 / top_p 1.0 come from when diffusion_generate() gets neither a generation config nor
# a temperature.
_V4_GENERATION_DEFAULTS = {
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False,
    "return_dict_in_generate": False, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None,
}


def _d4_from_model_config(m):
    # 4.46.2's GenerationConfig.from_model_config, for Dream's class only, with the legacy defaults of D5. 5.x's
    # compares every attribute of the new config with a plain GenerationConfig() (getattr(default, "eps") fails);
    # 4.46.2 did that only for a config whose decoder text config is another object, never so for Dream.
    def from_model_config(klass, model_config):
        config_dict = model_config.to_dict()
        for key, value in getattr(klass, "_tf4_legacy_generation_defaults", {}).items():
            config_dict.setdefault(key, value)
        config_dict.pop("_from_model_config", None)
        config_dict = {key: value for key, value in config_dict.items() if value is not None}
        generation_config = klass.from_dict(config_dict, return_unused_kwargs=False, _from_model_config=True)
        if generation_config.return_dict_in_generate is False and any(
                getattr(generation_config, flag, False)
                for flag in ("output_attentions", "output_hidden_states", "output_scores", "output_logits")):
            generation_config.return_dict_in_generate = True
        generation_config._original_object_hash = hash(generation_config)
        return generation_config
    return [(m.DreamGenerationConfig, "from_model_config", classmethod(from_model_config))]


def _d5_legacy_defaults(m):
    # Feed 4.x's legacy generation defaults to D4's from_model_config, for the keys a 5.x model config lacks.
    return [(m.DreamGenerationConfig, "_tf4_legacy_generation_defaults", dict(_V4_GENERATION_DEFAULTS))]


def _d6_tied_weights_mapping(m):
    # 5.x wants {target: source} (save_pretrained's _get_tied_weight_keys calls .keys() on it). The same
    # tie as 4.x's get_output_embeddings -> get_input_embeddings; Dream's configs tie nothing in either version.
    cls = m.DreamModel
    return [(cls, "_tied_weights_keys", {key: "model.embed_tokens.weight" for key in cls._tied_weights_keys})]


def _d7_resume_download(m):
    # Dream's from_pretrained passes resume_download=... to DreamGenerationConfig.from_pretrained; 4.46.2 dropped
    # it, 5.x forwards it to DreamGenerationConfig(**kwargs), which keeps unknown keys: the model's generation
    # config gains resume_download=None, and save_pretrained writes it to generation_config.json.
    cls = m.DreamGenerationConfig
    original = cls.from_pretrained.__func__  # GenerationConfig's classmethod (or Dream's own, if it has one)

    @functools.wraps(original)
    def from_pretrained(klass, *args, **kwargs):
        kwargs.pop("resume_download", None)
        return original(klass, *args, **kwargs)
    return [(cls, "from_pretrained", classmethod(from_pretrained))]


def _d8_no_reinit(m):
    # 5.0 to 5.12 call the model's _init_weights on every module after loading (5.13 skips custom-code modules whose
    # parameters and buffers were all loaded). Dream's _init_weights draws into module.weight.data directly, so the
    # loaded weights are overwritten with random ones (and the global RNG advances); 4.46.2 initialised only modules
    # with missing keys. Skip modules whose parameters were all loaded (_is_hf_initialized); from_config unchanged.
    cls = m.DreamPreTrainedModel
    original = cls.__dict__["_init_weights"]

    @functools.wraps(original)
    def _init_weights(self, module):
        params = list(module.parameters(recurse=False))
        if not (params and all(getattr(p, "_is_hf_initialized", False) for p in params)):
            return original(self, module)
    return [(cls, "_init_weights", _init_weights)]


# -------------------------------------------------------------------------------------------- LLaDA shims
def _l1_post_init(m):
    # LLaDAModelLM.__init__ never calls post_init(); 5.x needs what it sets (all_tied_weights_keys, ...). Run it at
    # the end of __init__ without its init_weights() step (weight init, tying), which 4.46.2 never ran for LLaDA.
    cls = m.LLaDAModelLM
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if "all_tied_weights_keys" not in self.__dict__:
            self.__dict__["init_weights"] = lambda: None  # on the instance, removed right after
            try:
                self.post_init()
            finally:
                self.__dict__.pop("init_weights", None)
    return [(cls, "__init__", __init__)]


def _l2_tie_weights_kwargs(m):
    # 5.x calls tie_weights(missing_keys=..., recompute_mapping=...); LLaDA's takes no arguments.
    cls = m.LLaDAModelLM
    original = cls.__dict__["tie_weights"]

    @functools.wraps(original)
    def tie_weights(self, *args, **kwargs):
        return original(self)
    return [(cls, "tie_weights", tie_weights)]


def _l3_config_use_cache(m):
    # 5.x's PreTrainedConfig.__init__ pops every generation parameter (use_cache among them) from its kwargs; LLaDA
    # passes use_cache that way, and its forward() reads config.use_cache. Keep it, as 4.x did.
    cls = m.LLaDAConfig
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self, use_cache=False, **kwargs):
        original(self, use_cache=use_cache, **kwargs)
        if "use_cache" not in self.__dict__:
            self.use_cache = use_cache
    return [(cls, "__init__", __init__)]


# torch.nn.init's functions, which 4.46.2's no_init_weights() made no-ops during from_pretrained.
_TORCH_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "xavier_uniform_", "xavier_normal_",
                         "kaiming_uniform_", "kaiming_normal_", "uniform", "normal", "xavier_uniform",
                         "xavier_normal", "kaiming_uniform", "kaiming_normal")


def _building_on_meta() -> bool:
    """Inside 5.x's from_pretrained model construction (it builds under ``with torch.device("meta")``)."""
    import torch
    try:
        from transformers.modeling_utils import get_torch_context_manager_or_global_device as current
    except ImportError:
        current = torch.get_default_device
    return current() == torch.device("meta")


_no_init = threading.local()  # .depth > 0: this thread is building a LLaDAModelLM inside from_pretrained (L4)
_no_init_lock = threading.Lock()
_no_init_users = 0  # threads inside _torch_init_skipped_in_this_thread(); the skipping functions are in place while > 0
_no_init_saved: Dict[str, Callable] = {}  # torch.nn.init's functions that the skipping ones replaced


def _skipping(function):
    """torch.nn.init's ``function``, a no-op in a thread inside ``_torch_init_skipped_in_this_thread()``."""
    @functools.wraps(function)
    def skipped_in_building_thread(*args, **kwargs):
        if getattr(_no_init, "depth", 0):
            return None  # 4.46.2's no_init_weights() put `lambda *args, **kwargs: None`-like functions in place
        return function(*args, **kwargs)
    skipped_in_building_thread.__klass_compat_skipping__ = function
    return skipped_in_building_thread


@contextlib.contextmanager
def _torch_init_skipped_in_this_thread():
    """torch.nn.init's functions do nothing in this thread while inside; other threads get torch's own.

    The module attributes are replaced once, by functions that ask a thread-local flag, for as long as any thread is
    inside (a count under a lock), and put back by the last to leave: a model that another thread builds meanwhile
    is initialised as usual."""
    import torch
    global _no_init_users
    init = torch.nn.init
    with _no_init_lock:
        if _no_init_users == 0:
            for name in _TORCH_INIT_FUNCTIONS:
                function = getattr(init, name, None)
                if function is None:
                    continue
                function = getattr(function, "__klass_compat_skipping__", function)  # one left by an interleaving
                _no_init_saved[name] = function
                setattr(init, name, _skipping(function))
        _no_init_users += 1
    depth = getattr(_no_init, "depth", 0)
    _no_init.depth = depth + 1
    try:
        yield
    finally:
        _no_init.depth = depth
        with _no_init_lock:
            _no_init_users -= 1
            if _no_init_users == 0:
                for name, function in _no_init_saved.items():
                    # put torch's back unless something else replaced ours meanwhile (then its restore brings ours
                    # back later: ours passes through to torch's function outside a building thread)
                    if getattr(getattr(init, name, None), "__klass_compat_skipping__", None) is function:
                        setattr(init, name, function)
                _no_init_saved.clear()


def _l4_no_init_in_from_pretrained(m):
    # LLaDAModelLM builds its LLaDAModel with init_device="cpu", so 5.x's meta-device context does not reach it:
    # torch's default init runs on the CPU for the whole model, drawing from the global RNG. 4.46.2 built it under
    # no_init_weights() (torch.nn.init a no-op: no draws), so `manual_seed(s); load; sample` differed. Re-create that
    # while a LLaDAModelLM is built inside from_pretrained only (the checkpoint overwrites the weights); from_config
    # and direct construction are unchanged, as in 4.x. Unlike 4.x's, the no-op is for the building thread only: a
    # model built by another thread meanwhile is initialised.
    cls = m.LLaDAModelLM
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if not _building_on_meta():
            return original(self, *args, **kwargs)
        with _torch_init_skipped_in_this_thread():
            return original(self, *args, **kwargs)
    return [(cls, "__init__", __init__)]


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Shim:
    name: str
    family: str
    versions: SpecifierSet  # the transformers versions that need it
    fixes: str  # the symptom without it
    applies_to: Callable[[types.ModuleType], bool]
    replacements: Callable[[types.ModuleType], List[tuple]]  # -> [(owner, attribute, new value)]

    def apply(self, module) -> List[tuple]:
        """Put the replacements in place, except those already there; returns the undo records
        ``(owner, attribute, previous value)``."""
        records = []
        for owner, attr, value in self.replacements(module):
            old = owner.__dict__.get(attr, _MISSING)
            if old is not _MISSING and self.name in _tags(old):
                continue
            if callable(getattr(value, "__func__", value)):
                setattr(getattr(value, "__func__", value), _TAG, self.name)
            records.append((owner, attr, old))
            setattr(owner, attr, value)
        return records


def _has(name, base=None):
    return lambda m: _cls(m, name, base) is not None


_DREAM_GEN_CONFIG = _has("DreamGenerationConfig", "GenerationConfig")
_DREAM_PRETRAINED = _has("DreamPreTrainedModel", "PreTrainedModel")
_LLADA_MODEL = _has("LLaDAModelLM", "PreTrainedModel")
_ALL = SpecifierSet(">=5")

SHIMS: List[Shim] = [
    Shim("D1-rope-default", "dream", _ALL, "KeyError: 'default' at ROPE_INIT_FUNCTIONS[self.rope_type]",
         lambda m: _cls(m, "DreamRotaryEmbedding") is not None and
         isinstance(m.__dict__.get("ROPE_INIT_FUNCTIONS"), dict) and "default" not in m.ROPE_INIT_FUNCTIONS,
         _d1_rope_default),
    Shim("D2-validate-kwargs", "dream", _ALL,
         "TypeError: DreamGenerationConfig.validate() got an unexpected keyword argument: 'user_set_attributes' "
         "when loading (5.23), 'strict' in save_pretrained (5.0)",
         lambda m: _DREAM_GEN_CONFIG(m) and "validate" in m.DreamGenerationConfig.__dict__ and
         _takes_no_var_kwargs(m.DreamGenerationConfig.validate), _d2_validate_kwargs),
    Shim("D3-rotary-init", "dream", _ALL, "silent: rotary inv_freq left uninitialised (empty) by from_pretrained",
         lambda m: _DREAM_PRETRAINED(m) and _cls(m, "DreamRotaryEmbedding") is not None, _d3_rotary_init),
    Shim("D4-from-model-config", "dream", _ALL,
         "AttributeError: 'GenerationConfig' object has no attribute 'eps' in from_model_config",
         _DREAM_GEN_CONFIG, _d4_from_model_config),
    Shim("D5-legacy-generation-defaults", "dream", _ALL,
         "silent: without a temperature Dream samples greedily on 5.x, at 1.0 / top_k 50 / top_p 1.0 on 4.x",
         lambda m: _DREAM_GEN_CONFIG(m) and "_tf4_legacy_generation_defaults" not in m.DreamGenerationConfig.__dict__,
         _d5_legacy_defaults),
    Shim("D6-tied-weights-mapping", "dream", _ALL,
         "AttributeError: 'list' object has no attribute 'keys' in save_pretrained (_get_tied_weight_keys)",
         lambda m: _cls(m, "DreamModel", "PreTrainedModel") is not None and
         isinstance(m.DreamModel.__dict__.get("_tied_weights_keys"), (list, tuple)), _d6_tied_weights_mapping),
    Shim("D7-resume-download-leak", "dream", _ALL,
         "cosmetic: generation_config.resume_download=None, written to generation_config.json on save",
         _DREAM_GEN_CONFIG, _d7_resume_download),
    Shim("D8-no-reinit-of-loaded-weights", "dream", SpecifierSet(">=5,<5.13"),
         "silent: Dream's _init_weights re-randomises the loaded Linear/Embedding weights after from_pretrained",
         _DREAM_PRETRAINED, _d8_no_reinit),
    Shim("L1-post-init", "llada", _ALL,
         "AttributeError: 'LLaDAModelLM' object has no attribute 'all_tied_weights_keys'", _LLADA_MODEL, _l1_post_init),
    Shim("L2-tie-weights-kwargs", "llada", _ALL,
         "TypeError: LLaDAModelLM.tie_weights() got an unexpected keyword argument 'missing_keys'",
         lambda m: _LLADA_MODEL(m) and "tie_weights" in m.LLaDAModelLM.__dict__ and
         _takes_no_var_kwargs(m.LLaDAModelLM.tie_weights), _l2_tie_weights_kwargs),
    Shim("L3-config-use-cache", "llada", _ALL, "AttributeError: 'LLaDAConfig' object has no attribute 'use_cache'",
         lambda m: getattr(_cls(m, "LLaDAConfig", "PretrainedConfig") or _cls(m, "LLaDAConfig", "PreTrainedConfig"),
                           "model_type", None) == "llada", _l3_config_use_cache),
    Shim("L4-no-init-in-from-pretrained", "llada", _ALL,
         "silent: from_pretrained draws from the global RNG (torch's default init on the CPU); 4.x drew nothing",
         _LLADA_MODEL, _l4_no_init_in_from_pretrained),
]

# The class names a module must define for any shim to apply: a cheap first test for every module imported.
_CLASS_NAMES = ("DreamRotaryEmbedding", "DreamGenerationConfig", "DreamPreTrainedModel", "DreamModel", "LLaDAModelLM",
                "LLaDAConfig")

_lock = threading.RLock()
_applied: Dict[int, tuple] = {}  # id(module) -> (module, [shim names in place], [undo records])


@functools.lru_cache(maxsize=None)
def _version(text: str) -> Version:
    return Version(text)


def transformers_version() -> Optional[Version]:
    """The imported transformers' version; None before transformers is imported (no remote-code module, all of
    which import it, can exist before)."""
    text = getattr(sys.modules.get("transformers"), "__version__", None)
    return _version(text) if text else None


def shims_for(version) -> List[Shim]:
    """The entries of ``SHIMS`` that transformers ``version`` (a string or ``Version``) needs."""
    return [shim for shim in SHIMS if shim.versions.contains(str(version), prereleases=True)]


def apply_to(module) -> List[str]:
    """Apply to ``module`` the shims that the imported transformers needs and that match it; returns the names of
    those in place on it (none on transformers < 5). Idempotent. A shim that fails warns, and is left out."""
    namespace = getattr(module, "__dict__", None)
    if not isinstance(namespace, dict) or not any(name in namespace for name in _CLASS_NAMES):
        return []
    version = transformers_version()
    if version is None or not shims_for(version):
        return []
    with _lock:
        _, names, records = _applied.setdefault(id(module), (module, [], []))
        for shim in shims_for(version):
            try:
                if shim.applies_to(module):
                    records += shim.apply(module)
                    if shim.name not in names:
                        names.append(shim.name)
            except Exception as exc:  # never break an import because of a shim
                warnings.warn(f"klass_patch.compat: shim {shim.name} failed on {module.__name__}: {exc!r}",
                              RuntimeWarning, stacklevel=2)
        if names:  # remote code (a module no shim fits, e.g. klass-patch's own stand-in, gets no hook either)
            records += _shim_subclass_modules(module)
        if not names:
            del _applied[id(module)]
        return list(names)


def _shim_subclass_modules(module) -> List[tuple]:
    """If ``module`` defines ``DreamGenerationMixin``: give it an ``__init_subclass__`` that applies the shims to the
    module of each class derived from it as it is defined (see "Installed route" above). Returns the undo records."""
    mixin = _cls(module, "DreamGenerationMixin")
    if mixin is None or "__init_subclass__" in mixin.__dict__:
        return []

    def __init_subclass__(cls, **kwargs):
        super(mixin, cls).__init_subclass__(**kwargs)
        derived = sys.modules.get(cls.__module__)
        if derived is None or cls.__qualname__ != cls.__name__:  # not a module-level class of an imported module
            return
        derived.__dict__[cls.__name__] = cls  # what the class statement binds right after; the shims look it up
        apply_to(derived)
    setattr(__init_subclass__, _TAG, "modeling-module-hook")
    mixin.__init_subclass__ = classmethod(__init_subclass__)
    return [(mixin, "__init_subclass__", _MISSING)]


def applied() -> Dict[str, List[str]]:
    """The shims in place now: module name -> shim names."""
    with _lock:
        return {module.__name__: list(names) for module, names, _ in _applied.values()}


def revert() -> Dict[str, List[str]]:
    """Undo every shim applied; returns what was in place (module name -> shim names). On transformers 5.x the
    Dream and LLaDA models loaded with them, and new loads of their remote code, fail again (see ``SHIMS``' fixes)
    until the shims are applied again."""
    with _lock:
        removed = {module.__name__: list(names) for module, names, _ in _applied.values()}
        for _, _, records in reversed(list(_applied.values())):
            undo(records)
        _applied.clear()
        return removed
