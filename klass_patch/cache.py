"""KV cache for block-wise decoding (``use_cache="prefix"|"dual"``), attached at run time to the model's own code.

A masked diffusion model attends both ways, so nothing it computes stays exact once any token changes. A cache
trades that for speed, as Fast-dLLM does: at a *refresh* the whole sequence goes through the model (the logits are
exactly a plain forward's) and every layer's keys and values are kept; until the next refresh a step sends only a
*window* of positions through the model, whose queries attend to the window's fresh keys/values and to the kept
ones everywhere else.

- ``"prefix"``: the window is the current block and everything after it; the prefix's K/V come from the refresh.
- ``"dual"``: the window is the current block only (Dream: the block and the position before it, whose logits
  predict the block's first token); prefix and suffix K/V come from the refresh.

Refresh rule: a full forward at each block start (the first forward a row makes in a block), and, with
``cache_refresh_every=N``, also every N-th forward inside a block. Rows of a batch keep their own blocks: a
step sends the rows that refresh through a full forward and the others through a window forward (two calls at
most), so each row makes exactly the forwards of its own batch-1 cached run; rows with no block left are not
sent at all.

What this module holds: :class:`CacheConfig` (the options and their validation, before any forward),
:func:`windows` (the positions a step queries), :class:`KVCache` (the kept K/V and the scatter of a window's fresh
ones), :class:`BlockForward` (one step's forward for rows in different blocks and phases) and
:func:`check_model_code` (the model files are pinned by sha256, ``versions.MODEL_FILES``: another file is used if
its interface matches, with a warning). Nothing here knows a model family: the attachments live next to their
families, ``klass_patch.llada_cache`` (LLaDA's ``LLaDABlock.attention`` wrapped per instance for the duration of
a call: its model forward refuses a cache and builds its bias for the input length) and
``klass_patch.dream_cache`` (Dream's attention already calls ``past_key_value.update(...)`` after RoPE, so a
:class:`KVCache` is passed as ``past_key_values`` with the window's ``position_ids`` and a
``[rows, 1, window, length]`` mask).

KLASS under a cache (the adapters implement it): candidates are the masked positions of the row's current
block, which every forward computes. A position whose logits a step does not compute is never stable: when the
next block's distributions were not computed by the block's last forward (``"dual"``), that block's positions
start afresh (history reset, KL unknown), exactly as the first block does; with ``"prefix"`` they were
computed, and are remembered as without a cache.
"""
from __future__ import annotations

import contextlib
import numbers
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .blocks import rows_where

__all__ = ["MODES", "CacheConfig", "KVCache", "BlockForward", "windows", "cache_options", "check_model_code"]

MODES = ("prefix", "dual")
CACHE_PARAMS = ("use_cache", "cache_refresh_every")


@dataclass(frozen=True)
class CacheConfig:
    """``mode``: ``"prefix"`` or ``"dual"``; ``refresh_every``: also refresh every N-th forward of a block (None:
    at block starts only)."""

    mode: str
    refresh_every: Optional[int] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"use_cache must be one of None, {', '.join(map(repr, MODES))}, got {self.mode!r}")
        n = self.refresh_every
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
            raise ValueError(f"cache_refresh_every must be a positive int or None, got {n!r}")

    def refreshes(self, step_in_block: int) -> bool:
        """Whether the forward number ``step_in_block`` (from 0) of a block is a full forward."""
        return step_in_block == 0 or (self.refresh_every is not None and step_in_block % self.refresh_every == 0)

    def refreshes_t(self, step_in_block: torch.Tensor) -> torch.Tensor:
        """:meth:`refreshes` of each entry of a tensor of step indices."""
        if self.refresh_every is None:
            return step_in_block == 0
        return (step_in_block == 0) | (step_in_block % self.refresh_every == 0)


def cache_options(kwargs: dict) -> Optional[CacheConfig]:
    """Take ``use_cache`` and ``cache_refresh_every`` out of ``kwargs`` and check them (before any forward).

    ``use_cache``: None or False (no cache: today's code path), ``"prefix"`` or ``"dual"``; anything else is a
    ``ValueError``. ``cache_refresh_every`` is accepted only with a cache (None means its default)."""
    mode = kwargs.pop("use_cache", None)
    every = kwargs.pop("cache_refresh_every", None)
    if mode is None or mode is False:
        if every is not None:
            raise ValueError(f"cache_refresh_every={every!r} is used only with use_cache='prefix' or 'dual'")
        return None
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"use_cache must be None, 'prefix' or 'dual', got {mode!r}"
                         + (" (klass-patch's cache is chosen by mode)" if mode is True else ""))
    return CacheConfig(mode, every)


def windows(mode: str, starts: torch.Tensor, length: int, block_length: int, shift: int = 0,
            width: Optional[int] = None):
    """The positions each row queries at a cached step: ``(pos, valid)``, both ``[rows, width]``.

    ``starts``: the first position of each row's current block. The window starts ``shift`` positions earlier
    (Dream: 1, its logits at i - 1 predict i) and covers the block (``"dual"``) or everything to the end
    (``"prefix"``). ``width`` is the widest row's; a narrower row's tail is not valid (its positions are clamped
    to the last one, computed but never written to the cache nor read). Entry ``j`` of row ``r`` is position
    ``starts[r] - shift + j``: the logits of a candidate ``p`` are read at ``p - starts[r]``. ``width``: the
    widest row's, when the host knows it (otherwise it is read from ``starts``)."""
    lo = starts - shift
    if mode == "dual":
        width = block_length + shift
    elif width is None:
        width = int((length - lo).max())
    pos = lo.unsqueeze(-1) + torch.arange(width, device=starts.device)
    valid = pos < length
    return pos.clamp_(max=length - 1), valid


class KVCache:
    """Every layer's keys and values (after RoPE, ``[rows, kv_heads, length, head_dim]``) of the last refresh.

    The model's attention calls :meth:`update` with its fresh keys/values. In a full forward (``full()``) they
    are kept (for the rows given) and returned unchanged, so the forward is exactly a plain one. In a window
    forward (``window()``) they are written at the window's positions (valid entries only) into the kept ones,
    which are returned: the queries see fresh K/V in the window and the refresh's elsewhere. ``update`` also has
    ``transformers``' ``Cache.update`` signature, which is how Dream's attention calls it."""

    def __init__(self, rows: int):
        self.rows = rows
        self.k, self.v = {}, {}
        self.phase = None
        self.sel = None  # model rows of the current forward (LongTensor), None: all rows in order
        self.pos = self.source = None  # window forward: queried positions; per entry, the entry whose K/V it writes
        self.key_mask = None  # [rows, length] bool, False at padding (only when the batch has padding)

    @contextlib.contextmanager
    def _phase(self, phase, sel, pos=None, source=None):
        if sel is not None and len(sel) == self.rows:
            sel = None
        self.phase, self.sel, self.pos, self.source = phase, sel, pos, source
        try:
            yield self
        finally:
            self.phase = self.sel = self.pos = self.source = None

    def full(self, sel=None):
        """Context of a full forward of model rows ``sel`` (None: all)."""
        return self._phase("full", sel)

    def window(self, sel, pos, valid, full_width: Optional[bool] = None):
        """Context of a window forward of model rows ``sel`` querying ``pos`` (``[n, width]``, ``valid`` likewise: a
        row's valid entries come first). ``full_width``: every entry is valid, when the caller knows it (else read).
        An invalid entry repeats its row's last position (``windows``); it writes the K/V of that position's valid
        entry, so that every write to a position carries the same values (a scatter's order cannot matter)."""
        if full_width is None:
            full_width = bool(valid.all())
        source = None
        if not full_width:  # found once per forward, not in every layer's update
            last = valid.sum(-1, keepdim=True) - 1
            source = torch.where(valid, torch.arange(valid.shape[-1], device=valid.device), last)
        return self._phase("window", sel, pos, source)

    def window_key_mask(self):
        """``[n, length]`` bool key mask of the rows of the current window forward, or None without padding."""
        if self.key_mask is None:
            return None
        return self.key_mask if self.sel is None else self.key_mask[self.sel]

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if self.phase == "full":
            if self.sel is None:
                self.k[layer_idx], self.v[layer_idx] = key_states, value_states
            else:
                for store, new in ((self.k, key_states), (self.v, value_states)):
                    if layer_idx not in store:
                        store[layer_idx] = new.new_zeros((self.rows, *new.shape[1:]))
                    store[layer_idx][self.sel] = new
            return key_states, value_states
        if self.phase != "window":
            raise RuntimeError("klass_patch KVCache.update called outside a cached forward")
        if layer_idx not in self.k:
            raise RuntimeError(f"klass_patch KVCache: no refresh has filled layer {layer_idx}")
        keys, values = self.k[layer_idx], self.v[layer_idx]
        if self.sel is not None:  # a copy: rows of a window forward are a subset (kept values are not needed back)
            keys, values = keys[self.sel], values[self.sel]
        if self.source is not None:  # an invalid entry carries its position's valid entry's K/V
            src = self.source[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[-1])
            key_states, value_states = key_states.gather(2, src), value_states.gather(2, src)
        idx = self.pos[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        keys.scatter_(2, idx, key_states.to(keys.dtype))
        values.scatter_(2, idx, value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx=0):  # transformers' Cache interface (not used when cache_position is given)
        return 0


class BlockForward:
    """One step's forward for rows that may sit in different blocks and phases.

    ``full(sel)``: the family's full forward of data rows ``sel`` (LongTensor), returning ``[n, length, V]``
    logits; ``window(sel, pos, valid, full_width)``: its window forward, returning ``[n, width, V]``
    (``full_width``: every entry is valid). ``__call__(blocks)`` (a ``klass_patch.blocks.RowBlocks``) returns the
    window logits of every row (``[rows, width, V]``, entry ``j`` of row ``r`` at position ``start[r] - shift + j``;
    rows not active are zeros, never read). Which rows refresh is known on the host (the blocks' host copy), so
    the rows of each forward are selected without a host read."""

    def __init__(self, config: CacheConfig, length: int, block_length: int, shift: int,
                 full: Callable, window: Callable):
        self.config, self.length, self.block_length, self.shift = config, length, block_length, shift
        self.full, self.window = full, window

    def __call__(self, blocks) -> torch.Tensor:
        lo = [s - self.shift for s in blocks.starts()]
        width = self.block_length + self.shift if self.config.mode == "dual" else max(self.length - a for a in lo)
        pos, valid = windows(self.config.mode, blocks.starts_t(), self.length, self.block_length, self.shift, width)
        refresh = [a and self.config.refreshes(s) for a, s in zip(blocks.active, blocks.step)]
        refresh_t = blocks.active_t & self.config.refreshes_t(blocks.step_t)
        parts = []
        for flag, mask_t in ((True, refresh_t), (False, blocks.active_t & ~refresh_t)):
            chosen = [r for r, a in enumerate(blocks.active) if a and refresh[r] == flag]
            if not chosen:
                continue
            sel = rows_where(mask_t, len(chosen))
            if flag:
                logits = self.full(sel)
                logits = logits[torch.arange(len(chosen), device=logits.device).unsqueeze(-1), pos[sel]]
            else:
                logits = self.window(sel, pos[sel], valid[sel], all(self.length - lo[r] >= width for r in chosen))
            parts.append((sel, logits, len(chosen)))
        if len(parts) == 1 and parts[0][2] == blocks.rows:
            return parts[0][1]
        out = parts[0][1].new_zeros((blocks.rows, pos.shape[1], parts[0][1].shape[-1]))
        for sel, logits, _ in parts:
            out[sel] = logits
        return out


# ---- model code fingerprints -------------------------------------------------------------------------------

_WARNED = set()


def check_model_code(obj, family: str) -> str:
    """The version of the model file defining ``type(obj)`` (``versions.MODEL_FILES``): its id, ``standin``, or
    ``unknown``, with a warning (once per file) that the cache was written for the known file."""
    from . import versions
    module = sys.modules.get(type(obj).__module__)
    if getattr(module, versions.STANDIN_MARK, None):
        return "standin"
    path = versions.module_file(module) if module is not None else None
    data = path.read_bytes() if path is not None else None
    found = versions.identify_bytes(data, family, versions.MODEL_FILES) if data is not None else None
    if found is not None:
        return found.id
    key = (family, str(path))
    if key not in _WARNED:
        _WARNED.add(key)
        known = ", ".join(v.sha256[:16] + "…" for v in versions.MODEL_FILES if v.family == family)
        what = f"{path} (sha256 {versions.sha256(data)[:16]}…)" if data is not None else "a model file not on disk"
        warnings.warn(f"use_cache: the {family} model code is {what}, not a known version ({known}); the cache "
                      "relies on its attention interface, which matched, but it was checked on the known file only",
                      RuntimeWarning, stacklevel=3)
    return "unknown"
