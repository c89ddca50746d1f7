"""The upstream files klass-patch knows: fingerprints, and the interface each family must offer.

A file is recognised by the sha256 of its bytes, or, for copies that differ only in line endings,
trailing spaces or final newlines, by the sha256 of its normalised text. Anything else is an unknown
version: patched at runtime if its interface matches (with a warning), refused if not.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

# Stand-ins shipped with klass-patch (klass_patch.toy) declare themselves with this module attribute.
STANDIN_MARK = "KLASS_PATCH_STANDIN"


@dataclass(frozen=True)
class UpstreamVersion:
    id: str
    family: str  # "dream" or "llada"
    sha256: str
    normalized_sha256: str
    note: str = ""


KNOWN: List[UpstreamVersion] = [
    UpstreamVersion("dream-v1", "dream", "11c6026c7847cadc7a954e708636d66bdf76de66153a76b58f6e17a4fb4a0934",
                    "5fa2d8c49b7308b41578e8a91f67f772901f37cdd3360d677796d6bf196ced07", "April 2025 release"),
    UpstreamVersion("dream-v2", "dream", "7f8ad01484898946b3c9c9d5ebc85e5ac726061d0fa7b4a522c4b8110c13a921",
                    "26db29ff69856ea7107ca5f168a04560c306e73e1a19a7337530b487700dd69d", "May 2025 batch fix; hub file"),
    UpstreamVersion("llada-2025-02", "llada", "b3539675ef5e142b035b3bb46f688e1c41b08538d932c2319f8c991ce1d9525e",
                    "02691768edb2e1b58e33684eaefecdbc254930f10e36ac6d02d55b7c9be4582d", "4fc3cd2"),
    UpstreamVersion("llada-2025-02", "llada", "d8d5c9e7f6a31912b402434e66ba154499607b8b6a557d821b9bc3bc12c9d9b8",
                    "d8d5c9e7f6a31912b402434e66ba154499607b8b6a557d821b9bc3bc12c9d9b8", "8d82634 (docstring)"),
    UpstreamVersion("llada-2025-03", "llada", "b20ad899fc1e10355cac8f0a82569f83c79a75cca668644b429d7ade0a3baddf",
                    "b20ad899fc1e10355cac8f0a82569f83c79a75cca668644b429d7ade0a3baddf", "d5634da"),
    UpstreamVersion("llada-2025-06", "llada", "9d7e2dbcbc112260003bde90905e8d5cf10afc9e960aa2be9b8f2b353aa1744c",
                    "9d7e2dbcbc112260003bde90905e8d5cf10afc9e960aa2be9b8f2b353aa1744c", "f51cb17"),
    UpstreamVersion("llada-2025-10", "llada", "45305a0fb0ab15884a48d93615903df1784f6dcf86d4fbbda6cade4c38dbbb0a",
                    "64068d2d31653d6ab161eb04be284edf0d141f810458f82bcb3779bd18656329", "f543ac7"),
    UpstreamVersion("llada-2025-10", "llada", "51577b6b239f73ec0a8ef5a680c7dbc6927b2bfc4e8e125e342a60923d10e348",
                    "64068d2d31653d6ab161eb04be284edf0d141f810458f82bcb3779bd18656329", "8e01df8 (final newline)"),
    UpstreamVersion("llada-2025-10", "llada", "a95b1c67d2f9d6a80f7a2d046d59be215fd0cf010c771e9ec07f5b80eae7a9c7",
                    "b8c9fb27e55df8e5f255cae84852662d417be100ca10abf5872da258d0b424d0",
                    "65cbed2 (HEAD, main() only); also iLLaDA's sampler (its README: reuse it with mask_id=5)"),
    # Models built on the same code (public copies; see the README's "Supported files").
    UpstreamVersion("llada-2025-06", "llada", "469d0c34563c174a3c49f3b8cae02f79e55a71b9c044817a2a3e01c9f66c8ced",
                    "9d7e2dbcbc112260003bde90905e8d5cf10afc9e960aa2be9b8f2b353aa1744c",
                    "LLaDA-1.5's evaluation copy (zhangyitonggg/dllm4code LiveCodeBench/llada_generate.py): f51cb17 "
                    "without its final newline"),
    UpstreamVersion("mmada", "llada", "a29060417d50b378e3b768c1e66ff64fcbb76fc016a070db99593fddd4126678",
                    "a29060417d50b378e3b768c1e66ff64fcbb76fc016a070db99593fddd4126678",
                    "Gen-Verse/MMaDA generate.py bce2b72: llada-2025-03 with batches (attention_mask, last "
                    "parameter, passed to the model as a [B,1,L,L] attention_bias)"),
    UpstreamVersion("mmada", "llada", "62e6c9d22f264a5c44d05d2602cf5c7addb291a85dcfe357878664eec803649a",
                    "62e6c9d22f264a5c44d05d2602cf5c7addb291a85dcfe357878664eec803649a", "MMaDA 0ef94ba (main() only)"),
    UpstreamVersion("mmada", "llada", "6e7da94fca35fd158f4ddda7ec323998483c573e3c6ffccd5f69514378202a3f",
                    "6e7da94fca35fd158f4ddda7ec323998483c573e3c6ffccd5f69514378202a3f", "MMaDA b209b3e (main() only)"),
    UpstreamVersion("mmada", "llada", "d3a394b81635e8ac8fbdadc9c64198f1562262c2c1b4c89b34ee0c81c11a22ee",
                    "d3a394b81635e8ac8fbdadc9c64198f1562262c2c1b4c89b34ee0c81c11a22ee", "MMaDA ce06b2a (main() only)"),
]

# The model files the KV cache (klass_patch.cache) attaches to at run time: recognised like the sampler files, but
# never installed into (family "llada"/"dream" here means the model code, not generate.py/generation_utils.py).
MODEL_FILES: List[UpstreamVersion] = [
    UpstreamVersion("llada-8b-modeling", "llada", "98bac7e53fef0bb7ca01e3716c11a7f710d183e10dbb9783b88db9dbba2e3766",
                    "a711ac52a6b6e6fba3830fc8ac67af961ef7dee6351ee00eb9aaad7ba7c92a49",
                    "modeling_llada.py of GSAI-ML/LLaDA-8B-Instruct"),
    UpstreamVersion("dream-v0-modeling", "dream", "3166e789f0d69beb1f4fbdee2317953d1c1c3b9bc21479b109afc5dd059de5b3",
                    "8a694c5979322591659c0d4c09a5fa2d314aef50805683055f6a14b733dbeae7",
                    "modeling_dream.py of Dream-org/Dream-v0-Instruct-7B"),
]

# The interface klass-patch relies on, per family.
LLADA_PARAMS = ("model", "prompt", "steps", "gen_length", "block_length", "temperature", "cfg_scale",
                "remasking", "mask_id")
DREAM_SAMPLE_PARAMS = ("input_ids", "attention_mask", "generation_config", "generation_tokens_hook_func",
                       "generation_logits_hook_func")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalized_sha256(data: bytes) -> str:
    text = data.decode("utf-8", errors="surrogateescape").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n")).rstrip("\n") + "\n"
    return sha256(text.encode("utf-8", errors="surrogateescape"))


def identify_bytes(data: bytes, family: Optional[str] = None,
                   versions: Optional[Iterable[UpstreamVersion]] = None) -> Optional[UpstreamVersion]:
    """The version (of ``family``, if given) among ``versions`` (default: ``KNOWN``) that ``data`` is."""
    raw, norm = sha256(data), normalized_sha256(data)
    for v in KNOWN if versions is None else versions:
        if (family is None or v.family == family) and (raw == v.sha256 or norm == v.normalized_sha256):
            return v
    return None


def known_ids(family: Optional[str] = None) -> List[str]:
    return sorted({v.id for v in KNOWN if family is None or v.family == family})


def module_file(module) -> Optional[Path]:
    f = getattr(module, "__file__", None)
    return Path(f) if f and Path(f).is_file() else None


def identify_module(module, family: str) -> str:
    """The version id of a loaded module: known id, ``standin``, or ``unknown (sha256 …)``."""
    if getattr(module, STANDIN_MARK, None):
        return "standin"
    path = module_file(module)
    if path is None:
        return "unknown (no source file)"
    data = path.read_bytes()
    v = identify_bytes(data, family)
    return v.id if v else f"unknown (sha256 {sha256(data)[:16]}…)"


def _missing_params(fn, required) -> List[str]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return list(required)
    return [p for p in required if p not in params]


def llada_missing(module) -> List[str]:
    """What a LLaDA ``generate`` module lacks for klass-patch (empty list: compatible)."""
    fn = getattr(module, "generate", None)
    if not callable(fn):
        return ["function generate"]
    return [f"generate parameter '{p}'" for p in _missing_params(fn, LLADA_PARAMS)]


def dream_missing(module) -> List[str]:
    """What a Dream ``generation_utils`` module lacks for klass-patch (empty list: compatible)."""
    mixin = getattr(module, "DreamGenerationMixin", None)
    if mixin is None:
        return ["class DreamGenerationMixin"]
    missing = [f"DreamGenerationMixin.{m}" for m in ("diffusion_generate", "_sample") if not hasattr(mixin, m)]
    if hasattr(mixin, "_sample"):
        missing += [f"_sample parameter '{p}'" for p in _missing_params(mixin._sample, DREAM_SAMPLE_PARAMS)]
    if not callable(getattr(module, "sample_tokens", None)):
        missing.append("function sample_tokens")
    return missing
