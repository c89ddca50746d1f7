"""Datasets and prompts: examples from a local JSON/JSONL file or the public dataset, and the chat
messages the authors' evaluation sends for each (``src/llada_evaluation.py``, ``src/dream_evaluation.py``).

Fields read per dataset (the public datasets' own names; the authors' ``data/*.json`` files use them too):

- ``gsm8k``: ``question``, ``answer`` (``#### 18`` at the end);
- ``math500``: ``problem``, ``answer`` or ``solution`` (its last ``\\boxed{}``);
- ``humaneval``: ``task_id``, ``prompt``, ``test``, ``entry_point``;
- ``mbpp``: ``task_id``, ``prompt`` (or ``text``), ``test_list``, optional ``test_imports``.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .scoring import gsm8k_gold, last_boxed
from .settings import DATASETS

# The authors' system messages, quoted from their test_dataset / test_humaneval.
REASONING_SYSTEM = ("Your task is to answer the question below. Give step by step reasoning before you answer, "
                    "and when you're ready to answer, please use the format 'The final answer is'.")
CODE_SYSTEM = "You complete only Python code."

# (path, config, split) of the public datasets, loaded with ``datasets.load_dataset`` when no file is given.
PUBLIC = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "humaneval": ("openai/openai_humaneval", None, "test"),
    "mbpp": ("google-research-datasets/mbpp", "sanitized", "test"),  # as the authors' test_mbpp
}
REQUIRED = {
    "gsm8k": (("question",), ("answer",)),
    "math500": (("problem",), ("answer", "solution")),
    "humaneval": (("task_id",), ("prompt",), ("test",), ("entry_point",)),
    "mbpp": (("task_id",), ("prompt", "text"), ("test_list",)),
}


@dataclass
class Example:
    id: str
    question: str  # the text put in the user message before formatting
    gold: Optional[str]  # reference answer (math datasets) or None (code datasets: the tests decide)
    raw: dict = field(repr=False, default_factory=dict)


def read_records(path) -> List[dict]:
    """A JSON list (or ``{"data": [...]}``), or JSON Lines; ``.gz`` files are decompressed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data: no such file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        records = whole
    elif isinstance(whole, dict):
        records = whole["data"] if isinstance(whole.get("data"), list) else [whole]
    else:  # JSON Lines (the authors' data/*_test.json files are JSON Lines too)
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"--data: {path} line {number} is not JSON: {e}") from None
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"--data: {path} must hold JSON objects, one per example")
    return records


def load_public(dataset: str) -> List[dict]:
    try:
        import datasets  # noqa: F401  (optional dependency, imported only here)
    except ImportError:
        raise ValueError(f"no --data file given and the `datasets` package is not installed: pip install "
                         f"datasets (to load {PUBLIC[dataset][0]}), or pass --data PATH (JSON or JSONL)") from None
    name, config, split = PUBLIC[dataset]
    return [dict(r) for r in datasets.load_dataset(name, config, split=split)]


def make_examples(dataset: str, records: List[dict], source: str = "data") -> List[Example]:
    """Check the fields and build examples; ids are ``task_id`` for code, the position otherwise."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset (--dataset) must be one of {', '.join(DATASETS)}, got {dataset!r}")
    examples, seen = [], set()
    for i, r in enumerate(records):
        for options in REQUIRED[dataset]:
            if not any(r.get(k) is not None for k in options):
                raise ValueError(f"{source}: example {i} of {dataset} lacks the field {' or '.join(options)!r} "
                                 f"(has: {', '.join(sorted(r)) or 'nothing'})")
        if dataset == "gsm8k":
            ex = Example(str(i), r["question"], gsm8k_gold(str(r["answer"])), r)
            if ex.gold is None:
                raise ValueError(f"{source}: example {i} of gsm8k has no '#### <number>' in its answer")
        elif dataset == "math500":
            gold = r.get("answer")
            gold = str(gold) if gold is not None else last_boxed(r["solution"])
            if gold is None:
                raise ValueError(f"{source}: example {i} of math500 has no 'answer' and no \\boxed{{}} in its solution")
            ex = Example(str(i), r["problem"], gold, r)
        elif dataset == "humaneval":
            ex = Example(str(r["task_id"]), r["prompt"], None, r)
        else:
            ex = Example(str(r["task_id"]), r.get("prompt") or r["text"], None, r)
        if ex.id in seen:
            raise ValueError(f"{source}: duplicate example id {ex.id!r}")
        seen.add(ex.id)
        examples.append(ex)
    return examples


def load_examples(dataset: str, path=None, limit: Optional[int] = None) -> List[Example]:
    """The first ``limit`` examples (as the authors' ``--test_size``) of ``path`` or the public dataset."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit (--limit) must be an int >= 0, got {limit!r}")
    records = read_records(path) if path is not None else load_public(dataset)
    examples = make_examples(dataset, records, source=str(path or PUBLIC[dataset][0]))
    return examples if limit is None else examples[:limit]


def messages(dataset: str, example: Example) -> List[dict]:
    """The chat messages of the authors' evaluation for one example."""
    if dataset in ("gsm8k", "math500"):
        return [{"role": "system", "content": REASONING_SYSTEM}, {"role": "user", "content": example.question}]
    if dataset == "humaneval":
        return [{"role": "system", "content": CODE_SYSTEM}, {"role": "user", "content": example.question}]
    # test_mbpp: a single user message; the tests are shown as the Python list's repr, as the f-string does.
    tests = list(example.raw["test_list"])
    return [{"role": "user", "content": f"You are an expert Python programmer, and here is your task: "
                                        f"{example.question} Your code should pass these tests:\n\n{tests}\n[BEGIN]"}]
