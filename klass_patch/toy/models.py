"""A weight-free toy denoiser: tiny, deterministic, and with predictions that firm up as context is decided.

The "language" is counting: the token after ``w`` is ``w + 1`` (modulo ``words``). Each decided token
votes for its neighbours within ``window`` positions (left: ``w + d``, right: ``w - d``), more strongly
when closer, on top of a fixed random background; a token's support saturates at ``cap``. A masked position next to decided tokens is therefore
confident and, once its neighbourhood stops changing, stable: the situation KLASS exploits.
"""
from types import SimpleNamespace

import torch


class ToyDenoiser:
    def __init__(self, vocab_size=64, mask_id=63, words=50, window=8, strength=12.0, cap=10.0, noise=1.0, seed=0,
                 shift=False, pad_id=None, dtype=torch.float32):
        self.vocab_size, self.mask_id, self.words = vocab_size, mask_id, words
        self.window, self.strength, self.cap, self.shift, self.pad_id = window, strength, cap, shift, pad_id
        self.noise, self.seed, self.dtype = noise, seed, dtype
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=4096)
        self.calls = 0

    def background(self, length):
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn((length, self.vocab_size), generator=g) * self.noise

    def predict(self, x):
        rows, length = x.shape
        votes = torch.zeros((rows, length, self.vocab_size))
        known = (x != self.mask_id) & (x < self.words)
        if self.pad_id is not None:
            known &= x != self.pad_id
        for d in range(1, self.window + 1):
            w = self.strength / d
            for sign in (1, -1):  # sign 1: the voter is d positions to the left
                src = torch.roll(x, shifts=sign * d, dims=1)
                ok = torch.roll(known, shifts=sign * d, dims=1)
                if sign == 1:
                    ok[:, :d] = False
                else:
                    ok[:, -d:] = False
                vote = (src + sign * d) % self.words
                votes.scatter_add_(-1, vote.unsqueeze(-1), (ok.float() * w).unsqueeze(-1))
        logits = self.background(length) + votes.clamp(max=self.cap)  # support saturates: stable once sure
        own = torch.where(known, x, torch.zeros_like(x))
        logits.scatter_add_(-1, own.unsqueeze(-1), (known.float() * 20.0).unsqueeze(-1))
        logits[..., self.mask_id] = -1e4
        return logits.to(self.dtype)

    def __call__(self, x, attention_mask=None, tok_idx=None, **kwargs):
        self.calls += 1
        logits = self.predict(x)
        if self.shift:  # Dream's model predicts position i + 1 at position i
            logits = torch.cat([logits[:, 1:], logits[:, -1:]], dim=1)
        return SimpleNamespace(logits=logits)


def dream_model(mixin, generation_config, **kwargs):
    """A toy Dream model: ``ToyDenoiser`` (shifted, as Dream's) mixing in ``DreamGenerationMixin``."""

    class ToyDream(ToyDenoiser, mixin):
        pass

    model = ToyDream(shift=True, **kwargs)
    model.generation_config = generation_config
    return model
