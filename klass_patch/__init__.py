"""klass-patch: KLASS (KL-Adaptive Stability Sampling) for LLaDA and Dream, as a patch over their own code.

    import klass_patch
    klass_patch.apply()          # patch what is imported now and later
    generate(model, prompt, ..., alg="klass", conf_threshold=0.6, kl_threshold=0.015, kl_history_length=2)
    model.diffusion_generate(ids, ..., alg="klass", conf_threshold=0.9, kl_threshold=0.001)
    klass_patch.revert()         # put upstream's samplers back (transformers 5.x shims stay: loaded models need them)
    klass_patch.revert(compat=True)  # ... and remove those shims too (Dream/LLaDA then fail on transformers 5.x)
    klass_patch.patched()        # what is patched: by apply(), and files rewritten by `klass-patch install`

The algorithm is in ``klass_patch.core``; the family adapters in ``klass_patch.llada`` and
``klass_patch.dream``; the patching rules in ``klass_patch.patching``.
"""
from importlib import import_module

__version__ = "0.1.0"
# Imported on first use (PEP 562): the installer's commands (klass-patch install/status/revert) need neither
# torch nor wrapt, and `import klass_patch` stays cheap until one of these is touched.
_LAZY = {"apply": "patching", "revert": "patching", "patched": "patching", "patch_installed": "patching",
         "PatchInfo": "patching", "IncompatibleUpstreamError": "patching", "UnknownUpstreamWarning": "patching",
         "KlassConfig": "core", "GenerateOutput": "core", "write_steps_jsonl": "core"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted({*globals(), *_LAZY})
