"""Loading what an evaluation needs: the model family (from the config), model and tokenizer, and for
LLaDA the user's ``generate.py`` (LLaDA's sampler is a script, not part of the model)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Optional

from .settings import FAMILIES

DTYPES = ("auto", "bfloat16", "float16", "float32")


def family_of_config(config) -> Optional[str]:
    """``llada`` or ``dream`` from ``config.model_type`` / ``config.architectures``; None if neither."""
    names = [str(getattr(config, "model_type", "") or "")]
    names += [str(a) for a in getattr(config, "architectures", None) or []]
    for family in FAMILIES:
        if any(family in name.lower() for name in names):
            return family
    return None


def _config(model_id: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id, trust_remote_code=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: cannot load the config of {model_id}: {e}") from None


def detect_family(model_id: str, family: Optional[str] = None) -> str:
    """The model's family, from its config (a cheap load: no weights). ``family`` (``--family``) is for
    configs that do not say (a derived model); one that contradicts the config is refused."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family (--family) must be one of {', '.join(FAMILIES)}, got {family!r}")
    config = _config(model_id)
    found = family_of_config(config)
    said = (f"model_type {getattr(config, 'model_type', None)!r}, architectures "
            f"{getattr(config, 'architectures', None)}")
    if found is None and family is None:
        raise ValueError(f"cannot tell the model family of {model_id} from its config ({said}); pass "
                         "--family llada or --family dream")
    if family is not None and found not in (None, family):
        raise ValueError(f"family (--family) is {family!r}, but {model_id} is a {found} model by its config "
                         f"({said}); pass --family {found}, or leave --family out")
    return family or found


def resolve_device_dtype(device: Optional[str], dtype: str):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype not in DTYPES:
        raise ValueError(f"dtype (--dtype) must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":  # the authors load in bfloat16 on GPU; CPUs are faster (and exact) in float32
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return device, getattr(torch, dtype)


def load_tokenizer(model_id: str):
    """The model's tokenizer (``AutoTokenizer``, remote code trusted); a ``ValueError`` naming ``--model`` if
    there is none. Loaded before the weights, so that a folder without one fails in seconds."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--model: no tokenizer could be loaded from {model_id} ({reason[:300]}); eval needs "
                         "the model's tokenizer files (tokenizer.json or tokenizer_config.json and its vocabulary) "
                         "next to its config") from None


def load_model(model_id: str, device: str, dtype):
    """``klass_patch.apply()`` first (so Dream's remote code is patched as it is imported), then the tokenizer
    (``load_tokenizer``: a folder without one fails before any weight is read), then the model (``AutoModel``,
    remote code trusted, in eval mode on ``device``)."""
    import klass_patch
    import transformers
    from packaging.version import Version
    from transformers import AutoModel

    klass_patch.apply()  # on transformers 5.x also klass_patch.compat's shims for Dream's and LLaDA's remote code
    tokenizer = load_tokenizer(model_id)
    # the dtype argument's name: `dtype` since 4.56 (`torch_dtype` warns there), `torch_dtype` before
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = AutoModel.from_pretrained(model_id, trust_remote_code=True, **{key: dtype}).to(device).eval()
    return model, tokenizer


def load_llada_generate(path: Optional[str], log=print):
    """The user's LLaDA ``generate.py`` loaded by path and patched (default ``./generate.py`` if there is
    one), or klass-patch's stand-in ``klass_patch.toy.llada_generate`` (same interface and algorithm)."""
    import klass_patch

    if path is None and Path("generate.py").is_file():
        path = "generate.py"
    if path is None:
        from ..toy import llada_generate

        log("No LLaDA generate.py given (--llada-generate) and none in the current folder: using klass-patch's "
            "stand-in klass_patch.toy.llada_generate (same interface and algorithm as upstream's).")
        klass_patch.apply(llada_generate)
        return llada_generate, "klass_patch.toy.llada_generate"
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--llada-generate: no such file: {file}")
    name = "klass_eval_llada_generate"
    spec = importlib.util.spec_from_file_location(name, str(file))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    klass_patch.apply(module)
    return module, str(file.resolve())
