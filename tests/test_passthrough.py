"""Calls that are not KLASS are upstream's: same outputs, same errors, same random stream, patched or not."""
import inspect

import pytest
import torch

import klass_patch
from conftest import STANDIN, installed_copy, load_file, needs_transformers, sources
from klass_patch.toy.models import ToyDenoiser, dream_model

LLADA_MASK = 126336


def _outcome(fn):
    """(result or exception type and message, random state after)."""
    torch.manual_seed(1234)
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - the exception is the outcome being compared
        result = (type(e), str(e))
    return result, torch.get_rng_state()


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and not isinstance(a, str):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__") or hasattr(a, "keys"):
        return type(a).__name__ == type(b).__name__ and all(
            _same(getattr(a, k), getattr(b, k)) for k in ("sequences", "history"))
    return a == b


def assert_identical(run_plain, run_patched):
    (ra, sa), (rb, sb) = _outcome(run_plain), _outcome(run_patched)
    assert _same(ra, rb), (ra, rb)
    assert torch.equal(sa, sb), "the random generator ends in a different state"


LLADA_CASES = {
    "greedy": dict(),
    "explicit alg=None": dict(alg=None),
    "alg=default": dict(alg="default"),
    "temperature": dict(temperature=0.7),
    "random remasking": dict(remasking="random"),
    "random remasking, temperature": dict(remasking="random", temperature=0.5),
    "cfg": dict(cfg_scale=1.5),
    "blocks": dict(block_length=4),
    "invalid remasking": dict(remasking="nope"),
    "bad lengths": dict(block_length=5),
}


def _patched_copy(path, family, how, tmp_path_factory):
    """The module under test: patched at run time (the test calls apply) or rewritten by the installer."""
    if how == "installed file":
        return load_file(installed_copy(path, family, tmp_path_factory.mktemp(family)))
    return load_file(path)


HOW = ["apply(module)", "installed file"]


def _with_how(params):
    return [pytest.param((p.values[0], how), id=f"{p.id}-{how}", marks=p.marks) for p in params for how in HOW]


@pytest.fixture(scope="module", params=_with_how(sources("llada")))
def llada_pair(request, tmp_path_factory):
    path, how = request.param
    return load_file(path), _patched_copy(path, "llada", how, tmp_path_factory)


@pytest.mark.parametrize("case", LLADA_CASES)
def test_llada_calls_are_upstream(llada_pair, case):
    plain, patched = llada_pair
    klass_patch.apply(patched)
    model = ToyDenoiser(vocab_size=126464, mask_id=LLADA_MASK, noise=2.0)
    prompt = torch.tensor([[3, 4, 5, 6]])
    kwargs = {**dict(steps=8, gen_length=8, block_length=8, mask_id=LLADA_MASK), **LLADA_CASES[case]}
    plain_kwargs = {k: v for k, v in kwargs.items() if k != "alg"}
    assert_identical(lambda: plain.generate(model, prompt, **plain_kwargs),
                     lambda: patched.generate(model, prompt, **kwargs))


def test_llada_batch_with_padding_is_upstream(llada_pair):
    plain, patched = llada_pair
    if "attention_mask" not in inspect.signature(plain.generate).parameters:
        pytest.skip("this generate.py has no attention_mask (batch size 1 only)")
    klass_patch.apply(patched)
    model = ToyDenoiser(vocab_size=126464, mask_id=LLADA_MASK, noise=2.0, pad_id=126081)
    prompt = torch.tensor([[126081, 126081, 3, 4], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    for extra in (dict(), dict(cfg_scale=1.0), dict(logits_eos_inf=True, confidence_eos_eot_inf=True)):
        assert_identical(lambda: plain.generate(model, prompt, mask, steps=8, gen_length=8, block_length=4, **extra),
                         lambda: patched.generate(model, prompt, mask, steps=8, gen_length=8, block_length=4, **extra))


DREAM_CASES = {
    "origin": dict(alg="origin"),
    "origin, temperature": dict(alg="origin", temperature=0.5),
    "maskgit_plus": dict(alg="maskgit_plus"),
    "maskgit_plus, top_p": dict(alg="maskgit_plus", temperature=0.4, top_p=0.9),
    "maskgit_plus, top_k, alg_temp": dict(alg="maskgit_plus", temperature=0.4, top_k=5, alg_temp=0.5),
    "topk_margin": dict(alg="topk_margin"),
    "entropy": dict(alg="entropy", temperature=0.3),
    "output_history": dict(alg="maskgit_plus", output_history=True, return_dict_in_generate=True),
    "dict without history": dict(alg="entropy", return_dict_in_generate=True),
}


def _dream_model(module, path, **kw):
    special = dict(mask_token_id=63, pad_token_id=62, eos_token_id=62, bos_token_id=62)
    model = dream_model(module.DreamGenerationMixin, module.DreamGenerationConfig(**special), noise=2.0, **kw)
    if path != STANDIN["dream"]:
        import transformers
        model.config = transformers.PretrainedConfig(vocab_size=64, max_position_embeddings=512)
    return model, special


@pytest.fixture(scope="module", params=_with_how(sources("dream")))
def dream_pair(request, tmp_path_factory):
    path, how = request.param
    needs_transformers(path)
    return path, load_file(path), _patched_copy(path, "dream", how, tmp_path_factory)


@pytest.mark.parametrize("case", DREAM_CASES)
def test_dream_calls_are_upstream(dream_pair, case):
    path, plain, patched = dream_pair
    klass_patch.apply(patched)
    prompt = torch.tensor([[3, 4, 5, 6]])
    runs = []
    for module in (plain, patched):
        model, special = _dream_model(module, path)
        config = module.DreamGenerationConfig(**special)
        runs.append(lambda m=model, c=config: m.diffusion_generate(prompt, generation_config=c, max_new_tokens=8,
                                                                   steps=8, **DREAM_CASES[case]))
    assert_identical(*runs)


def test_dream_batch_with_padding_is_upstream(dream_pair):
    path, plain, patched = dream_pair
    klass_patch.apply(patched)
    prompt = torch.tensor([[62, 62, 3, 4], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    runs = []
    for module in (plain, patched):
        model, special = _dream_model(module, path, pad_id=62)
        config = module.DreamGenerationConfig(**special)
        runs.append(lambda m=model, c=config: m.diffusion_generate(
            prompt, generation_config=c, attention_mask=mask, max_new_tokens=8, steps=8, alg="maskgit_plus",
            temperature=0.3, return_dict_in_generate=True, output_history=True))
    assert_identical(*runs)
