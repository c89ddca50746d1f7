"""Bad input: a ValueError naming the parameter and what is allowed, before the first forward."""
import pytest
import torch

import klass_patch
from conftest import STANDIN, load_file
from klass_patch.toy.models import ToyDenoiser, dream_model

BAD_KLASS = [
    (dict(unmask_strategy="random"), r"unmask_strategy must be one of 'all', 'max_conf', 'min_kl'"),
    (dict(conf_threshold=1.5), r"conf_threshold must be a number in \[0, 1\]"),
    (dict(conf_threshold=-0.1), r"conf_threshold must be a number in \[0, 1\]"),
    (dict(conf_threshold="high"), r"conf_threshold must be a number in \[0, 1\]"),
    (dict(kl_threshold=0), r"kl_threshold must be a number > 0"),
    (dict(kl_threshold=-1.0), r"kl_threshold must be a number > 0"),
    (dict(kl_threshold=float("nan")), r"kl_threshold must be a number > 0"),
    (dict(kl_history_length=0), r"kl_history_length must be a positive int"),
    (dict(kl_history_length=1.5), r"kl_history_length must be a positive int"),
    (dict(kl_history_length=True), r"kl_history_length must be a positive int"),
    (dict(save_steps=True), r"save_steps=True needs return_dict_in_generate=True"),
]
BAD_LLADA = BAD_KLASS + [
    (dict(gen_length=12), r"gen_length \(12\) must be a multiple of block_length \(8\)"),
    (dict(steps=3, block_length=4), r"steps \(3\) must be a multiple of the number of blocks"),
    (dict(remasking="random"), r"remasking must be 'low_confidence' with alg='klass'"),
    (dict(alg="fast"), r"alg must be one of None, 'default', 'klass', got 'fast'"),
]


@pytest.mark.parametrize("bad,message", BAD_LLADA, ids=lambda v: str(v))
def test_llada_bad_input(bad, message):
    module = load_file(STANDIN["llada"])
    klass_patch.apply(module)
    model = ToyDenoiser()
    kwargs = {**dict(steps=8, gen_length=8, block_length=8, mask_id=63, alg="klass"), **bad}
    with pytest.raises(ValueError, match=message):
        module.generate(model, torch.tensor([[3, 4]]), **kwargs)
    assert model.calls == 0


@pytest.mark.parametrize("bad,message", BAD_KLASS, ids=lambda v: str(v))
def test_dream_bad_input(bad, message):
    module = load_file(STANDIN["dream"])
    klass_patch.apply(module)
    model = dream_model(module.DreamGenerationMixin, module.DreamGenerationConfig(mask_token_id=63))
    with pytest.raises(ValueError, match=message):
        model.diffusion_generate(torch.tensor([[3, 4]]), max_new_tokens=8, steps=8, alg="klass", **bad)
    assert model.calls == 0


def test_llada_klass_parameters_without_klass_keep_upstream_error():
    module = load_file(STANDIN["llada"])
    klass_patch.apply(module)
    with pytest.raises(TypeError, match="conf_threshold"):
        module.generate(ToyDenoiser(), torch.tensor([[3, 4]]), steps=8, gen_length=8, mask_id=63,
                        conf_threshold=0.5)
