"""Datasets registered by name.

A dataset is built by a *factory* ``fn(root, seed, **kwargs) -> ClassificationData`` registered with
:func:`register_dataset`; :func:`get_dataset` builds it once per ``(name, root, seed, kwargs)`` and caches it in
memory. Every dataset exposes the same thing: class names in label order and train / val / test
:class:`ImageSplit` objects (labels + a way to fetch images as float tensors in [0, 1]).

Procedural datasets (the embedded "shapes world", one per rendering domain) keep their images in memory as
uint8 tensors (:class:`TensorImageSplit`). Real datasets (CoOp ``$DATA`` layout) will be further factories that
return a file-backed :class:`ImageSplit` subclass; nothing else has to change.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from fedlit.lazy import lazy
from fedlit.data import shapes
from fedlit.errors import FedlitError, unknown_name

torch = lazy("torch", __name__, "torch")

__all__ = [
    "ImageSplit",
    "TensorImageSplit",
    "ClassificationData",
    "register_dataset",
    "get_dataset",
    "list_datasets",
    "clear_cache",
]

Indices = Union[Sequence[int], np.ndarray, "torch.Tensor", slice, None]  # torch named, not imported
Factory = Callable[..., "ClassificationData"]


def _digest_value(h, name: str, value: Any) -> None:
    """Feed ``value`` into hash ``h`` by content (for :meth:`ImageSplit.cache_key`)."""
    import os

    if isinstance(value, ImageSplit):
        h.update(f"split:{value.cache_key()}".encode())
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor:{t.dtype}:{tuple(value.shape)}:".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    elif isinstance(value, np.ndarray):
        h.update(f"array:{value.dtype}:{value.shape}:".encode())
        h.update(repr(value.tolist()).encode() if value.dtype == object else np.ascontiguousarray(value).tobytes())
    elif name == "paths" and isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        lines = []
        for p in value:  # a file replaced in place changes size or mtime, hence the key
            try:
                st = os.stat(p)
                lines.append(f"{p}\t{st.st_size}\t{st.st_mtime_ns}")
            except OSError:
                lines.append(f"{p}\tmissing")
        h.update(f"paths:{len(value)}:".encode())
        h.update("\n".join(lines).encode())
    elif isinstance(value, dict):
        h.update(f"dict:{len(value)}:".encode())
        for k in sorted(value, key=repr):
            h.update(f"{k!r}=".encode())
            _digest_value(h, str(k), value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}:{len(value)}:".encode())
        for v in value:
            _digest_value(h, "", v)
    else:  # scalars, strings, None; anything else by repr (an address in it only makes the key never reused)
        h.update(f"{type(value).__name__}:{value!r}".encode())


#: The backbone's bicubic resize (antialiased, clamped to [0, 1]) without the mean/std step: FLiP's training
#: pre-processing (spec 3c §0.7, quirk F1; ``trainer.train_pixel_norm: none``).
UNNORMALISED = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "resize": "bicubic", "clamp": True}


def unnormalised(split: "ImageSplit") -> "ImageSplit":
    """A shallow copy of ``split`` whose images reach the tower resized but not normalised (:data:`UNNORMALISED`;
    its own cache key). A split with its own pre-processing is refused: the two do not compose."""
    import copy

    if split.pixel_norm is not None:
        raise FedlitError("trainer.train_pixel_norm=none replaces the backbone's normalisation, but this dataset "
                          "has its own pre-processing (data.dataset_args.preprocess: official); use "
                          "train_pixel_norm: clip, or preprocess: clip")
    out = copy.copy(split)
    out.__dict__.pop("_cache_key_memo", None)  # the copy's images differ: its own key
    out.pixel_norm = dict(UNNORMALISED)
    return out


@dataclass
class ImageSplit(abc.ABC):
    """One split: labels, and a way to get images. Subclasses decide where images live.

    Attributes:
        labels: int64 class labels [N], in the dataset's full label space.
        pixel_norm: ``None`` (the backbone's own resize and mean/std) or a dataset-specific pre-processing that
            replaces it, ``{"mean": (3,), "std": (3,), "resize": "bilinear"}``: normalise at the native size, then
            resize (what FedPGP/FedOTP's CIFAR code does). Set as an instance attribute, so it is part of
            :meth:`cache_key`. :data:`UNNORMALISED` (FLiP's training images, ``trainer.train_pixel_norm: none``)
            is the backbone's own resize without the mean/std.
    """

    labels: np.ndarray
    pixel_norm = None  # class default; not a dataclass field (subclasses add fields without defaults)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def images(self, indices: Indices = None) -> torch.Tensor:
        """Images at ``indices`` (all if None) as a float tensor [n, 3, H, W] in [0, 1], native size."""

    def view_crops(self, indices: np.ndarray, params, size: tuple[int, int]) -> torch.Tensor:
        """Augmented views ``[n, 3, *size]`` in [0, 1]: ``params(k, H, W) -> (top, left, h, w, flip)`` is a box of
        the ORIGINAL image of ``indices[k]`` (``H × W``), resized to ``size`` (bicubic) and flipped. This default crops
        :meth:`images` (the original for in-memory splits; each distinct image fetched once per call); file-backed
        splits crop the decoded file."""
        import torch.nn.functional as F

        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(rows, return_inverse=True)  # each image decoded once, however many views
        x = self.images(uniq).float()
        if not len(rows):
            return x.new_zeros(0, 3, *size)
        out = []
        for k in range(len(rows)):
            img = x[inverse[k]]
            top, left, h, w, flip = params(k, img.shape[-2], img.shape[-1])
            crop = F.interpolate(img[None, :, top : top + h, left : left + w], size=size, mode="bicubic",
                                 antialias=True, align_corners=False).clamp_(0, 1)
            out.append(crop.flip(-1) if flip else crop)
        return torch.cat(out) if out else x.new_zeros(0, 3, *size)

    def cache_key(self) -> str:
        """Hex digest of everything this split's images depend on (keys on-disk feature caches, fedlit.features).

        Covers the class, the dataset identity :func:`get_dataset` stamps (name, root, seed, arguments) and every
        instance attribute: tensors/arrays by content, ``paths`` with each file's size and mtime, nested splits
        by their own key, other values by ``repr``. Computed once per object (splits are immutable).
        """
        memo = self.__dict__.get("_cache_key_memo")
        if memo is None:
            import hashlib

            h = hashlib.blake2b(digest_size=16)
            h.update(f"{type(self).__module__}.{type(self).__qualname__}".encode())
            for name in sorted(vars(self)):
                if name != "_cache_key_memo":
                    h.update(f"|{name}=".encode())
                    _digest_value(h, name, getattr(self, name))
            memo = self.__dict__["_cache_key_memo"] = h.hexdigest()
        return memo


@dataclass
class TensorImageSplit(ImageSplit):
    """A split held in memory as a uint8 tensor [N, 3, H, W].

    Attributes:
        data: uint8 images [N, 3, H, W].
        meta: Optional per-image attributes (e.g. ``size``, ``pos`` for shapes), arrays of length N.
    """

    data: torch.Tensor = field(repr=False)
    meta: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.data, torch.Tensor) or self.data.dtype != torch.uint8 or self.data.ndim != 4:
            raise ValueError("TensorImageSplit.data must be a uint8 tensor [N, 3, H, W]")
        if len(self.data) != len(self.labels):
            raise ValueError(f"{len(self.data)} images but {len(self.labels)} labels")

    def images(self, indices: Indices = None) -> torch.Tensor:
        if indices is None:
            batch = self.data
        elif isinstance(indices, slice):
            batch = self.data[indices]
        else:
            batch = self.data[torch.as_tensor(np.asarray(indices), dtype=torch.long)]
        return batch.float().div_(255.0)


@dataclass
class ClassificationData:
    """A classification dataset: class names in label order and three splits.

    Attributes:
        name: Registered name.
        classnames: Class names; ``classnames[i]`` is the name of label ``i``.
        train: Training split.
        val: Validation split.
        test: Test split.
        image_size: Native image side in pixels (images are square at this size).
    """

    name: str
    classnames: list[str]
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    image_size: int

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

    def split(self, name: str) -> ImageSplit:
        """The split called ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise unknown_name("split", name, ["train", "val", "test"])
        return getattr(self, name)

    def summary(self) -> str:
        """One line: name, #classes, split sizes, image size."""
        return (
            f"{self.name}: {self.num_classes} classes, train {len(self.train)} / val {len(self.val)} / "
            f"test {len(self.test)} images, {self.image_size}px"
        )


_FACTORIES: dict[str, Factory] = {}
_CACHE: dict[tuple, ClassificationData] = {}


def register_dataset(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering ``fn(root, seed, **kwargs) -> ClassificationData`` under ``name``.

    Raises:
        ValueError: If ``name`` is already registered (a programming error, not a user error).
    """

    def decorator(fn: Factory) -> Factory:
        if name in _FACTORIES:
            raise ValueError(f"dataset '{name}' is already registered")
        _FACTORIES[name] = fn
        return fn

    return decorator


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_FACTORIES)


#: what each family of registered datasets is, by the module and factory that registered it
_FAMILIES = {
    "_shapes_factory": "procedural shapes world, embedded (no data root)",
    "_coop_json_factory": "CoOp layout: --data.root holding the CoOp folder and split_zhou_*.json",
    "fgvc_aircraft": "CoOp layout: --data.root holding fgvc_aircraft/",
    "imagenet": "CoOp layout: --data.root holding imagenet/ (classnames.txt)",
    "_imagenet_variant_factory": "CoOp layout: --data.root holding the ImageNet variant (evaluation)",
    "_multi_factory": "FedBN domain layout: --data.root holding the domains' folders",
    "_cifar_factory": ("torchvision's CIFAR archive under --data.root (dataset_args download: true fetches it; "
                       "preprocess: official = the FedPGP/FedOTP pipeline)"),
    "fashion_mnist": "Fashion-MNIST from Debian's dataset-fashion-mnist package (or --data.root)",
}


def describe_dataset(name: str) -> str:
    """One line: what the registered dataset ``name`` is and whether it needs a data root."""
    fn = _FACTORIES[name]
    key = fn.__qualname__.split(".<locals>")[0] if "<locals>" in fn.__qualname__ else fn.__name__
    for k in (key, name):
        if k in _FAMILIES:
            return _FAMILIES[k]
    doc = (fn.__doc__ or "").strip().split("\n")[0]
    return doc or f"registered at run time by {fn.__module__} (no description)"


def _cache_key(name: str, root: str | None, seed: int, kwargs: dict[str, Any]) -> tuple:
    frozen_kwargs = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    return (name, None if root is None else str(root), int(seed), frozen_kwargs)


def get_dataset(name: str, root: str | None = None, seed: int = 0, **kwargs: Any) -> ClassificationData:
    """Build (or fetch from the in-memory cache) the dataset registered as ``name``.

    Args:
        name: Registered name (see :func:`list_datasets`).
        root: Data root for file-backed datasets; ignored by procedural ones.
        seed: Seed of the dataset's own randomness (procedural rendering, random splits).
        **kwargs: Passed to the factory (e.g. ``train_per_class`` for shapes).

    Raises:
        FedlitError: If ``name`` is not registered (the message lists the valid names).
    """
    if name not in _FACTORIES:
        raise unknown_name("dataset", name, list_datasets())
    key = _cache_key(name, root, seed, kwargs)
    if key not in _CACHE:
        _CACHE[key] = _FACTORIES[name](root, seed, **kwargs)
        identity = {"name": name, "root": key[1], "seed": key[2], "args": dict(key[3])}
        for split in (_CACHE[key].train, _CACHE[key].val, _CACHE[key].test):
            split.__dict__.setdefault("_dataset_identity", identity)  # read by ImageSplit.cache_key
    return _CACHE[key]


def clear_cache() -> None:
    """Drop every cached dataset."""
    _CACHE.clear()


# --- procedural shapes datasets ------------------------------------------------------------------------------

_SPLITS = ("train", "val", "test")


def _shapes_factory(domain: str) -> Factory:
    def build(
        root: str | None,
        seed: int,
        train_per_class: int = 64,
        val_per_class: int = 8,
        test_per_class: int = 32,
        image_size: int = 32,
    ) -> ClassificationData:
        """Shapes world in one domain; all 48 classes (held-out combinations included), sorted by label."""
        del root  # procedural: nothing on disk
        per_class = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
        for split, count in per_class.items():
            if int(count) < 1:
                raise FedlitError(f"{split}_per_class must be >= 1 for the shapes datasets; got {count}")
        domain_id = list(shapes.DOMAINS).index(domain)
        splits = {}
        for split_id, split in enumerate(_SPLITS):
            labels = np.repeat(np.arange(shapes.NUM_CLASSES, dtype=np.int64), per_class[split])
            # Independent streams per (seed, domain, split): no image is shared between splits or domains.
            stream = int(np.random.SeedSequence([int(seed), domain_id, split_id]).generate_state(1, np.uint64)[0])
            data, attrs = shapes.render(
                labels // len(shapes.SHAPES), labels % len(shapes.SHAPES), domain, seed=stream, size=image_size
            )
            splits[split] = TensorImageSplit(labels, data=data, meta={"size": attrs["size"], "pos": attrs["pos"]})
        name = "shapes" if domain == "clean" else f"shapes-{domain}"
        return ClassificationData(name, shapes.class_names(), **splits, image_size=image_size)

    return build


for _domain in shapes.DOMAINS:
    register_dataset("shapes" if _domain == "clean" else f"shapes-{_domain}")(_shapes_factory(_domain))
del _domain
