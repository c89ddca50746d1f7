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
import re

import torch
import torch.nn.functional as F

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
        if not opts and alg != "klass":
            return wrapped(*args, **kwargs)
        hooks = ("generation_logits_hook_func", "generation_tokens_hook_func")
        token = _CALL.set(dict(opts, hooks_given=any(h in kwargs for h in hooks)))
        try:
            return wrapped(*args, **kwargs)
        finally:
            _CALL.reset(token)

    return wrapper


def make_sample_wrapper(module):
    """The wrapt wrapper of ``DreamGenerationMixin._sample`` for the upstream ``module``."""

    def wrapper(wrapped, instance, args, kwargs):
        call = inspect.signature(wrapped).bind(*args, **kwargs)
        a = call.arguments
        gc = a["generation_config"]
        opts = dict(_CALL.get() or {"hooks_given": True})
        hooks_given = opts.pop("hooks_given")
        save_steps = bool(opts.pop("save_steps", getattr(gc, "save_steps", False)))
        if gc.alg != "klass" and not save_steps:
            return wrapped(*args, **kwargs)
        if save_steps and not gc.return_dict_in_generate:
            raise ValueError("save_steps=True needs return_dict_in_generate=True: the step records are "
                             "returned in .history")
        hooks = (a["generation_tokens_hook_func"], a["generation_logits_hook_func"])
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
