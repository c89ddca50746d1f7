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

from .blocks import RowBlocks
from .cache import CacheConfig, cache_options
from .dream_cache import cached_forward, check_dream
from .core import (
    GenerateOutput,
    KlassConfig,
    KlassStep,
    Observer,
    StepRecorder,
    StepRules,
    klass_options,
    masks_left_warning,
    to_host,
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


def _prepare_attention(attention_mask, length, padded: Optional[bool] = None):
    """Upstream's handling of a padded batch: boolean [B, 1, N, N] mask and position ids, or "full". ``padded``:
    whether ``attention_mask`` has a 0, when the caller read it already."""
    if padded is None:
        padded = attention_mask is not None and bool(torch.any(attention_mask == 0.0))
    if attention_mask is not None and padded:
        attention_mask = F.pad(attention_mask, (0, length - attention_mask.shape[1]), value=1.0)
        tok_idx = attention_mask.long().cumsum(-1) - 1
        tok_idx.masked_fill_(attention_mask == 0, 1)
        attention_mask = torch.logical_and(attention_mask.unsqueeze(1).unsqueeze(-2),
                                           attention_mask.unsqueeze(1).unsqueeze(-1))
        return attention_mask, tok_idx
    return "full", None


def _first_facts(x, attention_mask, mask_id):
    """What the host needs before the first forward, in one read: whether the attention mask pads (upstream's own
    check), the first column holding a mask (0 if none) and, per row, whether it holds one."""
    masked = x == mask_id
    padded = torch.zeros((), dtype=torch.bool, device=x.device) if attention_mask is None else \
        (attention_mask == 0.0).any()
    first = masked.any(0).int().argmax()
    facts = to_host(torch.cat([torch.stack([padded.long(), first.long()]), masked.any(-1).long()]))[0]
    return bool(facts[0]), int(facts[1]), [bool(v) for v in facts[2:]]


def _shifted(logits, start, hooks_given):
    """The window ``[start, length)`` of Dream's logits: position i is predicted at i - 1 (position 0 by itself);
    read in place unless user hooks saw (and got) the shifted copy, as upstream makes it."""
    if hooks_given or start == 0:
        logits = logits if hooks_given else torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits[:, start:]
    return logits[:, start - 1:logits.shape[1] - 1]


def _sampled_fallback(module, gc, window, candidates):
    """The single-token fallback's scores when upstream's ``sample_tokens`` changes them (top_p, top_k, temperature):
    its confidence over the candidates of the rows that fall back. At temperature 0 it draws nothing, so it is
    computed for every window position (no host read); at temperature > 0 only where it was before, so that the
    random draws are the same (host reads: the draws' shape depends on the data)."""
    def scores(fallback):
        mine = candidates & fallback.unsqueeze(-1)
        if not gc.temperature > 0:
            rows, width, vocab = window.shape
            conf, _ = module.sample_tokens(window.reshape(rows * width, vocab), temperature=gc.temperature,
                                           top_p=gc.top_p, top_k=gc.top_k)
            return torch.where(mine, conf.view(rows, width), -math.inf)
        out = torch.full(candidates.shape, -math.inf, dtype=window.dtype, device=window.device)
        if not bool(fallback.any()):
            return out
        r, j = mine.nonzero(as_tuple=True)
        conf, _ = module.sample_tokens(window[r, j], temperature=gc.temperature, top_p=gc.top_p, top_k=gc.top_k)
        out = out.to(conf.dtype)
        out[r, j] = conf
        return out
    return scores


def _sampling(gc) -> bool:
    return gc.temperature > 0 or (gc.top_p is not None and gc.top_p < 1) or gc.top_k is not None


def _restart_remasked(stepper, remasked, start):
    """Positions a user's hook masked again start afresh (the window grows to the left to hold an earlier one);
    returns the window's start. Host reads: hooks only."""
    if not bool(remasked.any()):
        return start
    r, p = remasked.nonzero(as_tuple=True)
    lowest = int(p.min())
    if lowest < start:
        stepper.extend_left(start - lowest)
        start = lowest
    stepper.restart(r, p - start)
    return start


@torch.no_grad()
def klass_sample(model, module, input_ids, attention_mask, gc, tokens_hook, logits_hook,
                 config: KlassConfig, save_steps=False, hooks_given=True):
    """KLASS in place of upstream's ``_sample`` loop; ``gc`` is the prepared generation config. The window is every
    position from the first masked column on; one host read per forward (which rows still hold masks), one before
    the first (``_first_facts``). Without user hooks the shifted logits are read in place instead of copied."""
    mask_id = gc.mask_token_id
    x = F.pad(input_ids, (0, gc.max_length - input_ids.shape[1]), value=mask_id)
    histories = [] if (gc.return_dict_in_generate and gc.output_history and not save_steps) else None
    x = tokens_hook(None, x, None)
    padded, start, live = _first_facts(x, attention_mask, mask_id)
    attention_mask, tok_idx = _prepare_attention(attention_mask, gc.max_length, padded)
    rows, length = x.shape
    stepper = KlassStep(config, StepRules(low_precision_tokens=True), rows, length - start, x.device)
    recorder = StepRecorder() if save_steps else None
    first, used, left = start, [0] * rows, None
    for i in range(gc.steps):
        if not any(live):
            break
        used = [u + v for u, v in zip(used, live)]
        logits = model(x, attention_mask, tok_idx).logits
        if hooks_given:
            logits = logits_hook(i, x, torch.cat([logits[:, :1], logits[:, :-1]], dim=1))
        window, xw = _shifted(logits, start, hooks_given), x[:, start:]
        cand = xw == mask_id
        out = stepper.step(window, cand,
                           fallback_scores=_sampled_fallback(module, gc, window, cand) if _sampling(gc) else None)
        record = () if recorder is None else (recorder.pack(cand, out.tokens, out.confidence, out.kl, out.commit,
                                                            positions=torch.arange(start, length, device=x.device)
                                                            .expand(cand.shape)),)
        x = torch.cat([x[:, :start], torch.where(out.commit, out.tokens, xw)], dim=1)
        decided = x != mask_id if hooks_given else None
        x = tokens_hook(i, x, logits)
        if decided is not None:
            start = _restart_remasked(stepper, decided & (x == mask_id), start)
        if histories is not None:
            histories.append(x.clone())
        flags, *record = to_host(torch.stack([(x == mask_id).any(-1).long(), (x[:, first:] == mask_id).sum(-1)]),
                                 *record)  # the one host read of the forward
        live, left = [bool(v) for v in flags[0]], [int(v) for v in flags[1]]
        if recorder is not None:
            recorder.add_packed(i, record[0])
    return _result(x, mask_id, first, gc, used, left, recorder, histories)


def _result(x, mask_id, start, gc, used, left, recorder, histories):
    """What a KLASS ``_sample`` returns (cached or not): the tensor, or, with ``return_dict_in_generate``, a
    ``GenerateOutput`` with the forwards per row and the step records (or upstream's history). ``left``: the masks
    left per row when the host has them (else counted here)."""
    masks_left_warning(x, mask_id, start, counts=left)
    if not gc.return_dict_in_generate:
        return x
    return GenerateOutput(sequences=x, used_steps=torch.tensor(used, dtype=torch.long),
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
    block's last step) with ``t, s`` consecutive values of ``linspace(1, eps, steps_per_block + 1)``. With
    ``save_steps`` its records are those of ``save_steps`` on upstream's algorithms without a cache (argmax token,
    float64 confidence, KL to the previous forward over the block's masks), the next block's distributions
    remembered or not as KLASS's are."""
    check_dream(model)
    x = F.pad(input_ids, (0, gc.max_length - input_ids.shape[1]), value=gc.mask_token_id)
    rows, length = x.shape
    plen = input_ids.shape[1]
    bl, num_blocks, spb = _cached_blocks(gc, plen, length - plen, block_length, config is None)
    mask4d, tok_idx = _prepare_attention(attention_mask, gc.max_length)
    histories = [] if (gc.return_dict_in_generate and gc.output_history and not save_steps) else None
    recorder = StepRecorder() if save_steps else None
    if config is not None:
        rule = _KlassRule(KlassStep(config, StepRules(low_precision_tokens=True), rows, bl, x.device), module, gc,
                          recorder)
    else:
        observer = KlassStep(KlassConfig(kl_history_length=1), StepRules(), rows, bl, x.device) if save_steps else None
        rule = _UpstreamRule(module, gc, spb, torch.linspace(1, gc.eps, spb + 1, device=x.device), length, observer,
                             recorder)
    blocks = RowBlocks(rows, plen, bl, num_blocks, x.device)
    forward = cached_forward(model, x, mask4d, tok_idx, cache, bl)
    used, left = _cached_loop(x, forward, rule, blocks, gc.steps, gc.mask_token_id, histories, recorder, cache.mode)
    return _result(x, gc.mask_token_id, plen, gc, used, left, recorder, histories)


def _cached_blocks(gc, plen, gen, block_length, upstream_alg):
    """``(block_length, num_blocks, steps_per_block or None)`` of a cached call, checked before any forward."""
    bl = block_length if block_length is not None else min(DEFAULT_BLOCK, gen)
    if plen < 1:
        raise ValueError(f"use_cache needs a prompt of at least one token (the input has {plen})")
    if gen < 1 or gen % bl:
        raise ValueError(f"use_cache: the generated length ({gen} = max_length {gc.max_length} - prompt length "
                         f"{plen}) must be a positive multiple of block_length ({bl})")
    num_blocks = gen // bl
    if not upstream_alg:
        return bl, num_blocks, None
    if gc.steps % num_blocks:
        raise ValueError(f"use_cache with alg={gc.alg!r}: steps ({gc.steps}) must be a multiple of the number of "
                         f"blocks ({gen} // block_length {bl} = {num_blocks})")
    return bl, num_blocks, gc.steps // num_blocks


class _KlassRule:
    """KLASS's step on the rows' blocks (``klass_sample``'s rules: low-precision token, ``>=``, one fallback)."""

    def __init__(self, stepper, module, gc, recorder):
        self.tracked, self.module, self.gc, self.recorder = stepper, module, gc, recorder

    def __call__(self, window, cand, xw, blocks, pos):
        scores = _sampled_fallback(self.module, self.gc, window, cand) if _sampling(self.gc) else None
        out = self.tracked.step(window, cand, fallback_scores=scores)
        record = () if self.recorder is None else (
            self.recorder.pack(cand, out.tokens, out.confidence, out.kl, out.commit, positions=pos),)
        return out.commit, out.tokens, record


class _UpstreamRule:
    """Upstream's ``maskgit_plus`` / ``topk_margin`` / ``entropy`` on each row's block: upstream's confidence over the
    block's masks, its top ``int(masks * (1 - s / t))`` (all at the block's last step), or drawn with ``alg_temp``.
    Host reads as upstream's own loop makes them (the candidates, each row's count). With ``observer`` (a
    ``KlassStep``), also the records ``save_steps`` gives of upstream's algorithms."""

    def __init__(self, module, gc, spb, timesteps, length, observer, recorder):
        self.module, self.gc, self.spb, self.timesteps, self.length = module, gc, spb, timesteps, length
        self.tracked, self.recorder = observer, recorder

    def __call__(self, window, cand, xw, blocks, pos):
        gc, rows = self.gc, cand.shape[0]
        r_idx, j_idx = cand.nonzero(as_tuple=True)
        conf, tok = self.module.sample_tokens(window[r_idx, j_idx], temperature=gc.temperature, top_p=gc.top_p,
                                              top_k=gc.top_k, margin_confidence=gc.alg == "topk_margin",
                                              neg_entropy=gc.alg == "entropy")
        tokens = xw.clone()
        tokens[r_idx, j_idx] = tok
        scores = torch.full((rows, self.length), -math.inf, dtype=conf.dtype, device=cand.device)
        scores[r_idx, pos[r_idx, j_idx]] = conf
        transfer = torch.zeros((rows, self.length), dtype=torch.bool, device=cand.device)
        for r, k in enumerate(self._counts(cand, blocks)):
            if not blocks.active[r] or k <= 0:
                continue
            if not getattr(gc, "alg_temp", None):
                transfer[r, scores[r].topk(k).indices] = True
            else:  # upstream's alg_temp: drawn in proportion to softmax(confidence / alg_temp)
                transfer[r, torch.multinomial(F.softmax(scores[r] / gc.alg_temp, dim=-1), num_samples=k)] = True
        commit = transfer.gather(1, pos)
        record = ()
        if self.recorder is not None:
            obs = self.tracked.observe(window)
            record = (self.recorder.pack(cand, obs.tokens, torch.where(cand, obs.confidence, -math.inf),
                                         torch.where(cand, obs.kl, math.inf), commit,
                                         decided_tokens=torch.where(commit, tokens, xw), positions=pos),)
        return commit, tokens, record

    def _counts(self, cand, blocks):
        """Each row's number of tokens to unmask at this step of its block (one read)."""
        j, spb = blocks.step_t, self.spb
        masks = cand.sum(-1)
        ratio = 1 - self.timesteps[(j + 1).clamp(max=spb)] / self.timesteps[j.clamp(max=spb)]
        return [int(k) for k in to_host(torch.where(j >= spb - 1, masks, (masks * ratio).long()))[0]]


def _cached_loop(x, forward, rule, blocks, steps, mask_id, histories, recorder, mode):
    """Dream's decoding loop under a cache: each row's block until its masks are gone, at most ``steps`` forwards.
    ``x`` is updated in place. One host read per forward (which blocks still hold masks, the masks left) besides
    the rule's. Returns ``(forwards per row, masks left per row)``."""
    rows, bl, count = x.shape[0], blocks.width, blocks.count
    used, left = [0] * rows, None
    for i in range(steps):
        if not any(blocks.active):
            break
        used = [u + a for u, a in zip(used, blocks.active)]
        logits = forward(blocks)
        pos = blocks.positions_t()
        xw = x.gather(1, pos)
        cand = (xw == mask_id) & blocks.active_t.unsqueeze(-1)
        commit, tokens, record = rule(logits[:, :bl], cand, xw, blocks, pos)
        x.scatter_(1, pos, torch.where(commit, tokens, xw))
        gen = x[:, blocks.first:] == mask_id
        has = gen.view(rows, count, bl).any(-1)
        flags, masks, *record = to_host(has.long(), gen.sum(-1), *record)  # the loop's one host read
        left = [int(v) for v in masks]
        if recorder is not None:
            recorder.add_packed(i, record[0])
        _next_blocks(blocks, rule.tracked, flags, has, logits if mode == "prefix" else None)
        if histories is not None:
            histories.append(x.clone())
    return used, left


def _next_blocks(blocks, tracked, flags, has, logits):
    """Rows whose block has no mask left move to the next block that has one (on the host and on the device alike);
    at a block's end the next block's distributions are remembered (``logits``: the window that computed them) or
    it starts afresh."""
    bl, count = blocks.width, blocks.count
    block = []
    for r, b in enumerate(blocks.block):
        if b < count and not flags[r][b] and b + 1 < count and tracked is not None:
            if logits is None:
                tracked.restart(r)
            else:
                tracked.remember(r, logits[r, bl:2 * bl])
        while b < count and not flags[r][b]:
            b += 1
        block.append(b)
    later = has & (torch.arange(count, device=has.device) >= blocks.block_t.unsqueeze(-1))
    blocks.move(block, torch.where(later.any(-1), later.int().argmax(-1), count))
