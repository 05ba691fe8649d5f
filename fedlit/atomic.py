"""The one way fedlit writes a file that must never be seen half-written (results, checkpoints, the feature cache)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable, mode: str = "wb", unique: bool = True,
                 before_replace: Callable[[], None] | None = None) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, then ``os.replace`` it over ``path``; on any
    failure the temporary file is removed and ``path`` is untouched.

    ``unique``: a fresh temporary name (concurrent writers of one path); otherwise ``<name>.tmp`` (a name a run
    directory knows). ``before_replace`` runs between the fsync and the rename (crash tests).
    """
    path = Path(path)
    if unique:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 → what open() would give (0644 under umask 022)
        f = os.fdopen(fd, mode)
    else:
        tmp = str(path.with_name(path.name + ".tmp"))
        f = open(tmp, mode)
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    """JSON (indented, NaN allowed) written atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, allow_nan=True), mode="w", unique=False)


__all__ = ["atomic_write", "write_json_atomic"]
