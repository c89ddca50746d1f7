"""Stand-in for Dream's ``generation_utils.py`` (same interface, written for klass-patch; no transformers).

``DreamGenerationMixin.diffusion_generate`` appends ``max_new_tokens`` masks and, over ``steps`` forwards,
unmasks them: ``alg='origin'`` unmasks each masked position with probability ``1 - s/t``; the others unmask
the ``num_masked * (1 - s/t)`` positions of highest confidence (``maskgit_plus``: top probability,
``topk_margin``: top-1 minus top-2, ``entropy``: negative entropy).
"""

KLASS_PATCH_STANDIN = True  # tells klass_patch.versions this is a stand-in, not an upstream file
import copy
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributions as dists
import torch.nn.functional as F


def top_p_logits(logits, top_p):
    order = logits.argsort(dim=-1, descending=True)
    sorted_probs = logits.gather(-1, order).softmax(-1)
    beyond = sorted_probs.cumsum(-1) > top_p
    drop_sorted = torch.zeros_like(beyond)
    drop_sorted[..., 1:] = beyond[..., :-1]  # always keep the most likely token
    drop = torch.zeros_like(beyond).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def top_k_logits(logits, top_k):
    kth = logits.topk(min(top_k, logits.shape[-1])).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False, neg_entropy=False):
    """(confidence, token) per row: sampled at temperature > 0, else the argmax."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = logits.softmax(-1)
    if temperature > 0:
        token = dists.Categorical(probs=probs).sample()
        confidence = probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, token = probs.max(-1)
    if margin_confidence:
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    if neg_entropy:
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return confidence, token


@dataclass
class DreamModelOutput:
    sequences: torch.LongTensor = None
    history: Optional[Tuple[torch.FloatTensor]] = None


class DreamGenerationConfig:
    def __init__(self, **kwargs):
        self.temperature = kwargs.pop("temperature", 0.0)
        self.top_p = kwargs.pop("top_p", None)
        self.top_k = kwargs.pop("top_k", None)
        self.max_length = kwargs.pop("max_length", 20)
        self.max_new_tokens = kwargs.pop("max_new_tokens", None)
        self.eps = kwargs.pop("eps", 1e-3)
        self.steps = kwargs.pop("steps", 512)
        self.alg = kwargs.pop("alg", "origin")
        self.alg_temp = kwargs.pop("alg_temp", None)
        self.num_return_sequences = kwargs.pop("num_return_sequences", 1)
        self.return_dict_in_generate = kwargs.pop("return_dict_in_generate", False)
        self.output_history = kwargs.pop("output_history", False)
        self.mask_token_id = kwargs.pop("mask_token_id", None)
        self.pad_token_id = kwargs.pop("pad_token_id", None)
        self.bos_token_id = kwargs.pop("bos_token_id", None)
        self.eos_token_id = kwargs.pop("eos_token_id", None)

    def update(self, **kwargs):
        """Set the known attributes; return the unknown ones."""
        unused = {}
        for key, value in kwargs.items():
            if hasattr(self, key):
                setattr(self, key, value)
            else:
                unused[key] = value
        return unused


class DreamGenerationMixin:
    @torch.no_grad()
    def diffusion_generate(self, inputs=None, generation_config=None, **kwargs):
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        config.update(**kwargs)
        tokens_hook = kwargs.pop("generation_tokens_hook_func", lambda step, x, logits: x)
        logits_hook = kwargs.pop("generation_logits_hook_func", lambda step, x, logits: logits)
        assert inputs is not None
        attention_mask = kwargs.pop("attention_mask", None)
        if config.max_new_tokens is not None:
            config.max_length = inputs.shape[-1] + config.max_new_tokens
        if inputs.shape[-1] >= config.max_length:
            raise ValueError(f"Input length of input_ids is {inputs.shape[-1]}, but `max_length` is set to "
                             f"{config.max_length}.")
        if config.num_return_sequences > 1:
            inputs = inputs.repeat_interleave(config.num_return_sequences, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        return self._sample(inputs, attention_mask=attention_mask, generation_config=config,
                            generation_tokens_hook_func=tokens_hook, generation_logits_hook_func=logits_hook)

    def _sample(self, input_ids, attention_mask, generation_config, generation_tokens_hook_func,
                generation_logits_hook_func):
        c = generation_config
        history = [] if (c.return_dict_in_generate and c.output_history) else None
        x = F.pad(input_ids, (0, c.max_length - input_ids.shape[1]), value=c.mask_token_id)
        if attention_mask is not None and torch.any(attention_mask == 0):
            attention_mask = F.pad(attention_mask, (0, c.max_length - attention_mask.shape[1]), value=1)
            tok_idx = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            attention_mask = attention_mask.bool()
            attention_mask = attention_mask[:, None, None, :] & attention_mask[:, None, :, None]
        else:
            tok_idx, attention_mask = None, "full"
        times = torch.linspace(1, c.eps, c.steps + 1, device=x.device)
        x = generation_tokens_hook_func(None, x, None)
        for i in range(c.steps):
            masked = x == c.mask_token_id
            logits = self(x, attention_mask, tok_idx).logits
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # position i predicts token i
            logits = generation_logits_hook_func(i, x, logits)
            ratio = 1 - times[i + 1] / times[i]
            if c.alg == "origin":
                new = torch.full_like(x[masked], c.mask_token_id)
                move = torch.rand(new.shape, device=x.device) < (ratio if i < c.steps - 1 else 1)
                _, new[move] = sample_tokens(logits[masked][move], c.temperature, c.top_p, c.top_k)
                x[masked] = new
            else:
                flags = {"topk_margin": {"margin_confidence": True}, "entropy": {"neg_entropy": True},
                         "maskgit_plus": {}}
                if c.alg not in flags:
                    raise RuntimeError(f"Unknown alg: {c.alg}")
                conf, x0 = sample_tokens(logits[masked], c.temperature, c.top_p, c.top_k, **flags[c.alg])
                per_row = masked.sum() / masked.shape[0]
                k = int(per_row * ratio) if i < c.steps - 1 else int(per_row)
                score = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)
                score[masked] = conf
                if k > 0:
                    if c.alg_temp is None or c.alg_temp == 0:
                        pick = score.topk(k).indices
                    else:
                        pick = torch.multinomial((score / c.alg_temp).softmax(-1), num_samples=k)
                    cand = torch.full_like(x, c.mask_token_id)
                    cand[masked] = x0
                    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
                    x[rows, pick] = cand[rows, pick]
            x = generation_tokens_hook_func(i, x, logits)
            if history is not None:
                history.append(x.clone())
        if c.return_dict_in_generate:
            return DreamModelOutput(sequences=x, history=history)
        return x
