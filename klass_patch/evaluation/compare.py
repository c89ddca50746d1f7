"""``klass-patch eval --compare DIR...``: the paper's table (method, accuracy, steps, speed-ups) from the
``summary.json`` of several runs; speed-ups are against the first run given (put the baseline first)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

COLUMNS = ("method", "n", "accuracy", "avg steps", "step speed-up", "wall time (s)", "time speed-up")


def read_summary(path) -> dict:
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"--compare: {path} is not an eval output folder (no summary.json)")
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
        summary["run"], summary["average_steps"]  # noqa: B018  (the fields the table needs)
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"--compare: {file} is not a klass-patch eval summary ({e})") from None
    summary["path"] = str(path)
    return summary


def _ratio(base, value):
    return f"{base / value:.2f}x" if base and value else "-"


def table(summaries: List[dict]) -> str:
    """A text table, one row per run, with notes when the runs are not comparable."""
    base = summaries[0]
    rows = []
    for s in summaries:
        acc = "-" if s.get("accuracy") is None else f"{s['accuracy']:.2f}"
        steps = "-" if s.get("average_steps") is None else f"{s['average_steps']:.2f}"
        rows.append((s.get("method") or s["run"]["method"], str(s.get("n", "-")), acc, steps,
                     _ratio(base.get("average_steps"), s.get("average_steps")),
                     f"{s.get('wall_time_s', 0):.1f}", _ratio(base.get("wall_time_s"), s.get("wall_time_s"))))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    head = f"{base.get('model')} on {base.get('dataset')}"
    out = [head, line(COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows]
    notes = []
    for s in summaries[1:]:
        for key in ("dataset", "model", "n"):
            if s.get(key) != base.get(key):
                notes.append(f"note: {s['path']} has {key} {s.get(key)!r}, the first run {base.get(key)!r}")
    for s in summaries:
        if not s.get("complete", True):
            notes.append(f"note: {s['path']} is unfinished ({s.get('n')} of {s.get('total')} examples)")
    if len({s.get("versions", {}).get("cuda_device") for s in summaries}) > 1:
        notes.append("note: the runs were made on different devices; wall times are not comparable")
    return "\n".join(out + notes)


def compare(paths) -> str:
    if not paths:
        raise ValueError("--compare needs at least one eval output folder")
    return table([read_summary(p) for p in paths])
