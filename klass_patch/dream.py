"""Dream adapter: KLASS as an ``alg`` of Dream's ``DreamGenerationMixin.diffusion_generate``.

What Dream adds to the generic algorithm (``core``): candidates are all masked positions; the token is
the argmax of the softmax in the logits' dtype; the confidence test is not strict (``>=``); there is no
step-index guard; a row with no ready position unmasks exactly one position, the argmax over its masked
positions of the confidence returned by upstream's ``sample_tokens`` (which samples at temperature > 0),
writing the argmax token there. A row whose masks are gone makes no more forwards; the loop stops when
no row has a mask left. Everything else (lengths, special tokens, attention mask, hooks) is upstream's.
At temperature 0 each row of a batch comes out exactly as alone; at temperature > 0 the rows draw from
one random stream, as upstream's do, so a row is reproducible with the same batch and seed, not alone.
"""
from __future__ import annotations

import contextvars
import inspect
import math
import numbers
import re
from typing import Optional

import torch
import torch.nn.functional as F

from .cache import BlockForward, CacheConfig, KVCache, cache_options, check_dream, dream_full_forward
from .cache import dream_window_forward
from .core import (
    GenerateOutput,
    KlassConfig,
    Observer,
    StabilityTracker,
    StepRecorder,
    klass_options,
    low_precision_max_position,
    masks_left_warning,
    ready_mask,
    select_ready,
)

# Options of the current diffusion_generate call, read by the patched _sample it calls.
_CALL = contextvars.ContextVar("klass_patch_dream_call", default=None)


# Upstream's algorithms (its _sample raises RuntimeError for any other, but only after the first forward).
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "klass")


def algorithms(module) -> tuple:
    """The ``alg`` values ``module``'s ``_sample`` accepts: upstream's, KLASS, and any other a derived file
    tests for (``alg == '...'``)."""
    try:
        source = inspect.getsource(module.DreamGenerationMixin._sample)
    except (OSError, TypeError):
        return ALGS
    found = re.findall(r"""alg\s*==\s*['"]([\w-]+)['"]""", source)
    return ALGS + tuple(a for a in dict.fromkeys(found) if a not in ALGS)


def make_diffusion_generate_wrapper(module):
    """The wrapt wrapper of ``DreamGenerationMixin.diffusion_generate``: takes KLASS's keyword arguments out
    of the call (upstream would drop them) and checks ``alg`` and them, before any forward."""
    algs = algorithms(module)

    def wrapper(wrapped, instance, args, kwargs):
        config = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        config = config if config is not None else getattr(instance, "generation_config", None)
        alg = kwargs["alg"] if "alg" in kwargs else getattr(config, "alg", None)  # as upstream resolves it
        opts = klass_options(kwargs, alg, algs)
        if "save_steps" in kwargs:
            opts["save_steps"] = kwargs.pop("save_steps")
        if alg == "klass":
            KlassConfig.from_kwargs(dict(opts), defaults=config)  # raises before any forward
        hooks = ("generation_logits_hook_func", "generation_tokens_hook_func")
        cached = _cache_call(kwargs, alg, any(h in kwargs for h in hooks))  # use_cache=...: None without
        if not opts and alg != "klass" and cached is None:
            return wrapped(*args, **kwargs)
        if cached is not None:
            opts["cache"] = cached
        token = _CALL.set(dict(opts, hooks_given=any(h in kwargs for h in hooks)))
        try:
            return wrapped(*args, **kwargs)
        finally:
            _CALL.reset(token)

    return wrapper


def _cache_call(kwargs, alg, hooks_given):
    """``(CacheConfig, block_length)`` from ``use_cache``/``cache_refresh_every``/``block_length`` (taken out of
    ``kwargs``), or None without a cache; ``ValueError`` before any forward for what the cache does not take.
    ``use_cache=None``/``False``/``True`` stay in ``kwargs`` for upstream, as before (Dream's sampler ignores them:
    a Hugging Face habit must not change what upstream does); klass-patch's cache is chosen by its mode's name."""
    taken = {k: kwargs.pop(k) for k in ("cache_refresh_every",) if k in kwargs}
    if not isinstance(kwargs.get("use_cache"), (bool, type(None))):
        taken["use_cache"] = kwargs.pop("use_cache")
    block_length = kwargs.pop("block_length", None)
    cache = cache_options(taken)
    if cache is None:
        if block_length is not None:
            raise ValueError(f"block_length={block_length!r} is used only with use_cache='prefix' or 'dual' "
                             "(Dream's own sampler has no blocks)")
        return None
    if alg not in CACHED_ALGS:
        raise ValueError(f"use_cache={cache.mode!r} with Dream takes alg in {CACHED_ALGS} (alg is {alg!r}): a cache "
                         "needs blocks, and 'origin' unmasks at random over the whole sequence")
    if hooks_given:
        raise ValueError("use_cache does not take generation_logits_hook_func / generation_tokens_hook_func: a "
                         "cached step computes the logits of its window only")
    if block_length is not None and (isinstance(block_length, bool) or not isinstance(block_length, numbers.Integral)
                                     or block_length < 1):
        raise ValueError(f"block_length must be a positive int, got {block_length!r}")
    return cache, None if block_length is None else int(block_length)


def make_sample_wrapper(module):
    """The wrapt wrapper of ``DreamGenerationMixin._sample`` for the upstream ``module``."""

    def wrapper(wrapped, instance, args, kwargs):
        call = inspect.signature(wrapped).bind(*args, **kwargs)
        a = call.arguments
        gc = a["generation_config"]
        opts = dict(_CALL.get() or {"hooks_given": True})
        hooks_given = opts.pop("hooks_given")
        save_steps = bool(opts.pop("save_steps", getattr(gc, "save_steps", False)))
        if gc.alg != "klass" and not save_steps and "cache" not in opts:
            return wrapped(*args, **kwargs)
        if save_steps and not gc.return_dict_in_generate:
            raise ValueError("save_steps=True needs return_dict_in_generate=True: the step records are "
                             "returned in .history")
        hooks = (a["generation_tokens_hook_func"], a["generation_logits_hook_func"])
        cached = opts.pop("cache", None)
        if cached is not None:  # KLASS, or upstream's top-k rule restricted to blocks (klass_sample_cached)
            config = KlassConfig.from_kwargs(opts, defaults=gc) if gc.alg == "klass" else None
            return klass_sample_cached(instance, module, a["input_ids"], a["attention_mask"], gc, config, save_steps,
                                       *cached)
        if gc.alg == "klass":
            config = KlassConfig.from_kwargs(opts, defaults=gc)
            return klass_sample(instance, module, a["input_ids"], a["attention_mask"], gc, *hooks, config, save_steps,
                                hooks_given)
        return observed_sample(wrapped, instance, call, gc)

    return wrapper


def _prepare_attention(attention_mask, length):
    """Upstream's handling of a padded batch: boolean [B, 1, N, N] mask and position ids, or "full"."""
    if attention_mask is not None and torch.any(attention_mask == 0.0):
        attention_mask = F.pad(attention_mask, (0, length - attention_mask.shape[1]), value=1.0)
        tok_idx = attention_mask.long().cumsum(-1) - 1
        tok_idx.masked_fill_(attention_mask == 0, 1)
        attention_mask = torch.logical_and(attention_mask.unsqueeze(1).unsqueeze(-2),
                                           attention_mask.unsqueeze(1).unsqueeze(-1))
        return attention_mask, tok_idx
    return "full", None


@torch.no_grad()
def klass_sample(model, module, input_ids, attention_mask, gc, tokens_hook, logits_hook,
                 config: KlassConfig, save_steps=False, hooks_given=True):
    """KLASS in place of upstream's ``_sample`` loop; ``gc`` is the prepared generation config.

    Without user hooks the shifted logits are read in place (position i from the model's i - 1)
    instead of being copied; the full masked logits are gathered only when the fallback must sample.
    """
    mask_id, steps = gc.mask_token_id, gc.steps
    x = F.pad(input_ids, (0, gc.max_length - input_ids.shape[1]), value=mask_id)
    attention_mask, tok_idx = _prepare_attention(attention_mask, gc.max_length)
    histories = [] if (gc.return_dict_in_generate and gc.output_history and not save_steps) else None
    recorder = StepRecorder() if save_steps else None

    x = tokens_hook(None, x, None)
    rows, length = x.shape
    masked = (x == mask_id).any(0).nonzero()
    start = int(masked[0]) if len(masked) else 0
    tracker = StabilityTracker(rows, length, start, length - start, config.kl_history_length, x.device)
    used = torch.zeros(rows, dtype=torch.long, device=x.device)
    # where each position's prediction is read: the model's logits at i - 1 predict position i (position 0
    # reads itself), as upstream's shift; with user hooks the logits are shifted by copy, as upstream does
    read_at = torch.arange(length, device=x.device)
    if not hooks_given:
        read_at = (read_at - 1).clamp_(min=0)
    for i in range(steps):
        mask_index = x == mask_id
        live = mask_index.any(-1)
        if not bool(live.any()):
            break
        used += live
        logits = model(x, attention_mask, tok_idx).logits
        r_idx, p_idx = mask_index.nonzero(as_tuple=True)
        if hooks_given:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            logits = logits_hook(i, x, logits)
        read = read_at[p_idx]
        tok, conf, kl = tracker.update(logits, r_idx, p_idx, low_precision_tokens=True, read_pos=read)
        x0 = x.clone()
        x0[r_idx, p_idx] = tok
        full_conf = torch.full((rows, length), -math.inf, dtype=torch.float64, device=x.device)
        full_conf[r_idx, p_idx] = conf
        full_kl = torch.full((rows, length), math.inf, dtype=torch.float64, device=x.device)
        full_kl[r_idx, p_idx] = kl

        ready = ready_mask(mask_index, full_conf, tracker.stable(config.kl_threshold), config.conf_threshold,
                           strict=False)
        transfer = select_ready(ready, full_conf, full_kl, config.unmask_strategy)
        fallback = live & ~ready.any(-1)
        if bool(fallback.any()):  # one position per such row: the argmax of upstream's sampled confidence
            if gc.temperature > 0 or (gc.top_p is not None and gc.top_p < 1) or gc.top_k is not None:
                mine = fallback[r_idx]
                conf_fb, _ = module.sample_tokens(logits[r_idx[mine], read[mine]], temperature=gc.temperature,
                                                  top_p=gc.top_p, top_k=gc.top_k)
                scores = torch.full((rows, length), -math.inf, dtype=conf_fb.dtype, device=x.device)
                scores[r_idx[mine], p_idx[mine]] = conf_fb
                best = scores.argmax(-1)
            else:  # sample_tokens would return the top probability of the plain softmax: known up to rounding
                best = low_precision_max_position(logits, read_at, full_conf, mask_index & fallback.unsqueeze(-1))
            pick = F.one_hot(best, length).bool()
            transfer = torch.where(fallback.unsqueeze(-1), pick, transfer)
        if recorder is not None:
            recorder.add(i, mask_index, x0, full_conf, full_kl, transfer)
        x = torch.where(transfer, x0, x)
        decided = x != mask_id if hooks_given else None
        x = tokens_hook(i, x, logits)
        if decided is not None:  # positions a user's hook masked again start afresh
            remasked = decided & (x == mask_id)
            if bool(remasked.any()):
                tracker.reset(*remasked.nonzero(as_tuple=True))
        if histories is not None:
            histories.append(x.clone())

    return _result(x, mask_id, start, gc, used, recorder, histories)


def _result(x, mask_id, start, gc, used, recorder, histories):
    """What a KLASS ``_sample`` returns (cached or not): the tensor, or, with ``return_dict_in_generate``, a
    ``GenerateOutput`` with the forwards per row and the step records (or upstream's history)."""
    masks_left_warning(x, mask_id, start)
    if not gc.return_dict_in_generate:
        return x
    return GenerateOutput(sequences=x, used_steps=used.cpu(),
                          history=recorder.records if recorder is not None else histories)


def observed_sample(wrapped, model, call, gc):
    """Upstream's ``_sample`` untouched, with its own hooks used to record KLASS-style step records. Only the
    generated positions are tracked (from the first masked column; earlier ones if a user's hook masks them)."""
    a = call.arguments
    user_tokens, user_logits = a["generation_tokens_hook_func"], a["generation_logits_hook_func"]
    mask_id = gc.mask_token_id
    state = {}

    def observer(x):  # made at the first hook call, before any forward
        if "observer" not in state:
            masked = (x == mask_id).any(0).nonzero()
            state["observer"] = Observer(mask_id, int(masked[0]) if len(masked) else 0)
        return state["observer"]

    def tokens_hook(i, x, logits):
        decided = x != mask_id
        x = user_tokens(i, x, logits)
        seen = observer(x)
        seen.finish(x)
        remasked = decided & (x == mask_id)  # masked again by the user's hook: they start afresh
        if seen.tracker is not None and bool(remasked.any()):
            seen.tracker.reset(*remasked.nonzero(as_tuple=True))
        return x

    def logits_hook(i, x, logits):
        logits = user_logits(i, x, logits)
        observer(x).observe(x, logits, x == mask_id)
        return logits

    a["generation_tokens_hook_func"], a["generation_logits_hook_func"] = tokens_hook, logits_hook
    out = wrapped(*call.args, **call.kwargs)
    seqs = out.sequences if gc.return_dict_in_generate else out
    seen = state.get("observer")
    return GenerateOutput(sequences=seqs, used_steps=torch.full((seqs.shape[0],), seen.calls if seen else 0),
                          history=seen.records if seen else [])


DEFAULT_BLOCK = 32  # Dream's block length under a cache when none is given (Fast-dLLM's)
CACHED_ALGS = ("klass", "maskgit_plus", "topk_margin", "entropy")  # what use_cache takes with Dream


@torch.no_grad()
def klass_sample_cached(model, module, input_ids, attention_mask, gc, config: Optional[KlassConfig], save_steps,
                        cache: CacheConfig, block_length=None):
    """KLASS with a KV cache (``use_cache``): decoding goes block by block, as LLaDA's does, since a cache needs
    blocks (``block_length``, default 32 or the whole generation if shorter; it must divide the generated
    length). Candidates are the masked positions of the row's current block (a prompt's own masks are never
    candidates); everything else is ``klass_sample``'s: low-precision argmax token, ``>=`` test, one fallback
    position per row with no ready one. A row's block ends when its masks are gone, and the row makes no more
    forwards once its last block is done; ``steps`` bounds the forwards of the whole run. Forwards: full at each
    row's block start (and every ``cache.refresh_every``), window otherwise (``klass_patch.cache``; Dream's
    window starts one position before the block, whose logits predict the block's first token). At a block's
    last forward the next block's distributions are remembered (``"prefix"``) or, not computed (``"dual"``),
    the next block starts afresh.

    ``config=None``: upstream's ``gc.alg`` (``maskgit_plus``, ``topk_margin``, ``entropy``) restricted to blocks, as
    Fast-dLLM's Dream does, so that cached comparisons are like for like: ``steps // num_blocks`` forwards per block
    (``steps`` must be a multiple of the number of blocks), and at a block's step ``i`` upstream's own rule over the
    block's masks: its confidence from ``sample_tokens``, the top ``int(masks * (1 - s / t))`` (all of them at the
    block's last step) with ``t, s`` consecutive values of ``linspace(1, eps, steps_per_block + 1)``."""
    check_dream(model)
    mask_id, steps = gc.mask_token_id, gc.steps
    x = F.pad(input_ids, (0, gc.max_length - input_ids.shape[1]), value=mask_id)
    rows, length = x.shape
    plen = input_ids.shape[1]
    gen = length - plen
    bl = block_length if block_length is not None else min(DEFAULT_BLOCK, gen)
    if plen < 1:
        raise ValueError(f"use_cache needs a prompt of at least one token (the input has {plen})")
    if gen < 1 or gen % bl:
        raise ValueError(f"use_cache: the generated length ({gen} = max_length {gc.max_length} - prompt length "
                         f"{plen}) must be a positive multiple of block_length ({bl})")
    num_blocks = gen // bl
    if config is None:
        if save_steps:
            raise ValueError("save_steps with use_cache takes alg='klass' (the step records are KLASS's)")
        if steps % num_blocks:
            raise ValueError(f"use_cache with alg={gc.alg!r}: steps ({steps}) must be a multiple of the number of "
                             f"blocks ({gen} // block_length {bl} = {num_blocks})")
        spb = steps // num_blocks
        timesteps = torch.linspace(1, gc.eps, spb + 1, device=x.device)
    mask4d, tok_idx = _prepare_attention(attention_mask, gc.max_length)
    histories = [] if (gc.return_dict_in_generate and gc.output_history and not save_steps) else None
    recorder = StepRecorder() if save_steps else None
    tracker = StabilityTracker(rows, length, plen, min(gen, 2 * bl), config.kl_history_length, x.device) \
        if config is not None else None
    kv = KVCache(rows)

    def rows_of(sel):
        return (mask4d[sel] if isinstance(mask4d, torch.Tensor) else mask4d,
                None if tok_idx is None else tok_idx[sel])

    def full(sel):
        return dream_full_forward(model, kv, x[sel], *rows_of(sel), sel)

    def window(sel, pos, valid):
        return dream_window_forward(model, kv, x[sel].gather(1, pos), sel, pos, valid, *rows_of(sel))

    forward = BlockForward(cache, length, bl, 1, full, window)
    positions = torch.arange(length, device=x.device)
    block = [0] * rows
    step_in = [0] * rows
    used = torch.zeros(rows, dtype=torch.long, device=x.device)
    sampling = gc.temperature > 0 or (gc.top_p is not None and gc.top_p < 1) or gc.top_k is not None
    for i in range(steps):
        mask_index = x == mask_id
        has_masks = mask_index[:, plen:].view(rows, num_blocks, bl).any(-1).tolist()  # one sync per step
        for r in range(rows):  # a row moves on when its block has no mask left
            while block[r] < num_blocks and not has_masks[r][block[r]]:
                block[r], step_in[r] = block[r] + 1, 0
        if all(b >= num_blocks for b in block):
            break
        live = torch.tensor([b < num_blocks for b in block], device=x.device)
        used += live
        bstart = torch.tensor([plen + b * bl for b in block], device=x.device)
        logits = forward(bstart, live, torch.tensor([cache.refreshes(s) for s in step_in], device=x.device))
        in_block = (positions >= bstart.unsqueeze(-1)) & (positions < bstart.unsqueeze(-1) + bl)
        cand = mask_index & in_block & live.unsqueeze(-1)
        read_at = (positions - bstart.unsqueeze(-1)).clamp_(0, logits.shape[1] - 1)  # p's logits: p - 1 - (s - 1)
        r_idx, p_idx = cand.nonzero(as_tuple=True)
        read = read_at[r_idx, p_idx]
        if config is None:  # upstream's rule on the block's masks
            conf, tok = module.sample_tokens(logits[r_idx, read], temperature=gc.temperature, top_p=gc.top_p,
                                             top_k=gc.top_k, margin_confidence=gc.alg == "topk_margin",
                                             neg_entropy=gc.alg == "entropy")
            x0 = x.clone()
            x0[r_idx, p_idx] = tok
            scores = torch.full((rows, length), -math.inf, dtype=conf.dtype, device=x.device)
            scores[r_idx, p_idx] = conf
            transfer = torch.zeros_like(cand)
            counts = cand.sum(-1).tolist()
            for r in range(rows):
                if not block[r] < num_blocks:
                    continue
                masks, j = counts[r], step_in[r]
                k = masks if j >= spb - 1 else int(masks * (1 - timesteps[j + 1] / timesteps[j]))
                if k > 0 and not getattr(gc, "alg_temp", None):
                    transfer[r, scores[r].topk(k).indices] = True
                elif k > 0:  # upstream's alg_temp: drawn in proportion to softmax(confidence / alg_temp)
                    transfer[r, torch.multinomial(F.softmax(scores[r] / gc.alg_temp, dim=-1), num_samples=k)] = True
            x = torch.where(transfer, x0, x)
            for r in range(rows):
                step_in[r] += block[r] < num_blocks
            if histories is not None:
                histories.append(x.clone())
            continue
        tok, conf, kl = tracker.update(logits, r_idx, p_idx, low_precision_tokens=True, read_pos=read)
        x0 = x.clone()
        x0[r_idx, p_idx] = tok
        full_conf = torch.full((rows, length), -math.inf, dtype=torch.float64, device=x.device)
        full_conf[r_idx, p_idx] = conf
        full_kl = torch.full((rows, length), math.inf, dtype=torch.float64, device=x.device)
        full_kl[r_idx, p_idx] = kl

        ready = ready_mask(cand, full_conf, tracker.stable(config.kl_threshold), config.conf_threshold, strict=False)
        transfer = select_ready(ready, full_conf, full_kl, config.unmask_strategy)
        fallback = live & ~ready.any(-1)
        if bool(fallback.any()):  # as klass_sample, over the block's masks
            if sampling:
                mine = fallback[r_idx]
                conf_fb, _ = module.sample_tokens(logits[r_idx[mine], read[mine]], temperature=gc.temperature,
                                                  top_p=gc.top_p, top_k=gc.top_k)
                scores = torch.full((rows, length), -math.inf, dtype=conf_fb.dtype, device=x.device)
                scores[r_idx[mine], p_idx[mine]] = conf_fb
                best = scores.argmax(-1)
            else:
                best = low_precision_max_position(logits, read_at, full_conf, cand & fallback.unsqueeze(-1))
            pick = F.one_hot(best, length).bool()
            transfer = torch.where(fallback.unsqueeze(-1), pick, transfer)
        if recorder is not None:
            recorder.add(i, cand, x0, full_conf, full_kl, transfer)
        x = torch.where(transfer, x0, x)
        done = ((x == mask_id) & in_block).any(-1).logical_not_().tolist()
        for r in range(rows):
            if not block[r] < num_blocks:
                continue
            step_in[r] += 1
            if done[r] and block[r] + 1 < num_blocks:  # the block's last forward: the next block's first KL
                nxt = positions[plen + (block[r] + 1) * bl:plen + (block[r] + 2) * bl]
                if cache.mode == "prefix":
                    tracker.remember(logits, torch.full_like(nxt, r), nxt, read_pos=nxt - int(bstart[r]))
                else:
                    tracker.reset(torch.full_like(nxt, r), nxt)
        if histories is not None:
            histories.append(x.clone())

    return _result(x, mask_id, plen, gc, used, recorder, histories)
