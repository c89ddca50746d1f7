"""klass-patch: KLASS (KL-Adaptive Stability Sampling) for LLaDA and Dream, as a patch over their own code.

    import klass_patch
    klass_patch.apply()          # patch what is imported now and later
    generate(model, prompt, ..., alg="klass", conf_threshold=0.6, kl_threshold=0.015, kl_history_length=2)
    model.diffusion_generate(ids, ..., alg="klass", conf_threshold=0.9, kl_threshold=0.001)
    klass_patch.revert()         # put upstream back

The algorithm is in ``klass_patch.core``; the family adapters in ``klass_patch.llada`` and
``klass_patch.dream``; the patching rules in ``klass_patch.patching``.
"""
from .core import GenerateOutput, KlassConfig, write_steps_jsonl
from .patching import (IncompatibleUpstreamError, PatchInfo, UnknownUpstreamWarning, apply, patch_installed, patched,
                       revert)

__version__ = "0.1.0"
__all__ = ["apply", "revert", "patched", "patch_installed", "PatchInfo", "KlassConfig", "GenerateOutput", "write_steps_jsonl",
           "IncompatibleUpstreamError", "UnknownUpstreamWarning", "__version__"]
