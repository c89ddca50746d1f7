"""Upstream's algorithms under the cache (issue 18 items 10b and 13a): Dream's with save_steps, MMaDA's padded
batches."""
import warnings

import pytest
import torch

import klass_patch
from conftest import load_file
from test_cache import Family

pytest.importorskip("transformers", reason="the stand-in model files import transformers")


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy"])
def test_dream_upstream_alg_cached_save_steps(tmp_path, mode, alg):
    """Item 10b: save_steps with an upstream algorithm under the cache records its steps as save_steps does without a
    cache (one record per forward; every generated position unmasked once, with the token it keeps), and observing
    changes nothing (same tokens and forwards as the call without save_steps). With "dual" the first forward of a
    block compares with nothing (its distributions were not computed before), as KLASS's does."""
    fam = Family("dream", "standin", tmp_path)
    ids, mask = fam.batch()
    plain = fam.generate(ids, mask, use_cache=mode, alg=alg)
    out = fam.generate(ids, mask, use_cache=mode, alg=alg, save_steps=True)
    assert torch.equal(out.sequences, plain.sequences) and torch.equal(out.used_steps, plain.used_steps)
    assert len(out.history) == fam.calls == 24 and out.used_steps.tolist() == [24] * 3
    plen = ids.shape[1]
    for r in range(3):
        decided = sorted(e["position"] for rec in out.history for e in rec["decoded_tokens"] if e["row"] == r)
        assert decided == list(range(plen, plen + 24)), r
        for rec in out.history:
            for e in rec["decoded_tokens"]:
                assert int(out.sequences[e["row"], e["position"]]) == e["token_id"]
    for rec in out.history:
        block_start = {(e["position"] - plen) // 8 for e in rec["all_tokens"]}
        assert len(block_start) == 1  # candidates: the block's masks (the rows move together here)
        fresh = rec["step"] % 8 == 0 and (rec["step"] == 0 or mode == "dual")
        if fresh:
            assert all(e["kl_divergence"] > 10 for e in rec["all_tokens"]), rec["step"]


MMADA_LIKE = '''
import torch


def get_num_transfer_tokens(mask_index, steps):
    total = mask_index.sum(dim=1, keepdim=True)
    return total // steps + (torch.arange(steps, device=mask_index.device) < total % steps).long()


@torch.no_grad()
def generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0., cfg_scale=0.,
             remasking='low_confidence', mask_id=126336, attention_mask=None):
    """MMaDA's interface: attention_mask covers prompt and generation; the model gets it as a pairwise
    attention_bias. One token per forward, the most confident (enough for a test of the interface)."""
    bias = None
    if attention_mask is not None and bool((attention_mask == 0).any()):
        bias = (attention_mask[:, :, None] & attention_mask[:, None, :]).bool().unsqueeze(1)
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt.shape[1]] = prompt
    for _ in range(steps):
        logits = model(x, attention_bias=bias).logits
        conf = torch.where(x == mask_id, torch.softmax(logits, -1).max(-1).values, -torch.inf)
        pick = conf.argmax(-1, keepdim=True)
        x.scatter_(1, pick, logits.argmax(-1).gather(1, pick))
    return x
'''


class BiasModel(torch.nn.Module):
    """A LLaDA model called as MMaDA's generate.py calls it (attention_bias: [B, 1, L, L])."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, attention_bias=None):
        keys = None if attention_bias is None else attention_bias[:, 0, -1].long()  # the last query sees the keys
        return self.inner(input_ids) if keys is None else self.inner(input_ids, attention_mask=keys)


def test_mmada_upstream_cached_padded_batch_is_refused_before_any_forward(tmp_path, monkeypatch):
    """Item 13a: MMaDA's generate.py + use_cache + a padded batch crashed with a shape error in a window forward (the
    cache's key mask was gen_length too long: MMaDA's mask covers the generation already); it is refused before any
    forward, as alg='klass' is. One unpadded prompt still runs through the cache."""
    fam = Family("llada", "standin", tmp_path)
    path = tmp_path / "mmada_like_generate.py"
    path.write_text(MMADA_LIKE)
    monkeypatch.setattr(klass_patch.llada, "identify_module", lambda module, family: "mmada")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unknown (compatible) generate.py
        module = load_file(path)  # patched by apply()'s import hook (Family applied it)
        klass_patch.apply(module)
    model = BiasModel(fam.model)
    ids, mask = fam.batch()
    full = torch.cat([mask, torch.ones((3, 8), dtype=mask.dtype, device=mask.device)], dim=1)
    fam.calls = 0
    with pytest.raises(ValueError, match="padded batch is not supported for MMaDA"):
        module.generate(model, ids, steps=8, gen_length=8, block_length=8, mask_id=fam.mask_id, attention_mask=full,
                        use_cache="dual")
    assert fam.calls == 0
    one = module.generate(model, ids[:1], steps=8, gen_length=8, block_length=8, mask_id=fam.mask_id,
                          attention_mask=full[:1], use_cache="dual")
    assert one.shape == (1, 18) and not bool((one == fam.mask_id).any()) and fam.calls == 8
