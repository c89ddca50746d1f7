"""An eval output folder's files: ``results.jsonl`` (one line per finished example), the per-rank shards of a
data-parallel run, ``summary.json`` (written by ``runner``), and the run's lock.

Lock: one run at a time writes a folder. The run's rank 0 holds an exclusive ``fcntl.flock`` on
``.klass-eval.lock`` for the whole run (taken before any merge, released at the end; the kernel releases it
if the process dies, so a killed run leaves no stale lock) and writes its PID there. Another run into the
same folder fails at once with ``OutputBusy``, naming the folder and that PID; under ``accelerate launch`` /
``torchrun`` its other ranks learn it from rank 0 (``Dist.share``) and fail too, instead of waiting at a
barrier. Where ``fcntl`` does not exist (Windows) no lock is taken.

Shards: every process of an N-process run appends the examples it finishes to its own shard,
``results.rank<R>.jsonl`` (no two processes append to one file); after a barrier, rank 0 merges the shards
into ``results.jsonl`` (one line per example, in the examples' order) and removes them. A run started again,
on any number of processes, first merges whatever shards an interrupted run left (lines cut short are
dropped), so resuming works per example whatever the number of processes before and after.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Dict, Iterable, List

from ..files import atomic_write

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

RESULTS = "results.jsonl"
SHARD = "results.rank{rank}.jsonl"
SHARD_RE = re.compile(r"^results\.rank\d+\.jsonl$")
LOCK = ".klass-eval.lock"


class OutputBusy(RuntimeError):
    """Another run holds the output folder's lock."""


def write_json_atomic(path, obj) -> None:
    """Write JSON atomically (temporary file in the same folder, then a rename)."""
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def load_results(path, log=print) -> dict:
    """Finished examples by id. Lines cut short by an interruption are dropped, and so is every line after
    the first for one id (left by runs that wrote one folder at once, before the lock); the file is then
    rewritten with what is kept."""
    path = Path(path)
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    done, dropped, repeated = {}, 0, 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
            key = str(record["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            dropped += line.strip() != ""
            continue
        repeated += key in done
        done.setdefault(key, record)
    if dropped or repeated or (text and not text.endswith("\n")):
        what = [f"{dropped} incomplete line(s) left by an interrupted run"] if dropped or not repeated else []
        what += [f"{repeated} repeated example(s) (the first line of each kept)"] if repeated else []
        log(f"{path}: dropped {' and '.join(what)}")
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in done.values()).encode("utf-8"))
    return done


def shard_path(out, rank: int) -> Path:
    return Path(out) / SHARD.format(rank=rank)


def shards(out) -> List[Path]:
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if SHARD_RE.match(p.name)), key=lambda p: p.name)


def merge_shards(out, order: Iterable[str], log=print) -> bool:
    """Fold every shard in ``out`` into ``results.jsonl`` (atomically; lines cut short are dropped) and
    remove the shards. Records are written in ``order`` (example ids), then any others; one line per id
    (the first found: ``results.jsonl``, then the shards by rank). Returns whether there was anything to
    merge. Safe to repeat: a merge interrupted before the shards went is merged again."""
    found = shards(out)
    if not found:
        return False
    records: Dict[str, dict] = dict(load_results(Path(out) / RESULTS, log))
    for path in found:
        for key, record in load_results(path, log).items():
            records.setdefault(key, record)
    rank = {key: i for i, key in enumerate(order)}
    ordered = sorted(records.values(), key=lambda r: (rank.get(str(r["id"]), len(rank)),))
    atomic_write(Path(out) / RESULTS, "".join(json.dumps(r) + "\n" for r in ordered).encode("utf-8"))
    for path in found:
        path.unlink()
    return True


class ShardFollower:
    """Rank 0's view of the other ranks' progress: new complete lines of their shards, read incrementally."""

    def __init__(self, out, ranks: Iterable[int]):
        self.paths = [shard_path(out, r) for r in ranks]
        self.offsets = {p: 0 for p in self.paths}

    def poll(self) -> List[dict]:
        new = []
        for path in self.paths:
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[path])
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # complete lines only; the rest is still being written
            for line in data[:end].splitlines():
                try:
                    new.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
            self.offsets[path] += end
        return new


# (PID, folder's real path) -> [lock file, depth]: the locks this process holds (a forked child holds none)
_HELD: Dict[tuple, list] = {}


def _holder(f) -> str:
    """What the lock file says of the run holding it (it writes its PID just after taking the lock)."""
    for _ in range(20):
        f.seek(0)
        text = f.read().strip()
        if text:
            return text
        time.sleep(0.05)
    return "PID unknown"


def lock_output(out) -> None:
    """Take ``out``'s lock (creating the folder), or raise ``OutputBusy``. Re-entrant within a process."""
    key = (os.getpid(), os.path.realpath(out))
    if key in _HELD:
        _HELD[key][1] += 1
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    f = open(Path(out) / LOCK, "a+", encoding="utf-8")
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(f)
            f.close()
            raise OutputBusy(f"{out} is being written by another klass-patch eval run ({holder}); wait for it "
                             "to end, or pass another --out") from None
    f.truncate(0)
    f.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD[key] = [f, 1]


def unlock_output(out) -> None:
    key = (os.getpid(), os.path.realpath(out))
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        held[0].close()  # closing the file releases the flock


@contextlib.contextmanager
def output_lock(out, dist=None):
    """Hold ``out``'s lock for the block. With ``dist`` (a ``Dist``; every rank calls this), rank 0 takes it
    and every rank learns whether it did: on ``OutputBusy`` all of them raise it."""
    main = dist is None or dist.is_main
    error = None
    if main:
        try:
            lock_output(out)
        except OutputBusy as e:
            error = str(e)
    if dist is not None:
        error = dist.share(error)
    if error:
        raise OutputBusy(error)
    try:
        yield
    finally:
        if main:
            unlock_output(out)
