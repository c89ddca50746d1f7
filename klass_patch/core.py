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
from typing import Callable, Iterable, List, NamedTuple, Optional, Tuple

import torch

__all__ = [
    "EPS",
    "GenerateOutput",
    "STRATEGIES",
    "KlassConfig",
    "KlassStep",
    "StabilityTracker",
    "StepRules",
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
        """Pop the KLASS parameters out of ``kwargs``; a missing one, or one given as ``None``, comes from
        ``defaults``' attributes, then from ours."""
        values = {}
        for name in cls.__dataclass_fields__:
            value = kwargs.pop(name, None)
            if value is not None:
                values[name] = value
            elif defaults is not None and getattr(defaults, name, None) is not None:
                values[name] = getattr(defaults, name)
        return cls(**values)


try:  # the type of upstream's own outputs (Dream's DreamModelOutput): indexing, to_tuple(), .get()
    from transformers.utils import ModelOutput as _OutputBase
except ImportError:  # transformers is not needed for LLaDA: a plain dataclass then
    _OutputBase = object


@dataclass
class GenerateOutput(_OutputBase):
    """What a ``return_dict_in_generate=True`` call returns; a ``transformers`` ``ModelOutput`` when
    transformers is importable, so ``out[0]``, ``out["sequences"]``, ``out.to_tuple()`` and ``.get`` work as on
    upstream's output (fields in upstream's order, ``used_steps`` added last).

    ``sequences``: ``[rows, length]`` ids. ``history``: the step records when ``save_steps=True``, else
    upstream's history (Dream's ``output_history``: one tensor per step) or ``None``. ``used_steps``:
    ``[rows]`` number of model forwards each row made (what it would have made alone).
    """

    sequences: torch.LongTensor = None
    history: Optional[list] = None
    used_steps: torch.LongTensor = None


def masks_left_warning(x: torch.Tensor, mask_id: int, start: int = 0, counts: Optional[List[int]] = None) -> None:
    """Warn once when a run ends with masked positions left (the reference keeps them; so do we). ``counts``: the
    masks left per row, when the caller already has them on the host."""
    if counts is None:
        counts = (x[:, start:] == mask_id).sum(-1).tolist()
    total = sum(counts)
    if total:
        warnings.warn(
            f"KLASS used its steps with {total} masked position(s) left (per row: {counts}); the result "
            "keeps them, as the authors' sampler does. Each step unmasks only its ready tokens (or the fallback's "
            "few when none is ready), with any unmask_strategy; give more steps, or thresholds that let more "
            "tokens qualify (lower conf_threshold, higher kl_threshold, shorter kl_history_length).",
            RuntimeWarning,
            stacklevel=3,
        )


KLASS_PARAMS = tuple(KlassConfig.__dataclass_fields__)  # the keyword arguments KLASS adds


def klass_options(kwargs: dict, alg, algs: tuple, hint: str = "") -> dict:
    """The rule both families follow, checked before any forward: ``alg`` must be one of ``algs``, and the
    KLASS parameters (taken out of ``kwargs`` and returned) come with ``alg="klass"`` only; a parameter given
    as ``None`` means its default and is always accepted. Otherwise ``ValueError`` naming the parameter."""
    if alg not in algs:
        raise ValueError(f"alg must be one of {', '.join(map(repr, algs))}, got {alg!r}{hint}")
    opts = {k: kwargs.pop(k) for k in KLASS_PARAMS if k in kwargs}
    stray = [k for k, v in opts.items() if v is not None]
    if stray and alg != "klass":
        raise ValueError(f"{', '.join(stray)}: KLASS parameter(s), used only with alg='klass' (alg is {alg!r}); "
                         "pass alg='klass' or leave them out")
    return opts


def _log_eps(device) -> torch.Tensor:
    # log(0 + 1e-12) computed exactly as the reference does for p_prev = 0.
    return torch.log(torch.zeros((), dtype=torch.float64, device=device) + EPS)


# Rounding of two probabilities of one softmax: the same normaliser divides both, so values within a few
# units in the last place of the logits' dtype can tie or swap once computed in that dtype; 8 ulps is a
# safe margin.
SAME_ROW_ULPS = 8
# Comparing top probabilities of *different* positions: each low-precision softmax has its own normaliser, a
# sum over the whole vocabulary whose rounding error grows with its length, so the margin is wider: a float64
# order closer than 1e-3 relative (or 8 ulps, for a coarser dtype) is re-decided in the logits' dtype.
ACROSS_ROWS_RTOL = 1e-3


def low_precision_max_position(logits, read_at, conf64, candidates):
    """Per row of ``candidates`` ([rows, length]), the position whose top probability in the logits' own
    dtype is largest (first on ties), as upstream's ``softmax(...).max()`` then ``argmax`` over positions
    picks it. ``conf64`` ([rows, length], float64, -inf off candidates) decides unless another candidate
    of the row is within ``ACROSS_ROWS_RTOL`` (or 8 ulps of the dtype) of the row's best; those few
    positions are then computed in the logits' dtype. ``read_at`` ([length], or [rows, length] per row, e.g.
    a cache's window): where in ``logits`` each position's prediction is."""
    best = conf64.max(-1, keepdim=True).values
    rtol = max(ACROSS_ROWS_RTOL, SAME_ROW_ULPS * torch.finfo(logits.dtype).eps)
    close = candidates & (conf64 >= best * (1 - rtol))
    pick = conf64.argmax(-1)
    tied = close.sum(-1) > 1
    if bool(tied.any()):
        r_c, p_c = (close & tied.unsqueeze(-1)).nonzero(as_tuple=True)
        read = read_at[p_c] if read_at.dim() == 1 else read_at[r_c, p_c]  # [rows, length]: per row (a cache)
        exact = torch.softmax(logits[r_c, read], dim=-1).max(-1).values
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


class Range(NamedTuple):
    """Entries ``a..b`` of an update, processed together. ``run``: they sit at consecutive store slots and
    (unless the logits are pre-gathered) consecutive read positions of one row, so both are views; else they
    are gathered. ``row``, ``read``, ``slot``: those of entry ``a``."""

    a: int
    b: int
    run: bool
    row: int
    read: int
    slot: int


def _chunks(rows, read, slots, dense, size, split_runs) -> List[Range]:
    """Split entries ``0..n`` (host tensors) into ranges of at most ``size`` entries.

    A *run* is a stretch of entries at consecutive slots and, unless ``dense`` (logits already gathered,
    one row per entry), of one row at consecutive read positions. With ``split_runs`` each run is cut into
    pieces of ``size``; pieces of two or more entries are ranges of their own, read through views, and the
    one-entry pieces that follow each other are grouped, ``size`` at a time, and gathered. Without it the
    ranges are fixed (``size`` entries each), a view only where one happens to lie inside a run."""
    n = slots.shape[0]
    if n == 0:
        return []
    cont = slots[1:] == slots[:-1] + 1  # entry j + 1 continues the run of entry j
    if not dense:
        cont &= (rows[1:] == rows[:-1]) & (read[1:] == read[:-1] + 1)
    starts = [0] + (torch.nonzero(~cont).squeeze(-1) + 1).tolist()
    bounds = list(zip(starts, starts[1:] + [n]))  # [start, end) of each run
    if not split_runs:
        run_end = torch.zeros(n, dtype=torch.long)
        for s, e in bounds:
            run_end[s:e] = e
        spans = [(a, min(a + size, n)) for a in range(0, n, size)]
        flags = [int(run_end[a]) >= b for a, b in spans]
    else:
        spans, flags = [], []
        for s, e in bounds:
            for a in range(s, e, size):
                b = min(a + size, e)
                lone = b - a == 1
                if lone and flags and not flags[-1] and spans[-1][1] == a and a - spans[-1][0] < size:
                    spans[-1] = (spans[-1][0], b)  # one more lone entry joins the group before it
                else:
                    spans.append((a, b))
                    flags.append(not lone)
    first = torch.tensor([a for a, _ in spans])
    heads = torch.stack((rows[first], read[first], slots[first]), -1).tolist()
    return [Range(a, b, run, *head) for (a, b), run, head in zip(spans, flags, heads)]


class _Reader:
    """Where the logits of an update's entries are: a pre-gathered ``[N, V]`` tensor (row i is entry i), or
    the whole ``[rows, length, V]`` output read at ``(rows[i], read[i])`` (e.g. a shifted view)."""

    def __init__(self, logits, rows, read):
        self.logits, self.rows, self.read = logits, rows, read
        self.dense = logits.dim() == 2

    def at(self, sel):
        """Logits of entries ``sel`` (a slice or indices), gathered."""
        return self.logits[sel] if self.dense else self.logits[self.rows[sel], self.read[sel]]

    def range(self, r: Range):
        """Logits of a range: a view where it is a run of one row, else gathered."""
        if r.run and not self.dense:
            return self.logits[r.row, r.read:r.read + r.b - r.a]
        return self.at(slice(r.a, r.b))


class StabilityTracker:
    """KL divergence between consecutive steps and its history, for a ``[rows, length]`` grid of positions.

    Only a window of ``width`` positions per row, starting at ``start``, is tracked; a position ``pos``
    lives in slot ``(pos - start) % width``. A window narrower than what follows ``start`` (LLaDA: two
    blocks) is a ring; one that reaches the end (Dream) grows to the left when an earlier position is reset
    (the only way one becomes a candidate: a user's hook masks it again), so no two positions share a slot;
    ``update`` and ``remember`` never check, which keeps a device sync out of every step. For each slot the tracker keeps
    ``log(p_prev + 1e-12)`` in float64, the only vocabulary-sized state, and updates it in place.
    """

    def __init__(self, rows: int, length: int, start: int, width: int, history_length: int, device):
        self.rows, self.length, self.start, self.width = rows, length, start, width
        self.device = torch.device(device)
        self.history = torch.zeros((rows, length, history_length), dtype=torch.float64, device=self.device)
        self._log_prev: Optional[torch.Tensor] = None  # [rows * width, V], allocated at the first update

    @property
    def ring(self) -> bool:
        return self.start + self.width < self.length

    def _cover(self, pos: torch.Tensor) -> None:
        """Grow a window that reaches the end to the left so that it holds ``pos`` (fresh slots)."""
        if self.ring or not len(pos):
            return
        lowest = int(pos.min())
        if lowest >= self.start:
            return
        extra = self.start - lowest
        if self._log_prev is not None:
            vocab = self._log_prev.shape[-1]
            fresh = _log_eps(self.device).expand(self.rows, extra, vocab)
            grown = torch.cat([fresh, self._log_prev.view(self.rows, self.width, vocab)], dim=1)
            self._log_prev = grown.view(self.rows * (self.width + extra), vocab)
        self.start, self.width = lowest, self.width + extra

    def _slots(self, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return rows * self.width + (pos - self.start) % self.width

    def _store(self, vocab: int) -> torch.Tensor:
        if self._log_prev is None or self._log_prev.shape[-1] != vocab:
            self._log_prev = _log_eps(self.device).expand(self.rows * self.width, vocab).clone()
            # scratch space for one chunk, reused at every step (no large allocation per step)
            self._chunk = chunk_policy(self.device, vocab)
            self._scratch = torch.empty((3, self._chunk[0], vocab), dtype=torch.float64, device=self.device)
        return self._log_prev

    def _ranges(self, reader: _Reader, slots):
        """Per range of entries (see ``_chunks``): ``(range, its logits, its store rows as a view or None where
        they are not consecutive there)``. The entries' indices leave the device once."""
        store = self._store(reader.logits.shape[-1])
        host = torch.stack((reader.rows, reader.read, slots)).cpu()
        for r in _chunks(*host, reader.dense, *self._chunk):
            yield r, reader.range(r), (store[r.slot:r.slot + r.b - r.a] if r.run else None)

    def _log_probs(self, chunk, out):
        """``softmax(chunk.double())`` (in the scratch buffer, returned) and ``log(p + 1e-12)`` into ``out``."""
        p = self._scratch[0, :chunk.shape[0]]
        torch.softmax(p.copy_(chunk), dim=-1, out=p)
        torch.log(torch.add(p, EPS, out=out), out=out)
        return p

    def update(self, logits: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, tokens: Optional[torch.Tensor] = None,
               low_precision_tokens: bool = False, read_pos: Optional[torch.Tensor] = None):
        """Advance positions ``(rows[i], pos[i])`` (in ``nonzero()`` order) by one step.

        ``logits``: ``[N, V]`` (row i belongs to entry i) or the whole ``[rows, length, V]`` output, read only
        at the positions given (or at ``read_pos``, e.g. a shifted view). The token of a position is, by rule:

        - ``tokens[i]`` when given (LLaDA's noisy or EOS-aware argmax);
        - else, with ``low_precision_tokens``, the argmax of the softmax in the logits' own dtype (Dream's):
          the float64 argmax unless a runner-up is within rounding of it (checked), then computed in that dtype;
        - else the argmax of the float64 softmax.

        Returns ``(tokens, confidence, kl)``: the token, its float64 probability, and the KL to the previous
        step, which is also pushed into the history. Runs of consecutive positions are read and written
        through views (no gather, no scatter).
        """
        n = rows.shape[0]
        reader = _Reader(logits, rows, pos if read_pos is None else read_pos)
        store = self._store(logits.shape[-1])
        slots = self._slots(rows, pos)
        out_tok = torch.empty(n, dtype=torch.long, device=self.device)
        conf = torch.empty(n, dtype=torch.float64, device=self.device)
        kl = torch.empty(n, dtype=torch.float64, device=self.device)
        near = torch.zeros(n, dtype=torch.bool, device=self.device) if low_precision_tokens else None
        near_ratio = 1 - SAME_ROW_ULPS * torch.finfo(logits.dtype).eps
        for r, chunk, prev in self._ranges(reader, slots):
            a, b = r.a, r.b
            lp, w = self._scratch[1, :b - a], self._scratch[2, :b - a]
            p = self._log_probs(chunk, lp)  # p = softmax(logits.double()), lp = log(p + 1e-12)
            if tokens is not None:
                out_tok[a:b] = tokens[a:b]
                torch.gather(p, -1, tokens[a:b].unsqueeze(-1), out=conf[a:b].unsqueeze(-1))
            elif low_precision_tokens:
                conf[a:b], out_tok[a:b], runner_up = first_max(p, second=True)
                torch.ge(runner_up, conf[a:b] * near_ratio, out=near[a:b])
            else:
                conf[a:b], out_tok[a:b] = first_max(p)
            # sum(p * (log(p + eps) - log(p_prev + eps))); then this step's distribution becomes p_prev
            if prev is not None:  # a run: in place in the store, which then takes this step's values
                torch.sum(torch.sub(lp, prev, out=prev).mul_(p), -1, out=kl[a:b])
                prev.copy_(lp)
            else:
                prev = torch.index_select(store, 0, slots[a:b], out=w)
                torch.sum(torch.sub(lp, prev, out=w).mul_(p), -1, out=kl[a:b])
                store.index_copy_(0, slots[a:b], lp)
        if low_precision_tokens:
            self._redo_near_ties(reader, near.nonzero().squeeze(-1), out_tok, conf)
        h = self.history
        h[rows, pos] = torch.cat([h[rows, pos, 1:], kl.unsqueeze(-1)], dim=-1)
        return out_tok, conf, kl

    @staticmethod
    def _redo_near_ties(reader: _Reader, redo, out_tok, conf):
        """Entries whose top two probabilities may swap once rounded (rare): the softmax in the logits'
        dtype decides the token, as upstream's does; the confidence is that token's float64 probability."""
        if not len(redo):
            return
        chunk = reader.at(redo)
        tok = torch.softmax(chunk, dim=-1).max(-1).indices
        out_tok[redo] = tok
        conf[redo] = torch.softmax(chunk.to(torch.float64), dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)

    def remember(self, logits: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                 read_pos: Optional[torch.Tensor] = None):
        """Store ``log(p + 1e-12)`` of positions not advanced this step, so that their next KL is exact
        (``logits`` read at ``read_pos`` when given, e.g. a cache's window)."""
        store = self._store(logits.shape[-1])
        slots = self._slots(rows, pos)
        for r, chunk, prev in self._ranges(_Reader(logits, rows, pos if read_pos is None else read_pos), slots):
            lp = self._scratch[1, :r.b - r.a] if prev is None else prev  # runs: straight into the store
            self._log_probs(chunk, lp)
            if prev is None:
                store.index_copy_(0, slots[r.a:r.b], lp)

    def reset(self, rows: torch.Tensor, pos: torch.Tensor):
        """Forget positions (e.g. re-masked by a user's hook): they start afresh, as if never seen."""
        self._cover(pos)
        self.history[rows, pos] = 0.0
        if self._log_prev is not None:
            self._log_prev[self._slots(rows, pos)] = _log_eps(self.device)

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


# ---- the batched step ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepRules:
    """A family's rules for :class:`KlassStep`, known before the first step.

    ``strict``: the confidence test is ``>`` (LLaDA) instead of ``>=`` (Dream). ``guard``: a position is ready only
    once its row's step index is at least ``kl_history_length - 1`` (LLaDA: the index inside the block).
    ``schedule``: a row with no ready position unmasks its top ``schedule[step index]`` candidates by confidence
    (LLaDA: upstream's per-block schedule); ``None``: one position, the best by the fallback score (Dream).
    ``low_precision_tokens``: the token is the argmax of the softmax in the logits' own dtype, and the fallback
    score that softmax's maximum (Dream's ``sample_tokens`` at temperature 0). ``ban_after_token``: ids whose
    logits become ``-inf`` after the token is chosen, so that they get no probability (LLaDA's
    ``confidence_eos_eot_inf``); without tokens given, the token is then the argmax of the logits before the ban.
    """

    strict: bool = False
    guard: bool = False
    schedule: Optional[Tuple[int, ...]] = None
    low_precision_tokens: bool = False
    ban_after_token: Tuple[int, ...] = ()


class Observation(NamedTuple):
    """Per window position (``[rows, width]``): the token, its float64 probability, the KL to the previous step
    and, with ``low_precision_tokens``, the token's probability in the logits' dtype (else None)."""

    tokens: torch.Tensor
    confidence: torch.Tensor
    kl: torch.Tensor
    low_confidence: Optional[torch.Tensor]


class StepOutput(NamedTuple):
    """``commit``: the positions to unmask, with ``tokens``; ``confidence`` (``-inf``) and ``kl`` (``inf``) off the
    candidates. All ``[rows, width]``."""

    commit: torch.Tensor
    tokens: torch.Tensor
    confidence: torch.Tensor
    kl: torch.Tensor


class KlassStep:
    """One batched KLASS step over a window of ``width`` positions per row (a block, or everything after the
    prompt), as a diffusers scheduler's ``step()`` or an engine's decoding algorithm would call it.

    ``step(logits, candidates)`` takes the window's logits (``[rows, width, V]``, any strides along rows and
    positions: a view of the model's output is read in place) and the candidate mask (``[rows, width]``), and
    returns the positions to unmask and their tokens (:class:`StepOutput`). The state lives on the logits'
    device: per window position, ``log(p_prev + 1e-12)`` in float64 (the only vocabulary-sized state) and the KL
    history. Everything is tensor operations on shapes fixed by ``rows``, ``width`` and the vocabulary: no host
    read, no shape that depends on the data, so a step can be captured in a CUDA graph. Every window position is
    computed, candidate or not; the state of a non-candidate is never read (a position that becomes a candidate
    again is first reset with :meth:`restart`).

    A caller that moves a row's window (the next block) calls :meth:`remember` (the new window's distributions,
    from logits that computed them) or :meth:`restart` (afresh, as the first window starts).
    """

    def __init__(self, config: KlassConfig, rules: StepRules, rows: int, width: int, device):
        self.config, self.rules = config, rules
        self.rows, self.width, self.device = rows, width, torch.device(device)
        self.history = torch.zeros((rows, width, config.kl_history_length), dtype=torch.float64, device=self.device)
        self.log_prev: Optional[torch.Tensor] = None  # [rows, width, V], at the first step
        self._plan = None  # the chunks of the window (``_window_chunks``), made with the store
        self._schedule = None if rules.schedule is None else torch.tensor(rules.schedule)  # built on the host, ...
        if self._schedule is not None and self.device.type != "cpu":  # ... then sent (a copy, not a sync)
            self._schedule = self._schedule.to(self.device, non_blocking=True)

    def _store(self, vocab: int) -> torch.Tensor:
        if self.log_prev is None or self.log_prev.shape[-1] != vocab:
            self.log_prev = _log_eps(self.device).expand(self.rows, self.width, vocab).clone()
            self._plan = None
        if self._plan is None:
            size = chunk_policy(self.device, vocab)[0]
            self._plan = _window_chunks(self.rows, self.width, size)
            most = max((r1 - r0) * (j1 - j0) for r0, r1, j0, j1 in self._plan)
            self._scratch = torch.empty((2, most, vocab), dtype=torch.float64, device=self.device)
        return self.log_prev

    def extend_left(self, extra: int) -> None:
        """Widen the window by ``extra`` fresh positions before it (a position there became a candidate)."""
        fresh = self.history.new_zeros((self.rows, extra, self.history.shape[-1]))
        self.history = torch.cat([fresh, self.history], dim=1)
        if self.log_prev is not None:
            eps = _log_eps(self.device).expand(self.rows, extra, self.log_prev.shape[-1])
            self.log_prev = torch.cat([eps, self.log_prev], dim=1)
        self.width += extra
        self._plan = None

    def _probs(self, chunk):
        """``softmax`` of a chunk (``[a, b, V]``) in float64 in the scratch buffer (``[a * b, V]``), after the
        banned ids lose their logits; also the argmax of the logits before the ban when there is one."""
        a, b, vocab = chunk.shape
        p = self._scratch[0, :a * b]
        p.view(a, b, vocab).copy_(chunk)
        before = None
        if self.rules.ban_after_token:
            before = p.argmax(-1)
            for i in self.rules.ban_after_token:
                p[:, i] = -math.inf
        torch.softmax(p, dim=-1, out=p)
        return p, before

    def observe(self, logits: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> Observation:
        """The vocabulary-sized work of a step (see :class:`Observation`); the state moves on at every position.
        ``tokens`` (``[rows, width]``): the token of each position when the caller chose it (LLaDA's Gumbel noise);
        otherwise the rules say (low-precision argmax, argmax before the ban, or the float64 argmax)."""
        rows, width, vocab = logits.shape
        store = self._store(vocab)
        out_tok = torch.empty((rows, width), dtype=torch.long, device=self.device) if tokens is None else tokens
        conf = torch.empty((rows, width), dtype=torch.float64, device=self.device)
        kl = torch.empty_like(conf)
        low = torch.empty((rows, width), dtype=logits.dtype, device=self.device) \
            if self.rules.low_precision_tokens else None
        for r0, r1, j0, j1 in self._plan:
            chunk = logits[r0:r1, j0:j1]
            n = (r1 - r0) * (j1 - j0)
            p, before = self._probs(chunk)
            tok, c, k = out_tok[r0:r1, j0:j1].view(n), conf[r0:r1, j0:j1].view(n), kl[r0:r1, j0:j1].view(n)
            if tokens is None and low is not None:  # upstream's softmax in the logits' dtype decides the token
                torch.max(torch.softmax(chunk.reshape(n, vocab), dim=-1), -1, out=(low[r0:r1, j0:j1].view(n), tok))
            elif tokens is None and before is not None:
                tok.copy_(before)
            elif tokens is None:
                c[:], tok[:] = first_max(p)
            if tokens is not None or low is not None or before is not None:
                torch.gather(p, -1, tok.unsqueeze(-1), out=c.unsqueeze(-1))
            lp, prev = self._scratch[1, :n], store[r0:r1, j0:j1].view(n, vocab)
            torch.log(torch.add(p, EPS, out=lp), out=lp)
            # sum(p * (log(p + eps) - log(p_prev + eps))); then this step's distribution becomes p_prev
            torch.sum(torch.sub(lp, prev, out=prev).mul_(p), -1, out=k)
            prev.copy_(lp)
        self.history = torch.cat([self.history[..., 1:], kl.unsqueeze(-1)], dim=-1)
        return Observation(out_tok, conf, kl, low)

    def decide(self, obs: Observation, candidates: torch.Tensor, step_index: Optional[torch.Tensor] = None,
               fallback_scores: Optional[Callable] = None) -> StepOutput:
        """The step's decisions: ready candidates (confident and stable, past the guard) by the unmask strategy;
        a row with candidates but none ready falls back (top-k on the schedule, or its best position).
        ``step_index`` (``[rows]``): the guard's and the schedule's index. ``fallback_scores(rows)``: the
        single-token fallback's scores (``[rows, width]``, ``-inf`` off candidates) for the rows given (a bool
        mask), e.g. a sampled confidence; by default the token's probability (low-precision when it decides)."""
        cfg, rules = self.config, self.rules
        conf = torch.where(candidates, obs.confidence, -math.inf)
        kl = torch.where(candidates, obs.kl, math.inf)
        stable = (self.history < cfg.kl_threshold).all(-1)
        guard = step_index >= cfg.kl_history_length - 1 if rules.guard else None
        ready = ready_mask(candidates, conf, stable, cfg.conf_threshold, rules.strict, guard)
        commit = select_ready(ready, conf, kl, cfg.unmask_strategy)
        fallback = candidates.any(-1) & ~ready.any(-1)
        if rules.schedule is not None:  # upstream's top-k by confidence, k from its schedule
            k_row = self._schedule[step_index]
            for k in sorted(set(rules.schedule) - {0}):  # one top-k per distinct k: torch's own choice on ties
                top = torch.zeros_like(commit).scatter_(-1, conf.topk(min(k, self.width), -1).indices, True)
                commit |= top & (fallback & (k_row == k)).unsqueeze(-1)
            return StepOutput(commit & candidates, obs.tokens, conf, kl)
        if fallback_scores is not None:
            scores = fallback_scores(fallback)
        else:
            scores = torch.where(candidates, obs.low_confidence if obs.low_confidence is not None else conf, -math.inf)
        best = scores.argmax(-1, keepdim=True)
        pick = torch.arange(self.width, device=self.device) == best
        return StepOutput(torch.where(fallback.unsqueeze(-1), pick, commit), obs.tokens, conf, kl)

    def step(self, logits: torch.Tensor, candidates: torch.Tensor, step_index: Optional[torch.Tensor] = None,
             tokens: Optional[torch.Tensor] = None, fallback_scores: Optional[Callable] = None) -> StepOutput:
        """:meth:`observe` then :meth:`decide`."""
        return self.decide(self.observe(logits, tokens), candidates, step_index, fallback_scores)

    def remember(self, row: int, logits: torch.Tensor) -> None:
        """Row ``row``'s window moves on: its state becomes the distributions of ``logits`` (``[width, V]``, the
        new window's, e.g. from the forward that ended the old one), with an empty history."""
        store = self._store(logits.shape[-1])
        self.history[row] = 0.0
        size = chunk_policy(self.device, logits.shape[-1])[0]
        for j0 in range(0, self.width, size):
            j1 = min(j0 + size, self.width)
            p, _ = self._probs(logits[j0:j1].unsqueeze(0))
            prev = store[row, j0:j1]
            torch.log(torch.add(p, EPS, out=prev), out=prev)

    def restart(self, rows, positions=None) -> None:
        """Forget rows (or ``(rows, positions)`` pairs of window indices): they start afresh, as the first window."""
        index = rows if positions is None else (rows, positions)
        self.history[index] = 0.0
        if self.log_prev is not None:
            self.log_prev[index] = _log_eps(self.device)


def _window_chunks(rows: int, width: int, size: int) -> List[tuple]:
    """``(r0, r1, j0, j1)`` pieces of a ``[rows, width]`` window of at most ``size`` positions each: whole rows
    together where a row fits, else pieces of one row. Each is contiguous in a contiguous ``[rows, width, ...]``
    tensor, so state and outputs are written through views."""
    if size >= width:
        per = size // width
        return [(r, min(r + per, rows), 0, width) for r in range(0, rows, per)]
    return [(r, r + 1, j, min(j + size, width)) for r in range(rows) for j in range(0, width, size)]


class StepRecorder:
    """Per-step records: for every forward, the candidate positions and which of them were unmasked.

    A record is ``{"step", "decoded_tokens_num", "decoded_tokens", "all_tokens"}``; each token entry is
    ``{"row", "position", "token_id", "confidence", "kl_divergence"}`` with unrounded floats. The values
    of a step leave the device in one transfer.
    """

    def __init__(self):
        self.records: List[dict] = []

    def add(self, step: int, candidates, tokens, confidence, kl, decided, decided_tokens=None, positions=None):
        """All arguments are ``[rows, length]`` tensors; ``decided`` marks the unmasked positions and
        ``decided_tokens`` (default ``tokens``) the ids written there. ``positions``: the sequence position of
        each entry when the tensors cover a window (``[rows, width]``), else the entry's index."""
        self.add_packed(step, to_host(self.pack(candidates, tokens, confidence, kl, decided, decided_tokens,
                                                positions))[0])

    @staticmethod
    def pack(candidates, tokens, confidence, kl, decided, decided_tokens=None, positions=None) -> torch.Tensor:
        """The arguments of :meth:`add` as one float64 tensor ``[rows, width, 7]`` on their device (to be
        transferred with others in one go, then given to :meth:`add_packed`)."""
        if decided_tokens is None:
            decided_tokens = tokens
        if positions is None:
            positions = torch.arange(tokens.shape[-1], device=tokens.device).expand(tokens.shape)
        columns = (candidates, decided, tokens, decided_tokens, confidence, kl, positions)
        return torch.stack([c.to(torch.float64) for c in columns], dim=-1)

    def add_packed(self, step: int, packed: list) -> None:
        """A step's record from :meth:`pack`'s tensor, on the host (``to_host``: nested lists)."""
        every, done = [], []
        for row, line in enumerate(packed):
            for cand, dec, tok, dtok, c, k, position in line:
                if not (cand or dec):
                    continue
                entry = {"row": row, "position": int(position), "token_id": int(tok), "confidence": c,
                         "kl_divergence": k}
                if cand:
                    every.append(entry)
                if dec:
                    done.append(dict(entry, token_id=int(dtok)))
        self.records.append(
            {"step": step, "decoded_tokens_num": len(done), "decoded_tokens": done, "all_tokens": every}
        )


class Observer:
    """KLASS-style step records of a run that is not KLASS's (``save_steps`` with upstream's algorithms).

    ``observe`` takes each forward's input ids, the logits the sampler uses and its candidate positions, and
    computes what KLASS would see there (argmax token, confidence, KL to the previous forward); the step is
    closed by ``finish`` with the ids after it: the candidates no longer masked are the ones it unmasked.
    Only the window given (``start``, ``width``) is tracked, as ``StabilityTracker`` does.
    """

    def __init__(self, mask_id: int, start: int, width: Optional[int] = None):
        self.mask_id, self.start, self.width = mask_id, start, width
        self.tracker: Optional[StabilityTracker] = None
        self.recorder = StepRecorder()
        self.pending = None
        self.calls = 0

    def observe(self, ids, logits, candidates, read_pos=None):
        """One forward; ``logits`` as ``StabilityTracker.update`` reads them (``read_pos``: per position)."""
        rows, length = ids.shape
        if self.tracker is None:
            width = self.width if self.width is not None else length - self.start
            self.tracker = StabilityTracker(rows, length, self.start, width, 1, ids.device)
        self.finish(ids)
        r_idx, p_idx = candidates.nonzero(as_tuple=True)
        read = None if read_pos is None else read_pos[p_idx]
        tok, conf, kl = self.tracker.update(logits, r_idx, p_idx, read_pos=read)
        full_conf = torch.full((rows, length), -math.inf, dtype=torch.float64, device=ids.device)
        full_kl = torch.full((rows, length), math.inf, dtype=torch.float64, device=ids.device)
        full_conf[r_idx, p_idx], full_kl[r_idx, p_idx] = conf, kl
        x0 = ids.clone()
        x0[r_idx, p_idx] = tok
        self.pending = (self.calls, candidates, x0, full_conf, full_kl)
        self.calls += 1

    def finish(self, ids_after):
        """Close the pending step, if any."""
        if self.pending is None:
            return
        step, cand, x0, conf, kl = self.pending
        decided = cand & (ids_after != self.mask_id)
        self.recorder.add(step, cand, x0, conf, kl, decided, decided_tokens=ids_after)
        self.pending = None

    @property
    def records(self) -> List[dict]:
        return self.recorder.records


def to_host(*tensors: torch.Tensor) -> List[list]:
    """The tensors' values as nested Python lists (their shapes), in one transfer (as float64: integers are exact
    below 2**53)."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).cpu().tolist()
    out, at = [], 0
    for t in tensors:
        out.append(_nest(flat[at:at + t.numel()], list(t.shape)))
        at += t.numel()
    return out


def _nest(values: list, shape: List[int]) -> list:
    if len(shape) <= 1:
        return values
    step = len(values) // shape[0] if shape[0] else 0
    return [_nest(values[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def write_steps_jsonl(records: Iterable[dict], path) -> None:
    """Write step records (``.history`` of a ``save_steps=True`` call), one JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
