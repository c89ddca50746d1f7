"""Atomic file writes, for the installer and the evaluation outputs."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Optional


def atomic_write(path, data: bytes, mode: Optional[int] = 0o644) -> None:
    """Write a temporary file in the same folder, fsync it, then rename it over ``path`` (a symlink there is
    replaced, never written through). A failure at any point leaves ``path`` as it was and no temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".klass-tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
