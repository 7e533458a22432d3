"""File helpers shared by the checkpoint, reference-cache and length-index code: content hashes,
writes that never leave a half-written file, and flushing to disk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """The sha256 of a file's bytes, read in chunks (hashlib releases the GIL: threads help)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename, so a crash or a full disk never leaves a half-written file under ``path``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders) to disk, so that what is written after
    (a completion marker) cannot reach the disk before it (a power cut, not just a kill)."""
    for path in sorted(folder.rglob("*")) + [folder]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems refuse fsync on folders
        finally:
            os.close(fd)
