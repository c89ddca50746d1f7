"""Dream's side of the KV cache (``use_cache``; the family-free part is ``klass_patch.cache``).

Dream's attention already calls ``past_key_value.update(...)`` after RoPE, so a :class:`~klass_patch.cache.KVCache`
is passed as ``past_key_values``, with the window's ``position_ids`` and a ``[rows, 1, window, length]`` mask.
:func:`cached_forward` gives a call's full and window forwards.
"""
from __future__ import annotations

import inspect

import torch

from .cache import BlockForward, CacheConfig, KVCache, check_model_code

__all__ = ["cached_forward", "check_dream", "dream_full_forward", "dream_window_forward"]


def _dream_layers(model):
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not layers:
        raise ValueError("use_cache: no Dream attention layers in this model; the Dream cache is passed as "
                         "past_key_values to Dream's modeling_dream.py")
    params = inspect.signature(model.forward).parameters
    missing = [p for p in ("position_ids", "past_key_values", "cache_position") if p not in params]
    if missing:
        raise ValueError(f"use_cache: this model's forward lacks {missing} (Dream's modeling_dream.py has them)")
    return layers


def check_dream(model) -> None:
    """Raise ``ValueError`` unless ``model`` is Dream's model code (by interface); warn on an unknown file."""
    check_model_code(_dream_layers(model)[0], "dream")


def dream_full_forward(model, cache: KVCache, ids, mask4d, tok_idx, sel):
    """Full forward of rows ``sel`` (``mask4d``/``tok_idx`` already those rows', or ``"full"``/None)."""
    length = ids.shape[1]
    with cache.full(sel):
        return model(ids, mask4d, tok_idx, past_key_values=cache, use_cache=False,
                     cache_position=torch.arange(length, device=ids.device)).logits


def dream_window_forward(model, cache: KVCache, ids_window, sel, pos, valid, mask4d, tok_idx, full_width=None):
    """Window forward of rows ``sel`` querying ``pos``: position ids at the queries' true positions (``tok_idx``
    of the padded rows), mask = the full forward's mask rows for the queries (``mask4d``: those rows', or
    ``"full"``)."""
    if isinstance(mask4d, torch.Tensor):
        length = mask4d.shape[-1]
        mask = mask4d[:, 0].gather(1, pos.unsqueeze(-1).expand(-1, -1, length)).unsqueeze(1)
    else:
        mask = None
    position_ids = pos if tok_idx is None else tok_idx.gather(1, pos)
    with cache.window(sel, pos, valid, full_width):
        return model(ids_window, mask, position_ids, past_key_values=cache, use_cache=False,
                     cache_position=pos[0]).logits


def cached_forward(model, x, mask4d, tok_idx, cache: CacheConfig, block_length) -> BlockForward:
    """The cached forwards of a Dream call (``klass_patch.cache``): full and window forwards of data rows of ``x``
    (updated in place by the loop), with upstream's mask and position ids of those rows."""
    kv = KVCache(x.shape[0])

    def rows_of(sel):
        return (mask4d[sel] if isinstance(mask4d, torch.Tensor) else mask4d,
                None if tok_idx is None else tok_idx[sel])

    def full(sel):
        return dream_full_forward(model, kv, x[sel], *rows_of(sel), sel)

    def window(sel, pos, valid, full_width):
        return dream_window_forward(model, kv, x[sel].gather(1, pos), sel, pos, valid, *rows_of(sel), full_width)

    return BlockForward(cache, x.shape[1], block_length, 1, full, window)
