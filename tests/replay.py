"""Replay models for the golden traces (see tests/fixtures/golden/README.md)."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
# KLASS_PATCH_TEST_DEVICE=cuda replays on a GPU (model outputs, prompts and so every sampler tensor live there);
# traces that sample (Dream at temperature > 0) need the CPU's random stream and are left out elsewhere.
DEVICE = torch.device(os.environ.get("KLASS_PATCH_TEST_DEVICE", "cpu"))


def load(name):
    return torch.load(GOLDEN / name, weights_only=True)


def traces(family, folder=GOLDEN):
    return sorted(p.name for p in Path(folder).glob(f"{family}_*.pt"))


def full_logits(trace, t):
    """Forward t's logits over the whole vocabulary: ``fill`` everywhere, the recorded values at active ids."""
    sub = trace["subs"][t]  # [1, L, K]
    out = torch.full((*sub.shape[:2], trace["vocab_size"]), float(trace["fill"]), dtype=torch.float32)
    out[..., trace["active_ids"]] = sub
    return out.to(DEVICE)


class ReplayModel:
    """On its t-th call, checks the input is the reference's t-th input and returns the reference's logits."""

    def __init__(self, trace):
        self.trace = trace
        self.calls = 0
        self.device = DEVICE
        self.lm_head = SimpleNamespace(out_features=trace["vocab_size"])

    def __call__(self, x, *args, **kwargs):
        t = self.calls
        x = x.cpu()
        xs = self.trace["xs"]
        assert t < len(xs), f"forward {t}: the reference made only {len(xs)} forwards"
        diff = (x != xs[t]).nonzero().tolist() if x.shape == xs[t].shape else f"shape {tuple(x.shape)}"
        assert x.shape == xs[t].shape and not diff, f"forward {t}: input differs from the reference at {diff}"
        self.calls += 1
        return SimpleNamespace(logits=full_logits(self.trace, t))


def reference_steps(trace):
    return json.loads(trace["steps_log"])


DREAM_SPECIAL = dict(mask_token_id=151666, eos_token_id=151643, pad_token_id=151643, bos_token_id=151643)


def dream_replay_class(mixin, generation_config):
    """A replay model class mixing in ``mixin`` (a DreamGenerationMixin), as Dream's model class does."""

    class DreamReplay(ReplayModel, mixin):
        def __init__(self, trace):
            ReplayModel.__init__(self, trace)
            self.config = SimpleNamespace(vocab_size=trace["vocab_size"], max_position_embeddings=512)
            self.generation_config = generation_config

        def __call__(self, x, attention_mask=None, tok_idx=None):
            return ReplayModel.__call__(self, x)

    return DreamReplay


def dream_kwargs(trace):
    kw = dict(max_new_tokens=trace["gen_length"], steps=trace["steps"], temperature=trace["temperature"],
              top_p=trace["top_p"], alg="klass", conf_threshold=trace["conf_threshold"],
              kl_threshold=trace["kl_threshold"], kl_history_length=trace["kl_history_length"],
              unmask_strategy=trace["unmask_strategy"], return_dict_in_generate=True, output_history=True,
              save_steps=True)
    kw.update(DREAM_SPECIAL)
    return kw
