"""Frozen image work, done once.

When a method leaves the image tower untouched (``FedMethod.image_input`` is ``features``, ``tokens`` or
``value_tokens``) and the images are not augmented, CLIP's image features are a pure function of the image:
:class:`FeatureBank` encodes each image of a split at most once, on demand, and serves rows by index afterwards.
Methods that change the image tower get the normalised images instead (:meth:`FeatureBank.inputs`).

Where the cache lives (``trainer.feature_cache``):

- ``memory`` (default): one tensor per split in the process, on the backbone's device, filled lazily.
- ``disk``: one memory-mapped ``.npy`` file per split under ``trainer.cache_dir`` (default ``$FEDLIT_CACHE``, else
  ``~/.cache/fedlit/features``), reused by later runs and by every process of a run. The directory name holds a
  digest of everything the features depend on (:meth:`FeatureBank.cache_key`): the image tower's weights
  (blake2b of its tensors), its preprocessing (size, mean/std, interpolation), parameter dtype, device type and
  autocast dtype; the split's content (:meth:`~fedlit.data.registry.ImageSplit.cache_key`: dataset name, root,
  seed and arguments, labels, pixels or file paths with size and mtime); the split name; ``features``/``tokens``;
  the augmentation spec; and :data:`FORMAT_VERSION`. Change any of them and another file is used, so a stale
  cache is never read. ``meta.json`` repeats the full key and is compared on open (not only its digest).
  The files of a cache directory and their crash safety: :mod:`fedlit.feature_store`.

Augmentation. Views are cut from the ORIGINAL image (:meth:`~fedlit.data.registry.ImageSplit.view_crops`: the
decoded file for file-backed datasets, not the 224-px centre crop): torchvision's random-resized-crop algorithm
(scale (0.08, 1), ratio (3/4, 4/3)), bicubic resize to the tower's size, horizontal flip (p = 0.5); view ``v`` of
image ``i`` is drawn from ``(seed, i, v)`` only (:func:`~fedlit.feature_layout.augment_params`). Evaluation is never augmented.

- The **view bank** (``epoch_views: E``, what ``trainer.augment: dassl`` uses): Dassl draws a fresh view of each
  image every epoch, and a client sees each of its images once per epoch, so a run needs at most ``E = rounds ×
  local_epochs`` views per image: view ``r · local_epochs + e`` is the one every sample uses in epoch ``e`` of
  round ``r``. The views are drawn with the run's seed (the official stream follows ``--seed``), so seeds are
  independent, while every method of one seed with the same backbone, data, precision and ``E`` reads the same
  views (the cache key holds the seed). Where all ``E`` views of an image are
  used (``cache_views``: full participation; pooled features, or patch tokens within :data:`TOKEN_VIEW_BUDGET`,
  :func:`view_caching`) they are encoded once, batched, into the cache (``[N, E, D]``, ``[N, E, 1+M, D]`` for
  tokens; on disk with ``feature_cache: disk``): the cost is ``E`` image-tower forwards per training image,
  once per seed of a grid, which is what one Dassl run spends anyway. Otherwise (partial participation, a token bank
  beyond the budget: said once in the run log) the tower runs on each augmented batch, as the official code does; methods that prompt the image
  tower always get the augmented images.
- The legacy ``augment_views: K``: ``K`` fixed views per image encoded once, each step drawing one per sample from
  ``(seed, round, client, epoch)`` and its position.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .backbones import FrozenCLIP
from .data.registry import ImageSplit
from .errors import FedlitError
from .feature_layout import (AUG_FLIP, AUG_RATIO, AUG_SCALE, augment_params, block_layout,  # noqa: F401 (re-exported)
                             layout_positions, rows_digest)
from .feature_store import FORMAT_VERSION, _DiskStore, _MemoryStore

__all__ = ["FeatureBank", "FORMAT_VERSION", "TOKEN_VIEW_BUDGET", "view_caching", "default_cache_dir", "tower_digest", "augment_params"]

CACHE_ENV = "FEDLIT_CACHE"


#: Largest view bank of patch tokens kept (bytes over all views of the training split): FedOTP's tokens are
#: ``(1+M)·D`` floats a view (32 KB on the embedded model, 400 KB on ViT-B/16: a real grid does not fit).
TOKEN_VIEW_BUDGET = 1 << 30


def view_caching(clip: FrozenCLIP, kind: str, rows: int, views: int, participation: float) -> tuple[bool, str | None]:
    """Whether every view of the view bank is encoded once into the cache (``cache_views``), and, where a view
    bank exists but is not cached, the one-line reason. Pooled features always are (one ``D`` vector a view);
    patch tokens where all ``rows × views`` of them fit in :data:`TOKEN_VIEW_BUDGET`. Under partial participation
    most views are never used, so none is encoded ahead."""
    if kind == "images":
        return False, None
    if participation < 1:
        return False, "partial participation: the augmented views are encoded batch by batch, not cached" if views \
            else None
    if kind == "features":
        return True, None  # also the legacy ``augment_views`` bank (``views == 0``)
    if views == 0:
        return False, None
    size = clip.image_size if isinstance(clip.image_size, tuple) else (clip.image_size,) * 2
    with torch.no_grad():
        per_view = clip.encode_image_tokens(torch.zeros(1, 3, *size, device=clip.device))[0].numel() * 4
    total = rows * views * per_view
    if total <= TOKEN_VIEW_BUDGET:
        return True, None
    return False, (f"the patch tokens of {rows} images × {views} views ({total / 2**30:.1f} GiB) exceed the "
                   f"{TOKEN_VIEW_BUDGET / 2**30:.0f} GiB view-bank budget: the tower runs on each augmented batch")


def default_cache_dir() -> Path:
    """``$FEDLIT_CACHE`` if set, else ``~/.cache/fedlit/features``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlit" / "features"


# ----------------------------------------------------------------------------------------------- keys
_TOWER_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tower_digest(clip: FrozenCLIP) -> str:
    """blake2b of the image tower's state (names, dtypes, shapes, bytes); memoised per backbone object."""
    d = _TOWER_DIGESTS.get(clip)
    if d is None:
        h = hashlib.blake2b(digest_size=16)
        for name, t in sorted(clip.model.visual.state_dict().items()):
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy())
        d = h.hexdigest()
        _TOWER_DIGESTS[clip] = d
    return d


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s))[:60] or "x"


# ----------------------------------------------------------------------------------------------- the bank
class FeatureBank:
    """Per-split cache of frozen image features, filled lazily in batches.

    Args:
        clip: the frozen backbone.
        splits: name → split (``train``, ``test`` …).
        block_size: images per encoding pass. Every pass has exactly this many images and row ``r`` of a split
            always sits at slot ``position(r) % block`` (:func:`~fedlit.feature_layout.block_layout`; the position is its rank among the
            rows announced by :meth:`expect`, else the row), so a cached feature never depends on which rows were
            asked for first, by which process, or whether it was re-encoded after damage.
        autocast: a context-manager factory for mixed precision (e.g. ``fabric.autocast``).
        kind: ``features`` (pooled), ``tokens`` (all projected tokens, FedOTP), ``value_tokens`` (the pooled
            feature then each patch's value path, LoCoOp / GalLoP) or ``images`` (no cache:
            :meth:`inputs` returns normalised images, for methods that prompt the image tower).
        cache: ``memory`` (a tensor per split in this process) or ``disk`` (memory-mapped files under
            ``cache_dir``, reused across runs; see the module docstring).
        cache_dir: directory of the disk cache; ``None`` = :func:`default_cache_dir`.
        augment_views: ``K`` fixed augmented views per image of ``augment_split`` (0: no augmentation).
        seed: seed of the augmented views (the run's seed, for the view bank too).
        augment_split: the split that :meth:`train_views` augments (evaluation splits never are).
        epoch_views: ``E`` > 0 turns on the view bank (overrides ``augment_views``/``seed``): ``E`` views per image,
            view ``round · local_epochs + epoch`` used in that epoch, drawn from ``seed``.
        local_epochs: local epochs per round (view numbering of the view bank).
        cache_views: encode all views of an image once into the cache; ``False``: encode each augmented batch.
    """

    def __init__(self, clip: FrozenCLIP, splits: dict[str, ImageSplit], block_size: int = 32,
                 autocast=None, kind: str = "features", cache: str = "memory",
                 cache_dir: str | os.PathLike | None = None, augment_views: int = 0, seed: int = 0,
                 augment_split: str = "train", epoch_views: int = 0, local_epochs: int = 1,
                 cache_views: bool = True):
        if kind not in ("features", "tokens", "value_tokens", "images"):
            raise ValueError(f"unknown image input kind '{kind}'")
        if cache not in ("memory", "disk"):
            raise FedlitError(f"trainer.feature_cache={cache!r}: use 'memory' or 'disk'")
        if int(augment_views) < 0:
            raise FedlitError(f"trainer.augment_views={augment_views}: use 0 (no augmentation) or a number of views")
        self.clip = clip
        self.splits = splits
        self.block_size = int(block_size)
        self.autocast = autocast
        self.kind = kind
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.epoch_views = int(epoch_views)
        self.augment_views = self.epoch_views or int(augment_views)
        self.seed = int(seed)  # the run's seed: seeds draw independent views, methods of one seed share them
        self.augment_split = augment_split
        self.local_epochs = int(local_epochs)
        self.cache_views = bool(cache_views)
        self._stores: dict[tuple[str, bool], _MemoryStore | _DiskStore] = {}
        self._expected: dict[str, np.ndarray] = {}
        self._layouts: dict[tuple[str, bool], np.ndarray | None] = {}  # the pass layout each store was opened with
        self.encoded = 0  # images (views) encoded so far (a cache that works keeps this at one per image)

    # -------------------------------------------------------------------------------------------- images
    def images(self, split: str, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        data = self.splits[split]
        x = data.images(np.asarray(idx))
        return self.clip.normalize_images(x.to(self.clip.device), data.pixel_norm)

    def augmented_images(self, split: str, idx: Sequence[int] | np.ndarray,
                         views: Sequence[int] | np.ndarray) -> torch.Tensor:
        """View ``views[k]`` of image ``idx[k]`` (see :func:`~fedlit.feature_layout.augment_params`), resized and normalised."""
        idx, views = np.asarray(idx, dtype=np.int64), np.asarray(views, dtype=np.int64)
        if idx.shape != views.shape:
            raise ValueError(f"{len(idx)} images but {len(views)} view numbers")
        if len(views) and (views.min() < 0 or views.max() >= self.augment_views):
            raise ValueError(f"view numbers must be in [0, {self.augment_views})")
        size = self.clip.image_size if isinstance(self.clip.image_size, tuple) else (self.clip.image_size,) * 2

        def params(k: int, height: int, width: int):
            return augment_params(self.seed, int(idx[k]), int(views[k]), height, width)

        data = self.splits[split]
        x = data.view_crops(idx, params, tuple(size))
        return self.clip.normalize_images(x.to(self.clip.device, torch.float32), data.pixel_norm)

    def train_views(self, draw: tuple[int, ...], n: int, rows: np.ndarray) -> np.ndarray | None:
        """The view each of ``rows`` (positions in a client's data of ``n`` samples) uses at this step:
        drawn from ``draw = (seed, round, client, epoch)`` and the position only; ``None`` without augmentation.
        View bank: view ``round · local_epochs + epoch`` for every sample (one fresh view per epoch)."""
        if self.augment_views == 0:
            return None
        if self.epoch_views:
            v = int(draw[1]) * self.local_epochs + int(draw[3])
            if v >= self.epoch_views:
                raise FedlitError(f"view bank of {self.epoch_views} views per image has no view for round "
                                  f"{int(draw[1]) + 1}, epoch {int(draw[3]) + 1}; raise trainer.rounds")
            return np.full(len(rows), v, dtype=np.int64)
        return np.random.default_rng([*map(int, draw), 0x71E5]).integers(0, self.augment_views, size=n)[rows]

    # -------------------------------------------------------------------------------------------- keys
    def _backbone_identity(self) -> dict:
        dev = self.clip.device
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            on = torch.is_autocast_enabled(dev.type)
            amp = str(torch.get_autocast_dtype(dev.type)) if on else "off"
        param = next(self.clip.model.visual.parameters())
        size = self.clip.image_size if isinstance(self.clip.image_size, tuple) else (self.clip.image_size,) * 2
        return {"name": self.clip.name, "tower_blake2b": tower_digest(self.clip), "image_size": list(size),
                "mean": list(self.clip.mean), "std": list(self.clip.std), "interpolation": self.clip.interpolation,
                "resize": "bicubic-antialias", "param_dtype": str(param.dtype), "device_type": dev.type,
                "autocast": amp}

    def layout(self, split: str, augmented: bool = False) -> np.ndarray | None:
        """The rows whose ranks place them in the encoding passes of ``split`` (:func:`~fedlit.feature_layout.block_layout`): the
        expected rows (:meth:`expect`) when its store was opened, fixed for the store's life; ``None``: by row."""
        if (split, augmented) in self._layouts:
            return self._layouts[(split, augmented)]
        return self._expected.get(split)

    def cache_key(self, split: str, augmented: bool = False) -> dict:
        """Everything the cached rows of ``split`` depend on (JSON-able); its digest names the disk cache."""
        data = self.splits[split]
        key_fn = getattr(data, "cache_key", None)
        if key_fn is None:
            raise FedlitError(f"split '{split}' ({type(data).__name__}) has no cache_key(); "
                              "use trainer.feature_cache=memory for it")
        aug = None
        if augmented:
            aug = {"views": self.augment_views, "seed": self.seed, "scale": list(AUG_SCALE),
                   "ratio": list(AUG_RATIO), "flip": AUG_FLIP, "algorithm": "rrc-original-image-v2"}
        return {"format": FORMAT_VERSION, "backbone": self._backbone_identity(),
                "dataset": getattr(data, "_dataset_identity", None), "split": split, "split_content": key_fn(),
                "rows": len(data), "kind": self.kind, "augment": aug, "block": self.block_rows(split, augmented),
                "layout": rows_digest(self.layout(split, augmented))}

    def cache_path(self, split: str, augmented: bool = False) -> Path:
        """Directory of the disk cache of ``split`` (readable prefix + 32-hex digest of :meth:`cache_key`)."""
        key = self.cache_key(split, augmented)
        digest = hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()
        ident = key["dataset"] if isinstance(key["dataset"], dict) else {}
        ds = ident.get("name") or type(self.splits[split]).__name__
        tag = f"{_slug(ds)}-{_slug(split)}-{self.kind}" + (f"-aug{self.augment_views}" if augmented else "")
        return self.cache_dir / _slug(self.clip.name) / f"{tag}-{digest}"

    def _store(self, split: str, augmented: bool):
        st = self._stores.get((split, augmented))
        if st is None:
            self._layouts[(split, augmented)] = self.layout(split, augmented)
            n = len(self.splits[split])
            if self.cache == "disk":
                st = _DiskStore(self.cache_path(split, augmented), self.cache_key(split, augmented), n)
            else:
                st = _MemoryStore(n)
            self._stores[(split, augmented)] = st
        return st

    # -------------------------------------------------------------------------------------------- features
    def block_rows(self, split: str, augmented: bool = False) -> int:
        """Rows per encoding pass of ``split`` (see :func:`~fedlit.feature_layout.block_layout`): ``block_size`` images, ``K`` views of a
        row counting as ``K`` images, never more rows than the split has."""
        per = self.augment_views if augmented else 1
        return max(1, min(self.block_size // per, len(self.splits[split])))

    def _tower(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen image tower on normalised images, under the run's autocast: pooled features or tokens (fp32)."""
        encode = {"tokens": self.clip.encode_image_tokens, "value_tokens": self.clip.encode_image_value_tokens}.get(
            self.kind, self.clip.encode_image)
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            return encode(x).float()

    def _encode(self, split: str, rows: np.ndarray, augmented: bool, slots: np.ndarray, block: int) -> torch.Tensor:
        """Encode ``rows`` placed at ``slots`` of a full pass of ``block`` rows (the other slots hold zeros)."""
        k = self.augment_views if augmented else 1
        if augmented:
            x = self.augmented_images(split, np.repeat(rows, k), np.tile(np.arange(k), len(rows)))
        else:
            x = self.images(split, rows)
        full = x.new_zeros(block, k, *x.shape[1:])
        full[torch.as_tensor(slots, device=x.device)] = x.reshape(len(rows), k, *x.shape[1:])
        f = self._tower(full.flatten(0, 1))
        f = f.reshape(block, k, *f.shape[1:])[torch.as_tensor(slots, device=f.device)]
        return f if augmented else f[:, 0]

    def expect(self, split: str, rows: Sequence[int] | np.ndarray) -> None:
        """Rows of ``split`` that will be asked for: the first request that encodes anything encodes the missing
        ones of them too, in the same passes (a scattered subset asked for client by client would otherwise cost
        a pass per slot collision each time), and — announced before the split's first request — they are the
        split's pass layout: each sits at the slot of its rank among them (:func:`~fedlit.feature_layout.block_layout`), so the passes are
        full. Values are a fixed function of (row, layout); the layout's digest is part of the cache key."""
        self._expected[split] = np.unique(np.asarray(rows, dtype=np.int64))

    @torch.no_grad()
    def features(self, split: str, idx: Sequence[int] | np.ndarray,
                 views: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Image features ``[n, D]`` (``tokens``: ``[n, 1+M, D]``; float32, unnormalised) of the given rows of
        ``split``; with ``views``, of view ``views[k]`` of row ``idx[k]`` (``augment_views`` must be > 0)."""
        if self.kind == "images":
            raise ValueError("FeatureBank(kind='images') caches nothing; use inputs()")
        idx = np.asarray(idx, dtype=np.int64)
        augmented = views is not None
        if augmented and self.augment_views == 0:
            raise ValueError("view numbers given but augment_views is 0")
        if augmented and not self.cache_views:  # the tower runs on the augmented batch (nothing kept)
            self.encoded += len(idx)
            return self._tower(self.augmented_images(split, idx, views))
        store = self._store(split, augmented)
        todo = store.missing(idx)
        if len(todo) and split in self._expected:  # fill the passes with rows asked for later, not with zeros
            todo = np.union1d(todo, store.missing(self._expected[split]))
        block = self.block_rows(split, augmented)
        for rows, slots in block_layout(todo, block, layout_positions(todo, self._layouts[(split, augmented)])):
            store.write(rows, self._encode(split, rows, augmented, slots, block))
            self.encoded += len(rows) * (self.augment_views if augmented else 1)
        if len(todo):
            store.flush()
        out = store.read(idx, self.clip.device)
        if augmented:
            v = torch.as_tensor(np.asarray(views, dtype=np.int64), device=out.device)
            out = out[torch.arange(len(idx), device=out.device), v]
        return out

    def inputs(self, split: str, idx: Sequence[int] | np.ndarray,
               views: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """What a method's forward takes: cached features/tokens, or normalised images (augmented with ``views``)."""
        if self.kind == "images":
            return self.images(split, idx) if views is None else self.augmented_images(split, idx, views)
        return self.features(split, idx, views)

    def flush(self) -> None:
        """Write pending disk-cache index updates now (also done every few seconds and at exit)."""
        for st in self._stores.values():
            st.flush(force=True)

    @property
    def corrupt_rows(self) -> int:
        """Cached rows found damaged (CRC mismatch) and re-encoded."""
        return sum(st.corrupt_rows for st in self._stores.values())
