"""Stand-in for Dream's ``generation_utils.py``, written for klass-patch's tests with upstream's interface, not its
code: ``DreamGenerationConfig(GenerationConfig)`` with its own fields and a ``validate(self, is_init=False)`` that
does nothing, ``DreamGenerationMixin.diffusion_generate`` / ``_sample`` with upstream's signatures, and
``sample_tokens``.

The parts that transformers 5.x breaks behave as upstream's: the config's ``__init__`` never calls
``GenerationConfig.__init__`` and validates itself with ``validate(is_init=True)``; ``diffusion_generate`` without a
generation config builds one with ``DreamGenerationConfig.from_model_config(self.config)`` (so on 4.x the model
config's legacy ``temperature=1.0, top_k=50, top_p=1.0`` become the sampling defaults) and applies the call's
keyword arguments with ``GenerationConfig.update``. The sampler is klass-patch's own stand-in
(``klass_patch/toy/dream_generation.py``), with transformers' ``ModelOutput``.
"""

KLASS_PATCH_STANDIN = True  # tells klass_patch.versions this is a stand-in, not an upstream file

import copy
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributions as dists
import torch.nn.functional as F
from transformers import __version__
from transformers.generation.configuration_utils import GenerationConfig
from transformers.utils import ModelOutput


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
class DreamModelOutput(ModelOutput):
    sequences: torch.LongTensor = None
    history: Optional[Tuple[torch.FloatTensor]] = None


class DreamGenerationConfig(GenerationConfig):
    _FIELDS = {"temperature": 0.0, "top_p": None, "top_k": None, "max_length": 20, "max_new_tokens": None,
               "eps": 1e-3, "steps": 512, "alg": "origin", "alg_temp": None, "num_return_sequences": 1,
               "return_dict_in_generate": False, "output_history": False, "mask_token_id": None,
               "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}

    def __init__(self, **kwargs):  # GenerationConfig.__init__ is not called, as upstream's
        for name, default in self._FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        self.generation_kwargs = kwargs.pop("generation_kwargs", {})
        self._from_model_config = kwargs.pop("_from_model_config", False)
        self._commit_hash = kwargs.pop("_commit_hash", None)
        self.transformers_version = kwargs.pop("transformers_version", __version__)
        if not self._from_model_config:  # a model config's other fields are not generation parameters
            for key, value in kwargs.items():
                setattr(self, key, value)
        self.validate(is_init=True)

    def validate(self, is_init=False):
        pass


class DreamGenerationMixin:
    def _prepare_generation_config(self, generation_config, **kwargs):
        from_model = generation_config is None
        if from_model:  # upstream's: the model config, not model.generation_config
            generation_config = DreamGenerationConfig.from_model_config(self.config)
        generation_config = copy.deepcopy(generation_config)
        generation_config.update(**kwargs)
        if not from_model:  # special tokens left unset come from the model's generation config
            for name in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
                if getattr(generation_config, name) is None:
                    setattr(generation_config, name, getattr(self.generation_config, name, None))
        return generation_config

    def _prepare_generated_length(self, generation_config, has_default_max_length, input_ids_length):
        if generation_config.max_new_tokens is not None:
            generation_config.max_length = generation_config.max_new_tokens + input_ids_length
        elif has_default_max_length and generation_config.max_length == DreamGenerationConfig().max_length:
            limit = getattr(self.config, "max_position_embeddings", None)
            generation_config.max_length += input_ids_length
            if limit is not None:
                generation_config.max_length = min(generation_config.max_length, limit)
        return generation_config

    @torch.no_grad()
    def diffusion_generate(self, inputs=None, generation_config=None, **kwargs):
        generation_config = self._prepare_generation_config(generation_config, **kwargs)
        tokens_hook = kwargs.pop("generation_tokens_hook_func", lambda step, x, logits: x)
        logits_hook = kwargs.pop("generation_logits_hook_func", lambda step, x, logits: logits)
        assert inputs is not None
        attention_mask = kwargs.pop("attention_mask", None)
        has_default_max_length = kwargs.get("max_length") is None and generation_config.max_length is not None
        generation_config = self._prepare_generated_length(generation_config, has_default_max_length,
                                                           inputs.shape[-1])
        if inputs.shape[-1] >= generation_config.max_length:
            raise ValueError(f"Input length of input_ids is {inputs.shape[-1]}, but `max_length` is set to "
                             f"{generation_config.max_length}.")
        n = generation_config.num_return_sequences
        if n > 1:
            inputs = inputs.repeat_interleave(n, dim=0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(n, dim=0)
        return self._sample(inputs, attention_mask=attention_mask, generation_config=generation_config,
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
