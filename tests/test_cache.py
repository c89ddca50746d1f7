"""KV cache (use_cache="prefix"|"dual", klass_patch.cache): refresh consistency, cached generation, errors.

Models: tiny random models built (AutoModel.from_config, trust_remote_code) from the stand-ins of the remote code
(tests/standins/{llada,dream}/, which have the structure the cache attaches to), and, with
KLASS_PATCH_UPSTREAM (Dream: dream-model/ and dream/<v>/generation_utils.py; LLaDA: llada/<v>/generate.py and the
model code in KLASS_PATCH_LLADA_MODEL or $KLASS_PATCH_UPSTREAM/llada-model/), tiny random models built from the real
model files.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import klass_patch
from conftest import ENV, STANDIN, load_file
from replay import DEVICE  # KLASS_PATCH_TEST_DEVICE=cuda: the models and inputs on a GPU
from klass_patch.cache import KVCache, windows
from klass_patch.dream_cache import dream_full_forward, dream_window_forward
from klass_patch.llada_cache import llada_attached, llada_full_forward, llada_window_forward
from klass_patch.dream import _prepare_attention

HERE = Path(__file__).parent
STANDINS = HERE / "standins"
MODES = ("prefix", "dual")
SOURCES = ("standin", "upstream")
LLADA_KLASS = dict(alg="klass", conf_threshold=0.3, kl_threshold=0.05, kl_history_length=2)
DREAM_KLASS = dict(alg="klass", conf_threshold=0.3, kl_threshold=0.05, kl_history_length=2)


def _upstream_paths(family):
    root = os.environ.get(ENV)
    if not root:
        pytest.skip(f"real model files not given: set {ENV}=<folder> (see README, 'Testing against the real upstream "
                    "files'; LLaDA's model code: KLASS_PATCH_LLADA_MODEL or $KLASS_PATCH_UPSTREAM/llada-model)")
    root = Path(root)
    if family == "llada":
        model_dir = Path(os.environ.get("KLASS_PATCH_LLADA_MODEL") or root / "llada-model")
        samplers = sorted((root / "llada").rglob("generate.py"))
        files = [model_dir / "modeling_llada.py", model_dir / "configuration_llada.py"]
    else:
        samplers = sorted((root / "dream").rglob("generation_utils.py"))
        files = [root / "dream-model" / "modeling_dream.py", root / "dream-model" / "configuration_dream.py"]
    missing = [str(f) for f in files if not f.is_file()] + ([] if samplers else [f"{family} sampler files"])
    if missing:
        pytest.skip(f"real {family} model files missing: {', '.join(missing)}")
    pytest.importorskip("transformers", reason="the real model files import transformers")
    return files, samplers[-1]


def _from_files(family, source, files, sampler, tmp_path):
    """A tiny random model built from model files (real or stand-in) with LLaDA's / Dream's config fields."""
    pytest.importorskip("transformers", reason="the model files import transformers")
    from compat_worker import DREAM_CONFIG, LLADA_CONFIG
    from transformers import AutoConfig, AutoModel
    folder = tmp_path / f"cache_{source}_{family}"  # the module's name: one per source
    folder.mkdir()
    for f in files + ([sampler] if family == "dream" else []):
        shutil.copy(f, folder)
    config = dict(LLADA_CONFIG if family == "llada" else DREAM_CONFIG)
    config.update({"n_kv_heads": 2} if family == "llada" else {"initializer_range": 0.5})
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True)
    if family == "llada":  # LLaDA never initialises its weights itself
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1
                        else torch.randn(p.shape, generator=g) * 3 / p.shape[-1] ** 0.5)
    return model.eval()


class Family:
    """A tiny model, its sampler entry point and its ids."""

    def __init__(self, family, source, tmp_path):
        self.family = family
        if source == "standin":
            folder = STANDINS / family
            files = [folder / f"modeling_{family}.py", folder / f"configuration_{family}.py"]
            sampler = STANDIN["llada"] if family == "llada" else folder / "generation_utils.py"
        else:
            files, sampler = _upstream_paths(family)
        klass_patch.apply()  # on transformers 5.x the model code needs klass_patch.compat's shims to load
        if family == "llada":
            self.model = _from_files(family, source, files, sampler, tmp_path).to(DEVICE)
            self.module = load_file(sampler)
            klass_patch.apply(self.module)
            self.vocab, self.mask_id, self.pad = 250, 255, 250
        else:
            self.model = _from_files(family, source, files, sampler, tmp_path).to(DEVICE)
            self.vocab, self.mask_id, self.pad = 190, 199, 198
        self.calls = 0

        def count(module, args, kwargs):
            self.calls += 1

        def no_mask_token(module, args, out):  # as a trained model: [MASK] is never predicted
            out.logits[..., self.mask_id] = -1e4
        self.model.register_forward_pre_hook(count, with_kwargs=True)
        self.model.register_forward_hook(no_mask_token)

    def batch(self, rows=3, length=10, pads=(0, 3, 5), seed=1):
        ids = torch.randint(0, self.vocab - 6, (rows, length), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        for r, n in enumerate(pads[:rows]):
            ids[r, :n], mask[r, :n] = self.pad, 0
        return ids.to(DEVICE), mask.to(DEVICE)

    def generate(self, ids, mask, gen=24, block=8, steps=24, **kw):
        self.calls = 0
        if self.family == "llada":
            args = (self.model, ids) if mask is None else (self.model, ids, mask)
            return self.module.generate(*args, steps=steps, gen_length=gen, block_length=block, mask_id=self.mask_id,
                                        return_dict_in_generate=True, **kw)
        if isinstance(kw.get("use_cache"), str):
            kw.setdefault("block_length", block)
        return self.model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=gen, steps=steps,
                                             temperature=0.0, return_dict_in_generate=True, **kw)


@pytest.fixture(params=[(f, s) for s in SOURCES for f in ("llada", "dream")], ids=lambda p: f"{p[0]}-{p[1]}")
def fam(request, tmp_path):
    return Family(*request.param, tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_refresh_consistency(fam, mode):
    """Right after a refresh on the same ids, a window forward gives the full forward's logits for its window
    (padded batch, rows in different blocks), and the refresh itself is exactly a plain forward."""
    ids, mask = fam.batch(length=40)
    starts, bl = torch.tensor([16, 24, 32]), 8
    model = fam.model
    with torch.no_grad():
        if fam.family == "llada":
            plain = model(ids, attention_mask=mask).logits
            kv = KVCache(3)
            kv.key_mask = mask != 0
            with llada_attached(model, kv, 40):
                full = llada_full_forward(model, kv, ids, mask, None)
                pos, valid = windows(mode, starts, 40, bl, 0)
                win = llada_window_forward(model, kv, ids.gather(1, pos), None, pos, valid)
            assert "attention" not in vars(next(m for m in model.modules() if hasattr(m, "rotary_emb")))
        else:
            m4, tok_idx = _prepare_attention(mask, 40)
            plain = model(ids, m4, tok_idx).logits
            kv = KVCache(3)
            full = dream_full_forward(model, kv, ids, m4, tok_idx, None)
            pos, valid = windows(mode, starts, 40, bl, 1)
            win = dream_window_forward(model, kv, ids.gather(1, pos), None, pos, valid, m4, tok_idx)
    assert torch.equal(full, plain)
    for r in range(3):
        n = int(valid[r].sum())
        assert n == (bl + (fam.family == "dream") if mode == "dual" else 40 - int(pos[r, 0]))
        torch.testing.assert_close(win[r, :n], plain[r, pos[r, :n]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_cached_klass_rows_as_alone(fam, mode):
    """A cached KLASS run on a padded batch: no mask left (unmask_strategy 'all'), each row as its own batch-1 cached
    run (tokens and used_steps), and a batch-1 run's used_steps is its number of forwards."""
    params = LLADA_KLASS if fam.family == "llada" else DREAM_KLASS
    ids, mask = fam.batch()
    out = fam.generate(ids, mask, use_cache=mode, **params)
    assert not bool((out.sequences == fam.mask_id).any())
    plain = fam.generate(ids, mask, **params) if fam.family == "llada" else None
    for r in range(3):  # its own padding, so that positions (LLaDA's RoPE) are the same
        alone = fam.generate(ids[r:r + 1], mask[r:r + 1], use_cache=mode, **params)
        assert fam.calls == int(alone.used_steps[0])
        assert torch.equal(alone.sequences[0], out.sequences[r]), f"row {r}"
        assert int(alone.used_steps[0]) == int(out.used_steps[r])
    if fam.family == "llada":
        assert int(out.used_steps.max()) <= 24
        assert int(plain.used_steps.min()) < 24, "the thresholds should let KLASS decide several tokens per step"


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_upstream_algs_cached(fam, alg):
    """Dream's upstream algorithms under a cache decode block by block with upstream's rule inside each block: every
    mask filled in exactly `steps` forwards, each row as alone; one block refreshed at every forward is exactly the
    uncached upstream run (batch 1: upstream's count of tokens per step averages over rows). 'origin' is refused."""
    if fam.family != "dream":
        pytest.skip("Dream's algorithms")
    ids, mask = fam.batch()
    for mode in MODES:
        out = fam.generate(ids, mask, use_cache=mode, alg=alg)
        assert fam.calls == 24 and out.used_steps.tolist() == [24] * 3
        assert not bool((out.sequences == fam.mask_id).any())
        for r in range(3):
            keep = mask[r].bool()
            alone = fam.generate(ids[r:r + 1, keep], None, use_cache=mode, alg=alg)
            assert torch.equal(out.sequences[r, int((~keep).sum()):], alone.sequences[0]), (mode, r)
    one = ids[:1]
    plain = fam.generate(one, None, alg=alg)
    every = fam.generate(one, None, block=24, use_cache="prefix", cache_refresh_every=1, alg=alg)
    assert torch.equal(every.sequences, plain.sequences)
    with pytest.raises(ValueError, match="origin"):
        fam.generate(ids, mask, use_cache="dual", alg="origin")
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        fam.generate(ids, mask, use_cache="dual", alg=alg, steps=20)
    assert fam.calls == 0


def test_llada_upstream_default_cached(fam):
    """Upstream's own loop through the cache (LLaDA): runs, fills every mask, makes `steps` forwards; with a full
    forward at every step (cache_refresh_every=1) it is exactly the uncached run."""
    if fam.family != "llada":
        pytest.skip("LLaDA's algorithm")
    ids, mask = fam.batch()
    plain = fam.generate(ids, mask)
    for mode in MODES:
        out = fam.generate(ids, mask, use_cache=mode)
        assert fam.calls == 24 and out.used_steps.tolist() == [24] * 3
        assert not bool((out.sequences == fam.mask_id).any())
        every = fam.generate(ids, mask, use_cache=mode, cache_refresh_every=1)
        assert torch.equal(every.sequences, plain.sequences)


def test_prefix_refresh_every_step_is_uncached_klass(fam):
    """LLaDA KLASS with a prefix cache refreshed at every forward is bitwise the uncached run (same forwards, same
    remembered distributions); with a dual cache only the next block's first KL differs (it starts afresh)."""
    if fam.family != "llada":
        pytest.skip("Dream's uncached sampler has no blocks: not comparable")
    ids, mask = fam.batch()
    plain = fam.generate(ids, mask, save_steps=True, **LLADA_KLASS)
    every = fam.generate(ids, mask, use_cache="prefix", cache_refresh_every=1, save_steps=True, **LLADA_KLASS)
    assert torch.equal(every.sequences, plain.sequences)
    assert torch.equal(every.used_steps, plain.used_steps)
    assert every.history == plain.history


def test_use_cache_none_unchanged(fam):
    """use_cache=None (and False; for Dream also True, which its upstream sampler ignores: a Hugging Face habit must
    not change what upstream does) is today's code path: bitwise the same outputs and step records."""
    params = LLADA_KLASS if fam.family == "llada" else DREAM_KLASS
    ids, mask = fam.batch()
    ref = fam.generate(ids, mask, save_steps=True, **params)
    for value in (None, False) + ((True,) if fam.family == "dream" else ()):
        out = fam.generate(ids, mask, save_steps=True, use_cache=value, **params)
        assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.used_steps, ref.used_steps)
        assert out.history == ref.history


@pytest.mark.parametrize("bad, match", [
    (dict(use_cache="full"), "use_cache must be"),
    (dict(use_cache=True), "use_cache must be"),
    (dict(use_cache=1), "use_cache must be"),
    (dict(use_cache="dual", cache_refresh_every=0), "cache_refresh_every must be"),
    (dict(use_cache="prefix", cache_refresh_every=1.5), "cache_refresh_every must be"),
    (dict(cache_refresh_every=4), "used only with use_cache"),
])
def test_bad_values_raise_before_any_forward(fam, bad, match):
    if fam.family == "dream" and bad.get("use_cache") is True:
        pytest.skip("Dream: use_cache=True goes to upstream, which ignores it (test_use_cache_none_unchanged)")
    params = LLADA_KLASS if fam.family == "llada" else DREAM_KLASS
    with pytest.raises(ValueError, match=match):
        fam.generate(*fam.batch(), **params, **bad)
    assert fam.calls == 0


def test_dream_specific_errors(fam):
    if fam.family != "dream":
        pytest.skip("Dream's block_length")
    ids, mask = fam.batch()
    for kw, match in ((dict(block_length=8), "used only with use_cache"),
                      (dict(use_cache="dual", block_length=0), "block_length must be"),
                      (dict(use_cache="dual", block_length=5), "multiple of block_length"),
                      (dict(use_cache="dual", generation_tokens_hook_func=lambda i, x, l: x), "hook")):
        with pytest.raises(ValueError, match=match):
            fam.generate(ids, mask, **DREAM_KLASS, **kw)
        assert fam.calls == 0


def test_cached_calls_return_what_upstream_returns(fam):
    """Without return_dict_in_generate a cached call returns the tensor, as upstream does (KLASS and upstream's algs)."""
    ids, mask = fam.batch()
    calls = [dict(alg="klass")] + ([dict()] if fam.family == "llada" else [dict(alg="maskgit_plus")])
    for kw in calls:
        if fam.family == "llada":
            out = fam.module.generate(fam.model, ids, mask, steps=24, gen_length=24, block_length=8,
                                      mask_id=fam.mask_id, use_cache="dual", **kw)
        else:
            out = fam.model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=24, steps=24, temperature=0.0,
                                               use_cache="dual", block_length=8, **kw)
        assert isinstance(out, torch.Tensor) and out.shape == (3, 34), kw
