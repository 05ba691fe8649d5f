"""Real datasets in the CoOp ``$DATA`` layout (the 11 CoOp datasets and the ImageNet variants).

Every factory here takes ``root`` = the CoOp ``$DATA`` folder (``data.root`` in a config, or ``$FEDLIT_DATA``)
and returns a :class:`~fedlit.data.registry.ClassificationData` whose splits load images lazily from disk
(:class:`FileImageSplit`). FedBN's Office-Caltech10 / DomainNet live in :mod:`fedlit.data.fedbn`;
Fashion-MNIST and CIFAR-10/100 (in memory) in :mod:`fedlit.data.arrays`. The table lists them all.

Folder layouts (CoOp's DATASETS.md; spec/methods.md §7.1 and §7.2-5):

=================  ==============================================  ==========================================
name               images                                          split / class files
=================  ==============================================  ==========================================
caltech101         caltech-101/101_ObjectCategories/               caltech-101/split_zhou_Caltech101.json
oxford_pets        oxford_pets/images/                             oxford_pets/split_zhou_OxfordPets.json
oxford_flowers     oxford_flowers/jpg/                             oxford_flowers/split_zhou_OxfordFlowers.json
food101            food-101/images/                                food-101/split_zhou_Food101.json
dtd                dtd/images/                                     dtd/split_zhou_DescribableTextures.json
fgvc_aircraft      fgvc_aircraft/images/                           fgvc_aircraft/variants.txt,
                                                                   images_variant_{train,val,test}.txt
stanford_cars      stanford_cars/                                  stanford_cars/split_zhou_StanfordCars.json
sun397             sun397/SUN397/                                  sun397/split_zhou_SUN397.json
ucf101             ucf101/UCF-101-midframes/                       ucf101/split_zhou_UCF101.json
eurosat            eurosat/2750/                                   eurosat/split_zhou_EuroSAT.json
imagenet           imagenet/images/{train,val}/<wnid>/             imagenet/classnames.txt (val = test)
imagenetv2         imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/   classnames.txt
imagenet_sketch    imagenet-sketch/images/<wnid>/                  classnames.txt
imagenet_a         imagenet-adversarial/imagenet-a/<wnid>/         classnames.txt (200 classes)
imagenet_r         imagenet-rendition/imagenet-r/<wnid>/           classnames.txt (200 classes)
office_caltech10   office_caltech_10/{amazon,caltech,dslr,webcam}/<class>/  optional {domain}_{train,test}.pkl
domainnet          DomainNet/{clipart,infograph,...}/<class>/      optional {domain}_{train,test}.pkl
fashion_mnist      /usr/share/datasets/fashion-mnist/ (Debian package dataset-fashion-mnist) or root
cifar10, cifar100  cifar-10-batches-py/, cifar-100-python/ (torchvision's folders; dataset_args download: true)
=================  ==============================================  ==========================================

The ImageNet variants are test-only (train = val = test = every image), as in CoOp; their ``classnames.txt`` may
sit in the variant's folder or in ``imagenet/``. A split JSON entry is ``[relpath, label, classname]``; class
names are taken from it in label order. Labels follow CoOp exactly, so the base/novel rule
(:func:`fedlit.data.protocol.base_novel_classes`) and K-shot sampling (:func:`fedlit.data.protocol.sample_kshot`)
apply unchanged.

This module imports nothing heavy (PIL is imported on first image load).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fedlit.lazy import lazy
from fedlit.errors import FedlitError
from fedlit.data.registry import ClassificationData, ImageSplit, Indices, register_dataset

torch = lazy("torch", __name__, "torch")

__all__ = [
    "FileImageSplit",
    "load_image",
    "COOP_JSON_DATASETS",
]

HOWTO = "see CoOp's DATASETS.md for how to get it"
DEFAULT_IMAGE_SIZE = 224


# --- file-backed split ---------------------------------------------------------------------------------------

def load_image(path: str, size: int) -> np.ndarray:
    """One image as uint8 [size, size, 3]: RGB, shorter side resized to ``size`` (bicubic), centre-cropped.

    Same geometry as torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` (CLIP's test transform).

    Raises:
        FedlitError: If the file is missing or cannot be decoded (the message names the file).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except FileNotFoundError:
        raise FedlitError(f"image not found: {path}; check data.root (the CoOp $DATA folder)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FedlitError(f"cannot read image {path} ({e}); re-download it or remove it from the split") from None
    w, h = im.size
    if (w, h) != (size, size):
        if w <= h:
            nw, nh = size, max(1, int(size * h / w))
        else:
            nw, nh = max(1, int(size * w / h)), size
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
    return np.array(im, dtype=np.uint8)  # a writable copy


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """A process-wide thread pool for image decoding (PIL releases the GIL while decoding and resizing)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            workers = min(16, max(4, os.cpu_count() or 4))
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedlit-img")
        return _POOL


@dataclass
class FileImageSplit(ImageSplit):
    """A split whose images are files on disk, decoded on demand.

    Attributes:
        paths: One file path per image (absolute, or relative to the working directory).
        image_size: Side of the square images returned by :meth:`images` (shorter side resized, centre crop).
        meta: Optional per-image attributes, arrays of length N (e.g. ``domain`` for pooled multi-domain data).
    """

    paths: list[str] = field(default_factory=list, repr=False)
    image_size: int = DEFAULT_IMAGE_SIZE
    meta: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.paths = list(self.paths)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def _rows(self, indices: Indices) -> np.ndarray:
        if indices is None:
            return np.arange(len(self.paths))
        if isinstance(indices, slice):
            return np.arange(len(self.paths))[indices]
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        return np.asarray(indices, dtype=np.int64).reshape(-1)

    def images(self, indices: Indices = None) -> torch.Tensor:
        """Images at ``indices`` as float [n, 3, S, S] in [0, 1], ``S = image_size``; decoded on a thread pool."""
        rows = self._rows(indices)
        size = int(self.image_size)
        out = torch.empty(len(rows), size, size, 3, dtype=torch.uint8)
        if len(rows) == 0:
            return out.permute(0, 3, 1, 2).float()

        def fill(i: int) -> None:
            out[i] = torch.from_numpy(load_image(self.paths[int(rows[i])], size))

        if len(rows) == 1:
            fill(0)
        else:
            for fut in [_pool().submit(fill, i) for i in range(len(rows))]:
                fut.result()  # re-raises the first FedlitError (naming the file)
        return out.permute(0, 3, 1, 2).float().div_(255.0)

    def view_crops(self, indices, params, size: tuple[int, int]) -> torch.Tensor:
        """Augmented views cut from the ORIGINAL file (any size), as Dassl's ``RandomResizedCrop`` does: the box
        ``params(k, H, W)`` resized to ``size`` with PIL bicubic, then flipped; decoded on the thread pool. Each
        distinct file is decoded once per call, all its views cut from that one decode (the view bank asks for
        the ``E`` views of a row at once: ``E`` decodes of the same file before, identical crops)."""
        from PIL import Image

        rows = self._rows(indices)
        out = torch.empty(len(rows), size[0], size[1], 3, dtype=torch.uint8)
        uniq, inverse = np.unique(rows, return_inverse=True)
        where = [np.flatnonzero(inverse == u) for u in range(len(uniq))]

        def fill(u: int) -> None:
            row = int(uniq[u])
            try:
                with Image.open(self.paths[row]) as im:
                    im = im.convert("RGB")
            except (OSError, ValueError, SyntaxError) as e:
                raise FedlitError(f"cannot read image {self.paths[row]} ({e}); check data.root") from None
            for i in where[u]:
                top, left, h, w, flip = params(int(i), im.height, im.width)
                v = im.resize((size[1], size[0]), Image.BICUBIC, box=(left, top, left + w, top + h))
                out[i] = torch.from_numpy(np.array(v.transpose(Image.FLIP_LEFT_RIGHT) if flip else v, dtype=np.uint8))

        for fut in [_pool().submit(fill, u) for u in range(len(uniq))]:
            fut.result()
        return out.permute(0, 3, 1, 2).float().div_(255.0)


# --- helpers -------------------------------------------------------------------------------------------------

def resolve_data_root(root: str | None, name: str) -> str:
    root = root or os.environ.get("FEDLIT_DATA")
    if not root:
        raise FedlitError(
            f"dataset '{name}' is read from disk but no data root is set; set data.root in the config "
            f"(--data.root DIR) or $FEDLIT_DATA to the folder holding the datasets (CoOp's $DATA)"
        )
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise FedlitError(f"data root {root} does not exist; set data.root or $FEDLIT_DATA to the CoOp $DATA folder")
    return root


def _require(path: str, name: str, what: str, also: str = "") -> str:
    if not os.path.exists(path):
        extra = f" ({also})" if also else ""
        raise FedlitError(f"{name}: {what} not found: {path}{extra}; {HOWTO}")
    return path


def check_first(paths: Sequence[str], name: str, listed_in: str) -> None:
    """Cheap sanity check of a whole layout: the first listed image must exist."""
    if paths and not os.path.exists(paths[0]):
        raise FedlitError(
            f"{name}: image {paths[0]} listed in {listed_in} does not exist; is data.root the CoOp $DATA folder? {HOWTO}"
        )


def list_visible(path: str) -> list[str]:
    """Non-hidden entries, sorted (CoOp's ``listdir_nohidden(sort=True)``)."""
    return sorted(e for e in os.listdir(path) if not e.startswith("."))


def _classnames_from_items(items: dict[str, list], name: str, source: str) -> list[str]:
    names: dict[int, str] = {}
    for split_items in items.values():
        for _, label, cname in split_items:
            if names.setdefault(label, cname) != cname:
                raise FedlitError(f"{name}: {source} gives label {label} two names, '{names[label]}' and '{cname}'")
    n = max(names) + 1 if names else 0
    missing = [i for i in range(n) if i not in names]
    if missing or n == 0:
        raise FedlitError(f"{name}: {source} has no image of label(s) {missing[:10]}; labels must be 0..C-1")
    return [names[i] for i in range(n)]


def _file_split(items: list, image_dir: str, size: int) -> FileImageSplit:
    return FileImageSplit(
        np.asarray([it[1] for it in items], dtype=np.int64),
        paths=[os.path.join(image_dir, it[0]) for it in items],
        image_size=size,
    )


def check_size(image_size: int) -> int:
    if int(image_size) < 1:
        raise FedlitError(f"image_size must be >= 1; got {image_size}")
    return int(image_size)


# --- CoOp split-JSON datasets --------------------------------------------------------------------------------

#: registered name → (dataset folder, image folder inside it, split JSON file inside it)
COOP_JSON_DATASETS: dict[str, tuple[str, str, str]] = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
}


def _read_split_json(path: str, name: str) -> dict[str, list]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise FedlitError(f"{name}: cannot read split file {path} ({e}); {HOWTO}") from None
    out = {}
    for split in ("train", "val", "test"):
        entries = raw.get(split) if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise FedlitError(f"{name}: split file {path} has no '{split}' list; {HOWTO}")
        items = []
        for e in entries:
            if not (isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], str)
                    and isinstance(e[1], int) and not isinstance(e[1], bool) and e[1] >= 0 and isinstance(e[2], str)):
                raise FedlitError(
                    f"{name}: bad entry {e!r} in '{split}' of {path}; expected [relpath, label, classname]"
                )
            items.append((e[0], int(e[1]), e[2]))
        out[split] = items
    return out


def _coop_json_factory(name: str):
    folder, image_folder, split_file = COOP_JSON_DATASETS[name]

    def build(root: str | None, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> ClassificationData:
        del seed  # fixed CoOp split
        size = check_size(image_size)
        base = os.path.join(resolve_data_root(root, name), folder)
        image_dir = os.path.join(base, image_folder) if image_folder else base
        split_path = os.path.join(base, split_file)
        _require(split_path, name, "split file", f"images expected in {image_dir}/")
        _require(image_dir, name, "image folder", f"next to {split_file}")
        items = _read_split_json(split_path, name)
        classnames = _classnames_from_items(items, name, split_file)
        splits = {s: _file_split(items[s], image_dir, size) for s in ("train", "val", "test")}
        for s in splits.values():
            check_first(s.paths, name, split_file)
        return ClassificationData(name, classnames, **splits, image_size=size)

    build.__doc__ = f"CoOp {name}: images in $DATA/{folder}/{image_folder}, split {split_file}."
    return build


for _name in COOP_JSON_DATASETS:
    register_dataset(_name)(_coop_json_factory(_name))


@register_dataset("fgvc_aircraft")
def _fgvc_aircraft(root: str | None, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> ClassificationData:
    """FGVC-Aircraft (100 variants): ``variants.txt`` gives the class order, ``images_variant_*.txt`` the splits."""
    del seed
    name = "fgvc_aircraft"
    size = check_size(image_size)
    base = os.path.join(resolve_data_root(root, name), "fgvc_aircraft")
    image_dir = os.path.join(base, "images")
    variants = _require(os.path.join(base, "variants.txt"), name, "class list")
    with open(variants, encoding="utf-8") as f:
        classnames = [line.strip() for line in f if line.strip()]
    lab = {c: i for i, c in enumerate(classnames)}
    _require(image_dir, name, "image folder")
    splits = {}
    for split in ("train", "val", "test"):
        path = _require(os.path.join(base, f"images_variant_{split}.txt"), name, "split file")
        items = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split(" ")
                if not parts or not parts[0]:
                    continue
                cname = " ".join(parts[1:])
                if cname not in lab:
                    raise FedlitError(f"{name}: variant '{cname}' in {path} is not in variants.txt")
                items.append((parts[0] + ".jpg", lab[cname], cname))
        splits[split] = _file_split(items, image_dir, size)
        check_first(splits[split].paths, name, os.path.basename(path))
    return ClassificationData(name, classnames, **splits, image_size=size)


# --- ImageNet and its variants -------------------------------------------------------------------------------

def _read_imagenet_classnames(path: str, name: str) -> dict[str, str]:
    """``classnames.txt``: lines ``<wnid> <class name with spaces>`` → {wnid: name}, file order."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.strip().split(" ", 1)
            if len(parts) == 2:
                out[parts[0]] = parts[1].strip()
            elif parts[0]:
                raise FedlitError(f"{name}: bad line {line.strip()!r} in {path}; expected '<wnid> <class name>'")
    if not out:
        raise FedlitError(f"{name}: {path} lists no class; {HOWTO}")
    return out


def _folder_items(image_dir: str, folders: Sequence[str], labels: Sequence[int]) -> tuple[list[str], list[int]]:
    paths, ys = [], []
    for folder, y in zip(folders, labels):
        d = os.path.join(image_dir, folder)
        if not os.path.isdir(d):
            continue
        files = [os.path.join(d, f) for f in list_visible(d) if os.path.isfile(os.path.join(d, f))]
        paths += files
        ys += [y] * len(files)
    return paths, ys


@register_dataset("imagenet")
def _imagenet(root: str | None, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> ClassificationData:
    """ImageNet-1k: ``images/train`` for training, ``images/val`` as test (and val), labels = sorted wnid order."""
    del seed
    name = "imagenet"
    size = check_size(image_size)
    base = os.path.join(resolve_data_root(root, name), "imagenet")
    cn = _read_imagenet_classnames(_require(os.path.join(base, "classnames.txt"), name, "class list"), name)
    wnids = sorted(cn)
    splits = {}
    for split, sub in (("train", "train"), ("test", "val")):
        d = _require(os.path.join(base, "images", sub), name, "image folder")
        unknown = sorted(set(f for f in list_visible(d) if os.path.isdir(os.path.join(d, f))) - set(cn))
        if unknown:
            raise FedlitError(f"{name}: folders {unknown[:5]} in {d} are not in classnames.txt")
        paths, ys = _folder_items(d, wnids, range(len(wnids)))
        if not paths:
            raise FedlitError(f"{name}: no image found under {d}/<wnid>/; {HOWTO}")
        splits[split] = FileImageSplit(np.asarray(ys), paths=paths, image_size=size)
    return ClassificationData(name, [cn[w] for w in wnids], train=splits["train"], val=splits["test"],
                              test=splits["test"], image_size=size)


#: registered name → (dataset folder, image folder inside it)
IMAGENET_VARIANTS: dict[str, tuple[str, str]] = {
    "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val"),
    "imagenet_sketch": ("imagenet-sketch", "images"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r"),
}


def _imagenet_variant_factory(name: str):
    folder, image_folder = IMAGENET_VARIANTS[name]

    def build(root: str | None, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> ClassificationData:
        del seed
        size = check_size(image_size)
        data_root = resolve_data_root(root, name)
        base = os.path.join(data_root, folder)
        image_dir = _require(os.path.join(base, image_folder), name, "image folder")
        cn_path = os.path.join(base, "classnames.txt")
        if not os.path.exists(cn_path):
            cn_path = os.path.join(data_root, "imagenet", "classnames.txt")
        cn_path = _require(cn_path, name, "classnames.txt", f"copy it from $DATA/imagenet/ to {base}/")
        cn = _read_imagenet_classnames(cn_path, name)
        if name == "imagenetv2":  # folders 0..999 = label index into the (sorted) ImageNet class list
            wnids = sorted(cn)
            folders = [str(i) for i in range(len(wnids))]
        else:  # one folder per wnid present (200 for -A and -R), label = position in sorted order
            folders = wnids = [f for f in list_visible(image_dir) if os.path.isdir(os.path.join(image_dir, f))]
            unknown = [w for w in wnids if w not in cn]
            if unknown:
                raise FedlitError(f"{name}: folders {unknown[:5]} in {image_dir} are not in {cn_path}")
        paths, ys = _folder_items(image_dir, folders, range(len(folders)))
        if not paths:
            raise FedlitError(f"{name}: no image found under {image_dir}/; {HOWTO}")
        split = FileImageSplit(np.asarray(ys), paths=paths, image_size=size)
        return ClassificationData(name, [cn[w] for w in wnids], train=split, val=split, test=split, image_size=size)

    build.__doc__ = f"{name} (test-only; train = val = test): images in $DATA/{folder}/{image_folder}/."
    return build


for _name in IMAGENET_VARIANTS:
    register_dataset(_name)(_imagenet_variant_factory(_name))


del _name
