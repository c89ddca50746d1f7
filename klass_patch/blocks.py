"""Rows in blocks: where each row of a batch is, on the host and on the device (both families' decoding loops).

A decoding loop keeps, per row, its current block and the step index inside it. The host's copy decides what the
host does (which rows a cached forward sends, which rows move on, when the run ends); the device's copy feeds the
tensor work (window positions, the step's guard and schedule). Both advance on the same per-row flags, which leave
the device in the loop's one transfer per forward, so the host never reads the device's copy.
"""
from __future__ import annotations

from typing import List, Optional

import torch

__all__ = ["RowBlocks", "rows_where", "window_of"]


class RowBlocks:
    """``count`` blocks of ``width`` positions from position ``first``, for ``rows`` rows; a row is active until it
    moves past its last block."""

    def __init__(self, rows: int, first: int, width: int, count: int, device):
        self.rows, self.first, self.width, self.count = rows, first, width, count
        self.block, self.step = [0] * rows, [0] * rows
        self.block_t = torch.zeros(rows, dtype=torch.long, device=device)
        self.step_t = torch.zeros_like(self.block_t)
        self._offsets = torch.arange(width, device=device)

    @property
    def active(self) -> List[bool]:
        return [b < self.count for b in self.block]

    @property
    def active_t(self) -> torch.Tensor:
        return self.block_t < self.count

    def starts(self) -> List[int]:
        """Each row's block start (a row past its last block: the end of the last one)."""
        return [self.first + b * self.width for b in self.block]

    def starts_t(self) -> torch.Tensor:
        return self.first + self.block_t * self.width

    def positions_t(self) -> torch.Tensor:
        """``[rows, width]``: the positions of each row's block (a row past its last block: the last block's)."""
        return (self.first + self.block_t.clamp(max=self.count - 1) * self.width).unsqueeze(-1) + self._offsets

    def common_start(self) -> Optional[int]:
        """The block start the active rows share, or None when they differ."""
        starts = {s for s, a in zip(self.starts(), self.active) if a}
        return starts.pop() if len(starts) == 1 else None

    def advance(self, ended: List[int], ended_t: torch.Tensor) -> None:
        """Rows with ``ended`` (host flags; ``ended_t`` the same on the device) move to their next block."""
        self.move([b + int(e) for b, e in zip(self.block, ended)], self.block_t + ended_t.long())

    def move(self, block: List[int], block_t: torch.Tensor) -> None:
        """After a step: each row's block is now ``block`` (host; ``block_t`` the same on the device). A row that
        changed block is at its step 0, another active row at its next step."""
        active_t = self.active_t
        self.step_t = torch.where(block_t != self.block_t, 0, self.step_t + active_t.long())
        self.block_t = block_t
        for r, (b, live) in enumerate(zip(block, self.active)):
            self.step[r] = 0 if b != self.block[r] else self.step[r] + live
            self.block[r] = b


def rows_where(mask_t: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the ``count`` True entries of ``mask_t`` (``[rows]`` bool), in order, without a host read
    (``count`` is known to the host): a stable sort puts them first."""
    return torch.argsort((~mask_t).to(torch.int8), stable=True)[:count]


def window_of(logits: torch.Tensor, blocks: RowBlocks, shift: int = 0) -> torch.Tensor:
    """Each row's block of a full forward's ``[rows, length, V]`` logits, read ``shift`` positions earlier (Dream: the
    logits at i - 1 predict i; position 0 reads itself): a view when the active rows share their block, else
    gathered."""
    start = blocks.common_start()
    if start is not None and start - shift >= 0:
        return logits[:, start - shift:start - shift + blocks.width]
    read = (blocks.positions_t() - shift).clamp_(min=0)
    return logits[torch.arange(blocks.rows, device=logits.device).unsqueeze(-1), read]
