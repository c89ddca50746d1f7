"""Stand-in for Dream's ``generation_utils.py``, written for klass-patch's tests with upstream's interface, not its
code: ``DreamGenerationConfig(GenerationConfig)`` with its own fields and a ``validate(self, is_init=False)`` that
does nothing, ``DreamGenerationMixin.diffusion_generate`` / ``_sample`` with upstream's signatures, and
``sample_tokens``.

The parts that transformers 5.x breaks behave as upstream's: the config's ``__init__`` never calls
``GenerationConfig.__init__`` and validates itself with ``validate(is_init=True)``; ``diffusion_generate`` without a
generation config builds one with ``DreamGenerationConfig.from_model_config(self.config)`` (so on 4.x the model
config's legacy ``temperature=1.0, top_k=50, top_p=1.0`` become the sampling defaults) and applies the call's
keyword arguments with ``GenerationConfig.update``. The sampler itself (``_sample``, ``sample_tokens``) is
klass-patch's own stand-in, imported from ``klass_patch/toy/dream_generation.py``.
"""

KLASS_PATCH_STANDIN = True  # tells klass_patch.versions this is a stand-in, not an upstream file

import copy
import inspect

import torch
from transformers import __version__
from transformers.generation.configuration_utils import GenerationConfig

from klass_patch.toy import dream_generation as _toy
from klass_patch.toy.dream_generation import DreamModelOutput, sample_tokens, top_k_logits, top_p_logits  # noqa: F401


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

    # the toy's own function (not a patched one), in this class's own namespace, as upstream's
    _sample = inspect.unwrap(_toy.DreamGenerationMixin.__dict__["_sample"])
