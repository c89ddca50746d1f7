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


@pytest.mark.parametrize("extra", [dict(conf_threshold=0.5), dict(alg="default", kl_threshold=0.1),
                                   dict(unmask_strategy="all", kl_history_length=3)], ids=str)
def test_klass_parameters_without_klass_are_refused_by_both_families(extra):
    """One rule (issue 11, item 14): a KLASS parameter without alg='klass' is a ValueError naming it, before any
    forward (LLaDA's upstream raised TypeError, Dream's silently dropped it)."""
    names = [k for k in extra if k != "alg"]
    llada = load_file(STANDIN["llada"])
    klass_patch.apply(llada)
    model = ToyDenoiser()
    with pytest.raises(ValueError, match=f"{names[0]}.*alg='klass'"):
        llada.generate(model, torch.tensor([[3, 4]]), steps=8, gen_length=8, mask_id=63, **extra)
    assert model.calls == 0
    dream = load_file(STANDIN["dream"])
    klass_patch.apply(dream)
    model = dream_model(dream.DreamGenerationMixin, dream.DreamGenerationConfig(mask_token_id=63))
    dream_extra = dict(extra, alg="maskgit_plus") if "alg" in extra else extra
    with pytest.raises(ValueError, match=f"{names[0]}.*alg='klass'"):
        model.diffusion_generate(torch.tensor([[3, 4]]), max_new_tokens=8, steps=8, **dream_extra)
    assert model.calls == 0


def test_dream_unknown_alg_is_refused_before_any_forward():
    module = load_file(STANDIN["dream"])
    klass_patch.apply(module)
    model = dream_model(module.DreamGenerationMixin, module.DreamGenerationConfig(mask_token_id=63))
    with pytest.raises(ValueError, match=r"alg must be one of 'origin', .*'klass', got 'klas'"):
        model.diffusion_generate(torch.tensor([[3, 4]]), max_new_tokens=8, steps=8, alg="klas")
    model.generation_config.alg = "nope"  # from the model's generation config, as upstream resolves it
    with pytest.raises(ValueError, match="got 'nope'"):
        model.diffusion_generate(torch.tensor([[3, 4]]), max_new_tokens=8, steps=8)
    assert model.calls == 0


def test_none_means_the_default():
    module = load_file(STANDIN["llada"])
    klass_patch.apply(module)
    common = dict(steps=8, gen_length=8, block_length=8, mask_id=63, alg="klass")
    a = module.generate(ToyDenoiser(), torch.tensor([[3, 4]]), **common)
    b = module.generate(ToyDenoiser(), torch.tensor([[3, 4]]), conf_threshold=None, kl_threshold=None,
                        kl_history_length=None, unmask_strategy=None, **common)
    assert torch.equal(a, b)
    plain = module.generate(ToyDenoiser(), torch.tensor([[3, 4]]), steps=8, gen_length=8, block_length=8, mask_id=63,
                            conf_threshold=None)  # None without alg='klass' is no KLASS parameter at all
    assert plain.shape == (1, 10)


def test_llada_lengths_accept_numpy_ints():
    np = pytest.importorskip("numpy")
    module = load_file(STANDIN["llada"])
    klass_patch.apply(module)
    a = module.generate(ToyDenoiser(), torch.tensor([[3, 4]]), steps=np.int64(8), gen_length=np.int64(8),
                        block_length=np.int32(4), mask_id=63, alg="klass")
    b = module.generate(ToyDenoiser(), torch.tensor([[3, 4]]), steps=8, gen_length=8, block_length=4, mask_id=63,
                        alg="klass")
    assert torch.equal(a, b)


def test_dream_cache_block_length_message_explains_its_numbers(tmp_path):
    """Issue 18, item 12: the message ended with an unexplained "(got 8)" (the prompt length)."""
    from test_cache import Family
    fam = Family("dream", "standin", tmp_path)
    ids, mask = fam.batch()
    with pytest.raises(ValueError) as err:
        fam.generate(ids, mask, alg="klass", use_cache="dual", block_length=5)
    message = str(err.value)
    assert "generated length (24 = max_length 34 - prompt length 10)" in message, message
    assert "multiple of block_length (5)" in message and "got" not in message, message
    assert fam.calls == 0
