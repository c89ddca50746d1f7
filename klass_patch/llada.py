"""LLaDA adapter: KLASS inside the semi-autoregressive block schedule of LLaDA's ``generate.py``.

What LLaDA adds to the generic algorithm (``core``): candidates are the masked positions of the row's
current block; the confidence test is strict (``>``); a position is only ready once the step index inside
its block is at least ``kl_history_length - 1``; a row with no ready position falls back to upstream's
top-k by confidence, k from upstream's per-block schedule; a block whose masks are all gone ends
without another forward. Rows of a batch keep their own block and step counters, so each row makes the
forwards it would make alone.
At temperature 0 each row of a batch comes out exactly as alone; at temperature > 0 the rows draw from
one random stream, as upstream's do, so a row is reproducible with the same batch and seed, not alone.
"""
from __future__ import annotations

import contextlib
import inspect
import numbers
from typing import Callable, Optional

import torch
import wrapt

from .cache import CacheConfig, cache_options
from .llada_cache import CachedModel, cached_forward
from .versions import identify_module
from .blocks import RowBlocks, window_of
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

EOS_ID, EOT_ID = 126081, 126348  # the ids upstream's logits_eos_inf / confidence_eos_eot_inf refer to (LLaDA-8B's)
ALGS = (None, "default", "klass")


def _schedule(block_length: int, steps_per_block: int) -> list:
    """Upstream's number of tokens to unmask at each step of a (fully masked) block: ``get_num_transfer_tokens`` of
    every known ``generate.py`` (the block's masks spread evenly, the remainder on the first steps), computed on
    the host (upstream's function takes and returns tensors: reading them back would be a host read)."""
    base, rem = divmod(block_length, steps_per_block)
    return [base + (1 if s < rem else 0) for s in range(steps_per_block)]


def special_ids(model) -> tuple:
    """``(eos, eot)`` for ``logits_eos_inf`` / ``confidence_eos_eot_inf``: the model config's ``eos_token_id`` and
    ``eot_token_id`` where it has them (models built on LLaDA's code with another vocabulary, e.g. LLaDA-MoE),
    else LLaDA-8B's 126081 / 126348, the ids upstream's generate.py hard-codes (LLaDA-8B's config says 126081)."""
    config = getattr(model, "config", None)
    eos, eot = getattr(config, "eos_token_id", None), getattr(config, "eot_token_id", None)
    return (int(eos) if isinstance(eos, numbers.Integral) else EOS_ID,
            int(eot) if isinstance(eot, numbers.Integral) else EOT_ID)


def mmada_bias(attention_mask):
    """MMaDA's generate.py passes a padded batch's mask to the model as a [B, 1, L, L] boolean ``attention_bias``
    (None when nothing is padded)."""
    if attention_mask is None or not bool((attention_mask == 0).any()):
        return None
    return (attention_mask[:, :, None] & attention_mask[:, None, :]).bool().unsqueeze(1)


def check_lengths(prompt, steps, gen_length, block_length) -> tuple:
    """Validate LLaDA's length arguments as upstream requires; return (num_blocks, steps_per_block)."""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        raise ValueError(f"prompt must be a 2-D tensor of token ids [batch, length], got {type(prompt).__name__}"
                         + (f" of shape {tuple(prompt.shape)}" if isinstance(prompt, torch.Tensor) else ""))
    for name, v in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    steps, gen_length, block_length = int(steps), int(gen_length), int(block_length)  # numpy ints too
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks "
                         f"gen_length // block_length = {num_blocks}")
    return num_blocks, steps // num_blocks


def _check_klass_call(model, prompt, attention_mask, steps, gen_length, block_length, temperature, module,
                      add_gumbel_noise, cache, mask_as_bias):
    """Everything a KLASS call can get wrong, before any forward: ``(num_blocks, steps_per_block, noise)``."""
    num_blocks, spb = check_lengths(prompt, steps, gen_length, block_length)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    add_gumbel_noise = add_gumbel_noise or getattr(module, "add_gumbel_noise", None)
    if temperature > 0 and add_gumbel_noise is None:
        raise ValueError("temperature > 0 needs upstream's add_gumbel_noise; pass module= or add_gumbel_noise=")
    if mask_as_bias and cache is not None:
        _refuse_padded_mmada_cache(attention_mask)
    return num_blocks, spb, add_gumbel_noise


def _refuse_padded_mmada_cache(attention_mask):
    """MMaDA's generate.py gives its model a padded batch's mask as attention_bias (and takes a mask over prompt and
    generation): the cache, which needs the keys' padding, refuses it, before any forward."""
    if attention_mask is not None and bool((attention_mask == 0).any()):
        raise ValueError("use_cache with a padded batch is not supported for MMaDA's generate.py (its model takes "
                         "the mask as attention_bias); use_cache=None, or one prompt per call")


def _start(model, prompt, attention_mask, gen_length, mask_id):
    """Upstream's start: the prompt followed by ``gen_length`` masks, and the attention mask extended over them."""
    rows, plen = prompt.shape
    device = model.device
    x = torch.full((rows, plen + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :plen] = prompt
    if attention_mask is not None:
        attention_mask = attention_mask if attention_mask.device == device else attention_mask.to(device)
        attention_mask = torch.cat(
            [attention_mask, torch.ones((rows, gen_length), dtype=attention_mask.dtype, device=device)], dim=-1)
    return x, attention_mask


def _guided(call, ids, prompt_index, attention_mask, cfg_scale, mask_id, logits_eos_inf, eos_id):
    """Upstream's logits of a forward: classifier-free guidance (the prompt masked in a second copy of the rows)
    and, with ``logits_eos_inf``, no EOS."""
    if cfg_scale > 0.0:
        un = ids.masked_fill(prompt_index, mask_id)
        am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
        cond, uncond = torch.chunk(call(torch.cat([ids, un]), am), 2, dim=0)
        out = uncond + (cfg_scale + 1) * (cond - uncond)
    else:
        out = call(ids, attention_mask)
    if logits_eos_inf:
        out[:, :, eos_id] = -torch.inf
    return out


class _Uncached:
    """No cache: every forward is a full one (all rows, as upstream's); the window is each row's block of it."""

    def __init__(self, model, prompt_index, attention_mask, cfg_scale, mask_id, logits_eos_inf, eos_id, mmada):
        # MMaDA: the mask as a pairwise attention_bias, built once (none under guidance)
        bias = mmada_bias(attention_mask) if mmada and cfg_scale == 0.0 else None

        def call(inp, am):
            if mmada:
                return model(inp, attention_bias=bias).logits
            return (model(inp) if am is None else model(inp, attention_mask=am)).logits
        self.args = (call, prompt_index, attention_mask, cfg_scale, mask_id, logits_eos_inf, eos_id)

    def __call__(self, x, blocks):
        call, prompt_index, attention_mask, *rest = self.args
        logits = _guided(call, x, prompt_index, attention_mask, *rest)
        starts, width = blocks.starts(), blocks.width
        return window_of(logits, blocks), lambda r: logits[r, starts[r] + width:starts[r] + 2 * width]


class _Cached:
    """A cache (``klass_patch.cache``): full forwards at block starts (and every ``refresh_every``), window forwards
    otherwise. The next block's distributions come from the window (``"prefix"``) or are not computed (``"dual"``)."""

    def __init__(self, forward, mode):
        self.forward, self.mode = forward, mode

    def __call__(self, x, blocks):
        logits = self.forward(blocks)
        width = blocks.width
        if self.mode == "prefix":
            return logits[:, :width], lambda r: logits[r, width:2 * width]
        return logits[:, :width], lambda r: None


def _noisy_tokens(add_gumbel_noise, logits, candidates, temperature):
    """Upstream's Gumbel-max tokens of the candidates; the noise is drawn for them only, in their order, as
    before (a host read: the noise's shape is the number of candidates)."""
    r, j = candidates.nonzero(as_tuple=True)
    tokens = torch.zeros(candidates.shape, dtype=torch.long, device=candidates.device)
    tokens[r, j] = add_gumbel_noise(logits[r, j], temperature=temperature).argmax(-1)
    return tokens


@torch.no_grad()
def klass_generate(model, prompt, attention_mask=None, *, steps=128, gen_length=128, block_length=128,
                   temperature=0.0, cfg_scale=0.0, mask_id=126336, logits_eos_inf=False,
                   confidence_eos_eot_inf=False, config: KlassConfig = KlassConfig(), save_steps=False,
                   module=None, add_gumbel_noise: Optional[Callable] = None,
                   cache: Optional[CacheConfig] = None, special: Optional[tuple] = None,
                   mask_as_bias: bool = False) -> GenerateOutput:
    """KLASS decoding with LLaDA's blocks. ``module`` is the upstream ``generate`` module whose helpers
    (schedule, Gumbel noise) are used; arguments mean what they mean in upstream's ``generate``.

    ``cache``: KV-cached forwards (``klass_patch.cache``): a full forward at each row's block start (and every
    ``refresh_every`` forwards), window forwards otherwise; candidates are the block's masks as without a cache.
    At a block's last forward the next block's distributions are remembered for its first KL with ``"prefix"``
    (its window computed them); with ``"dual"`` they were not computed, so the next block starts afresh (KL
    history reset, as the first block starts). None: a full forward every time.

    ``special``: ``(eos, eot)`` ids (default: ``special_ids(model)``). ``mask_as_bias``: call the model as MMaDA's
    generate.py does (a padded batch's mask as ``attention_bias``; none with classifier-free guidance)."""
    num_blocks, spb, add_gumbel_noise = _check_klass_call(
        model, prompt, attention_mask, steps, gen_length, block_length, temperature, module, add_gumbel_noise, cache,
        mask_as_bias)
    gen_length, block_length = int(gen_length), int(block_length)
    eos_id, eot_id = special if special is not None else special_ids(model)
    x, attention_mask = _start(model, prompt, attention_mask, gen_length, mask_id)
    rows, plen = prompt.shape
    prompt_index = x != mask_id
    if cache is None:
        forward = _Uncached(model, prompt_index, attention_mask, cfg_scale, mask_id, logits_eos_inf, eos_id,
                            mask_as_bias)
        attached = contextlib.nullcontext()
    else:
        cached, attached = cached_forward(model, x, prompt_index, attention_mask, cache, x.shape[1], block_length,
                                           cfg_scale, mask_id, logits_eos_inf, eos_id)
        forward = _Cached(cached, cache.mode)
    ban = ((eot_id,) if temperature > 0 else (eot_id, eos_id)) if confidence_eos_eot_inf else ()
    rules = StepRules(strict=True, guard=True, schedule=tuple(_schedule(block_length, spb)),
                      ban_after_token=ban)
    stepper = KlassStep(config, rules, rows, block_length, x.device)
    blocks = RowBlocks(rows, plen, block_length, num_blocks, x.device)
    noise = (lambda logits, cand: _noisy_tokens(add_gumbel_noise, logits, cand, temperature)) if temperature > 0 \
        else None
    with attached:
        used, left, records = _klass_loop(x, forward, stepper, blocks, spb, mask_id, noise, save_steps)
    masks_left_warning(x, mask_id, plen, counts=left)
    return GenerateOutput(sequences=x, used_steps=torch.tensor(used, dtype=torch.long), history=records)


def _klass_loop(x, forward, stepper, blocks, spb, mask_id, noise, save_steps):
    """The decoding loop (every mode): one forward and one KLASS step per iteration, for the rows whose blocks are
    not done; a row's block ends when its masks are gone or its ``spb`` steps are spent. One host read per
    forward: which rows' blocks ended (and the masks left, for the final warning). ``x`` is updated in place.
    Returns ``(forwards per row, masks left per row, step records or None)``."""
    recorder = StepRecorder() if save_steps else None
    rows = x.shape[0]
    used, left = [0] * rows, None
    it = 0
    while any(blocks.active):
        logits, next_block = forward(x, blocks)
        pos = blocks.positions_t()
        xw = x.gather(1, pos)
        cand = (xw == mask_id) & blocks.active_t.unsqueeze(-1)
        out = stepper.step(logits, cand, blocks.step_t, noise(logits, cand) if noise is not None else None)
        new = torch.where(out.commit, out.tokens, xw)
        x.scatter_(1, pos, new)
        ended_t = blocks.active_t & (((new == mask_id).sum(-1) == 0) | (blocks.step_t + 1 == spb))
        masks = (x[:, blocks.first:] == mask_id).sum(-1)
        record = () if recorder is None else (recorder.pack(cand, out.tokens, out.confidence, out.kl, out.commit,
                                                            positions=pos),)
        flags, *record = to_host(torch.stack([ended_t.long(), masks]), *record)  # the one host read of the forward
        ended, left = ([int(v) for v in line] for line in flags)
        if recorder is not None:
            recorder.add_packed(it, record[0])
        for r in range(rows):
            if blocks.active[r]:
                used[r] += 1
            if ended[r] and blocks.block[r] + 1 < blocks.count:  # the block's last forward: the next block's start
                following = next_block(r)
                if following is None:
                    stepper.restart(r)
                else:
                    stepper.remember(r, following)
        blocks.advance(ended, ended_t)
        it += 1
    return used, left, recorder.records if recorder is not None else None


class ObservedModel(wrapt.ObjectProxy):
    """A model proxy that records KLASS-style step records (confidence, KL) of an upstream LLaDA call.

    Upstream's loop is untouched: the proxy only reads each forward's input and output. Records use the
    model's logits after classifier-free guidance and before upstream's EOS tweaks; ``token_id`` of a
    candidate is the argmax, that of an unmasked position the token written there.
    """

    def __init__(self, model, prompt_len, gen_length, block_length, steps, cfg_scale, mask_id, remember_next=True):
        super().__init__(model)
        num_blocks, spb = check_lengths(torch.zeros((1, prompt_len)), steps, gen_length, block_length)
        self._self_cfg = (prompt_len, int(block_length), spb, num_blocks, cfg_scale, mask_id)
        self._self_remember = remember_next  # False under a dual cache: the next block starts afresh
        self._self_observer = Observer(mask_id, prompt_len, min(int(gen_length), 2 * int(block_length)))

    def __call__(self, ids, *args, **kwargs):
        out = self.__wrapped__(ids, *args, **kwargs)
        plen, bl, spb, num_blocks, cfg_scale, mask_id = self._self_cfg
        logits = out.logits
        if cfg_scale > 0.0:
            cond, uncond = torch.chunk(logits, 2, dim=0)
            logits, ids = uncond + (cfg_scale + 1) * (cond - uncond), torch.chunk(ids, 2, dim=0)[0]
        observer = self._self_observer
        block, step = divmod(observer.calls, spb)
        start = plen + block * bl
        cand = ids == mask_id
        cand[:, :start] = False
        cand[:, start + bl:] = False
        observer.observe(ids, logits, cand)
        if step == spb - 1 and block + 1 < num_blocks:  # keep the next block's distributions for its first KL
            nxt = torch.arange(start + bl, start + 2 * bl, device=ids.device)
            for r in range(ids.shape[0]):
                if self._self_remember:
                    observer.tracker.remember(logits, torch.full_like(nxt, r), nxt)
                else:
                    observer.tracker.reset(torch.full_like(nxt, r), nxt)
        return out

    def finish(self, ids_after):
        self._self_observer.finish(ids_after)

    @property
    def records(self):
        return self._self_observer.records

    @property
    def calls(self):
        return self._self_observer.calls


def _upstream_call(wrapped, call, cache, save_steps, as_dict, mmada):
    """Upstream's own loop (``call``: its bound arguments), with its forwards through the cache (``CachedModel``)
    and observed for step records (``ObservedModel``) as asked."""
    a = call.arguments
    attached = contextlib.nullcontext()
    if cache is not None:
        if mmada:
            _refuse_padded_mmada_cache(a.get("attention_mask"))
        spb = check_lengths(a["prompt"], a["steps"], a["gen_length"], a["block_length"])[1]
        a["model"] = CachedModel(a["model"], a["prompt"], a.get("attention_mask"), a["gen_length"],
                                 a["block_length"], spb, a["cfg_scale"], cache)
        attached = a["model"].attached()
    observed = ObservedModel(a["model"], a["prompt"].shape[1], a["gen_length"], a["block_length"],
                             a["steps"], a["cfg_scale"], a["mask_id"],
                             remember_next=cache is None or cache.mode == "prefix") if save_steps else None
    if observed is not None:
        a["model"] = observed
    with attached:
        seqs = wrapped(*call.args, **call.kwargs)
    if observed is not None:
        observed.finish(seqs)
    if not as_dict:  # upstream's loop through the cache: upstream's return type
        return seqs
    forwards = observed.calls if observed is not None else a["steps"]
    return GenerateOutput(sequences=seqs, used_steps=torch.full((seqs.shape[0],), forwards, dtype=torch.long),
                          history=observed.records if observed is not None else None)


def make_generate_wrapper(module):
    """The wrapt wrapper for a LLaDA ``generate`` function of ``module``.

    Adds ``alg`` (None/"default": upstream; "klass"), the KLASS parameters, ``save_steps``,
    ``return_dict_in_generate`` and ``use_cache``/``cache_refresh_every`` (``klass_patch.cache``; with upstream's
    algorithm, its own loop runs through a cached model proxy). A call with none of them goes to upstream
    unchanged.
    """

    # MMaDA's generate.py gives the model its mask as an attention_bias: KLASS calls the model the same way
    mmada = (getattr(module, "__klass_patch_installed__", None) or identify_module(module, "llada")) == "mmada"

    def wrapper(wrapped, instance, args, kwargs):
        alg = kwargs.pop("alg", None)
        save_steps = bool(kwargs.pop("save_steps", False))
        as_dict = bool(kwargs.pop("return_dict_in_generate", False))
        opts = klass_options(kwargs, alg, ALGS, hint=" (upstream's strategies are chosen with remasking=)")
        cache = cache_options(kwargs)  # use_cache / cache_refresh_every, checked before any forward
        if alg != "klass" and not save_steps and not as_dict and cache is None:
            return wrapped(*args, **kwargs)
        if save_steps and not as_dict:
            raise ValueError("save_steps=True needs return_dict_in_generate=True: the step records are "
                             "returned in .history")
        config = KlassConfig.from_kwargs(opts) if alg == "klass" else None
        call = inspect.signature(wrapped).bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        if config is not None:
            if a["remasking"] != "low_confidence":
                raise ValueError("remasking must be 'low_confidence' with alg='klass' (its fallback is top-k by "
                                 f"confidence), got {a['remasking']!r}")
            out = klass_generate(
                a["model"], a["prompt"], a.get("attention_mask"), steps=a["steps"], gen_length=a["gen_length"],
                block_length=a["block_length"], temperature=a["temperature"], cfg_scale=a["cfg_scale"],
                mask_id=a["mask_id"], logits_eos_inf=a.get("logits_eos_inf", False),
                confidence_eos_eot_inf=a.get("confidence_eos_eot_inf", False), config=config,
                save_steps=save_steps, module=module, cache=cache, mask_as_bias=mmada)
            return out if as_dict else out.sequences  # upstream returns the tensor
        return _upstream_call(wrapped, call, cache, save_steps, as_dict, mmada)

    return wrapper
