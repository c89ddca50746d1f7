"""Stand-in for LLaDA's ``configuration_llada.py``, written for klass-patch's tests with upstream's interface, not
its code.

``ModelConfig`` holds the model's own settings (a dataclass, as in OLMo-style code); ``LLaDAConfig`` is the
``PretrainedConfig`` with ``model_type = "llada"`` whose ``__init__(use_cache=False, **kwargs)`` merges the
``ModelConfig`` defaults with the keyword arguments and passes everything, ``use_cache`` included, through
``super().__init__(**kwargs)``, as upstream's does (so transformers 5.x, which takes generation parameters out of
those keyword arguments, drops ``use_cache``). Tiny defaults.
"""

KLASS_PATCH_STANDIN = True  # tells klass_patch.versions this is a stand-in, not an upstream file

from dataclasses import asdict, dataclass
from typing import Optional

from transformers import PretrainedConfig


@dataclass
class ModelConfig:
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    n_layers: int = 2
    mlp_hidden_size: int = 128
    vocab_size: int = 256
    embedding_size: Optional[int] = 256
    max_sequence_length: int = 512
    rope_theta: float = 500000.0
    rope: bool = True
    rope_full_precision: bool = True
    attention_dropout: float = 0.0
    rms_norm_eps: float = 1e-5
    include_bias: bool = False
    weight_tying: bool = False
    init_device: Optional[str] = None
    init_std: float = 0.02
    mask_token_id: int = 255
    pad_token_id: int = 250
    eos_token_id: int = 250

    @property
    def effective_n_kv_heads(self):
        return self.n_kv_heads or self.n_heads


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, use_cache: bool = False, **kwargs):
        merged = asdict(ModelConfig())
        merged.update(kwargs)
        merged["use_cache"] = use_cache
        merged.setdefault("architectures", ["LLaDAModelLM"])
        super().__init__(**merged)

    @property
    def num_attention_heads(self):
        return self.n_heads

    @property
    def num_hidden_layers(self):
        return self.n_layers

    @property
    def hidden_size(self):
        return self.d_model
