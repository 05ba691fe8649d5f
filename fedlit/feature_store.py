"""Where cached frozen features live (:mod:`fedlit.features`): one in-memory tensor per split, or one memory-mapped
``.npy`` per split on disk with a CRC-checked index of filled rows (what a cache directory's name digests is in
:mod:`fedlit.features`).

Files of one cache directory: ``data.npy`` (float32 ``[N, *row_shape]``, created once — written as a temporary
file then ``os.replace``-d), ``index.npy`` (int64 ``[N]``: bit 32 set = row filled, low 32 bits = the row's
CRC-32; rewritten atomically, after the rows it claims were flushed) and ``meta.json``. A crash can leave rows
written but unclaimed (re-encoded next time), never a claimed row that was not written; a row whose bytes do not
match its CRC (a damaged file) is re-encoded; an unreadable or truncated file is discarded and rebuilt. Creation
and index updates hold an exclusive ``flock`` on ``<dir>.lock``, so two processes can fill one cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
import weakref
import zlib
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write as _atomic_write

#: Bump when anything that changes cached values without changing the key inputs changes (e.g. the resize).
FORMAT_VERSION = 3  # 2: rows encoded in fixed blocks (feature_layout.block_layout); 3: slots by rank in the layout
_FILLED = np.int64(1 << 32)
_CRC_MASK = np.int64((1 << 32) - 1)
_FLUSH_EVERY_S = 2.0


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class _MemoryStore:
    """Rows ``[N, *row_shape]`` in one tensor (allocated at the first write, on the features' device)."""

    def __init__(self, n: int):
        self.n = n
        self.data: torch.Tensor | None = None
        self.have = np.zeros(n, dtype=bool)
        self.corrupt_rows = 0

    def missing(self, idx: np.ndarray) -> np.ndarray:
        return np.unique(idx[~self.have[idx]])

    def write(self, rows: np.ndarray, values: torch.Tensor) -> None:
        if self.data is None:
            self.data = torch.empty(self.n, *values.shape[1:], device=values.device)
        self.data[torch.as_tensor(rows, device=values.device)] = values
        self.have[rows] = True

    def read(self, idx: np.ndarray, device: torch.device) -> torch.Tensor:
        return self.data[torch.as_tensor(idx, device=self.data.device)]

    def flush(self, force: bool = False) -> None:
        pass


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def _atomic_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), mode="w")


def _crc_rows(arr: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(arr).reshape(len(arr), -1)
    return np.fromiter((zlib.crc32(r) for r in flat), dtype=np.int64, count=len(flat))


@contextlib.contextmanager
def _flock(path: Path):
    """An exclusive advisory lock on ``path`` (created if missing); a no-op where ``fcntl`` is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _IndexState:
    """What a pending index flush needs (kept apart from the store so that a finaliser can flush it)."""

    def __init__(self, path: Path, n: int):
        self.path, self.n = path, n
        self.mm: np.memmap | None = None
        self.inode: int | None = None
        self.index = np.zeros(n, dtype=np.int64)
        self.dirty = False
        self.last_flush = time.monotonic()

    @property
    def lock(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def read_index(self) -> np.ndarray | None:
        try:
            idx = np.load(self.path / "index.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return idx if idx.shape == (self.n,) and idx.dtype == np.int64 else None

    def flush(self) -> None:
        if not self.dirty or self.mm is None:
            return
        self.mm.flush()  # the rows reach the file before the index claims them
        with _flock(self.lock):
            try:
                same_file = os.stat(self.path / "data.npy").st_ino == self.inode
            except OSError:
                same_file = False
            if same_file:  # merge: rows other processes claimed meanwhile are kept (and verified when read)
                disk = self.read_index()
                if disk is not None:
                    self.index = np.where((self.index & _FILLED) != 0, self.index, disk)
                _atomic_save(self.path / "index.npy", self.index)
        self.dirty = False
        self.last_flush = time.monotonic()


class _DiskStore:
    """Rows ``[N, *row_shape]`` in ``<dir>/data.npy`` (memory-mapped), claimed in ``<dir>/index.npy``."""

    def __init__(self, path: Path, key: dict, n: int):
        self.path, self.key, self.n = path, _jsonable(key), n
        self.st = _IndexState(path, n)
        self.trusted = np.zeros(n, dtype=bool)  # rows whose CRC this process checked (or wrote)
        self.corrupt_rows = 0  # rows found damaged and re-encoded
        self.rebuilt: str | None = None  # why an existing cache was discarded, if it was
        path.parent.mkdir(parents=True, exist_ok=True)
        with _flock(self.st.lock):
            self._open()
        self._finalizer = weakref.finalize(self, self.st.flush)

    # -- opening / creating (under the lock)
    def _open(self) -> None:
        meta_path = self.path / "meta.json"
        if not self.path.exists():
            return
        if not meta_path.exists():  # meta.json is written last: a creation that never finished claimed nothing
            self._discard(None)
            return
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != self.key:
                raise ValueError("meta.json holds another key")
            row_shape = tuple(int(s) for s in meta["row_shape"])
            mm = np.load(self.path / "data.npy", mmap_mode="r", allow_pickle=False)  # "r": a short file raises
            if mm.dtype != np.float32 or mm.shape != (self.n, *row_shape):
                raise ValueError(f"data.npy is {mm.dtype} {mm.shape}, expected float32 {(self.n, *row_shape)}")
            mm = np.load(self.path / "data.npy", mmap_mode="r+", allow_pickle=False)  # ("r+" would extend it)
            if mm.dtype != np.float32 or mm.shape != (self.n, *row_shape):
                raise ValueError(f"data.npy is {mm.dtype} {mm.shape}, expected float32 {(self.n, *row_shape)}")
            index = self.st.read_index()
            if index is None:
                raise ValueError("index.npy is missing or malformed")
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            self._discard(f"{type(e).__name__}: {str(e)[:200]}")
            return
        self.st.mm, self.st.index = mm, index
        self.st.inode = os.stat(self.path / "data.npy").st_ino

    def _discard(self, why: str | None) -> None:
        if why is not None:
            self.rebuilt = why
            warnings.warn(f"feature cache {self.path} is unusable ({why}); rebuilding it", RuntimeWarning,
                          stacklevel=4)
        for p in self.path.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()

    def _create(self, row_shape: tuple[int, ...]) -> None:
        with _flock(self.st.lock):
            self._open()  # another process may have created it meanwhile
            if self.st.mm is not None:
                if self.st.mm.shape[1:] != row_shape:
                    raise RuntimeError(f"feature cache {self.path}: rows are {self.st.mm.shape[1:]}, not {row_shape}")
                return
            self.path.mkdir(parents=True, exist_ok=True)
            for p in self.path.glob("*.tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix="data.npy.", suffix=".tmp")
            os.close(fd)
            try:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(self.n, *row_shape))
                mm.flush()
                del mm
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, self.path / "data.npy")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _atomic_save(self.path / "index.npy", np.zeros(self.n, dtype=np.int64))
            meta = {"format": FORMAT_VERSION, "key": self.key, "row_shape": list(row_shape), "dtype": "float32",
                    "rows": self.n, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _atomic_text(self.path / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
            self.st.mm = np.load(self.path / "data.npy", mmap_mode="r+", allow_pickle=False)
            self.st.index = np.zeros(self.n, dtype=np.int64)
            self.st.inode = os.stat(self.path / "data.npy").st_ino

    # -- rows
    def missing(self, idx: np.ndarray) -> np.ndarray:
        rows = np.unique(idx)
        if self.st.mm is None:
            return rows
        filled = (self.st.index[rows] & _FILLED) != 0
        check = rows[filled & ~self.trusted[rows]]
        if len(check):  # first use of rows written earlier (by another run or process): verify their CRC
            ok = _crc_rows(self.st.mm[check]) == (self.st.index[check] & _CRC_MASK)
            self.trusted[check[ok]] = True
            bad = check[~ok]
            if len(bad):
                self.corrupt_rows += len(bad)
                self.st.index[bad] = 0
                warnings.warn(f"feature cache {self.path}: {len(bad)} damaged rows; re-encoding them",
                              RuntimeWarning, stacklevel=3)
        return rows[~self.trusted[rows]]

    def write(self, rows: np.ndarray, values: torch.Tensor) -> None:
        arr = values.detach().to("cpu", torch.float32).numpy()
        if self.st.mm is None:
            self._create(tuple(arr.shape[1:]))
        self.st.mm[rows] = arr
        self.st.index[rows] = _FILLED | _crc_rows(arr)
        self.trusted[rows] = True
        self.st.dirty = True

    def read(self, idx: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.st.mm[idx])).to(device)

    def flush(self, force: bool = False) -> None:
        if force or time.monotonic() - self.st.last_flush >= _FLUSH_EVERY_S or self.trusted.all():
            self.st.flush()
