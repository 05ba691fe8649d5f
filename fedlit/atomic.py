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


# ----------------------------------------------------------------------------------------- directory locks
_HELD: dict[str, object] = {}  # directory → the open lock file this process holds


def lock_dir(path: str | Path, name: str = ".lock", busy: str = "") -> None:
    """Hold ``path/name`` (an exclusive, non-blocking ``flock``) until :func:`unlock_dir`; if another process (or
    another open of this one) holds it, raise :class:`~fedlit.errors.FedlitError` with ``busy``. No-op where
    ``fcntl`` is missing. The lock goes with the process: a killed run leaves no stale lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    f = open(Path(path) / name, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        from .errors import FedlitError

        raise FedlitError(busy or f"{path} is locked by another process") from None
    _HELD[str(path)] = f


def unlock_dir(path: str | Path) -> None:
    f = _HELD.pop(str(path), None)
    if f is not None:
        f.close()


def dir_in_use(path: str | Path, name: str = ".lock") -> bool:
    """Some run (this process or another) holds ``path/name`` now."""
    if str(path) in _HELD:
        return True
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return False
    if not (Path(path) / name).exists():
        return False
    with open(Path(path) / name, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
