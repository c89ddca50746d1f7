"""Stand-in for Dream's ``modeling_dream.py``, written for klass-patch's tests with upstream's interface, not its code.

A tiny bidirectional transformer with the class names, attributes and loading behaviour of upstream's that
transformers 5.x trips on: ``DreamRotaryEmbedding`` takes its initialiser from
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[self.rope_type]`` (``"default"``), keeps ``inv_freq`` as a
non-persistent buffer (with ``original_inv_freq``, ``rope_kwargs``, ``rope_init_fn``, ``attention_scaling``);
``DreamPreTrainedModel._init_weights`` initialises only Linear / Embedding weights, drawing into ``.weight.data``;
its ``from_pretrained`` reloads the generation config with ``DreamGenerationConfig.from_pretrained(...,
resume_download=...)``; ``DreamModel`` declares ``_tied_weights_keys`` as a list. As upstream's, the model's logits at
position i predict token i + 1 (``_sample`` shifts them), and ``forward(input_ids, attention_mask, position_ids)``
takes a boolean [B, 1, N, N] mask, ``"full"`` or None. For klass-patch's KV cache, as upstream's:
``forward(..., past_key_values=, use_cache=, cache_position=)``, and each attention calls
``past_key_value.update(key, value, layer_idx, cache_kwargs)`` after RoPE (before the GQA repeat) and attends with
what it returns; position ids default to ``cache_position``.
"""

KLASS_PATCH_STANDIN = True  # tells klass_patch.versions this is a stand-in, not an upstream file

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel

from .configuration_dream import DreamConfig
from .generation_utils import DreamGenerationConfig, DreamGenerationMixin


class DreamRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, h):
        dtype = h.dtype
        h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class DreamRotaryEmbedding(nn.Module):
    def __init__(self, config: DreamConfig, device=None):
        super().__init__()
        self.rope_kwargs = {}
        scaling = config.rope_scaling
        self.rope_type = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = self.rope_init_fn(self.config, device, **self.rope_kwargs)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_inv_freq = self.inv_freq

    def reset_parameters(self):
        inv_freq, self.attention_scaling = self.rope_init_fn(self.config, self.inv_freq.device, **self.rope_kwargs)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_inv_freq = self.inv_freq

    @torch.no_grad()
    def forward(self, x, position_ids):
        angles = self.inv_freq.float()[None, :, None] * position_ids[:, None, :].float()  # [B, D/2, N]
        angles = torch.cat([angles, angles], dim=1).transpose(1, 2)  # [B, N, D]
        return ((angles.cos() * self.attention_scaling).to(x.dtype),
                (angles.sin() * self.attention_scaling).to(x.dtype))


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + turned * sin[:, None]


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv = config.num_attention_heads, config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv
        self.head_dim = config.hidden_size // self.num_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, h, attention_mask, position_embeddings, past_key_value=None, cache_position=None):
        b, n, _ = h.shape
        q = self.q_proj(h).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.num_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.num_kv, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, *position_embeddings), _rotate(k, *position_embeddings)
        if past_key_value is not None:  # as upstream: a transformers-style cache, after RoPE, before repeat_kv
            cos, sin = position_embeddings
            k, v = past_key_value.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
        groups = self.num_heads // self.num_kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.input_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h, attention_mask, position_embeddings, past_key_value=None, cache_position=None):
        h = h + self.self_attn(self.input_layernorm(h), attention_mask, position_embeddings, past_key_value,
                               cache_position)
        m = self.post_attention_layernorm(h)
        return h + self.down_proj(self.act_fn(self.gate_proj(m)) * self.up_proj(m))


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        # as upstream: the generation config is read again, with the download options passed through
        model.generation_config = DreamGenerationConfig.from_pretrained(
            pretrained_model_name_or_path, cache_dir=kwargs.get("cache_dir"),
            force_download=kwargs.get("force_download", False), resume_download=kwargs.get("resume_download"),
            proxies=kwargs.get("proxies"), local_files_only=kwargs.get("local_files_only", False),
            token=kwargs.get("token"), revision=kwargs.get("revision", "main"), subfolder=kwargs.get("subfolder", ""),
            _from_auto=kwargs.get("_from_auto", False), _from_pipeline=kwargs.get("_from_pipeline"))
        return model


class DreamBaseModel(DreamPreTrainedModel):
    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, return_dict=None, cache_position=None, **kwargs):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if cache_position is None:
            cache_position = torch.arange(h.shape[1], device=h.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        position_embeddings = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask, position_embeddings, past_key_values, cache_position)
        return BaseModelOutput(last_hidden_state=self.norm(h))


class DreamModel(DreamGenerationMixin, DreamPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def reset_rope_parameters(self):
        self.model.rotary_emb.reset_parameters()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, return_dict=None, cache_position=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                            cache_position=cache_position).last_hidden_state
        return MaskedLMOutput(logits=self.lm_head(hidden))
