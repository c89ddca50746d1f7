"""The KLASS algorithm (KL-Adaptive Stability Sampling), independent of any model family.

At every denoising step a masked position is *ready* when its predicted token is confident
(probability above ``conf_threshold``) and its predictive distribution is stable (the KL divergence
between consecutive steps stayed below ``kl_threshold`` for the last ``kl_history_length`` steps).
Ready positions are unmasked together (or one of them, per ``unmask_strategy``); a row with no ready
position falls back to a rule its model family supplies.

This module holds the pieces that do not depend on Dream or LLaDA:

- :class:`KlassConfig`: the parameters and their validation;
- :class:`StabilityTracker`: per-position float64 distributions, KL divergences and their history,
  computed only at the positions a caller asks for (never the whole sequence);
- :func:`ready_mask` and :func:`select_ready`: the stability/confidence test and the unmask strategies;
- :class:`StepRecorder`: the per-step records (``save_steps``), one host transfer per step.

Numerics follow the authors' reference exactly: ``p = softmax(logits.double())`` and
``KL = sum(p * (log(p + 1e-12) - log(p_prev + 1e-12)))`` with ``p_prev = 0`` before the first forward.
"""
from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch

__all__ = [
    "EPS",
    "GenerateOutput",
    "STRATEGIES",
    "KlassConfig",
    "StabilityTracker",
    "StepRecorder",
    "ready_mask",
    "select_ready",
    "write_steps_jsonl",
]

EPS = 1e-12
STRATEGIES = ("all", "max_conf", "min_kl")
# Positions processed together in the float64 work. On a CPU a few, so that the temporaries (CHUNK x
# vocab) stay in cache; on an accelerator as many as fit in CHUNK_BYTES per temporary, so that a step
# launches a few kernels per chunk rather than per handful of positions.
CHUNK = 4
CHUNK_BYTES = 64 * 2**20
BLOCK = 128  # block size of first_max


@dataclass(frozen=True)
class KlassConfig:
    """KLASS parameters. Invalid values raise ``ValueError`` naming the parameter and what is allowed."""

    conf_threshold: float = 0.9
    kl_threshold: float = 0.01
    kl_history_length: int = 2
    unmask_strategy: str = "all"

    def __post_init__(self):
        c = self.conf_threshold
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0.0 <= float(c) <= 1.0:
            raise ValueError(f"conf_threshold must be a number in [0, 1], got {c!r}")
        k = self.kl_threshold
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not float(k) > 0.0 or math.isnan(k):
            raise ValueError(f"kl_threshold must be a number > 0, got {k!r}")
        n = self.kl_history_length
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"kl_history_length must be a positive int, got {n!r}")
        if self.unmask_strategy not in STRATEGIES:
            raise ValueError(
                f"unmask_strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {self.unmask_strategy!r}"
            )

    @classmethod
    def from_kwargs(cls, kwargs: dict, defaults: Optional[object] = None) -> "KlassConfig":
        """Pop the KLASS parameters out of ``kwargs`` (missing ones from ``defaults``' attributes, then ours)."""
        values = {}
        for name in cls.__dataclass_fields__:
            if name in kwargs:
                values[name] = kwargs.pop(name)
            elif defaults is not None and getattr(defaults, name, None) is not None:
                values[name] = getattr(defaults, name)
        return cls(**values)


@dataclass
class GenerateOutput:
    """What a ``return_dict_in_generate=True`` call returns.

    ``sequences``: ``[rows, length]`` ids. ``used_steps``: ``[rows]`` number of model forwards each row made
    (what it would have made alone). ``history``: the step records when ``save_steps=True``, else
    upstream's history (Dream's ``output_history``: one tensor per step) or ``None``.
    """

    sequences: torch.LongTensor
    used_steps: torch.LongTensor
    history: Optional[list] = None


def masks_left_warning(x: torch.Tensor, mask_id: int, start: int = 0) -> None:
    """Warn once when a run ends with masked positions left (the reference keeps them; so do we)."""
    left = (x[:, start:] == mask_id).sum(-1)
    total = int(left.sum())
    if total:
        warnings.warn(
            f"KLASS ran out of steps with {total} masked position(s) left (per row: {left.tolist()}); "
            "the result keeps them, as the authors' sampler does. Use more steps or unmask_strategy='all'.",
            RuntimeWarning,
            stacklevel=3,
        )


KLASS_PARAMS = tuple(KlassConfig.__dataclass_fields__)  # the keyword arguments KLASS adds


def _log_eps(device) -> torch.Tensor:
    # log(0 + 1e-12) computed exactly as the reference does for p_prev = 0.
    return torch.log(torch.zeros((), dtype=torch.float64, device=device) + EPS)


def low_precision_max_position(logits, read_at, conf64, candidates):
    """Per row of ``candidates`` ([rows, length]), the position whose top probability in the logits' own
    dtype is largest (first on ties), as upstream's ``softmax(...).max()`` then ``argmax`` over positions
    picks it. ``conf64`` ([rows, length], float64, -inf off candidates) decides unless another candidate
    of the row is within a relative 1e-3 (or 8 ulps of the dtype) of the row's best; those few positions
    are then computed in the logits' dtype. ``read_at`` ([length]): where in ``logits`` each position's
    prediction is."""
    best = conf64.max(-1, keepdim=True).values
    rtol = max(1e-3, 8 * torch.finfo(logits.dtype).eps)
    close = candidates & (conf64 >= best * (1 - rtol))
    pick = conf64.argmax(-1)
    tied = close.sum(-1) > 1
    if bool(tied.any()):
        r_c, p_c = (close & tied.unsqueeze(-1)).nonzero(as_tuple=True)
        exact = torch.softmax(logits[r_c, read_at[p_c]], dim=-1).max(-1).values
        scores = torch.full(candidates.shape, -math.inf, dtype=exact.dtype, device=candidates.device)
        scores[r_c, p_c] = exact
        pick = torch.where(tied, scores.argmax(-1), pick)
    return pick


def first_max(p: torch.Tensor, second: bool = False):
    """``p.max(-1)`` of a ``[n, V]`` tensor (value and first index of the maximum) and, if ``second``, the
    largest value at any other index, in one pass over ``p``: the maximum of blocks of ``BLOCK`` entries,
    then the first maximum inside the first block holding it (torch's indexed max over long rows is
    several times slower than a plain maximum); the runner-up is the larger of the other blocks' maxima
    and the rest of that block."""
    n, v = p.shape
    if v % BLOCK or v < 8 * BLOCK:
        top, idx = p.max(-1)
        if not second:
            return top, idx
        rest = p.scatter(-1, idx.unsqueeze(-1), -math.inf)
        return top, idx, rest.amax(-1)
    blocks = p.view(n, v // BLOCK, BLOCK)
    maxima = blocks.amax(-1)
    top, block = maxima.max(-1)
    inside = blocks[torch.arange(n, device=p.device), block]
    inner = inside.argmax(-1)
    if not second:
        return top, block * BLOCK + inner
    others = maxima.scatter_(-1, block.unsqueeze(-1), -math.inf).amax(-1)
    rest = inside.scatter_(-1, inner.unsqueeze(-1), -math.inf).amax(-1)
    return top, block * BLOCK + inner, torch.maximum(others, rest)


def chunk_policy(device: torch.device, vocab: int):
    """``(size, split_runs)``: at most ``size`` positions per chunk; ``split_runs``: cut chunks where runs
    of consecutive positions end, so that runs are read through views (worth it on a CPU, where a gather
    is a pass over memory; elsewhere fixed ranges, gathered unless they happen to be one run)."""
    if device.type == "cpu":
        return CHUNK, True
    return max(CHUNK, CHUNK_BYTES // (8 * vocab)), False


def _chunks(rows, read, slots, dense, size, split_runs):
    """Split entries ``0..n`` into ranges of at most ``size`` entries, computed on host tensors (no loop
    over entries). A *run* (entries at consecutive slots and, unless ``dense``, of one row at consecutive
    read positions) is read and written through views; other ranges are gathered. With ``split_runs``,
    runs are cut into pieces of ``size``, pieces of 2 or more are ranges of their own, and the entries
    left alone are grouped, ``size`` at a time. Returns ``(a, b, run, row, read, slot)`` per range, the
    last three those of entry ``a``."""
    n = slots.shape[0]
    if n == 0:
        return []
    cont = torch.zeros(n, dtype=torch.bool)  # entry j continues the run of entry j - 1
    cont[1:] = slots[1:] == slots[:-1] + 1
    if not dense:
        cont[1:] &= (rows[1:] == rows[:-1]) & (read[1:] == read[:-1] + 1)
    idx = torch.arange(n)
    run = (~cont).cumsum(0) - 1  # run of each entry

    def last_start(flags):  # per entry, the last index <= it where ``flags`` holds
        return torch.where(flags, idx, 0).cummax(0).values

    if not split_runs:
        a = torch.arange(0, n, size)
        b = (a + size).clamp_(max=n)
        whole = run[a] == run[b - 1]
    else:
        offset = idx - last_start(~cont)  # place in its run
        length = torch.bincount(run)[run]  # its run's length
        alone = (length - (offset - offset % size)).clamp_(max=size) == 1  # its run's piece is 1 entry
        new = alone.clone()  # a stretch of lone entries starts here
        new[1:] &= ~alone[:-1]
        place = idx - last_start(new)  # place in its stretch (for lone entries)
        first = torch.where(alone, place % size == 0, offset % size == 0)
        a = idx[first]
        b = torch.cat([a[1:], torch.tensor([n])])
        whole = ~alone[a]
    return torch.stack((a, b, whole.long(), rows[a], read[a], slots[a]), -1).tolist()


class StabilityTracker:
    """KL divergence between consecutive steps and its history, for a ``[rows, length]`` grid of positions.

    Only a window of ``width`` positions per row, starting at ``start``, can ever be tracked; a position
    ``pos`` lives in slot ``(pos - start) % width``, so a window narrower than the generation (LLaDA: two
    blocks) is a ring. For each tracked slot the tracker keeps ``log(p_prev + 1e-12)`` in float64, the
    only vocabulary-sized state, and updates it in place.
    """

    def __init__(self, rows: int, length: int, start: int, width: int, history_length: int, device):
        self.rows, self.length, self.start, self.width = rows, length, start, width
        self.device = torch.device(device)
        self.history = torch.zeros((rows, length, history_length), dtype=torch.float64, device=self.device)
        self._log_prev: Optional[torch.Tensor] = None  # [rows * width, V], allocated at the first update

    def _slots(self, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return rows * self.width + (pos - self.start) % self.width

    def _store(self, vocab: int) -> torch.Tensor:
        if self._log_prev is None or self._log_prev.shape[-1] != vocab:
            self._log_prev = _log_eps(self.device).expand(self.rows * self.width, vocab).clone()
            # scratch space for one chunk, reused at every step (no large allocation per step)
            self._chunk = chunk_policy(self.device, vocab)
            self._scratch = torch.empty((3, self._chunk[0], vocab), dtype=torch.float64, device=self.device)
        return self._log_prev

    @staticmethod
    def _read(logits, rows, read, sel):
        """Logits of entries ``sel`` (a slice or indices): rows of a pre-gathered ``[N, V]`` tensor, or
        gathered from ``[rows, L, V]`` at ``(rows, read)``."""
        return logits[sel] if logits.dim() == 2 else logits[rows[sel], read[sel]]

    def _ranges(self, logits, rows, read, slots):
        """Per range of entries (see ``_chunks``): ``(a, b, logits of entries a..b, their store rows as a view,
        or None where they are not consecutive there)``. The entries' indices leave the device once."""
        store = self._store(logits.shape[-1])
        host = torch.stack((rows, read, slots)).cpu()
        for a, b, run, row, at, slot in _chunks(*host, logits.dim() == 2, *self._chunk):
            if run and logits.dim() == 3:
                chunk = logits[row, at:at + b - a]
            else:
                chunk = self._read(logits, rows, read, slice(a, b))
            yield a, b, chunk, (store[slot:slot + b - a] if run else None)

    def _log_probs(self, chunk, out):
        """``softmax(chunk.double())`` (in the scratch buffer, returned) and ``log(p + 1e-12)`` into ``out``."""
        p = self._scratch[0, :chunk.shape[0]]
        torch.softmax(p.copy_(chunk), dim=-1, out=p)
        torch.log(torch.add(p, EPS, out=out), out=out)
        return p

    def update(self, logits: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, tokens: Optional[torch.Tensor] = None,
               low_precision_tokens: bool = False, read_pos: Optional[torch.Tensor] = None):
        """Advance positions ``(rows[i], pos[i])`` (in ``nonzero()`` order) by one step.

        ``logits`` is either ``[N, V]`` (row i belongs to position i) or the whole ``[rows, length, V]``
        output, read only at the positions given (or at ``read_pos``, e.g. a shifted view). The token of a
        position is ``tokens[i]`` if given, else the argmax of the float64 softmax or, if
        ``low_precision_tokens``, of the softmax in the logits' own dtype (upstream Dream's token): the
        same index unless two probabilities are within rounding of each other, which is checked, and
        then computed in that dtype.

        Returns ``(tokens, confidence, kl)``: the token, its float64 probability, and the KL to the
        previous step, which is also pushed into the history.

        Runs of consecutive positions are read and written through views (no gather, no scatter); the
        positions' indices leave the device once per call and the ranges are found without a loop over them.
        """
        n = rows.shape[0]
        store = self._store(logits.shape[-1])
        slots = self._slots(rows, pos)
        read = pos if read_pos is None else read_pos
        out_tok = torch.empty(n, dtype=torch.long, device=self.device)
        conf = torch.empty(n, dtype=torch.float64, device=self.device)
        kl = torch.empty(n, dtype=torch.float64, device=self.device)
        near = torch.zeros(n, dtype=torch.bool, device=self.device) if low_precision_tokens else None
        near_ratio = 1 - 8 * torch.finfo(logits.dtype).eps  # probabilities this close may tie once rounded
        for a, b, chunk, prev in self._ranges(logits, rows, read, slots):
            lp, w = self._scratch[1, :b - a], self._scratch[2, :b - a]
            p = self._log_probs(chunk, lp)  # p = softmax(logits.double()), lp = log(p + 1e-12)
            if tokens is not None:
                tok = tokens[a:b]
                torch.gather(p, -1, tok.unsqueeze(-1), out=conf[a:b].unsqueeze(-1))
            else:
                if low_precision_tokens:  # a runner-up within rounding of the top may win once rounded
                    top, tok, runner_up = first_max(p, second=True)
                    torch.ge(runner_up, top * near_ratio, out=near[a:b])
                else:
                    top, tok = first_max(p)
                conf[a:b] = top
            out_tok[a:b] = tok
            # sum(p * (log(p + eps) - log(p_prev + eps))); then this step's distribution becomes p_prev
            if prev is not None:  # in place in the store, which then takes this step's values
                torch.sum(torch.sub(lp, prev, out=prev).mul_(p), -1, out=kl[a:b])
                prev.copy_(lp)
            else:
                prev = torch.index_select(store, 0, slots[a:b], out=w)
                torch.sum(torch.sub(lp, prev, out=w).mul_(p), -1, out=kl[a:b])
                store.index_copy_(0, slots[a:b], lp)
        if low_precision_tokens:  # near-ties (rare): the softmax in the logits' dtype decides, as upstream's
            redo = near.nonzero().squeeze(-1)
            if len(redo):
                chunk = self._read(logits, rows, read, redo)
                tok = torch.softmax(chunk, dim=-1).max(-1).indices
                out_tok[redo] = tok
                conf[redo] = torch.softmax(chunk.to(torch.float64), dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        h = self.history
        h[rows, pos] = torch.cat([h[rows, pos, 1:], kl.unsqueeze(-1)], dim=-1)
        return out_tok, conf, kl

    def remember(self, logits: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor):
        """Store ``log(p + 1e-12)`` of positions not advanced this step, so that their next KL is exact."""
        store = self._store(logits.shape[-1])
        slots = self._slots(rows, pos)
        for a, b, chunk, prev in self._ranges(logits, rows, pos, slots):
            lp = self._scratch[1, :b - a] if prev is None else prev  # runs: straight into the store
            self._log_probs(chunk, lp)
            if prev is None:
                store.index_copy_(0, slots[a:b], lp)

    def stable(self, threshold: float) -> torch.Tensor:
        """``[rows, length]``: every value in the history is below ``threshold``."""
        return (self.history < threshold).all(-1)


def ready_mask(candidates, confidence, stable, conf_threshold, strict: bool, guard=None) -> torch.Tensor:
    """Candidates that are confident (``>`` if ``strict`` else ``>=``), stable and, if given, past the guard."""
    confident = confidence > conf_threshold if strict else confidence >= conf_threshold
    ready = candidates & confident & stable
    if guard is not None:
        ready &= guard.unsqueeze(-1)
    return ready


def select_ready(ready: torch.Tensor, confidence: torch.Tensor, kl: torch.Tensor, strategy: str) -> torch.Tensor:
    """Positions to unmask among the ready ones, per row: all, the most confident, or the smallest KL.

    Ties go to the lowest position, as in the reference (``argmax``/``argmin`` over ready positions in order).
    """
    if strategy == "all":
        return ready
    if strategy == "max_conf":
        pick = torch.where(ready, confidence, -math.inf).argmax(-1)
    else:  # "min_kl"
        pick = torch.where(ready, kl, math.inf).argmin(-1)
    one = torch.zeros_like(ready)
    one.scatter_(-1, pick.unsqueeze(-1), True)
    return one & ready.any(-1, keepdim=True)


class StepRecorder:
    """Per-step records: for every forward, the candidate positions and which of them were unmasked.

    A record is ``{"step", "decoded_tokens_num", "decoded_tokens", "all_tokens"}``; each token entry is
    ``{"row", "position", "token_id", "confidence", "kl_divergence"}`` with unrounded floats. The values
    of a step leave the device in one transfer.
    """

    def __init__(self):
        self.records: List[dict] = []

    def add(self, step: int, candidates, tokens, confidence, kl, decided, decided_tokens=None):
        """All arguments are ``[rows, length]`` tensors; ``decided`` marks the unmasked positions and
        ``decided_tokens`` (default ``tokens``) the ids written there."""
        if decided_tokens is None:
            decided_tokens = tokens
        packed = torch.stack(
            [
                candidates.to(torch.float64),
                decided.to(torch.float64),
                tokens.to(torch.float64),
                decided_tokens.to(torch.float64),
                confidence.to(torch.float64),
                kl.to(torch.float64),
            ],
            dim=-1,
        ).cpu()
        every, done = [], []
        for row, line in enumerate(packed.tolist()):
            for position, (cand, dec, tok, dtok, c, k) in enumerate(line):
                if not (cand or dec):
                    continue
                entry = {"row": row, "position": position, "token_id": int(tok), "confidence": c, "kl_divergence": k}
                if cand:
                    every.append(entry)
                if dec:
                    done.append(dict(entry, token_id=int(dtok)))
        self.records.append(
            {"step": step, "decoded_tokens_num": len(done), "decoded_tokens": done, "all_tokens": every}
        )


def write_steps_jsonl(records: Iterable[dict], path) -> None:
    """Write step records (``.history`` of a ``save_steps=True`` call), one JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
