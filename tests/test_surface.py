"""What users touch, on the stand-ins and (with KLASS_PATCH_UPSTREAM) every real upstream file: return types,
reloads, installed files loaded every way, EOS/EOT handling, user hooks, classifier-free guidance, padding."""
import importlib
import importlib.util
import inspect
import sys
from types import SimpleNamespace

import pytest
import torch

import klass_patch
from conftest import STANDIN, installed_copy, load_file, needs_transformers, sources
from klass_patch import patching
from klass_patch.llada import EOS_ID, EOT_ID
from klass_patch.toy.models import ToyDenoiser, dream_model

LLADA_MASK, LLADA_VOCAB = 126336, 126464
KLASS = dict(alg="klass", conf_threshold=0.6, kl_threshold=0.015, kl_history_length=2)
LLADA = dict(steps=8, gen_length=8, block_length=4, mask_id=LLADA_MASK)
DREAM_SPECIAL = dict(mask_token_id=63, pad_token_id=62, eos_token_id=62, bos_token_id=62)


def _llada(path):
    module = load_file(path)
    klass_patch.apply(module)
    return module


def _dream(path):
    needs_transformers(path)
    module = load_file(path)
    klass_patch.apply(module)
    return module, _real_config(dream_model(module.DreamGenerationMixin, module.DreamGenerationConfig(**DREAM_SPECIAL)))


def _real_config(model):
    """Real Dream files read the model config as a transformers config (to_dict)."""
    transformers = pytest.importorskip("transformers")
    model.config = transformers.PretrainedConfig(vocab_size=model.config.vocab_size, max_position_embeddings=512,
                                                 **DREAM_SPECIAL)
    return model


def _toy_llada():
    return ToyDenoiser(vocab_size=LLADA_VOCAB, mask_id=LLADA_MASK, noise=2.0)


def _is_output(out):
    return isinstance(out, klass_patch.GenerateOutput) and out[0] is out.sequences


# ------------------------------------------------------------------------------------------ return types
@pytest.mark.parametrize("path", sources("llada"))
def test_llada_return_types_follow_return_dict_in_generate(path):
    """Item 1: without return_dict_in_generate a KLASS call returns the tensor, as upstream's generate does."""
    module = _llada(path)
    prompt = torch.tensor([[3, 4, 5, 6]])
    upstream = module.generate(_toy_llada(), prompt, **LLADA)
    assert type(upstream) is torch.Tensor
    for extra in (KLASS, dict(KLASS, return_dict_in_generate=False)):
        out = module.generate(_toy_llada(), prompt, **LLADA, **extra)
        assert type(out) is torch.Tensor and out.shape == upstream.shape
        assert out[:, prompt.shape[1]:].shape == (1, 8)
    for extra in (dict(KLASS, return_dict_in_generate=True), dict(KLASS, return_dict_in_generate=True, save_steps=True),
                  dict(return_dict_in_generate=True), dict(return_dict_in_generate=True, save_steps=True)):
        out = module.generate(_toy_llada(), prompt, **LLADA, **extra)
        assert _is_output(out) and out.sequences.shape == upstream.shape
        assert (out.history is not None) == bool(extra.get("save_steps"))


@pytest.mark.parametrize("path", sources("dream"))
def test_dream_return_types_follow_upstream(path):
    """KLASS and observed (save_steps) calls return what upstream returns for the same flags: the tensor, or an
    output indexable like upstream's ModelOutput (out[0], out['sequences'], to_tuple(), get)."""
    module, model = _dream(path)
    prompt = torch.tensor([[3, 4, 5, 6]])
    common = dict(max_new_tokens=8, steps=8)
    for alg in ("maskgit_plus", "klass"):
        assert type(model.diffusion_generate(prompt, alg=alg, **common)) is torch.Tensor
        out = model.diffusion_generate(prompt, alg=alg, return_dict_in_generate=True, output_history=True, **common)
        assert out.history[-1].shape == out.sequences.shape
        if alg == "klass":  # upstream's own output otherwise
            assert _is_output(out) and len(out.history) == int(out.used_steps[0])
            assert out["sequences"] is out.sequences and out.to_tuple()[0] is out.sequences
            assert out[1] is out.get("history") is out.history  # upstream's field order
        out = model.diffusion_generate(prompt, alg=alg, return_dict_in_generate=True, save_steps=True, **common)
        assert _is_output(out) and len(out.history) == int(out.used_steps[0])
        assert all(isinstance(rec, dict) for rec in out.history)


# ------------------------------------------------------------------------------------- loading and reload
def _importable(tmp_path, monkeypatch, path, name):
    """``path`` as a module importable by ``name`` (reload finds a module by its name)."""
    (tmp_path / f"{name}.py").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, module)  # removed again after the test
    return module


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_reload_keeps_the_patch(tmp_path, monkeypatch, family):
    """Item 3: importlib.reload (and %autoreload) re-executes the module in the same object; it stays patched."""
    klass_patch.apply()
    module = _importable(tmp_path, monkeypatch, STANDIN[family], f"_klass_reload_{family}")
    importlib.reload(module)
    assert patching._KlassWrapper in map(type, _wrapped_objects(module))
    _run_klass(module, family)
    klass_patch.revert()
    assert patching._KlassWrapper not in map(type, _wrapped_objects(module))


def _wrapped_objects(module):
    if hasattr(module, "DreamGenerationMixin"):
        mixin = module.DreamGenerationMixin
        return [mixin.__dict__["diffusion_generate"], mixin.__dict__["_sample"]]
    return [module.__dict__["generate"]]


def _run_klass(module, family):
    prompt = torch.tensor([[3, 4, 5, 6]])
    if family == "llada":
        out = module.generate(ToyDenoiser(), prompt, steps=8, gen_length=8, block_length=8, mask_id=63, **KLASS)
    else:
        model = dream_model(module.DreamGenerationMixin, module.DreamGenerationConfig(**DREAM_SPECIAL))
        out = model.diffusion_generate(prompt, max_new_tokens=8, steps=8, **KLASS)
    assert type(out) is torch.Tensor and out.shape == (1, 12) and not (out == 63).any()


def _load_without_sys_modules(path):
    spec = importlib.util.spec_from_file_location("_klass_not_registered", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no sys.modules[name] = module first
    return module


def _exec_namespace(path):
    namespace = {"__name__": "_klass_exec"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return SimpleNamespace(**namespace)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("load", ["no-sys-modules", "exec", "import"])
def test_installed_file_loads_every_way(tmp_path, monkeypatch, family, load):
    """Item 2: a rewritten file is patched however it is loaded, as the untouched file loads every way."""
    path = installed_copy(STANDIN[family], family, tmp_path / "installed")
    if load == "import":
        module = _importable(tmp_path, monkeypatch, path, f"_klass_installed_{family}")
    else:
        module = _load_without_sys_modules(path) if load == "no-sys-modules" else _exec_namespace(path)
    assert patching._KlassWrapper in map(type, _wrapped_objects(module))
    _run_klass(module, family)
    if load == "import":  # item 3 for installed files: a reload runs the appended block again
        importlib.reload(module)
        assert patching._KlassWrapper in map(type, _wrapped_objects(module))
        _run_klass(module, family)


# ------------------------------------------------------------------------------------------ LLaDA options
class ConstantLogits:
    """The same logits at every forward (per position), whatever the input: every KL after a position's
    first forward is 0."""

    def __init__(self, vocab, length, eot_logit=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.randn((1, length, vocab), generator=g)
        winner = (11 + torch.arange(length) % 20).view(1, length, 1)
        self.logits.scatter_(-1, winner, 8.0)  # a clear winner per position (not EOS/EOT)...
        if eot_logit is not None:  # ...and, for LLaDA, a lot of mass on EOT and EOS
            self.logits[..., EOT_ID] = self.logits[..., EOS_ID] = eot_logit
        self.device = torch.device("cpu")
        self.calls = 0

    def __call__(self, x, attention_mask=None, tok_idx=None, **kwargs):
        self.calls += 1
        return SimpleNamespace(logits=self.logits[:, :x.shape[1]].expand(x.shape[0], -1, -1).clone())


@pytest.mark.parametrize("path", sources("llada"))
def test_confidence_eos_eot_inf_first_kl_of_a_block_uses_the_same_distribution(path):
    """Item 4: with logits that never change, every KL after a position's first forward is 0, at block starts
    too (the next block's distribution is remembered from the same altered logits the step used)."""
    module = _llada(path)
    if "confidence_eos_eot_inf" not in inspect.signature(module.generate).parameters:
        pytest.skip("this generate.py has no confidence_eos_eot_inf")
    model = ConstantLogits(LLADA_VOCAB, 4 + 8, eot_logit=6.0)
    out = module.generate(model, torch.tensor([[3, 4, 5, 6]]), confidence_eos_eot_inf=True, return_dict_in_generate=True,
                          save_steps=True, **LLADA, **dict(KLASS, conf_threshold=0.99))
    seen = set()
    for rec in out.history:
        for e in rec["all_tokens"]:
            if e["position"] in seen:
                assert e["kl_divergence"] == 0.0, (rec["step"], e)
            elif e["position"] < 8:  # block 0's first forward compares with nothing (p_prev = 0)
                assert e["kl_divergence"] > 10
            else:  # block 1's first KL: against what was remembered at block 0's last forward
                assert e["kl_divergence"] == 0.0, (rec["step"], e)
            assert e["token_id"] not in (EOT_ID,) and e["confidence"] < 1
            seen.add(e["position"])
    assert len(out.history) == 8 and model.calls == 8


def _cfg_and_eos_reference(model, cfg_scale, prompt_len, mask_id, eos):
    """The logits LLaDA's generate sees after guidance (and EOS removal), as a plain model."""

    def call(x, attention_mask=None, **kwargs):
        un = x.clone()
        un[:, :prompt_len] = mask_id
        cond, uncond = model(x).logits, model(un).logits
        logits = uncond + (cfg_scale + 1) * (cond - uncond) if cfg_scale else cond
        if eos:
            logits[:, :, EOS_ID] = -torch.inf
        return SimpleNamespace(logits=logits)

    return SimpleNamespace(__call__=call, device=model.device)


@pytest.mark.parametrize("path", sources("llada"))
@pytest.mark.parametrize("extra", [dict(cfg_scale=1.5), dict(logits_eos_inf=True), dict(cfg_scale=0.5, logits_eos_inf=True)],
                         ids=str)
def test_llada_klass_with_guidance_and_eos_is_klass_on_the_guided_logits(path, extra):
    """KLASS with cfg_scale > 0 / logits_eos_inf equals KLASS on a model returning the guided logits."""
    module = _llada(path)
    if "logits_eos_inf" in extra and "logits_eos_inf" not in inspect.signature(module.generate).parameters:
        pytest.skip("this generate.py has no logits_eos_inf")
    prompt = torch.tensor([[3, 4, 5, 6]])
    settings = dict(LLADA, **KLASS, return_dict_in_generate=True, save_steps=True)
    out = module.generate(_toy_llada(), prompt, **settings, **extra)
    toy = _toy_llada()

    class Guided:
        device = toy.device

        def __call__(self, x, attention_mask=None, **kwargs):
            return _cfg_and_eos_reference(toy, extra.get("cfg_scale", 0.0), 4, LLADA_MASK,
                                          extra.get("logits_eos_inf", False)).__call__(x)

    ref = module.generate(Guided(), prompt, **settings)
    assert torch.equal(out.sequences, ref.sequences) and out.history == ref.history


@pytest.mark.parametrize("path", sources("llada"))
def test_llada_klass_temperature(path):
    """Temperature > 0: the noise only picks the token (confidence and KL from the plain softmax), so a
    vanishing temperature is greedy; a seed reproduces a run; the noise is drawn from torch's stream."""
    module = _llada(path)
    prompt = torch.tensor([[3, 4, 5, 6]])
    settings = dict(LLADA, **KLASS, return_dict_in_generate=True, save_steps=True)
    greedy = module.generate(_toy_llada(), prompt, **settings)
    cold = module.generate(_toy_llada(), prompt, temperature=1e-9, **settings)
    assert torch.equal(greedy.sequences, cold.sequences) and greedy.history == cold.history
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(module.generate(ToyDenoiser(vocab_size=LLADA_VOCAB, mask_id=LLADA_MASK, noise=0.2), prompt,
                                    temperature=5.0, **settings).sequences)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


class RowWise(ToyDenoiser):
    """Each row's logits from its own unpadded ids (left padding removed by the attention mask), so a row's
    predictions are those it gets alone."""

    def __call__(self, x, attention_mask=None, **kwargs):
        self.calls += 1
        out = torch.zeros((*x.shape, self.vocab_size))
        for r in range(x.shape[0]):
            pad = 0 if attention_mask is None else int((attention_mask[r].cumsum(-1) == 0).sum())
            out[r, pad:] = self.predict(x[r:r + 1, pad:])[0]
        return SimpleNamespace(logits=out)


@pytest.mark.parametrize("path", sources("llada"))
def test_llada_left_padded_batch_of_different_prompt_lengths(path):
    module = _llada(path)
    if "attention_mask" not in inspect.signature(module.generate).parameters:
        pytest.skip("this generate.py has no attention_mask: batch size 1 only")
    prompts = [[3, 4], [10, 11, 12, 13, 14], [30, 31, 32]]
    width, pad_id = max(map(len, prompts)), 126081
    batch = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    settings = dict(LLADA, **KLASS, return_dict_in_generate=True)
    out = module.generate(RowWise(vocab_size=LLADA_VOCAB, mask_id=LLADA_MASK, noise=2.0), batch, mask, **settings)
    for r, p in enumerate(prompts):
        alone = module.generate(RowWise(vocab_size=LLADA_VOCAB, mask_id=LLADA_MASK, noise=2.0), torch.tensor([p]),
                                **settings)
        assert torch.equal(out.sequences[r, width - len(p):], alone.sequences[0]), f"row {r}"
        assert out.used_steps[r] == alone.used_steps[0]


# ------------------------------------------------------------------------------------------- Dream hooks
@pytest.mark.parametrize("path", sources("dream"))
def test_dream_identity_hooks_equal_no_hooks(path):
    """User hooks take the copy-and-shift path; identity hooks must decide exactly as the in-place path."""
    module, model = _dream(path)
    prompt = torch.tensor([[3, 4, 5, 6]])
    common = dict(max_new_tokens=12, steps=12, return_dict_in_generate=True, save_steps=True, **KLASS)
    plain = model.diffusion_generate(prompt, **common)
    hooked = model.diffusion_generate(prompt, generation_tokens_hook_func=lambda i, x, logits: x,
                                      generation_logits_hook_func=lambda i, x, logits: logits, **common)
    assert torch.equal(plain.sequences, hooked.sequences) and plain.history == hooked.history
    assert torch.equal(plain.used_steps, hooked.used_steps)


class ConstantDream(ConstantLogits):
    def __init__(self, module, length):
        super().__init__(64, length)
        self.logits[..., 63] = -1e4  # never the mask token
        self.config = SimpleNamespace(vocab_size=64, max_position_embeddings=512)
        self.generation_config = module.DreamGenerationConfig(**DREAM_SPECIAL)


@pytest.mark.parametrize("alg", ["klass", "maskgit_plus"])
@pytest.mark.parametrize("path", sources("dream"))
def test_dream_remasked_positions_start_afresh_and_alias_nothing(path, alg):
    """Item 5: a hook that masks a decided position, and one of the prompt, again: each starts afresh (its
    next KL compares with nothing, as a first one does) and no other position's state changes (logits never
    change here, so every other KL after a position's first forward is 0)."""
    needs_transformers(path)
    module = load_file(path)
    klass_patch.apply(module)

    class Model(ConstantDream, module.DreamGenerationMixin):
        pass

    prompt = torch.tensor([[3, 4, 5, 6]])
    model = _real_config(Model(module, 4 + 10))
    remasked = {}

    def hook(i, x, logits):  # at the first step (after the first) that decided a generated position
        decided = ((x[0] != 63) & (torch.arange(x.shape[1]) >= 4)).nonzero().squeeze(-1)
        if i is not None and i >= 1 and not remasked and len(decided):
            remasked.update({int(decided[0]): i + 1, 3: i + 1})  # a generated position, and the prompt's last
            x = x.clone()
            x[0, list(remasked)] = 63
        return x

    extra = dict(conf_threshold=0.99) if alg == "klass" else {}
    out = model.diffusion_generate(prompt, alg=alg, max_new_tokens=10, steps=14, return_dict_in_generate=True,
                                   save_steps=True, generation_tokens_hook_func=hook, **extra)
    first_seen = {}
    for rec in out.history:
        for e in rec["all_tokens"]:
            fresh = first_seen.setdefault(e["position"], rec["step"]) == rec["step"] or \
                remasked.get(e["position"]) == rec["step"]
            assert (e["kl_divergence"] > 10) if fresh else (e["kl_divergence"] == 0.0), (alg, rec["step"], e)
    assert remasked and all(first_seen[p] < remasked[p] for p in remasked if p != 3)


# ----------------------------------------------------------------------- save_steps on upstream's algorithms
def _seeded(run, seed=7):
    torch.manual_seed(seed)
    out = run()
    return out, torch.get_rng_state()


@pytest.mark.parametrize("path", sources("llada"))
@pytest.mark.parametrize("extra", [dict(), dict(remasking="random", temperature=0.7), dict(cfg_scale=1.0)], ids=str)
def test_llada_save_steps_observes_upstream_without_changing_it(path, extra):
    """Non-KLASS save_steps: upstream's outputs and random stream exactly, plus one record per forward whose
    unmasked positions are the ones upstream unmasked."""
    plain, patched = load_file(path), _llada(path)
    prompt = torch.tensor([[3, 4, 5, 6]])
    model = _toy_llada()
    if "attention_mask" in inspect.signature(plain.generate).parameters:  # 2025-10's cfg needs one (upstream bug)
        extra = dict(extra, attention_mask=torch.ones_like(prompt))
    want, want_rng = _seeded(lambda: plain.generate(model, prompt, **LLADA, **extra))
    out, rng = _seeded(lambda: patched.generate(model, prompt, save_steps=True, return_dict_in_generate=True,
                                                **LLADA, **extra))
    assert torch.equal(out.sequences, want) and torch.equal(rng, want_rng)
    assert len(out.history) == int(out.used_steps[0]) == LLADA["steps"]
    decided = sorted(e["position"] for rec in out.history for e in rec["decoded_tokens"])
    assert decided == list(range(4, 12))
    assert all(out.sequences[0, e["position"]] == e["token_id"] for rec in out.history for e in rec["decoded_tokens"])


@pytest.mark.parametrize("path", sources("dream"))
@pytest.mark.parametrize("extra", [dict(alg="maskgit_plus"), dict(alg="origin", temperature=0.5),
                                   dict(alg="entropy", temperature=0.3, top_p=0.9)], ids=str)
def test_dream_save_steps_observes_upstream_without_changing_it(path, extra):
    needs_transformers(path)
    plain, (_, model) = load_file(path), _dream(path)
    plain_model = _real_config(dream_model(plain.DreamGenerationMixin, plain.DreamGenerationConfig(**DREAM_SPECIAL)))
    prompt = torch.tensor([[3, 4, 5, 6]])
    common = dict(max_new_tokens=8, steps=8, return_dict_in_generate=True, **extra)
    want, want_rng = _seeded(lambda: plain_model.diffusion_generate(prompt, **common))
    out, rng = _seeded(lambda: model.diffusion_generate(prompt, save_steps=True, **common))
    assert torch.equal(out.sequences, want.sequences) and torch.equal(rng, want_rng)
    assert len(out.history) == int(out.used_steps[0]) == 8
    decided = sorted(e["position"] for rec in out.history for e in rec["decoded_tokens"])
    assert decided == list(range(4, 12))


# ----------------------------------------------------------------------------- models built on LLaDA's code
def test_llada_eos_id_comes_from_the_model_config():
    """A model with its own vocabulary (LLaDA-MoE, iLLaDA): logits_eos_inf bans the config's eos_token_id, not
    LLaDA-8B's 126081 (out of range here: without the config's id this raises)."""
    module = _llada(STANDIN["llada"])
    toy = ToyDenoiser(vocab_size=64, mask_id=63, noise=2.0)
    settings = dict(steps=16, gen_length=16, block_length=8, mask_id=63, **KLASS)
    generated = module.generate(toy, torch.tensor([[3, 4, 5]]), **settings)[0, 3:]
    eos = int(generated[0])  # a token this model does generate
    toy.config.eos_token_id = eos
    banned = module.generate(toy, torch.tensor([[3, 4, 5]]), logits_eos_inf=True, **settings)[0, 3:]
    assert eos not in banned.tolist() and (banned != 63).all()


class _Recording(ToyDenoiser):
    def __call__(self, x, **kwargs):
        self.kwargs = getattr(self, "kwargs", []) + [kwargs]
        return super().__call__(x)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_mmada_generate_gets_its_mask_as_attention_bias(monkeypatch, cfg_scale):
    """MMaDA's generate.py hands a padded batch's mask to the model as a [B,1,L,L] boolean attention_bias (no mask
    under guidance): KLASS on that file calls the model the same way."""
    monkeypatch.setattr(klass_patch.llada, "identify_module", lambda module, family: "mmada")
    module = load_file(STANDIN["llada"])
    klass_patch.apply(module)
    model = _Recording(vocab_size=64, mask_id=63)
    batch, mask = torch.tensor([[62, 3, 4], [5, 6, 7]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    module.generate(model, batch, mask, steps=4, gen_length=4, block_length=4, mask_id=63, cfg_scale=cfg_scale,
                    **KLASS)
    full = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    for kwargs in model.kwargs:
        assert set(kwargs) == {"attention_bias"}
        if cfg_scale > 0:
            assert kwargs["attention_bias"] is None
        else:
            assert torch.equal(kwargs["attention_bias"], (full[:, :, None] & full[:, None, :]).bool().unsqueeze(1))
