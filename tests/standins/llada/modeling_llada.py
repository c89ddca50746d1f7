"""Stand-in for LLaDA's ``modeling_llada.py``, written for klass-patch's tests with upstream's interface, not its
code.

``LLaDAModel`` is a plain ``nn.Module`` (a tiny bidirectional Llama-style transformer under ``transformer``: ``wte``,
``blocks``, ``ln_f``, ``ff_out``) whose layers are created with ``device=config.init_device``;
``LLaDAModelLM(PreTrainedModel)`` wraps it the way upstream's does: its ``__init__`` builds the inner model from a
``ModelConfig`` with ``init_device = "cpu"`` (so torch's default initialisation runs on the CPU, drawing from the
global RNG, even inside transformers 5.x's meta-device context) and never calls ``post_init()``; ``tie_weights(self)``
takes no arguments; ``forward`` reads ``self.config.use_cache`` when no ``use_cache`` is given. ``forward(input_ids,
attention_mask=[B, N] 0/1 or None)`` returns the logits of every position (no shift). For klass-patch's KV cache,
the blocks have upstream's structure: ``LLaDABlock.attention(q, k, v, attention_bias, layer_past, use_cache)`` with
``rotary_emb`` (``get_rotary_embedding``, ``apply_rotary_pos_emb``; queries taken as the last positions),
``_cast_attn_bias``, ``_scaled_dot_product_attention`` and ``attn_out``; the padding bias is additive, keys only.
"""

KLASS_PATCH_STANDIN = True  # tells klass_patch.versions this is a stand-in, not an upstream file

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig, ModelConfig


def create_model_config_from_pretrained_config(config: LLaDAConfig) -> ModelConfig:
    return ModelConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)
                          if hasattr(config, f.name)})


class RMSLayerNorm(nn.Module):
    def __init__(self, config: ModelConfig, size: int):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.weight = nn.Parameter(torch.ones(size, device=config.init_device))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE as upstream's interface has it: ``get_rotary_embedding(length, device)`` gives sin and cos
    ``[1, 1, length, head_dim]``; ``forward(q, k)`` rotates the keys at 0..n_k-1 and the queries as the last n_q of
    them. No buffers (upstream keeps its tables in a cache, not in the state dict)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def get_rotary_embedding(self, seq_len, device):
        dim = self.config.d_model // self.config.n_heads
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim)
        angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.sin()[None, None], angles.cos()[None, None]

    def rotate_half(self, x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    def apply_rotary_pos_emb(self, pos_sin, pos_cos, t):
        return ((t * pos_cos) + (self.rotate_half(t) * pos_sin)).to(t.dtype)

    def forward(self, q, k):
        q_, k_ = (q.float(), k.float()) if self.config.rope_full_precision else (q, k)
        n_q, n_k = q_.shape[-2], k_.shape[-2]
        sin, cos = self.get_rotary_embedding(n_k, q_.device)
        sin, cos = sin.type_as(q_), cos.type_as(q_)
        q_ = self.apply_rotary_pos_emb(sin[:, :, n_k - n_q:n_k], cos[:, :, n_k - n_q:n_k], q_)
        k_ = self.apply_rotary_pos_emb(sin, cos, k_)
        return q_.type_as(q), k_.type_as(k)


class LLaDABlock(nn.Module):
    """The attention of a block, with upstream's method names and signatures (what klass-patch's cache wraps)."""

    def __init__(self, layer_id: int, config: ModelConfig):
        super().__init__()
        self.layer_id, self.config = layer_id, config
        self.q_norm = self.k_norm = None
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=config.include_bias, device=config.init_device)
        self.rotary_emb = RotaryEmbedding(config)
        self.flash_attn_func = None

    @classmethod
    def _cast_attn_bias(cls, bias, input_dtype):
        return bias if bias.dtype == input_dtype else bias.to(input_dtype)

    def _scaled_dot_product_attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        if q.size(1) != k.size(1):
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False)

    def attention(self, q, k, v, attention_bias=None, layer_past=None, use_cache=False):
        B, T, C = q.size()
        hd = C // self.config.n_heads
        q = q.view(B, T, self.config.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, self.config.effective_n_kv_heads, hd).transpose(1, 2)
        v = v.view(B, T, self.config.effective_n_kv_heads, hd).transpose(1, 2)
        if layer_past is not None:
            k, v = torch.cat((layer_past[0], k), dim=-2), torch.cat((layer_past[1], v), dim=-2)
        present = (k, v) if use_cache else None
        n_q, n_k = q.shape[-2], k.shape[-2]
        q, k = self.rotary_emb(q, k)
        if attention_bias is not None:
            attention_bias = self._cast_attn_bias(attention_bias[:, :, n_k - n_q:n_k, :n_k], k.dtype)
        att = self._scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)
        return self.attn_out(att.transpose(1, 2).contiguous().view(B, T, C)), present


class LLaDALlamaBlock(LLaDABlock):
    def __init__(self, layer_id: int, config: ModelConfig):
        super().__init__(layer_id, config)
        d, dev, bias = config.d_model, config.init_device, config.include_bias
        kv = d // config.n_heads * config.effective_n_kv_heads
        self.attn_norm, self.ff_norm = RMSLayerNorm(config, d), RMSLayerNorm(config, d)
        self.q_proj = nn.Linear(d, d, bias=bias, device=dev)
        self.k_proj = nn.Linear(d, kv, bias=bias, device=dev)
        self.v_proj = nn.Linear(d, kv, bias=bias, device=dev)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=bias, device=dev)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=bias, device=dev)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=bias, device=dev)

    def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
        a = self.attn_norm(x)
        att, cache = self.attention(self.q_proj(a), self.k_proj(a), self.v_proj(a), attention_bias,
                                    layer_past=layer_past, use_cache=use_cache)
        x = x + att
        f = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(f)) * self.up_proj(f)), cache


class LLaDAModel(nn.Module):
    def __init__(self, config: ModelConfig, init_params: bool = True):
        super().__init__()
        self.config = config
        dev = config.init_device
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size or config.vocab_size, config.d_model, device=dev),
            blocks=nn.ModuleList(LLaDALlamaBlock(i, config) for i in range(config.n_layers)),
            ln_f=RMSLayerNorm(config, config.d_model)))
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, config.embedding_size or config.vocab_size,
                                                   bias=config.include_bias, device=dev)
        if init_params and dev != "meta":
            self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        assert not use_cache, "The kvcache is not suppotred for MDM."
        x = self.transformer.wte(input_ids)
        bias = None
        if attention_mask is not None and bool((attention_mask == 0).any()):  # keys only, additive, as upstream's
            m = attention_mask.to(torch.float)[:, None, None, :]
            bias = (1.0 - m) * torch.finfo(m.dtype).min
        for block in self.transformer.blocks:
            x, _ = block(x, bias)
        x = self.transformer.ln_f(x)
        out = self.transformer.wte if self.config.weight_tying else self.transformer.ff_out
        logits = F.linear(x, out.weight, getattr(out, "bias", None))
        return logits[..., :self.config.vocab_size]


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]

    def __init__(self, config: LLaDAConfig, model: Optional[LLaDAModel] = None, init_params: bool = False):
        super().__init__(config)  # and no post_init(), as upstream
        if model is None:
            model_config = create_model_config_from_pretrained_config(config)
            model_config.init_device = "cpu"  # always built on the CPU first, as upstream
            model = LLaDAModel(model_config, init_params=init_params)
        self.model = model

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, return_dict=None, **kwargs):
        if use_cache is None:
            use_cache = self.config.use_cache
        logits = self.model(input_ids, attention_mask=attention_mask, use_cache=use_cache)
        return CausalLMOutputWithPast(logits=logits)

    def can_generate(self) -> bool:
        return True

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return self.model.transformer.wte if self.config.weight_tying else self.model.transformer.ff_out

    def set_output_embeddings(self, value):
        self.model.transformer["wte" if self.config.weight_tying else "ff_out"] = value

    def tie_weights(self):
        if self.config.weight_tying:
            self.model.transformer.ff_out = self.model.transformer.wte
