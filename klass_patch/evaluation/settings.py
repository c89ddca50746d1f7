"""Sampling settings of an evaluation run: the authors' published defaults per family and dataset, and
their validation (a ``ValueError`` naming the parameter and what is allowed, before any model forward).

Defaults are taken from the authors' ``scripts/{llada,dream}_{gsm8k,math,humaneval,mbpp}.sh`` and the
argparse defaults of their ``src/llada_evaluation.py`` / ``src/dream_evaluation.py``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Optional

from ..core import KLASS_PARAMS, KlassConfig

FAMILIES = ("llada", "dream")
DATASETS = ("gsm8k", "math500", "humaneval", "mbpp")
CODE_DATASETS = ("humaneval", "mbpp")
# "default"/"random": upstream LLaDA's remasking='low_confidence'/'random'; Dream's are its own ``alg`` values.
ALGS = {"llada": ("klass", "default", "random"),
        "dream": ("klass", "maskgit_plus", "origin", "topk_margin", "entropy")}
BASELINE = {"llada": "default", "dream": "maskgit_plus"}  # the paper's top-k confidence baselines

# scripts/*.sh: LLaDA 256 tokens, block 64, 256 steps, temperature 0 (llada_evaluation.py default);
# Dream 256 tokens, 256 steps, temperature 0.2, top_p 0.95 (dream_evaluation.py test_* defaults).
FAMILY_DEFAULTS = {
    "llada": dict(gen_length=256, block_length=64, steps=256, temperature=0.0, top_p=None),
    "dream": dict(gen_length=256, block_length=None, steps=256, temperature=0.2, top_p=0.95),
}
# (conf_threshold, kl_threshold) of scripts/<family>_<dataset>.sh; HISTORY_LENGTH=2 and
# UNMASK_STRATEGY="all" in every script.
HISTORY_LENGTH = 2
KLASS_DEFAULTS = {
    ("llada", "gsm8k"): (0.6, 0.015), ("llada", "math500"): (0.6, 0.01),
    ("llada", "humaneval"): (0.9, 0.01), ("llada", "mbpp"): (0.7, 0.01),
    ("dream", "gsm8k"): (0.9, 0.001), ("dream", "math500"): (0.9, 0.005),
    ("dream", "humaneval"): (0.8, 0.001), ("dream", "mbpp"): (0.9, 0.001),
}
FLAG = {f: "--" + f.replace("_", "-") for f in (
    "alg", "gen_length", "steps", "block_length", "temperature", "top_p", "conf_threshold", "kl_threshold",
    "kl_history_length", "unmask_strategy", "batch_size", "seed", "timeout", "mask_id", "use_cache",
    "cache_refresh_every")}
CACHE_MODES = ("prefix", "dual")  # klass_patch.cache


@dataclass(frozen=True)
class Settings:
    """Everything that decides what a run generates and how it is scored (``None``: does not apply)."""

    family: str
    dataset: str
    alg: str
    gen_length: int
    steps: int
    block_length: Optional[int]  # LLaDA; Dream with use_cache (its cache decodes in blocks; default 32)
    temperature: float
    top_p: Optional[float]  # Dream only
    conf_threshold: Optional[float]  # KLASS only
    kl_threshold: Optional[float]
    kl_history_length: Optional[int]
    unmask_strategy: Optional[str]
    save_steps: bool = False
    batch_size: int = 1
    seed: int = 0
    timeout: float = 3.0  # seconds per program, code datasets (the authors' humaneval_timeout / eval_timeout)
    mask_id: Optional[int] = None  # LLaDA: None = the model's config / tokenizer, else 126336
    use_cache: Optional[str] = None  # KV cache: None, "prefix" or "dual" (klass_patch.cache)
    cache_refresh_every: Optional[int] = None  # with a cache: also a full forward every N forwards of a block

    def to_dict(self) -> dict:
        return asdict(self)

    def klass_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in KLASS_PARAMS} if self.alg == "klass" else {}

    def cache_kwargs(self) -> dict:
        """``use_cache`` / ``cache_refresh_every`` for the sampler call (none without a cache)."""
        return {} if self.use_cache is None else dict(use_cache=self.use_cache,
                                                      cache_refresh_every=self.cache_refresh_every)

    def label(self) -> str:
        """A short name of the method, for tables: ``klass (conf 0.6, KL 0.015, n 2)``."""
        cache = "" if self.use_cache is None else f" + {self.use_cache} cache"
        if self.alg != "klass":
            return self.alg + cache
        extra = "" if self.unmask_strategy == "all" else f", {self.unmask_strategy}"
        return f"klass (conf {self.conf_threshold}, KL {self.kl_threshold}, n {self.kl_history_length}{extra}){cache}"


def _name(param):
    return f"{param} ({FLAG[param]})" if param in FLAG else param


def _check_int(param, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{_name(param)} must be an int >= {minimum}, got {value!r}")


def _check_float(param, value, low, high, low_open=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        if math.isinf(high):
            allowed = f"a finite number {'>' if low_open else '>='} {low}"
        else:
            allowed = f"a number in {'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{_name(param)} must be {allowed}, got {value!r}")


def resolve_settings(family: str, dataset: str, **given) -> Settings:
    """The authors' defaults for ``family``/``dataset`` with the values in ``given`` (``None``: default)
    on top, validated. Raises ``ValueError`` naming the bad parameter and the allowed values."""
    if family not in FAMILIES:
        raise ValueError(f"family (--family) must be one of {', '.join(FAMILIES)}, got {family!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset (--dataset) must be one of {', '.join(DATASETS)}, got {dataset!r}")
    known = {f.name for f in fields(Settings)} - {"family", "dataset"}
    unknown = set(given) - known
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in given.items() if v is not None}
    alg = given.get("alg", "klass")
    if alg not in ALGS[family]:
        raise ValueError(f"{_name('alg')} must be one of {', '.join(ALGS[family])} for {family}, got {alg!r}")
    _refuse_what_does_not_apply(family, alg, given)
    values = dict(FAMILY_DEFAULTS[family], alg=alg)
    if alg == "klass":
        conf, kl = KLASS_DEFAULTS[(family, dataset)]
        values.update(conf_threshold=conf, kl_threshold=kl, kl_history_length=HISTORY_LENGTH, unmask_strategy="all")
    else:
        values.update({p: None for p in KLASS_PARAMS})
    values.update(given)
    s = Settings(family=family, dataset=dataset, **values)
    _check_values(s)
    return s


def _refuse_what_does_not_apply(family: str, alg: str, given: dict) -> None:
    """A ``ValueError`` for a cache mode that is not one, or a setting that does not apply to the family/alg."""
    use_cache = given.get("use_cache")
    if use_cache is not None and use_cache not in CACHE_MODES:
        raise ValueError(f"{_name('use_cache')} must be one of {', '.join(CACHE_MODES)}, got {use_cache!r}")
    if use_cache is not None and family == "dream" and alg == "origin":
        raise ValueError(f"{_name('use_cache')} takes Dream's klass, maskgit_plus, topk_margin or entropy, not origin")
    not_here = {"llada": ("top_p",), "dream": ("mask_id",) + (() if use_cache else ("block_length",))}[family]
    if alg != "klass":
        not_here += KLASS_PARAMS
    if use_cache is None:
        not_here += ("cache_refresh_every",)
    for param in not_here:
        if param in given:
            who = "alg='klass'" if param in KLASS_PARAMS else {
                "top_p": "Dream", "block_length": "LLaDA (and Dream with --use-cache)", "mask_id": "LLaDA",
                "cache_refresh_every": "--use-cache"}[param]
            raise ValueError(f"{_name(param)} applies to {who} only; drop it for {family} with alg={alg!r}")


def _check_values(s: Settings) -> None:
    """A ``ValueError`` naming the first setting of ``s`` out of its range."""
    _check_int("gen_length", s.gen_length)
    _check_int("steps", s.steps)
    _check_int("batch_size", s.batch_size)
    _check_int("seed", s.seed, minimum=0)
    _check_float("temperature", s.temperature, 0.0, math.inf)
    _check_float("timeout", s.timeout, 0.0, 3600.0, low_open=True)
    if s.mask_id is not None:
        _check_int("mask_id", s.mask_id, minimum=0)
    if s.cache_refresh_every is not None:
        _check_int("cache_refresh_every", s.cache_refresh_every)
    if s.family == "llada":
        _check_int("block_length", s.block_length)
        if s.gen_length % s.block_length:
            raise ValueError(f"gen_length ({s.gen_length}, --gen-length) must be a multiple of block_length "
                             f"({s.block_length}, --block-length)")
        blocks = s.gen_length // s.block_length
        if s.steps % blocks:
            raise ValueError(f"steps ({s.steps}, --steps) must be a multiple of the number of blocks "
                             f"gen_length // block_length = {blocks}")
    else:
        _check_float("top_p", s.top_p, 0.0, 1.0, low_open=True)
    if s.alg == "klass":
        try:
            KlassConfig(s.conf_threshold, s.kl_threshold, s.kl_history_length, s.unmask_strategy)
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise ValueError(str(e).replace(param, _name(param), 1)) from None


def describe(settings: Settings, given: Optional[dict] = None) -> str:
    """One line per setting, marking the ones that differ from the authors' defaults."""
    given = {k for k, v in (given or {}).items() if v is not None}
    lines = []
    for key, value in settings.to_dict().items():
        if value is None or key in ("family", "dataset"):
            continue
        mark = "  (set)" if key in given else ""
        lines.append(f"  {key:<18} {value}{mark}")
    return "\n".join(lines)
