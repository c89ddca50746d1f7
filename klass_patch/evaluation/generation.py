"""The evaluation package's generation API: prompts in, token ids, forwards used and step records out.

    from klass_patch.evaluation import Generator, encode, resolve_settings
    settings = resolve_settings("dream", "gsm8k", alg="klass", gen_length=256, steps=256)
    generator = Generator(model, settings, tokenizer=tokenizer)   # LLaDA: generate_fn=<its generate.py>
    ids, mask = encode(tokenizer, prompts, settings.family, model.device)   # left-padded
    sequences, used_steps, history = generator(ids, mask)

``Generator`` calls LLaDA's patched ``generate.py`` or Dream's patched ``diffusion_generate`` with a run's
``Settings`` (KLASS or upstream's samplers, with or without a KV cache). ``klass-patch eval`` (``runner``) and
the lm-evaluation-harness model (``klass_patch.lm_eval``) both generate through it.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from typing import Callable, List, Optional

import torch

from .settings import CODE_DATASETS, Settings

LLADA_MASK_ID = 126336  # LLaDA-8B's mask token, where neither the config nor the tokenizer names one


def draws_random(settings: Settings) -> bool:
    """Whether the sampler draws random numbers: temperature > 0, LLaDA ``random`` remasking, Dream ``origin``."""
    return settings.temperature > 0 or settings.alg in ("random", "origin")


def rows_per_call(settings: Settings) -> int:
    """Examples per sampler call: ``batch_size``, or 1 where sampling is random. The rows of a batch share
    one torch random stream, so a row's draws would depend on the other rows; alone, each example draws
    from its own seed and gives the same text at any ``batch_size``, resumed or not."""
    return 1 if draws_random(settings) else settings.batch_size


def with_mask_id(settings: Settings, model, tokenizer=None) -> Settings:
    """LLaDA settings without ``mask_id``: the model config's ``mask_token_id``, else the tokenizer's, else
    126336 (LLaDA-8B's). Other settings as given."""
    if settings.family != "llada" or settings.mask_id is not None:
        return settings
    found = getattr(getattr(model, "config", None), "mask_token_id", None)
    found = found if found is not None else getattr(tokenizer, "mask_token_id", None)
    return dataclasses.replace(settings, mask_id=int(found) if found is not None else LLADA_MASK_ID)


def llada_generate_of(obj) -> Callable:
    """The patched ``generate`` of a LLaDA ``generate.py`` module (or of the module of a function)."""
    import klass_patch

    module = obj if isinstance(obj, types.ModuleType) else sys.modules.get(getattr(obj, "__module__", ""), None)
    klass_patch.apply(module if module is not None else obj)
    return getattr(module, "generate") if module is not None else obj


def encode(tokenizer, texts: List[str], family: str, device):
    """Left-padded ``input_ids`` and ``attention_mask``. LLaDA: ``tokenizer(prompt)`` as the authors'
    LLaDA script; Dream: no special tokens added, as ``apply_chat_template(tokenize=True)`` does."""
    rows = [list(tokenizer(t, add_special_tokens=family == "llada")["input_ids"]) for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def decode(tokenizer, ids: torch.Tensor, family: str, dataset: str) -> str:
    """A generation's text as the authors decode it: LLaDA ``batch_decode(skip_special_tokens=True)``,
    Dream ``decode`` of everything; both cut at the first EOS token's text (LLaDA: code datasets only)."""
    eos = getattr(tokenizer, "eos_token", None)
    if family == "llada":
        text = tokenizer.batch_decode(ids.unsqueeze(0), skip_special_tokens=True)[0]
        cut = dataset in CODE_DATASETS
    else:
        text, cut = tokenizer.decode(ids.tolist()), True
    return text.split(eos)[0] if (cut and eos) else text


def split_history(history: list, row: int, rows: int) -> list:
    """One row's step records out of a batch's (row renumbered 0; steps where it was done left out)."""
    if rows == 1:
        return history
    out = []
    for rec in history:
        done = [dict(t, row=0) for t in rec["decoded_tokens"] if t["row"] == row]
        every = [dict(t, row=0) for t in rec["all_tokens"] if t["row"] == row]
        if done or every:
            out.append({"step": rec["step"], "decoded_tokens_num": len(done), "decoded_tokens": done,
                        "all_tokens": every})
    return out


def final_kl(history: list) -> Optional[float]:
    """Mean, over the generated tokens, of the KL divergence each had at the step it was decided."""
    kls = [t["kl_divergence"] for rec in history for t in rec["decoded_tokens"]]
    return sum(kls) / len(kls) if kls else None


class Generator:
    """One batch of prompts -> ``(sequences, used_steps, history)`` with a run's ``Settings``.

    ``Generator(model, settings, generate_fn=None, tokenizer=None)``:

    - ``model``: a LLaDA or Dream model (Dream's ``diffusion_generate`` is patched here, ``klass_patch.apply``);
    - ``settings``: ``resolve_settings(...)``; a LLaDA ``mask_id`` left unset is taken from the model's config,
      else ``tokenizer``'s, else 126336 (the settings used are ``generator.settings``);
    - ``generate_fn``: LLaDA only, its ``generate`` function or ``generate.py`` module (patched here; LLaDA's
      sampler is a script, not part of the model), e.g. ``klass_patch.toy.llada_generate``.

    Calling it with left-padded ``input_ids`` and ``attention_mask`` (``encode``) returns the sequences (prompt
    and generation), each row's model forwards (``used_steps``; every step for upstream Dream, which does not
    count), and the step records with ``save_steps`` (else None; ``split_history`` gives one row's).
    ``generator.rows`` is how many prompts one call should take (``rows_per_call``). Bad settings raise
    ``ValueError`` here, before any forward.
    """

    def __init__(self, model, settings: Settings, generate_fn=None, tokenizer=None):
        self.model, self.s = model, with_mask_id(settings, model, tokenizer)
        if settings.family == "llada":
            if generate_fn is None:
                raise ValueError("LLaDA needs generate_fn: the generate function (or module) of LLaDA's "
                                 "generate.py, e.g. klass_patch.toy.llada_generate")
            self.fn = llada_generate_of(generate_fn)
            self.takes_mask = "attention_mask" in inspect.signature(self.fn).parameters
            if rows_per_call(settings) > 1 and not self.takes_mask:
                raise ValueError("batch_size (--batch-size) > 1 needs a LLaDA generate() that takes "
                                 "attention_mask (the 2025-10 generate.py); use --batch-size 1 with this one")
        else:
            import klass_patch

            klass_patch.apply(model)  # the model's DreamGenerationMixin takes alg="klass" from now on

    @property
    def settings(self) -> Settings:
        return self.s

    @property
    def rows(self) -> int:
        return rows_per_call(self.s)

    def _llada(self, ids, mask):
        s = self.s
        kw = dict(steps=s.steps, gen_length=s.gen_length, block_length=s.block_length,
                  temperature=s.temperature, remasking="random" if s.alg == "random" else "low_confidence",
                  mask_id=s.mask_id, return_dict_in_generate=True, save_steps=s.save_steps)
        if s.alg == "klass":
            kw.update(alg="klass", **s.klass_kwargs())
        if not bool(mask.all()):
            kw["attention_mask"] = mask
        return self.fn(self.model, ids, **kw, **s.cache_kwargs())

    def _dream(self, ids, mask):
        s = self.s
        kw = dict(attention_mask=mask, max_new_tokens=s.gen_length, steps=s.steps, temperature=s.temperature,
                  top_p=s.top_p, alg=s.alg, alg_temp=0.0, return_dict_in_generate=True, **s.klass_kwargs())
        if s.save_steps:
            kw["save_steps"] = True
        kw.update(s.cache_kwargs())
        if s.use_cache is not None and s.block_length is not None:
            kw["block_length"] = s.block_length
        return self.model.diffusion_generate(ids, **kw)

    def __call__(self, ids, mask):
        s = self.s
        out = self._llada(ids, mask) if s.family == "llada" else self._dream(ids, mask)
        sequences = out.sequences if hasattr(out, "sequences") else out
        used = getattr(out, "used_steps", None)  # upstream Dream without KLASS: none; every step ran
        used = [int(u) for u in used] if used is not None else [s.steps] * sequences.shape[0]
        history = out.history if s.save_steps else None
        return sequences, used, history
