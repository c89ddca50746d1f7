"""Data-parallel ``klass-patch eval``: the process's place in a launch, a barrier, and the results shards.

Under ``accelerate launch`` or ``torchrun`` each process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
from the environment. With ``WORLD_SIZE`` > 1, ``torch.distributed`` is initialised (gloo on CPU, nccl on
CUDA) for barriers only: no tensors are exchanged, the processes share their work through files.

Output folder of a run on N processes: every process appends the examples it finishes to its own shard,
``results.rank<R>.jsonl`` (no two processes append to one file); after a barrier, rank 0 merges the shards
into ``results.jsonl`` (one line per example, in the examples' order) and removes them. A run started again,
on any number of processes, first merges whatever shards an interrupted run left (lines cut short are
dropped), so resuming works per example whatever the number of processes before and after.
"""
from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

RESULTS = "results.jsonl"
SHARD = "results.rank{rank}.jsonl"
SHARD_RE = re.compile(r"^results\.rank\d+\.jsonl$")
# A barrier waits for the slowest process; generous, since a rank's share of a run can take hours.
BARRIER_TIMEOUT = datetime.timedelta(hours=72)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass
class Dist:
    """This process's place in a (possibly one-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _owned: bool = field(default=False, repr=False)

    @classmethod
    def from_env(cls) -> "Dist":
        world = _env_int("WORLD_SIZE", 1)
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", _env_int("RANK", 0))
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world} from the environment do not fit together")
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: Optional[str]) -> str:
        """The device of this process: cuda:LOCAL_RANK where CUDA is there (``--device cuda`` too), else
        ``requested`` as given (``cuda:3`` stays ``cuda:3``), else cpu."""
        import torch

        if requested is None:
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if self.world_size > 1 and requested == "cuda":
            return f"cuda:{self.local_rank}"
        return requested

    def setup(self, device) -> None:
        """Initialise torch.distributed (once) where there is more than one process."""
        if self.world_size <= 1:
            return
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return
        device = torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size, timeout=BARRIER_TIMEOUT)
        self._owned = True

    def barrier(self) -> None:
        if self.world_size <= 1:
            return
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owned = False


def shard_path(out, rank: int) -> Path:
    return Path(out) / SHARD.format(rank=rank)


def shards(out) -> List[Path]:
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if SHARD_RE.match(p.name)), key=lambda p: p.name)


def merge_shards(out, order: Iterable[str], log=print) -> bool:
    """Fold every shard in ``out`` into ``results.jsonl`` (atomically; lines cut short are dropped) and
    remove the shards. Records are written in ``order`` (example ids), then any others. Returns whether
    there was anything to merge. Safe to repeat: a merge interrupted before the shards went is merged again,
    and an id is written once."""
    from ..files import atomic_write
    from .runner import load_results

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
