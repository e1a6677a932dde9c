"""Writing files so that a failure never leaves a truncated one behind, or destroys the one that was there."""
from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary name beside ``path`` (same directory, so the rename cannot cross file systems) for the block to
    write to; renamed over ``path`` when the block ends without an error, removed when it raises (a full disk, an
    interruption). Unique per call (mkstemp), so two threads writing one path do not share it; the file gets the
    permissions a plain open() would have given it (mkstemp makes 0600)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["atomic_path"]
