"""Stand-in for Dream's ``configuration_dream.py``, written for klass-patch's tests with upstream's interface
(class name, ``model_type``, fields and their defaults' roles), not its code.

A ``PretrainedConfig`` whose ``model_type`` is ``"Dream"``; rope settings are validated by transformers'
``rope_config_validation`` as upstream does; ``mask_token_id`` and ``pad_token_id`` are set after the base
``__init__``. Tiny defaults: the tests build models of a few hundred kB.
"""

KLASS_PATCH_STANDIN = True  # tells klass_patch.versions this is a stand-in, not an upstream file

from transformers.configuration_utils import PretrainedConfig
from transformers.modeling_rope_utils import rope_config_validation


class DreamConfig(PretrainedConfig):
    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=512,
                 initializer_range=0.02, rms_norm_eps=1e-6, use_cache=False, tie_word_embeddings=False,
                 rope_theta=10000.0, rope_scaling=None, attention_dropout=0.0, mask_token_id=199, pad_token_id=198,
                 **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps, self.use_cache = initializer_range, rms_norm_eps, use_cache
        self.rope_theta, self.rope_scaling, self.attention_dropout = rope_theta, rope_scaling, attention_dropout
        if self.rope_scaling is not None and "type" in self.rope_scaling:  # the old spelling
            self.rope_scaling["rope_type"] = self.rope_scaling["type"]
        rope_config_validation(self)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
