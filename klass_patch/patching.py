"""Runtime patching: ``apply()`` and ``revert()``. The patching rules live here, and only here.

One target per model family, in a registry (the shape of Liger-Kernel's ``monkey_patch``):

- ``llada``: a module with LLaDA's ``generate`` and ``get_num_transfer_tokens`` (``generate.py``, imported
  under any name or loaded from a file path). Its ``generate`` is wrapped.
- ``dream``: a module with ``DreamGenerationMixin`` (Dream's ``generation_utils.py``, which Hugging Face
  imports as ``transformers_modules.<name>...generation_utils``). The mixin's ``diffusion_generate`` and
  ``_sample`` are wrapped, so every model class built on it, and every model already loaded, gets KLASS.

Wrapping uses ``wrapt`` (signatures and introspection survive); revert puts the original objects back.
``apply()`` patches the matching modules already imported and, through a hook on the source loader's
``exec_module`` (used by ``import``, by ``importlib.util.spec_from_file_location`` loads and by Hugging
Face's dynamic modules alike), every matching module loaded later. Both are idempotent.

On transformers 5.x the same ``apply()`` and hook also put ``klass_patch.compat``'s shims on Dream's and LLaDA's
remote code (every module, not only the targets above), so that it runs there as on 4.46.2;
``klass_patch.compat.applied()`` says which are in place (``patched()`` lists only KLASS's targets). They fix
upstream's breakage on 5.x, not KLASS: ``revert()`` keeps them (and the hook, for them only, while they are in
use), so that what is loaded or installed keeps working; ``revert(compat=True)`` removes them too.
"""
from __future__ import annotations

import importlib.machinery
import sys
import threading
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import wrapt

from . import compat, dream, llada
from . import compat as _compat  # revert()'s parameter is named compat
from .versions import STANDIN_MARK, dream_missing, identify_module, known_ids, llada_missing, module_file

__all__ = ["apply", "revert", "patched", "patch_installed", "PatchInfo", "IncompatibleUpstreamError",
           "UnknownUpstreamWarning"]

# A file rewritten by ``klass-patch install`` sets this module attribute to its upstream version id.
INSTALLED_MARK = "__klass_patch_installed__"


class IncompatibleUpstreamError(TypeError):
    """The module looks like an upstream target but lacks what KLASS needs."""


class UnknownUpstreamWarning(UserWarning):
    """A module of an unknown upstream version was patched because its interface matches."""


@dataclass(frozen=True)
class PatchInfo:
    module: str
    family: str
    version: str
    file: Optional[str]


class _KlassWrapper(wrapt.FunctionWrapper):
    """Marks the objects klass-patch put in place, so that patching twice is a no-op."""


@dataclass(frozen=True)
class _Target:
    family: str
    looks_like: Callable[[types.ModuleType], bool]
    missing: Callable[[types.ModuleType], List[str]]
    attributes: Callable[[types.ModuleType], List[tuple]]  # (owner, name, wrapper) to wrap
    gate: Callable[[types.ModuleType], None] = lambda module: None


def _llada_attrs(module):
    return [(module, "generate", llada.make_generate_wrapper(module))]


def _dream_attrs(module):
    mixin = module.DreamGenerationMixin
    return [(mixin, "diffusion_generate", dream.make_diffusion_generate_wrapper(module)),
            (mixin, "_sample", dream.make_sample_wrapper(module))]


def _dream_gate(module):
    """On transformers 5.x Dream's remote code runs only with ``compat``'s shims: apply them to this module (and,
    through ``compat``'s subclass hook, to the ``modeling_dream.py`` that imports it); warn if they do not apply."""
    version = compat.transformers_version()
    if version is not None and version.major >= 5 and not compat.apply_to(module) and \
            not getattr(module, STANDIN_MARK, None):  # klass-patch's stand-ins need no shim
        warnings.warn(f"transformers {version}: Dream's remote code needs klass_patch.compat's shims, and they do not "
                      f"apply to {module.__name__}, so expect failures (or use transformers 4.46.2 to 4.57.x)",
                      RuntimeWarning, stacklevel=4)


def _defines(module, name) -> bool:
    """The module defines ``name`` itself (a module that merely imported it is not a target)."""
    return getattr(getattr(module, name, None), "__module__", None) == getattr(module, "__name__", None)


TARGETS: Dict[str, _Target] = {
    "llada": _Target("llada", lambda m: _defines(m, "generate") and _defines(m, "get_num_transfer_tokens"),
                     llada_missing, _llada_attrs),
    "dream": _Target("dream", lambda m: _defines(m, "DreamGenerationMixin"), dream_missing, _dream_attrs,
                     _dream_gate),
}

_lock = threading.RLock()
_patched: Dict[int, tuple] = {}  # id(module) -> (module, PatchInfo, [(owner, name, original)])
# files rewritten by `klass-patch install` that patched themselves (patch_installed), for good:
_installed: Dict[int, tuple] = {}  # id(their globals) -> (globals, PatchInfo)
# "original": the loader's own exec_module; "targets": KLASS's patch too (apply()), not only compat's shims;
# "installed": an installed file needs the compat part for the model code loaded after it (revert() keeps it)
_hook: Dict[str, object] = {}


def _family_of(module) -> Optional[str]:
    for name, target in TARGETS.items():
        if target.looks_like(module):
            return name
    return None


def _patch_module(module, family: str, explicit: bool) -> Optional[PatchInfo]:
    target = TARGETS[family]
    with _lock:
        if id(module) in _patched:  # again, e.g. re-executed by importlib.reload: wrap what is plain again
            _, info, saved = _patched[id(module)]
            _patched[id(module)] = (module, info, _wrap(target, module, saved))
            return info
        missing = target.missing(module)
        if missing:
            msg = (f"klass_patch: cannot patch {module.__name__} as {family}: missing {', '.join(missing)}. "
                   f"Known upstream versions: {', '.join(known_ids(family))}.")
            if explicit:
                raise IncompatibleUpstreamError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return None
        target.gate(module)
        installed = getattr(module, INSTALLED_MARK, None)
        version = f"{installed} (installed file)" if installed else identify_module(module, family)
        path = module_file(module)
        if version.startswith("unknown"):
            warnings.warn(f"klass_patch: {module.__name__} ({path}) is {version} of {family}, not one of "
                          f"{', '.join(known_ids(family))}; its interface matches, so it is patched.",
                          UnknownUpstreamWarning, stacklevel=3)
        saved = _wrap(target, module)
        info = PatchInfo(module.__name__, family, version, str(path) if path else None)
        _patched[id(module)] = (module, info, saved)
        return info


def _wrap(target: _Target, module, saved: Optional[List[tuple]] = None) -> List[tuple]:
    """Wrap the target's objects of ``module`` that are not wrapped yet; returns ``saved`` (the
    ``(owner, name, original)`` that revert puts back) with an entry for each, replacing any earlier entry
    of the same owner and name (a reloaded module's new function is the one to put back)."""
    saved = list(saved or [])
    for owner, name, wrapper in target.attributes(module):
        current = owner.__dict__[name]
        if isinstance(current, _KlassWrapper):  # already patched (e.g. a reloaded module's class)
            continue
        saved = [e for e in saved if not (e[0] is owner and e[1] == name)] + [(owner, name, current)]
        setattr(owner, name, _KlassWrapper(current, wrapper))
    return saved


def _after_exec(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    module = args[0] if args else kwargs.get("module")
    if module is not None:
        compat.apply_to(module)
        family = _family_of(module) if _hook.get("targets") else None
        if family is not None:
            _patch_module(module, family, explicit=False)
    return result


def _install_hook(targets: bool = True):
    """Hook the source loader: ``compat``'s shims for every module executed from now on, and (``targets``, what
    ``apply()`` asks for) KLASS's patch for every target module too."""
    loader = importlib.machinery.SourceFileLoader
    if "original" not in _hook:
        _hook["original"] = loader.__dict__.get("exec_module")
        loader.exec_module = _KlassWrapper(loader.exec_module, _after_exec)
    _hook["targets"] = _hook.get("targets", False) or targets


def _remove_hook():
    if "original" in _hook:
        loader = importlib.machinery.SourceFileLoader
        original = _hook.pop("original")
        _hook.clear()
        if original is None:
            del loader.exec_module
        else:
            loader.exec_module = original


def _module_of(obj):
    if isinstance(obj, types.ModuleType):
        return obj
    if isinstance(obj, (types.FunctionType, wrapt.FunctionWrapper)):
        name = obj.__module__
    elif isinstance(obj, type) or hasattr(obj, "generation_config") or hasattr(obj, "diffusion_generate"):
        cls = obj if isinstance(obj, type) else type(obj)
        name = next((k.__module__ for k in cls.__mro__ if k.__name__ == "DreamGenerationMixin"), cls.__module__)
    else:
        raise IncompatibleUpstreamError(
            f"klass_patch.apply() takes a module, a Dream model or model class, or LLaDA's generate function; "
            f"got {type(obj).__name__} {obj!r:.80}")
    module = sys.modules.get(name)
    if module is None:
        raise IncompatibleUpstreamError(f"klass_patch: cannot find the module of {obj!r:.80} ({name}) to patch")
    return module


def apply(obj=None) -> List[PatchInfo]:
    """Patch LLaDA's ``generate`` and Dream's ``DreamGenerationMixin`` so they accept ``alg="klass"``.

    With no argument: every matching module already imported, and every one imported later. With a
    module, class (e.g. a Dream model class), loaded model, or LLaDA ``generate`` function: that one's
    module (an incompatible one raises ``IncompatibleUpstreamError`` saying what is missing). Returns what
    is patched. Calling it again changes nothing. On transformers 5.x it also applies ``klass_patch.compat``'s
    shims: with no argument to all of Dream's and LLaDA's remote code, imported now or later (call it before
    ``from_pretrained``); with a Dream module, class or model, to that module.
    """
    with _lock:
        if obj is not None:
            module = _module_of(obj)
            family = _family_of(module)
            if family is None:
                missing = {f: TARGETS[f].missing(module) for f in TARGETS}
                passed = "" if obj is module else f" (the module of {obj!r:.80})"
                raise IncompatibleUpstreamError(
                    f"klass_patch: {module.__name__}{passed} is neither LLaDA's generate.py (missing "
                    f"{', '.join(missing['llada'])}) nor Dream's generation_utils.py (missing "
                    f"{', '.join(missing['dream'])})")
            return [_patch_module(module, family, explicit=True)]
        _install_hook()
        for module in list(sys.modules.values()):
            if isinstance(module, types.ModuleType):
                compat.apply_to(module)
                family = _family_of(module)
                if family is not None:
                    _patch_module(module, family, explicit=False)
        return patched()


class _Namespace:
    """A module's globals seen as attributes: what a rewritten file that was executed without a module
    object (``exec(source, namespace)``, or a module not in ``sys.modules``) offers to be patched."""

    def __init__(self, namespace: dict):
        self.__dict__ = namespace


def patch_installed(namespace: dict, family: str, version: str) -> None:
    """Called by a file that ``klass-patch install`` rewrote, at the end of its own execution, with its
    globals: however it was loaded (``import``, ``spec_from_file_location`` with or without ``sys.modules``,
    ``exec``, ``importlib.reload``), its objects are wrapped exactly as ``apply(module)`` wraps them, for
    good: ``revert()`` leaves them (the file itself is what ``klass-patch revert`` restores). ``patched()`` lists
    it, its version marked "(installed file)"."""
    module = sys.modules.get(namespace.get("__name__"))
    if module is None or module.__dict__ is not namespace:
        module = _Namespace(namespace)
    namespace[INSTALLED_MARK] = version
    target = TARGETS[family]
    missing = target.missing(module)
    if missing:
        raise IncompatibleUpstreamError(f"klass_patch: {namespace.get('__name__')} ({version}) lacks "
                                        f"{', '.join(missing)}")
    target.gate(module)
    path = namespace.get("__file__")
    with _lock:
        _wrap(target, module)
        _installed[id(namespace)] = (namespace, PatchInfo(str(namespace.get("__name__")), family,
                                                          f"{version} (installed file)", str(path) if path else None))
        tf_version = compat.transformers_version()
        if family == "llada" and tf_version is not None and tf_version.major >= 5:
            # LLaDA's scripts import generate.py before they load the model: the model code loaded from now on gets
            # compat's shims (KLASS's patch of other files stays apply()'s), after revert() too
            _install_hook(targets=False)
            _hook["installed"] = True


def _names(names: List[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def revert(compat: bool = False) -> Dict[str, List[str]]:
    """Put back every original object that ``apply()`` wrapped (``alg="klass"`` is upstream's error again) and stop
    patching modules imported later. Files rewritten by ``klass-patch install`` stay patched (``klass-patch revert``
    restores them).

    ``klass_patch.compat``'s shims (transformers 5.x) stay: they fix upstream's breakage, not KLASS, and the Dream
    and LLaDA models loaded with them (after ``apply()``, or through installed files) need them for every call,
    upstream's algorithms included. So does the import hook, for them only, while a shim is in place or an installed
    file needs it: Dream and LLaDA still load afterwards. Returns ``{}``.

    ``revert(compat=True)`` also removes the shims and the whole hook, and returns what it removed (module name ->
    shim names). On transformers 5.x that breaks what is loaded: Dream's calls fail (``DreamGenerationConfig
    .validate() got an unexpected keyword argument 'user_set_attributes'``), and so does loading (Dream: ``KeyError:
    'default'``; LLaDA: no attribute ``all_tied_weights_keys``), until ``apply()`` is called again; a
    ``RuntimeWarning`` says so. On transformers 4.x there are no shims: both forms are the same."""
    with _lock:
        removed: Dict[str, List[str]] = {}
        if compat:
            _remove_hook()
            removed = _compat.revert()
            version = _compat.transformers_version()
            if removed and version is not None and version.major >= 5:
                warnings.warn(
                    f"klass_patch.revert(compat=True) removed transformers {version}'s compatibility shims from "
                    f"{_names(sorted(removed))}: the Dream and LLaDA models loaded with them now fail (Dream on "
                    f"every call: DreamGenerationConfig.validate() got an unexpected keyword argument), and so does "
                    f"loading them (KeyError: 'default'; no attribute 'all_tied_weights_keys'), until "
                    f"klass_patch.apply()", RuntimeWarning, stacklevel=2)
        elif _compat.applied() or _hook.get("installed"):
            _hook["targets"] = False  # the hook stays, for compat's shims only
        else:
            _remove_hook()
        for module, info, saved in _patched.values():
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)
        _patched.clear()
        return removed


def patched() -> List[PatchInfo]:
    """What is patched now (module name, family, upstream version, file): by ``apply()``, and the files rewritten by
    ``klass-patch install`` that this process executed."""
    with _lock:
        seen = {id(vars(module)) for module, _, _ in _patched.values()}
        return [info for _, info, _ in _patched.values()] + \
            [info for key, (_, info) in _installed.items() if key not in seen]
