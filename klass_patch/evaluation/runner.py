"""The evaluation loop: prompts in, generations out, scored, written one line per example, resumable.

Output folder:

- ``results.jsonl``: one JSON object per example, appended and flushed as soon as it is scored: ``id``,
  ``prompt``, ``generation``, ``answer`` (parsed answer, or the code that was run), ``gold``, ``correct``,
  ``steps`` (model forwards), ``seconds`` (generation wall time; a batch's time split evenly over its rows),
  ``tokens`` (generated positions), and ``exec`` (code datasets), ``final_kl`` and ``steps_log`` (with
  ``save_steps``). A run started again with the same settings skips the examples already there.
- ``summary.json`` (written atomically, after every batch): accuracy, average steps, tokens per second,
  wall time, all settings, package versions (and what klass-patch patched); ``complete`` says whether
  every example is done; ``run`` holds what a resumed run must match.
- ``steps/<id>.jsonl`` with ``save_steps``: the example's step records (``klass_patch.write_steps_jsonl``).
- On N processes (``accelerate launch`` / ``torchrun``, see ``distributed``): ``results.rank<R>.jsonl`` per
  process while it runs, merged by rank 0 into ``results.jsonl`` at the end (and at the start of a resumed
  run); the summary then covers every example once and records ``world_size``.
- ``.klass-eval.lock``: held by the run writing the folder (its PID inside); a second run into the folder
  fails at once, naming that PID (see ``results``).

Reproducibility: example ``i`` (its index in ``examples``) is generated after ``torch.manual_seed(seed + i)``,
whatever the batch size and whether the run was resumed. The samplers draw one random stream for all the
rows of a batch, so where sampling is random (temperature > 0, LLaDA ``random`` remasking, Dream ``origin``)
each example is generated alone, whatever ``batch_size`` says; batches are used only where sampling draws
no random numbers, and there a row comes out as alone (up to the rounding of batched model forwards).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

from .data import Example, messages
from .distributed import Dist
from .execution import humaneval_program, mbpp_program, run_program
from .generation import Generator, decode, encode, final_kl, split_history
from .results import RESULTS, SHARD, ShardFollower, load_results, merge_shards, output_lock, write_json_atomic
from .scoring import extract_math_answer, humaneval_code, math_equal, mbpp_code, parse_gsm8k_answer
from .settings import CODE_DATASETS, Settings

SUMMARY, STEPS = "summary.json", "steps"
# Settings that do not change what a run generates: a run may be resumed with other values of these.
# (batch_size: see rows_per_call.)
NOT_IN_RUN_KEY = ("batch_size", "save_steps")


def example_seed(seed: int, index: int) -> int:
    """The torch seed of example ``index`` (its position in the examples) in a run with ``seed``."""
    return seed + index


class CodeExecutionRefused(ValueError):
    """A code dataset was asked for without allow_code_execution."""


def refuse_code_execution(dataset: str, allow: bool) -> None:
    if dataset in CODE_DATASETS and not allow:
        raise CodeExecutionRefused(
            f"{dataset} is scored by running the model's code against the tests; pass --allow-code-execution "
            "(allow_code_execution=True) to accept that. The code runs in a separate process with a timeout "
            "and memory/CPU limits, not in a sandbox: use a container or VM for untrusted models.")


def versions() -> dict:
    import platform
    from importlib import metadata

    import klass_patch

    found = {"python": platform.python_version(), "klass-patch": klass_patch.__version__, "torch": torch.__version__}
    for dist in ("transformers", "tokenizers", "math-verify", "datasets"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        found["cuda_device"] = torch.cuda.get_device_name()
    found["patched"] = [dataclasses.asdict(p) for p in klass_patch.patched()]
    return found


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def grade(dataset: str, example: Example, generation: str, timeout: float) -> dict:
    """``answer``, ``correct`` (and ``exec`` for code) of one generation."""
    if dataset == "gsm8k":
        answer = parse_gsm8k_answer(generation)
        return {"answer": answer, "correct": answer == example.gold}
    if dataset == "math500":
        answer = extract_math_answer(generation)
        return {"answer": answer, "correct": math_equal(example.gold, answer)}
    if dataset == "humaneval":
        code = humaneval_code(generation)
        result = run_program(humaneval_program(example.raw, code), timeout)
    else:
        code = mbpp_code(generation)
        result = run_program(mbpp_program(example.raw, code), timeout)
    return {"answer": code, "correct": result.passed, "exec": result.status}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summarize(records: List[dict], total: int, run: dict, started: float, settings: Settings,
              world_size: int = 1) -> dict:
    """The summary of the examples done so far (``records``) out of ``total``."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    seconds = sum(r["seconds"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return {
        "model": run["model"], "family": run["settings"]["family"], "dataset": run["settings"]["dataset"],
        "method": run["method"],
        "n": n, "total": total, "complete": n == total, "correct": correct,
        "accuracy": round(100.0 * correct / n, 2) if n else None,
        "average_steps": round(sum(r["steps"] for r in records) / n, 2) if n else None,
        "tokens_per_second": round(tokens / seconds, 2) if seconds else None,
        "wall_time_s": round(seconds, 3),  # generation time of the examples counted, over every session
        "session_time_s": round(time.time() - started, 3),  # this session, loading excluded, scoring included
        "world_size": world_size,  # processes of the latest session (data parallel: examples split among them)
        "settings": settings.to_dict(), "run": run, "versions": versions(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_eval(model, tokenizer, examples: List[Example], settings: Settings, out_dir, *, generate_fn=None,
             allow_code_execution: bool = False, model_name: Optional[str] = None, data_source: str = "",
             progress: bool = True, log: Callable = print, dist: Optional[Dist] = None) -> dict:
    """Evaluate ``model`` on ``examples`` with ``settings``; write ``out_dir``; return the summary.

    ``generate_fn``: for LLaDA, the upstream ``generate`` function or its module (patched here). Examples
    already in ``out_dir/results.jsonl`` from a run with the same settings are skipped; a folder holding a
    run with other settings is refused, and so is a folder another run is writing (``OutputBusy``, naming
    its PID: the run holds ``out_dir``'s lock from start to end, see ``results``). Raises ``ValueError`` on
    bad input before any model forward.

    ``dist``: this process's place in a data-parallel run (``Dist.from_env()`` under ``accelerate launch`` /
    ``torchrun``; default one process). Every process calls ``run_eval`` with the same arguments; the examples
    still to do are split by their position among them (``i % world_size``); each process writes its own
    shard; rank 0 merges them after a barrier and writes the summary, which it returns (the other ranks
    return the summary of their own share). See ``distributed``.
    """
    refuse_code_execution(settings.dataset, allow_code_execution)
    generator = Generator(model, settings, generate_fn, tokenizer)
    s = generator.settings  # LLaDA's mask_id resolved
    if not examples:
        raise ValueError("no examples to evaluate (check --data and --limit)")
    if generator.rows < s.batch_size:
        log(f"batch_size {s.batch_size}: sampling is random here (temperature {s.temperature}, alg {s.alg}), so "
            "each example is generated alone, with its own seed, to give the same text at any batch size")
    dist = dist or Dist()
    if not dist.is_main:
        progress, log = False, (lambda *_: None)
    out = Path(out_dir)
    run = make_run(s, model_name or type(model).__name__, data_source)
    check_resumable(out, run)
    device = getattr(model, "device", "cpu")
    dist.setup(device)
    with output_lock(out, dist):  # rank 0 holds it; a second run into `out` fails here, on every rank
        check_resumable(out, run)  # again: the folder cannot change under us from now on
        return _Session(generator, tokenizer, examples, out, run, dist, device, log).run(progress)


class _Session:
    """One ``run_eval`` call, once the folder is locked: resume, generate this process's share, merge."""

    def __init__(self, generator: Generator, tokenizer, examples, out: Path, run: dict, dist: Dist, device, log):
        self.generator, self.tokenizer, self.examples, self.out, self.run_key = generator, tokenizer, examples, out, run
        self.s, self.dist, self.device, self.log = generator.settings, dist, device, log
        self.order = [ex.id for ex in examples]
        self.counted: List[dict] = []  # the whole run's finished examples (rank 0: the other ranks' too)
        self.own: List[dict] = []  # this process's, this session
        self.started = time.time()

    def summary(self, records=None, total=None) -> dict:
        records = self.counted if records is None else records
        total = len(self.examples) if total is None else total
        return summarize(records, total, self.run_key, self.started, self.s, self.dist.world_size)

    def resume(self) -> list:
        """Merge what an earlier run left, read what is done, and return this process's share of the rest."""
        out, dist, log = self.out, self.dist, self.log
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            merge_shards(out, self.order, log)  # shards an interrupted run left, on any number of processes
            done = load_results(out / RESULTS, log)
        dist.barrier()  # rank 0 has merged: every rank now reads the same finished examples
        if not dist.is_main:
            done = load_results(out / RESULTS, log)
        ids = set(self.order)
        self.counted = [r for i, r in done.items() if i in ids]
        pending = [(i, ex) for i, ex in enumerate(self.examples) if ex.id not in done]
        if self.counted:
            log(f"Resuming {out}: {len(self.counted)} of {len(self.examples)} examples already done, "
                f"{len(pending)} to go.")
        if dist.world_size > 1:
            log(f"{dist.world_size} processes share the {len(pending)} examples to do (rank r takes positions r, "
                f"r + {dist.world_size}, ...); their shards are merged into {out / RESULTS} at the end.")
        if dist.is_main:
            write_json_atomic(out / SUMMARY, self.summary())
        if self.s.save_steps:
            (out / STEPS).mkdir(exist_ok=True)
        return pending[dist.rank::dist.world_size]

    def run(self, progress: bool) -> dict:
        from tqdm import tqdm

        mine = self.resume()
        bar = tqdm(total=len(self.examples), initial=len(self.counted), desc=f"{self.s.dataset} {self.s.alg}",
                   disable=not progress, dynamic_ncols=True)
        finished = False
        try:
            self.generate(mine, bar)
            finished = True
        finally:
            summary = self.finish(finished, bar, len(mine))
        return summary

    def generate(self, mine: list, bar) -> None:
        """Generate, score and append (flushed) each example of ``mine``; rank 0 follows the others' shards."""
        dist, out = self.dist, self.out
        others = ShardFollower(out, range(1, dist.world_size)) if dist.is_main and dist.world_size > 1 else None
        target = out / (RESULTS if dist.world_size == 1 else SHARD.format(rank=dist.rank))
        with open(target, "a", encoding="utf-8") as f:
            for start in range(0, len(mine), self.generator.rows):
                for record in self.batch(mine[start:start + self.generator.rows]):
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    self.counted.append(record)
                    self.own.append(record)
                    bar.update(1)
                if others is not None:  # the whole run's progress: the other ranks' finished examples too
                    theirs = others.poll()
                    self.counted.extend(theirs)
                    bar.update(len(theirs))
                if dist.is_main:
                    n = len(self.counted)
                    bar.set_postfix(acc=f"{100 * sum(bool(r['correct']) for r in self.counted) / n:.1f}%",
                                    steps=f"{sum(r['steps'] for r in self.counted) / n:.1f}")
                    write_json_atomic(out / SUMMARY, self.summary())

    def batch(self, batch: list) -> List[dict]:
        """The records of one sampler call's examples (``(index, example)`` pairs)."""
        s, tokenizer = self.s, self.tokenizer
        prompts = [tokenizer.apply_chat_template(messages(s.dataset, ex), add_generation_prompt=True,
                                                 tokenize=False) for _, ex in batch]
        ids, mask = encode(tokenizer, prompts, s.family, self.device)
        torch.manual_seed(example_seed(s.seed, batch[0][0]))  # several rows: nothing drawn at random
        _sync(self.device)
        t0 = time.perf_counter()
        sequences, used, history = self.generator(ids, mask)
        _sync(self.device)
        seconds = (time.perf_counter() - t0) / len(batch)
        records = []
        for row, ((_, ex), prompt) in enumerate(zip(batch, prompts)):
            generation = decode(tokenizer, sequences[row, ids.shape[1]:].cpu(), s.family, s.dataset)
            record = {"id": ex.id, "prompt": prompt, "generation": generation, "gold": ex.gold,
                      **grade(s.dataset, ex, generation, s.timeout), "steps": used[row],
                      "seconds": round(seconds, 4), "tokens": s.gen_length}
            if history is not None:
                self.write_steps(record, split_history(history, row, len(batch)))
            records.append(record)
        return records

    def write_steps(self, record: dict, steps: list) -> None:
        from .. import write_steps_jsonl

        record["final_kl"] = final_kl(steps)
        record["steps_log"] = f"{STEPS}/{_safe(record['id'])}.jsonl"
        write_steps_jsonl(steps, self.out / record["steps_log"])

    def finish(self, finished: bool, bar, share: int) -> dict:
        """After the last batch (or an error): merge the shards (rank 0, once every rank is done), the summary."""
        dist = self.dist
        if dist.world_size > 1 and finished:
            dist.barrier()  # every shard is complete and flushed
        if not dist.is_main:
            bar.close()
            return self.summary(self.own, share)
        if dist.world_size > 1 and finished:
            merge_shards(self.out, self.order, self.log)
            merged = load_results(self.out / RESULTS, self.log)
            self.counted = [merged[i] for i in self.order if i in merged]
            bar.update(len(self.counted) - bar.n)
        bar.close()
        summary = self.summary()
        write_json_atomic(self.out / SUMMARY, summary)
        return summary


def make_run(settings: Settings, model_name: str, data_source: str) -> dict:
    """What identifies a run: a folder holding another run is not resumed with this one."""
    key = {k: v for k, v in settings.to_dict().items() if k not in NOT_IN_RUN_KEY and
           not (k in ("use_cache", "cache_refresh_every") and v is None)}  # runs made before the cache resume
    return {"model": model_name, "data": data_source, "method": settings.label(), "settings": key}


def check_resumable(out, run: dict, ignore=()) -> None:
    """Raise ``ValueError`` if ``out`` holds a run made with other settings (``ignore``: keys not compared)."""
    path = Path(out) / SUMMARY
    if not path.exists():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))["run"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return
    diff = [k for k in sorted(set(before["settings"]) | set(run["settings"]))
            if k not in ignore and before["settings"].get(k) != run["settings"].get(k)]
    diff += [k for k in ("model", "data") if before.get(k) != run.get(k)]
    if diff:
        what = ", ".join(f"{k}: {before['settings'].get(k, before.get(k))!r} -> "
                         f"{run['settings'].get(k, run.get(k))!r}" for k in diff)
        raise ValueError(f"{out} holds a run with other settings ({what}); resume it with the same settings, "
                         "or pass another --out")
