"""Readers of the real distribution-shift sets of FOCoOp's evaluation (spec 3b §2.8), from the data root:

- ``cifar10_c`` / ``cifar100_c``: ``CIFAR-10-C/`` / ``CIFAR-100-C/`` holding ``{type}.npy`` (the 10,000 test images
  at the 5 severities stacked severity-major, uint8 [50000, 32, 32, 3]) and ``labels.npy``. Rows are mapped to the
  CIFAR test image they corrupt (``source`` = row mod 10,000), checked against CIFAR's own test labels when its
  folder is there too. ``dataset_args``: ``types`` (default: every type of :data:`CIFAR_C_TYPES` present),
  ``severities``.
- ``tinyimagenet``: ``tiny-imagenet-200/`` (``wnids.txt``, ``words.txt``, ``train/<wnid>/images/*.JPEG``,
  ``val/images`` + ``val_annotations.txt``; the val split is the test split, as is customary).
- ``tinyimagenet_c``: ``Tiny-ImageNet-C/{type}/{1..5}/{wnid}/*.JPEG`` (15 types); class names from
  ``tiny-imagenet-200/``; each file maps to the val image of the same name.
- ``texture``: every image under ``dtd/images/<class>/`` (FOCoOp's OOD set, 5,640 images; labels = folder order).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import FedlitError
from ..lazy import lazy
from .coop import FileImageSplit, check_size, list_visible, resolve_data_root
from .registry import ClassificationData, ImageSplit, Indices, get_dataset, register_dataset

torch = lazy("torch", __name__, "torch")

CIFAR_C_TYPES = ("brightness", "fog", "glass_blur", "motion_blur", "snow", "contrast", "frost", "impulse_noise",
                 "pixelate", "spatter", "defocus_blur", "gaussian_blur", "jpeg_compression", "saturate",
                 "speckle_noise", "elastic_transform", "gaussian_noise", "shot_noise", "zoom_blur")
TINY_C_TYPES = tuple(t for t in CIFAR_C_TYPES if t not in ("spatter", "gaussian_blur", "saturate", "speckle_noise"))
_MMAPS: dict[str, np.ndarray] = {}  # memory-mapped .npy files, per process (not part of a split's cache key)
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class StackedArraySplit(ImageSplit):
    """CIFAR-C's ``{type}.npy`` files side by side, memory-mapped (type-major; each file severity-major)."""

    def __init__(self, files: list[str], labels: np.ndarray, severities: tuple[int, ...]):
        self.files, per = list(files), len(labels) // 5
        keep = np.isin(np.arange(len(labels)) // per + 1, severities)
        self.rows_in_file = np.flatnonzero(keep)
        n = len(self.rows_in_file)
        super().__init__(np.tile(np.asarray(labels)[self.rows_in_file], len(files)))
        self.meta = {"corruption": np.repeat(np.arange(len(files)), n),
                     "severity": np.tile(self.rows_in_file // per + 1, len(files)),
                     "source": np.tile(self.rows_in_file % per, len(files))}

    def images(self, indices: Indices = None) -> torch.Tensor:
        arrays = [_MMAPS.setdefault(f, np.load(f, mmap_mode="r")) if f not in _MMAPS else _MMAPS[f] for f in self.files]
        rows = np.arange(len(self))[indices] if indices is None or isinstance(indices, slice) else \
            np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64).reshape(-1)
        n = len(self.rows_in_file)
        out = np.stack([arrays[r // n][self.rows_in_file[r % n]] for r in rows]) if len(rows) else \
            np.zeros((0, 32, 32, 3), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).float().div_(255.0)


def _cifar_c_factory(name: str, folder: str, base_name: str):
    def build(root, seed, types: list[str] | None = None, severities: list[int] | None = None,
              **base_args) -> ClassificationData:
        d = os.path.join(resolve_data_root(root, name), folder)
        if not os.path.isfile(os.path.join(d, "labels.npy")):
            raise FedlitError(f"{name}: {d}/labels.npy not found; extract {folder}.tar (Hendrycks & Dietterich) "
                              f"into the data root")
        types = list(types or [t for t in CIFAR_C_TYPES if os.path.isfile(os.path.join(d, f"{t}.npy"))])
        missing = [t for t in types if not os.path.isfile(os.path.join(d, f"{t}.npy"))]
        if missing or not types:
            raise FedlitError(f"{name}: no {', '.join(missing) or 'corruption'} .npy file in {d}; "
                              f"list the types you have with ood.dataset_args: {{types: [...]}}")
        labels = np.load(os.path.join(d, "labels.npy")).astype(np.int64)
        if len(labels) % 5:
            raise FedlitError(f"{name}: labels.npy holds {len(labels)} labels, not 5 severities of one test set")
        test = StackedArraySplit([os.path.join(d, f"{t}.npy") for t in types], labels,
                                 tuple(severities or (1, 2, 3, 4, 5)))
        test.corruptions = tuple(types)
        try:
            base = get_dataset(base_name, root, seed, **base_args)
        except FedlitError:  # no CIFAR folder: no per-image source map, label ids as names
            base = None
        if base is not None:
            if not np.array_equal(labels[: len(labels) // 5], base.test.labels):
                raise FedlitError(f"{name}: labels.npy does not repeat {base_name}'s test labels in order")
            test.base, test.pixel_norm = base.test, base.test.pixel_norm
            classnames = list(base.classnames)
        else:
            del test.meta["source"]
            classnames = [str(i) for i in range(int(labels.max()) + 1)]
        return ClassificationData(name, classnames, test, test, test, 32)

    build.__doc__ = f"{name}: {folder}/{{type}}.npy + labels.npy under the data root (covariate shift of {base_name})."
    return build


def _tiny_names(root: str, name: str) -> tuple[str, list[str], list[str]]:
    d = os.path.join(resolve_data_root(root, name), "tiny-imagenet-200")
    if not os.path.isfile(os.path.join(d, "wnids.txt")):
        raise FedlitError(f"{name}: {d}/wnids.txt not found; extract tiny-imagenet-200.zip into the data root")
    wnids = sorted(w.strip() for w in open(os.path.join(d, "wnids.txt")) if w.strip())
    words = {}
    if os.path.isfile(os.path.join(d, "words.txt")):
        for line in open(os.path.join(d, "words.txt")):
            k, _, v = line.rstrip("\n").partition("\t")
            words[k] = v.split(",")[0].strip()
    return d, wnids, [words.get(w, w) for w in wnids]


@register_dataset("tinyimagenet")
def tinyimagenet(root, seed, image_size: int = 64, **_ignored) -> ClassificationData:
    """TinyImageNet (tiny-imagenet-200/ under the data root; test = the labelled val split)."""
    del seed
    d, wnids, names = _tiny_names(root, "tinyimagenet")
    label = {w: i for i, w in enumerate(wnids)}
    train = [(os.path.join(d, "train", w, "images", f), label[w]) for w in wnids
             for f in list_visible(os.path.join(d, "train", w, "images"))]
    ann = os.path.join(d, "val", "val_annotations.txt")
    val = [(os.path.join(d, "val", "images", p[0]), label[p[1]]) for p in
           (line.rstrip("\n").split("\t") for line in open(ann) if line.strip())]
    size = check_size(image_size)
    split = lambda items: FileImageSplit(np.array([y for _, y in items], dtype=np.int64),  # noqa: E731
                                         paths=[p for p, _ in items], image_size=size)
    test = split(val)
    return ClassificationData("tinyimagenet", names, split(train), test, test, size)


@register_dataset("tinyimagenet_c")
def tinyimagenet_c(root, seed, types: list[str] | None = None, severities: list[int] | None = None,
                   image_size: int = 64, **_ignored) -> ClassificationData:
    """Tiny-ImageNet-C ({type}/{1..5}/{wnid}/*.JPEG under the data root; covariate shift of tinyimagenet)."""
    d = os.path.join(resolve_data_root(root, "tinyimagenet_c"), "Tiny-ImageNet-C")
    _, wnids, names = _tiny_names(root, "tinyimagenet_c")
    types = list(types or [t for t in TINY_C_TYPES if os.path.isdir(os.path.join(d, t))])
    if not types or any(not os.path.isdir(os.path.join(d, t)) for t in types):
        raise FedlitError(f"tinyimagenet_c: corruption folders {types or 'of ' + ', '.join(TINY_C_TYPES)} not all in "
                          f"{d}; list the ones you have with ood.dataset_args: {{types: [...]}}")
    try:
        base = get_dataset("tinyimagenet", root, seed, image_size=image_size)
        src_of = {os.path.basename(p): i for i, p in enumerate(base.test.paths)}
    except FedlitError:
        base, src_of = None, {}
    paths, labels, meta = [], [], {"corruption": [], "severity": [], "source": []}
    for ti, t in enumerate(types):
        for s in severities or (1, 2, 3, 4, 5):
            for ci, w in enumerate(wnids):
                folder = os.path.join(d, t, str(s), w)
                for f in list_visible(folder) if os.path.isdir(folder) else []:
                    paths.append(os.path.join(folder, f))
                    labels.append(ci)
                    meta["corruption"].append(ti), meta["severity"].append(int(s)), meta["source"].append(src_of.get(f, -1))
    test = FileImageSplit(np.array(labels, dtype=np.int64), paths=paths, image_size=check_size(image_size),
                          meta={k: np.array(v, dtype=np.int64) for k, v in meta.items()})
    test.corruptions = tuple(types)
    if base is not None and (test.meta["source"] >= 0).all():
        test.base = base.test
    else:
        del test.meta["source"]
    return ClassificationData("tinyimagenet_c", names, test, test, test, test.image_size)


def image_folder(d: str, name: str, size: int) -> tuple[list[str], FileImageSplit]:
    """Every image under ``d/<class>/`` (sorted classes and files): ``(classnames, split)``."""
    if not os.path.isdir(d):
        raise FedlitError(f"{name}: folder {d} not found under the data root")
    classes = [c for c in list_visible(d) if os.path.isdir(os.path.join(d, c))]
    items = [(os.path.join(d, c, f), i) for i, c in enumerate(classes) for f in list_visible(os.path.join(d, c))
             if f.lower().endswith(IMAGE_EXT)]
    if not items:
        raise FedlitError(f"{name}: no image under {d}/<class>/")
    return classes, FileImageSplit(np.array([y for _, y in items], dtype=np.int64), paths=[p for p, _ in items],
                                   image_size=size)


@register_dataset("texture")
def texture(root, seed, image_size: int = 224, **_ignored) -> ClassificationData:
    """Texture (DTD) as an OOD set: every image under dtd/images/<class>/ (FOCoOp's, 5,640 images)."""
    del seed
    classes, test = image_folder(os.path.join(resolve_data_root(root, "texture"), "dtd", "images"), "texture",
                                 check_size(image_size))
    return ClassificationData("texture", [c.replace("_", " ") for c in classes], test, test, test, test.image_size)


register_dataset("cifar10_c")(_cifar_c_factory("cifar10_c", "CIFAR-10-C", "cifar10"))
register_dataset("cifar100_c")(_cifar_c_factory("cifar100_c", "CIFAR-100-C", "cifar100"))

__all__ = ["CIFAR_C_TYPES", "TINY_C_TYPES", "StackedArraySplit", "image_folder"]
