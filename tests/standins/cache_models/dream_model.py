"""Stand-in for Dream's ``modeling_dream.py`` with the structure klass-patch's KV cache uses (written for the tests,
not upstream's code): ``forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
cache_position)``; each attention applies RoPE at ``position_ids``, then calls
``past_key_value.update(key, value, layer_idx, cache_kwargs)`` and attends with what it returns (GQA: ``repeat_kv``
after the update); the mask is a boolean ``[B, 1, N, N]`` tensor, ``"full"`` or None. Logits at i predict i + 1.
``make_model(mixin, generation_config)`` mixes in a ``DreamGenerationMixin``.
"""

KLASS_PATCH_STANDIN = True

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab_size: int = 96
    hidden_size: int = 32
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_hidden_layers: int = 2
    intermediate_size: int = 64
    rope_theta: float = 10000.0


def _rotate(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DreamSdpaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        h, kv = config.hidden_size, self.num_key_value_heads * self.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, kv), nn.Linear(h, kv)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.rotary_emb = None  # as upstream, the model's shared rotary embedding is what is used

    def forward(self, x, attention_mask, position_embeddings, past_key_value=None, cache_position=None):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = q * cos[:, None] + _rotate(q) * sin[:, None], k * cos[:, None] + _rotate(k) * sin[:, None]
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = DreamSdpaAttention(config, layer_idx)
        h, m = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, m, bias=False), nn.Linear(h, m, bias=False), \
            nn.Linear(m, h, bias=False)
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(h), nn.RMSNorm(h)

    def forward(self, x, attention_mask, position_embeddings, past_key_value=None, cache_position=None):
        x = x + self.self_attn(self.input_layernorm(x), attention_mask, position_embeddings, past_key_value,
                               cache_position)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DreamModelBase(nn.Module):
    def __init__(self, config=None, seed=0):
        super().__init__()
        self.config = config = config or Config()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(self.named_parameters()):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1
                        else torch.randn(p.shape, generator=g) * (3.0 / p.shape[-1] ** 0.5))
        self.eval()

    @property
    def device(self):
        return self.embed_tokens.weight.device

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                cache_position=None, **kwargs):
        x = self.embed_tokens(input_ids)
        if cache_position is None:
            cache_position = torch.arange(input_ids.shape[1], device=x.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        d = self.config.hidden_size // self.config.num_attention_heads
        inv = 1.0 / self.config.rope_theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float) / d)
        ang = position_ids[..., None].float() * inv
        ang = torch.cat([ang, ang], dim=-1)
        emb = (ang.cos().to(x.dtype), ang.sin().to(x.dtype))
        for layer in self.layers:
            x = layer(x, attention_mask, emb, past_key_values, cache_position)
        return SimpleNamespace(logits=self.lm_head(self.norm(x)))


def make_model(mixin, generation_config, **kwargs):
    class DreamModel(DreamModelBase, mixin):
        pass

    model = DreamModel(**kwargs)
    model.generation_config = generation_config
    return model
