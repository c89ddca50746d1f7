"""Data-parallel ``klass-patch eval``: the process's place in a launch, barriers, rank 0's word to every rank.

Under ``accelerate launch`` or ``torchrun`` each process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
from the environment. With ``WORLD_SIZE`` > 1, ``torch.distributed`` is initialised (gloo on CPU, nccl on
CUDA) for barriers and one broadcast (whether rank 0 got the output folder's lock) only: no tensors are
exchanged, the processes share their work through files (``results``: per-rank shards, merged by rank 0).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Optional

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


def cpu_launch_note(environ=None) -> Optional[str]:
    """What to say when ``accelerate launch --cpu`` started this process alone: accelerate's simple launcher
    sets ``ACCELERATE_USE_CPU`` and starts ONE process, whatever ``--num_processes`` says (no ``WORLD_SIZE``)."""
    environ = os.environ if environ is None else environ
    cpu = environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "y", "on")
    if not cpu or environ.get("WORLD_SIZE"):
        return None
    return ("note: ACCELERATE_USE_CPU is set but WORLD_SIZE is not: this is one process (accelerate launch --cpu "
            "starts one, whatever --num_processes says). For N CPU processes: accelerate launch --multi_gpu "
            "--num_processes N -m klass_patch eval ..., or torchrun --nproc_per_node N -m klass_patch eval ...")


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

    def share(self, obj):
        """Rank 0's ``obj`` (a picklable value), returned on every rank (every rank calls this)."""
        if self.world_size <= 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owned = False
