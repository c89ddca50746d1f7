"""``klass-patch eval --compare DIR...``: the paper's table (method, accuracy, steps, speed-ups) from the
``summary.json`` of several runs, one row per run with its folder; speed-ups are against the first run given
(put the baseline first).

A speed-up compares samplers on one task, so it is shown only for runs that differ from the first in the
sampler alone (``SAMPLER``: alg, KLASS thresholds, cache). A run that differs in anything else (model, data,
dataset, gen_length, steps, block_length, temperature, top_p, seed, ...) gets ``NOT COMPARABLE`` in its
speed-up cells and a WARNING naming what differs. The time speed-up is the ratio of generation seconds per
example (the summary's ``wall_time_s`` / ``n``, which leaves loading out); it is not shown either where the
batch size or the device differ. Below the table, the settings that differ between the runs, per run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

COLUMNS = ("run", "folder", "method", "n", "accuracy", "avg steps", "step speed-up", "s/example",
           "time speed-up")
# What a speed-up compares: the sampler. Every other setting must match the first run's.
SAMPLER = ("alg", "conf_threshold", "kl_threshold", "kl_history_length", "unmask_strategy", "use_cache",
           "cache_refresh_every")
TIME_ONLY = ("batch_size", "device")  # change the time per example, not the steps
NOT_COMPARABLE = "NOT COMPARABLE"


def read_summary(path) -> dict:
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"--compare: {path} is not an eval output folder (no summary.json)")
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
        summary["run"]["settings"], summary["average_steps"]  # noqa: B018  (the fields the table needs)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--compare: {file} is not a klass-patch eval summary ({e})") from None
    summary["path"] = str(path)
    return summary


def identity(summary: dict) -> dict:
    """What a run was made with: its run settings, model, data, batch size and device."""
    run = summary["run"]
    return {**run["settings"], "model": run.get("model"), "data": run.get("data"),
            "batch_size": (summary.get("settings") or {}).get("batch_size", 1),
            "device": (summary.get("versions") or {}).get("cuda_device", "cpu")}


def differing(summaries: List[dict]) -> List[str]:
    """The settings whose values are not the same in every run."""
    ids = [identity(s) for s in summaries]
    keys = dict.fromkeys(k for i in ids for k in i)
    return [k for k in keys if len({json.dumps(i.get(k), sort_keys=True) for i in ids}) > 1]


def per_example(summary: dict):
    """Generation seconds per example (None without examples)."""
    n, seconds = summary.get("n"), summary.get("wall_time_s")
    return seconds / n if n and seconds is not None else None


def _ratio(base, value):
    return f"{base / value:.2f}x" if base and value else "-"


def _cell(value, fmt="{}"):
    return "-" if value is None else fmt.format(value)


def _row(number: int, s: dict, base: dict, task_ok: bool, time_ok: bool) -> tuple:
    steps, seconds = s.get("average_steps"), per_example(s)
    step_up = _ratio(base.get("average_steps"), steps) if task_ok else NOT_COMPARABLE
    time_up = _ratio(per_example(base), seconds) if task_ok and time_ok else NOT_COMPARABLE
    return (str(number), s["path"], s.get("method") or s["run"]["method"], _cell(s.get("n")),
            _cell(s.get("accuracy"), "{:.2f}"), _cell(steps, "{:.2f}"), step_up, _cell(seconds, "{:.3f}"), time_up)


def _lines(head, rows, left: int) -> List[str]:
    """Aligned text lines: the header, a rule, the rows (the first ``left`` columns to the left)."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(head).rstrip(), line(["-" * w for w in widths])] + [line(r).rstrip() for r in rows]


def _warnings(number: int, s: dict, base: dict) -> tuple:
    """(task_ok, time_ok, warning lines) of run ``number`` against the first."""
    mine, first = identity(s), identity(base)
    task = [k for k in differing([base, s]) if k not in SAMPLER + TIME_ONLY]
    time = [k for k in differing([base, s]) if k in TIME_ONLY]

    def what(keys):
        return ", ".join(f"{k} {first.get(k)!r} -> {mine.get(k)!r}" for k in keys)

    lines = []
    if task:
        lines.append(f"WARNING: run {number} ({s['path']}) differs from run 1 in more than the sampler: "
                     f"{what(task)}; its speed-ups are not comparable and are not shown")
    elif time:
        lines.append(f"WARNING: run {number} ({s['path']}) differs from run 1 in {what(time)}; its time per "
                     "example is not comparable and no time speed-up is shown")
    return not task, not time, lines


def table(summaries: List[dict]) -> str:
    """A text table, one row per run, then the settings that differ, warnings and notes."""
    base = summaries[0]
    rows, warnings = [], []
    for number, s in enumerate(summaries, 1):
        task_ok, time_ok, lines = _warnings(number, s, base) if number > 1 else (True, True, [])
        rows.append(_row(number, s, base, task_ok, time_ok))
        warnings += lines
    out = [f"{base.get('model')} on {base.get('dataset')}"] + _lines(COLUMNS, rows, left=3)
    keys = differing(summaries)
    if keys:
        ids = [identity(s) for s in summaries]
        out += ["", "settings that differ:"]
        out += _lines(("run",) + tuple(keys), [(str(n),) + tuple(_cell(i.get(k)) for k in keys)
                                              for n, i in enumerate(ids, 1)], left=len(keys) + 1)
    notes = [f"note: run {n} ({s['path']}) counts {s.get('n')} examples, run 1 {base.get('n')}: accuracies are "
             "over different examples" for n, s in enumerate(summaries[1:], 2) if s.get("n") != base.get("n")]
    notes += [f"note: run {n} ({s['path']}) is unfinished ({s.get('n')} of {s.get('total')} examples)"
              for n, s in enumerate(summaries, 1) if not s.get("complete", True)]
    return "\n".join(out + ([""] if warnings or notes else []) + warnings + notes)


def compare(paths) -> str:
    if not paths:
        raise ValueError("--compare needs at least one eval output folder")
    return table([read_summary(p) for p in paths])
