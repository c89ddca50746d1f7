"""Stand-in for LLaDA's ``modeling_llada.py``, written for klass-patch's tests with upstream's interface, not its
code.

``LLaDAModel`` is a plain ``nn.Module`` (a tiny bidirectional Llama-style transformer under ``transformer``: ``wte``,
``blocks``, ``ln_f``, ``ff_out``) whose layers are created with ``device=config.init_device``;
``LLaDAModelLM(PreTrainedModel)`` wraps it the way upstream's does: its ``__init__`` builds the inner model from a
``ModelConfig`` with ``init_device = "cpu"`` (so torch's default initialisation runs on the CPU, drawing from the
global RNG, even inside transformers 5.x's meta-device context) and never calls ``post_init()``; ``tie_weights(self)``
takes no arguments; ``forward`` reads ``self.config.use_cache`` when no ``use_cache`` is given. ``forward(input_ids,
attention_mask=[B, N] 0/1 or None)`` returns the logits of every position (no shift).
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


def _rope(x, theta):
    """Rotary embedding of [B, H, N, D], computed on the fly (upstream keeps it in a cache, not in buffers)."""
    n, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float) / d)
    angles = torch.outer(torch.arange(n, device=x.device, dtype=torch.float), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    turned = torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)
    return (x.float() * angles.cos() + turned.float() * angles.sin()).to(x.dtype)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig):
        super().__init__()
        self.layer_id, self.config = layer_id, config
        d, dev, bias = config.d_model, config.init_device, config.include_bias
        self.n_kv = config.n_kv_heads or config.n_heads
        kv = d // config.n_heads * self.n_kv
        self.attn_norm, self.ff_norm = RMSLayerNorm(config, d), RMSLayerNorm(config, d)
        self.q_proj = nn.Linear(d, d, bias=bias, device=dev)
        self.k_proj = nn.Linear(d, kv, bias=bias, device=dev)
        self.v_proj = nn.Linear(d, kv, bias=bias, device=dev)
        self.attn_out = nn.Linear(d, d, bias=bias, device=dev)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=bias, device=dev)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=bias, device=dev)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=bias, device=dev)

    def forward(self, x, attention_bias=None):
        b, n, d = x.shape
        h, hd = self.config.n_heads, d // self.config.n_heads
        a = self.attn_norm(x)
        q = self.q_proj(a).view(b, n, h, hd).transpose(1, 2)
        k = self.k_proj(a).view(b, n, self.n_kv, hd).transpose(1, 2)
        v = self.v_proj(a).view(b, n, self.n_kv, hd).transpose(1, 2)
        q, k = _rope(q, self.config.rope_theta), _rope(k, self.config.rope_theta)
        k, v = k.repeat_interleave(h // self.n_kv, dim=1), v.repeat_interleave(h // self.n_kv, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, n, d))
        f = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(f)) * self.up_proj(f))


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
        if attention_mask is not None and bool((attention_mask == 0).any()):
            bias = attention_mask.bool()[:, None, None, :]  # keys only, as LLaDA's additive bias
        for block in self.transformer.blocks:
            x = block(x, bias)
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
