"""``klass-patch plot-steps``: pictures of step logs (matplotlib, Agg backend, imported only here).

- A step log of one example (``steps/<id>.jsonl`` of an eval folder, or any ``write_steps_jsonl`` file):
  for every generated position, the step it was decided at, its confidence and its KL divergence then.
- An eval folder run with ``--save-steps``: the distribution of the final KL (per example, the mean KL of
  its tokens at the step each was decided) of correct and incorrect answers, as in the paper's Figure 1b.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

KL_FLOOR = 1e-12  # KL values are >= 0; a log axis needs them > 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_steps(path) -> List[dict]:
    """Step records from JSON Lines (``write_steps_jsonl``) or a JSON list (the authors' stepwise files)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        records = json.loads(text)
        records = records if isinstance(records, list) else [records]
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not records or not all(isinstance(r, dict) and "decoded_tokens" in r for r in records):
        raise ValueError(f"{path} is not a step log (JSON records with 'step' and 'decoded_tokens'); "
                         "write one with eval --save-steps or klass_patch.write_steps_jsonl")
    return records


def plot_example(path, out=None, row: int = 0) -> Path:
    """Which position was decided at which step, with what confidence and KL. Returns the PNG's path."""
    records = read_steps(path)
    decided = [(rec.get("step", i), t["position"], t["confidence"], t["kl_divergence"])
               for i, rec in enumerate(records) for t in rec["decoded_tokens"] if t.get("row", 0) == row]
    if not decided:
        rows = sorted({t.get("row", 0) for rec in records for t in rec["decoded_tokens"]})
        raise ValueError(f"{path}: no token decided in row {row} (rows present: {rows})")
    step, pos, conf, kl = zip(*decided)
    kl = [max(float(k), KL_FLOOR) for k in kl]
    plt = _pyplot()
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(11, 8), sharex=True, gridspec_kw={"height_ratios": [2, 1, 1]},
                                  constrained_layout=True)
    points = a.scatter(pos, step, c=conf, cmap="viridis", vmin=0, vmax=1, s=14)
    fig.colorbar(points, ax=(a, b, c), label="confidence", shrink=0.6)
    a.set_ylabel("step decided")
    a.set_title(f"{Path(path).name}: {len(decided)} tokens decided in {len({s for s in step})} steps "
                f"({max(step) + 1} forwards)")
    b.scatter(pos, conf, s=8, color="tab:blue")
    b.set_ylabel("confidence")
    b.set_ylim(0, 1.02)
    c.scatter(pos, kl, s=8, color="tab:red")
    c.set_yscale("log")
    c.set_ylabel("KL when decided")
    c.set_xlabel("position")
    return _save(fig, plt, Path(out) if out else Path(path).with_suffix(".png"))


def plot_final_kl(folder, out=None) -> Path:
    """Histogram of the final KL of correct and incorrect answers of an eval folder (``--save-steps``)."""
    folder = Path(folder)
    results = folder / "results.jsonl"
    if not results.is_file():
        raise ValueError(f"{folder} is not an eval output folder (no results.jsonl)")
    groups = {True: [], False: []}
    for line in results.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("final_kl") is not None:
                groups[bool(r["correct"])].append(max(float(r["final_kl"]), KL_FLOOR))
    if not groups[True] and not groups[False]:
        raise ValueError(f"{results} has no final_kl values: run eval with --save-steps")
    values = groups[True] + groups[False]
    low, high = math.log10(min(values)), math.log10(max(values))
    log_axis = high - low >= 1  # a log axis once the values span a decade or more
    if not log_axis:
        low, high = min(values), max(values)
        low, high = (low - 0.5 * abs(low) - 1e-12, high + 0.5 * abs(high) + 1e-12) if high - low < 1e-9 else (low, high)
    edges = [low + (high - low) * i / 30 for i in range(31)]
    bins = [10 ** e for e in edges] if log_axis else edges
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for ok, color in ((True, "tab:green"), (False, "tab:red")):
        v = groups[ok]
        if v:
            ax.hist(v, bins=bins, alpha=0.55, color=color,
                    label=f"{'correct' if ok else 'incorrect'} (n={len(v)}, median {_median(v):.3g})")
    if log_axis:
        ax.set_xscale("log")
    ax.set_xlabel("final KL (mean KL of the generated tokens when decided)")
    ax.set_ylabel("examples")
    ax.set_title(f"{folder.name}: final KL of correct vs incorrect answers")
    ax.legend()
    return _save(fig, plt, Path(out) if out else folder / "final_kl.png")


def _median(v):
    v = sorted(v)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def _save(fig, plt, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_steps(log, out=None, row: int = 0) -> Path:
    """An eval folder: the final-KL figure; a file: the step figure of that example."""
    log = Path(log)
    if log.is_dir():
        return plot_final_kl(log, out)
    if not log.is_file():
        raise ValueError(f"plot-steps: no such file or folder: {log}")
    return plot_example(log, out, row)
