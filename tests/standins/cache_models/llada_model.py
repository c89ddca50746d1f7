"""Stand-in for LLaDA's ``modeling_llada.py`` with the structure klass-patch's KV cache attaches to (written for the
tests, not upstream's code): ``LLaDABlock.attention(q, k, v, attention_bias, layer_past, use_cache)`` with RoPE from
``rotary_emb`` (``get_rotary_embedding(length, device)`` -> sin, cos ``[1, 1, length, head_dim]``;
``apply_rotary_pos_emb(sin, cos, t)``; queries assumed to be the last positions), ``_cast_attn_bias``,
``_scaled_dot_product_attention``, ``attn_out``; the model builds an additive ``[B, 1, 1, N]`` padding bias from a
0/1 ``attention_mask`` and refuses a cache, as upstream's does. Logits of every position, no shift.
"""

KLASS_PATCH_STANDIN = True

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab_size: int = 96
    d_model: int = 32
    n_heads: int = 4
    n_kv_heads: int = 2
    n_layers: int = 2
    mlp_hidden_size: int = 64
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 10000.0
    max_sequence_length: int = 256
    attention_dropout: float = 0.0
    mask_token_id: int = 95

    @property
    def effective_n_kv_heads(self):
        return self.n_kv_heads


class RotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config

    def get_rotary_embedding(self, seq_len, device):
        dim = self.config.d_model // self.config.n_heads
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim))
        ang = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float), inv)
        ang = torch.cat([ang, ang], dim=-1)
        return ang.sin()[None, None], ang.cos()[None, None]

    def rotate_half(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def apply_rotary_pos_emb(self, pos_sin, pos_cos, t):
        return ((t * pos_cos) + (self.rotate_half(t) * pos_sin)).to(t.dtype)

    def forward(self, q, k):
        q_, k_ = (q.float(), k.float()) if self.config.rope_full_precision else (q, k)
        n_q, n_k = q_.shape[-2], k_.shape[-2]
        sin, cos = self.get_rotary_embedding(n_k, q_.device)
        sin, cos = sin.type_as(q_), cos.type_as(q_)
        q_ = self.apply_rotary_pos_emb(sin[:, :, n_k - n_q:n_k], cos[:, :, n_k - n_q:n_k], q_)  # queries come last
        k_ = self.apply_rotary_pos_emb(sin, cos, k_)
        return q_.type_as(q), k_.type_as(k)


class LLaDABlock(nn.Module):
    def __init__(self, layer_id, config):
        super().__init__()
        self.layer_id, self.config = layer_id, config
        d, hd = config.d_model, config.d_model // config.n_heads
        self.q_norm = self.k_norm = None
        self.attn_out = nn.Linear(d, d, bias=False)
        self.rotary_emb = RotaryEmbedding(config)
        self.flash_attn_func = None

    @classmethod
    def _cast_attn_bias(cls, bias, input_dtype):
        return bias.to(input_dtype) if bias.dtype != input_dtype else bias

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
    def __init__(self, layer_id, config):
        super().__init__(layer_id, config)
        d, kv = config.d_model, config.d_model // config.n_heads * config.effective_n_kv_heads
        self.attn_norm, self.ff_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d, bias=False), nn.Linear(d, kv), nn.Linear(d, kv)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
        h = self.attn_norm(x)
        att, cache = self.attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), attention_bias,
                                    layer_past=layer_past, use_cache=use_cache)
        x = x + att
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)), cache


class LLaDAModelLM(nn.Module):
    def __init__(self, config: Optional[Config] = None, seed: int = 0):
        super().__init__()
        self.config = config = config or Config()
        g = torch.Generator().manual_seed(seed)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDALlamaBlock(i, config) for i in range(config.n_layers))
        self.ln_f = nn.RMSNorm(config.d_model)
        self.ff_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        with torch.no_grad():
            for _, p in sorted(self.named_parameters()):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1
                        else torch.randn(p.shape, generator=g) * (3.0 / p.shape[-1] ** 0.5))
        self.eval()

    @property
    def device(self):
        return self.wte.weight.device

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
        assert past_key_values is None and not use_cache, "The kvcache is not suppotred for MDM."
        x = self.wte(input_ids)
        bias = None
        if attention_mask is not None and 0.0 in attention_mask:
            m = attention_mask.to(torch.float)[:, None, None, :]
            bias = (1.0 - m) * torch.finfo(m.dtype).min
        for block in self.blocks:
            x, _ = block(x, bias)
        return SimpleNamespace(logits=self.ff_out(self.ln_f(x)))
