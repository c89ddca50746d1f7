"""LLaDA's side of the KV cache (``use_cache``; the family-free part is ``klass_patch.cache``).

- The attachment: every ``LLaDABlock.attention`` of the model is wrapped per instance for the duration of a call
  (LLaDA's model forward refuses a cache and builds its bias for the input length), and runs through a
  :class:`~klass_patch.cache.KVCache` while the cache is in a forward phase.
- :func:`cached_forward`: the full and window forwards of a KLASS run, classifier-free guidance included.
- :class:`CachedModel`: a model proxy through which upstream's own ``generate`` loop runs with the cache.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import wrapt

from .cache import BlockForward, CacheConfig, KVCache, check_model_code, windows

__all__ = ["CachedModel", "cached_forward", "llada_attached", "llada_full_forward", "llada_window_forward"]

_LLADA_BLOCK_ATTRS = ("attention", "rotary_emb", "attn_out", "_scaled_dot_product_attention", "_cast_attn_bias",
                      "config", "layer_id")


def _llada_blocks(model):
    blocks = [m for m in model.modules() if any(c.__name__ == "LLaDABlock" for c in type(m).__mro__)]
    if not blocks:
        raise ValueError("use_cache: no LLaDABlock in this model; the LLaDA cache attaches to the attention of "
                         "LLaDA's modeling_llada.py (LLaDABlock.attention)")
    for b in blocks:
        missing = [a for a in _LLADA_BLOCK_ATTRS if not hasattr(b, a)]
        params = list(inspect.signature(b.attention).parameters)[:6]
        if missing or params != ["q", "k", "v", "attention_bias", "layer_past", "use_cache"]:
            raise ValueError(f"use_cache: {type(b).__name__} does not have the interface of LLaDA's LLaDABlock "
                             f"(missing {missing or 'nothing'}, attention parameters {params})")
        if not b.config.rope:
            raise ValueError("use_cache: the LLaDA cache needs RoPE (config.rope=True), as LLaDA's model does")
    return blocks


def _llada_rope(rotary, t, pos, length):
    """RoPE of ``t`` ([n, heads, T, hd]) at positions ``pos`` ([n, T]), computed as ``RotaryEmbedding.forward``
    computes it for those positions (which assumes the queries are the last ``T`` of ``length``)."""
    t_ = t.float() if rotary.config.rope_full_precision else t
    with torch.autocast(t.device.type, enabled=False):
        sin, cos = rotary.get_rotary_embedding(length, t_.device)
        sin, cos = sin.type_as(t_)[0, 0][pos].unsqueeze(1), cos.type_as(t_)[0, 0][pos].unsqueeze(1)
        t_ = rotary.apply_rotary_pos_emb(sin, cos, t_)
    return t_.type_as(t)


def _llada_attention(block, cache: KVCache, length: int):
    original = block.attention  # the bound method of the class

    def attention(q, k, v, attention_bias=None, layer_past=None, use_cache=False):
        if cache.phase is None or layer_past is not None or use_cache:
            return original(q, k, v, attention_bias, layer_past, use_cache)
        cfg = block.config
        B, T, C = q.size()
        dtype = k.dtype
        if cache.phase == "full":  # the original computes the output; the cache keeps its keys/values
            out = original(q, k, v, attention_bias, layer_past, use_cache)
        if block.q_norm is not None and block.k_norm is not None:
            q = block.q_norm(q).to(dtype=dtype)
            k = block.k_norm(k).to(dtype=dtype)
        hd = C // cfg.n_heads
        k = k.view(B, T, cfg.effective_n_kv_heads, hd).transpose(1, 2)
        v = v.view(B, T, cfg.effective_n_kv_heads, hd).transpose(1, 2)
        if cache.phase == "full":
            cache.update(_llada_rope(block.rotary_emb, k, torch.arange(T, device=k.device).expand(B, T), length),
                         v, block.layer_id)
            return out
        q = q.view(B, T, cfg.n_heads, hd).transpose(1, 2)
        q = _llada_rope(block.rotary_emb, q, cache.pos, length)
        k, v = cache.update(_llada_rope(block.rotary_emb, k, cache.pos, length), v, block.layer_id)
        keep = cache.window_key_mask()
        bias = None
        if keep is not None:  # the padding bias the model builds for a full forward, for these queries
            bias = torch.zeros(keep.shape, dtype=torch.float, device=q.device)
            bias.masked_fill_(~keep, torch.finfo(torch.float).min)
            bias = block._cast_attn_bias(bias[:, None, None, :], dtype)
        att = block._scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=0.0 if not block.training else cfg.attention_dropout, is_causal=False)
        att = att.transpose(1, 2).contiguous().view(B, T, C)
        return block.attn_out(att), None

    attention.__klass_patch_cache__ = True
    return attention


@contextlib.contextmanager
def llada_attached(model, cache: KVCache, length: int):
    """Within the block, every ``LLaDABlock`` of ``model`` runs its attention through ``cache`` while the cache is
    in a forward phase (``cache.full()``/``cache.window()``), and exactly as before otherwise. The wrappers are
    instance attributes, removed on exit; the model's class and file are untouched."""
    blocks = _llada_blocks(model)
    check_model_code(blocks[0], "llada")
    mine = []
    try:
        for b in blocks:
            if getattr(b.__dict__.get("attention"), "__klass_patch_cache__", False):
                raise RuntimeError("use_cache: this LLaDA model is already in a cached generate call")
            b.attention = _llada_attention(b, cache, length)
            mine.append(b)
        yield
    finally:
        for b in mine:
            b.__dict__.pop("attention", None)


def llada_full_forward(model, cache: KVCache, ids, attention_mask, sel):
    """A full forward of model rows ``sel`` that fills the cache; logits exactly a plain forward's."""
    with cache.full(sel):
        return (model(ids) if attention_mask is None else model(ids, attention_mask=attention_mask)).logits


def llada_window_forward(model, cache: KVCache, ids_window, sel, pos, valid, full_width=None):
    """A window forward of model rows ``sel``: ``ids_window`` are the ids at ``pos``; padding comes from
    ``cache.key_mask``."""
    with cache.window(sel, pos, valid, full_width):
        return model(ids_window).logits


def cached_forward(model, x, prompt_index, attention_mask, cache: CacheConfig, length, block_length, cfg_scale,
                   mask_id, logits_eos_inf, eos_id):
    """``(BlockForward, context)`` of a cached KLASS run: the full and window forwards of data rows (classifier-free
    guidance: their unconditional copies ride along as model rows ``rows + r``), and the context that attaches
    the cache to the model's attention for the run."""
    rows = prompt_index.shape[0]
    cfg = cfg_scale > 0.0
    kv = KVCache(rows * (2 if cfg else 1))
    if attention_mask is not None and bool((attention_mask == 0).any()):
        kv.key_mask = torch.cat([attention_mask != 0] * (2 if cfg else 1))

    def with_uncond(ids, sel):
        if not cfg:
            return ids, sel
        un = ids.masked_fill(prompt_index[sel], mask_id)
        return torch.cat([ids, un]), torch.cat([sel, sel + rows])

    def finish(out):
        if cfg:
            cond, uncond = torch.chunk(out, 2, dim=0)
            out = uncond + (cfg_scale + 1) * (cond - uncond)
        if logits_eos_inf:
            out[:, :, eos_id] = -torch.inf
        return out

    def full(sel):
        ids, msel = with_uncond(x[sel], sel)
        am = None if attention_mask is None else attention_mask[sel]
        am = torch.cat([am, am]) if cfg and am is not None else am
        return finish(llada_full_forward(model, kv, ids, am, msel))

    def window(sel, pos, valid, full_width):
        ids, msel = with_uncond(x[sel], sel)
        if cfg:
            pos, valid = torch.cat([pos, pos]), torch.cat([valid, valid])
        return finish(llada_window_forward(model, kv, ids.gather(1, pos), msel, pos, valid, full_width))

    return BlockForward(cache, length, block_length, 0, full, window), llada_attached(model, kv, length)


class CachedModel(wrapt.ObjectProxy):
    """A model proxy that runs upstream's own ``generate`` loop with the cache: upstream makes ``steps_per_block``
    forwards per block, all rows together, so the forward number says the block and step. A full forward at
    each block start (and every ``refresh_every``) returns the model's output; a window forward returns
    ``[rows, length, V]`` logits holding the window's and zeros elsewhere (upstream never reads them: its
    confidence there is ``-inf``, outside the block or not masked). Use within ``attached()``."""

    def __init__(self, model, prompt, attention_mask, gen_length, block_length, spb, cfg_scale,
                 cache: CacheConfig):
        super().__init__(model)
        rows, plen = prompt.shape
        copies = 2 if cfg_scale > 0.0 else 1
        self._self_cfg = (plen, int(block_length), spb, cache, plen + int(gen_length))
        self._self_kv = KVCache(rows * copies)
        if attention_mask is not None and bool((attention_mask == 0).any()):
            keep = torch.cat([attention_mask != 0, torch.ones((rows, int(gen_length)), dtype=torch.bool,
                                                              device=attention_mask.device)], dim=-1)
            keep = torch.cat([keep] * copies)
            self._self_kv.key_mask = keep if keep.device == model.device else keep.to(model.device)
        self._self_calls = 0

    def __call__(self, ids, attention_mask=None, **kwargs):
        plen, bl, spb, cache, _ = self._self_cfg
        block, step = divmod(self._self_calls, spb)
        self._self_calls += 1
        kv = self._self_kv
        if cache.refreshes(step):
            with kv.full():
                if attention_mask is None:
                    return self.__wrapped__(ids, **kwargs)
                return self.__wrapped__(ids, attention_mask=attention_mask, **kwargs)
        start = plen + block * bl
        starts = torch.full((ids.shape[0],), start, device=ids.device)
        pos, valid = windows(cache.mode, starts, ids.shape[1], bl, 0, ids.shape[1] - start)  # every row's window alike
        logits = llada_window_forward(self.__wrapped__, kv, ids.gather(1, pos), None, pos, valid, True)
        out = logits.new_zeros((*ids.shape, logits.shape[-1]))
        out[:, start:start + pos.shape[1]] = logits
        return _Logits(out)

    def attached(self):
        """The context attaching the cache to the model's attention for the call."""
        return llada_attached(self.__wrapped__, self._self_kv, self._self_cfg[4])


class _Logits:
    def __init__(self, logits):
        self.logits = logits
