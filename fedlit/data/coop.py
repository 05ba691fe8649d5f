"""Real datasets: the CoOp ``$DATA`` layout, FedBN's Office-Caltech10 / DomainNet, and Fashion-MNIST.

Every factory here takes ``root`` = the CoOp ``$DATA`` folder (``data.root`` in a config, or ``$FEDLIT_DATA``)
and returns a :class:`~fedlit.data.registry.ClassificationData` whose splits load images lazily from disk
(:class:`FileImageSplit`), except Fashion-MNIST, which is small enough to hold in memory.

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
=================  ==============================================  ==========================================

The ImageNet variants are test-only (train = val = test = every image), as in CoOp; their ``classnames.txt`` may
sit in the variant's folder or in ``imagenet/``. A split JSON entry is ``[relpath, label, classname]``; class
names are taken from it in label order. Labels follow CoOp exactly, so the base/novel rule
(:func:`fedlit.data.protocol.base_novel_classes`) and K-shot sampling (:func:`fedlit.data.protocol.sample_kshot`)
apply unchanged.

This module imports nothing heavy (PIL is imported on first image load).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from fedlit.errors import FedlitError
from fedlit.data.registry import ClassificationData, ImageSplit, Indices, TensorImageSplit, register_dataset

__all__ = [
    "FileImageSplit",
    "load_image",
    "COOP_JSON_DATASETS",
    "OFFICE_DOMAINS",
    "OFFICE_CLASSES",
    "DOMAINNET_DOMAINS",
    "DOMAINNET_CLASSES",
    "FASHION_MNIST_CLASSES",
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


# --- helpers -------------------------------------------------------------------------------------------------

def _data_root(root: str | None, name: str) -> str:
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


def _check_first(paths: Sequence[str], name: str, listed_in: str) -> None:
    """Cheap sanity check of a whole layout: the first listed image must exist."""
    if paths and not os.path.exists(paths[0]):
        raise FedlitError(
            f"{name}: image {paths[0]} listed in {listed_in} does not exist; is data.root the CoOp $DATA folder? {HOWTO}"
        )


def _listdir(path: str) -> list[str]:
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


def _check_size(image_size: int) -> int:
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
        size = _check_size(image_size)
        base = os.path.join(_data_root(root, name), folder)
        image_dir = os.path.join(base, image_folder) if image_folder else base
        split_path = os.path.join(base, split_file)
        _require(split_path, name, "split file", f"images expected in {image_dir}/")
        _require(image_dir, name, "image folder", f"next to {split_file}")
        items = _read_split_json(split_path, name)
        classnames = _classnames_from_items(items, name, split_file)
        splits = {s: _file_split(items[s], image_dir, size) for s in ("train", "val", "test")}
        for s in splits.values():
            _check_first(s.paths, name, split_file)
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
    size = _check_size(image_size)
    base = os.path.join(_data_root(root, name), "fgvc_aircraft")
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
        _check_first(splits[split].paths, name, os.path.basename(path))
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
        files = [os.path.join(d, f) for f in _listdir(d) if os.path.isfile(os.path.join(d, f))]
        paths += files
        ys += [y] * len(files)
    return paths, ys


@register_dataset("imagenet")
def _imagenet(root: str | None, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> ClassificationData:
    """ImageNet-1k: ``images/train`` for training, ``images/val`` as test (and val), labels = sorted wnid order."""
    del seed
    name = "imagenet"
    size = _check_size(image_size)
    base = os.path.join(_data_root(root, name), "imagenet")
    cn = _read_imagenet_classnames(_require(os.path.join(base, "classnames.txt"), name, "class list"), name)
    wnids = sorted(cn)
    splits = {}
    for split, sub in (("train", "train"), ("test", "val")):
        d = _require(os.path.join(base, "images", sub), name, "image folder")
        unknown = sorted(set(f for f in _listdir(d) if os.path.isdir(os.path.join(d, f))) - set(cn))
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
        size = _check_size(image_size)
        data_root = _data_root(root, name)
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
            folders = wnids = [f for f in _listdir(image_dir) if os.path.isdir(os.path.join(image_dir, f))]
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


# --- FedBN multi-domain datasets: Office-Caltech10, DomainNet ------------------------------------------------

OFFICE_DOMAINS = ("amazon", "caltech", "dslr", "webcam")
#: FedBN's ``label_dict`` order (label i = OFFICE_CLASSES[i]); folder names are these with spaces → underscores.
OFFICE_CLASSES = ("back pack", "bike", "calculator", "headphones", "keyboard", "laptop computer", "monitor",
                  "mouse", "mug", "projector")
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_CLASSES = ("bird", "feather", "headphones", "ice cream", "teapot", "tiger", "whale", "windmill",
                     "wine glass", "zebra")

_MULTI = {
    "office_caltech10": ("office_caltech_10", OFFICE_DOMAINS, OFFICE_CLASSES),
    "domainnet": ("DomainNet", DOMAINNET_DOMAINS, DOMAINNET_CLASSES),
}


class _ListUnpickler(pickle.Unpickler):
    """Loads only lists/tuples/str/int and numpy arrays of them; refuses every other global (no code runs)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_list_pickle(path: str, name: str) -> tuple[list[str], list]:
    """FedBN's ``{domain}_{train,test}.pkl``: ``(paths, labels)``, labels as class-name strings or ints."""
    try:
        with open(path, "rb") as f:
            obj = _ListUnpickler(io.BytesIO(f.read())).load()
    except Exception as e:  # noqa: BLE001 - any failure of an untrusted file is a user error
        raise FedlitError(f"{name}: cannot load {path} ({e}); expected a pickled (paths, labels) pair") from None
    ok = isinstance(obj, (list, tuple, np.ndarray)) and len(obj) == 2
    if ok:
        paths, labels = ([x.item() if isinstance(x, np.generic) else x for x in list(part)] for part in obj)
        ok = len(paths) == len(labels) and all(isinstance(p, str) for p in paths) and all(
            isinstance(y, (str, int)) and not isinstance(y, bool) for y in labels)
    if not ok:
        raise FedlitError(f"{name}: {path} does not hold a (paths, labels) pair of equal-length lists")
    return paths, labels


def _resolve(rel: str, data_root: str, base: str, domain: str) -> str:
    """FedBN pickle paths are relative to ``$DATA`` (``office_caltech_10/amazon/...``); accept a few variants."""
    rel = rel.replace("\\", "/")
    for cand in (os.path.join(data_root, rel), os.path.join(base, rel)):
        if os.path.exists(cand):
            return cand
    parts = rel.split("/")
    if domain in parts:  # strip any prefix before the domain folder
        return os.path.join(base, *parts[parts.index(domain):])
    return os.path.join(data_root, rel)


def _split_rows(n: int, rng: np.random.Generator, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``range(n)``; return (rest, held-out) with ``round(fraction * n)`` held out, both sorted."""
    perm = rng.permutation(n)
    k = int(round(fraction * n))
    return np.sort(perm[k:]), np.sort(perm[:k])


def _domain_items(dataset: str, name: str, data_root: str, domain: str, seed: int, test_fraction: float,
                  val_fraction: float) -> dict[str, tuple[list[str], list[int]]]:
    folder, domains, classes = _MULTI[dataset]
    base = os.path.join(data_root, folder)
    dom_id = domains.index(domain)
    lab = {c: i for i, c in enumerate(classes)}
    lab.update({c.replace(" ", "_"): i for i, c in enumerate(classes)})
    train_pkl, test_pkl = (os.path.join(base, f"{domain}_{s}.pkl") for s in ("train", "test"))

    def label_of(y, where: str) -> int:
        if isinstance(y, int):
            if not 0 <= y < len(classes):
                raise FedlitError(f"{name}: label {y} in {where} is outside 0..{len(classes) - 1}")
            return y
        if y not in lab:
            raise FedlitError(f"{name}: class '{y}' in {where} is not one of {', '.join(classes)}")
        return lab[y]

    out: dict[str, tuple[list[str], list[int]]] = {}
    use_pickles = os.path.exists(train_pkl) and os.path.exists(test_pkl)
    if use_pickles:
        for split, pkl in (("train", train_pkl), ("test", test_pkl)):
            rel, ys = _load_list_pickle(pkl, name)
            out[split] = ([_resolve(p, data_root, base, domain) for p in rel], [label_of(y, pkl) for y in ys])
        rest, val = _split_rows(len(out["train"][0]), np.random.default_rng([seed, dom_id, 1]), val_fraction)
        paths, ys = out["train"]
        out["val"] = ([paths[i] for i in val], [ys[i] for i in val])
        out["train"] = ([paths[i] for i in rest], [ys[i] for i in rest])
    else:
        ddir = os.path.join(base, domain)
        if not os.path.isdir(ddir):
            raise FedlitError(
                f"{name}: domain folder not found: {ddir} (expected {ddir}/<class>/*.jpg, or {train_pkl} + "
                f"{os.path.basename(test_pkl)}); see FedBN's README for how to get it"
            )
        out = {s: ([], []) for s in ("train", "val", "test")}
        found = 0
        for c, cname in enumerate(classes):
            cdir = os.path.join(ddir, cname.replace(" ", "_"))
            if not os.path.isdir(cdir):
                continue
            found += 1
            files = [os.path.join(cdir, f) for f in _listdir(cdir) if os.path.isfile(os.path.join(cdir, f))]
            perm = np.random.default_rng([seed, dom_id, c]).permutation(len(files))
            n_test, n_val = int(round(test_fraction * len(files))), int(round(val_fraction * len(files)))
            test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
            for split, rows in (("train", train), ("val", val), ("test", test)):
                out[split][0].extend(files[i] for i in np.sort(rows))
                out[split][1].extend([c] * len(rows))
        if not found:
            raise FedlitError(
                f"{name}: no class folder ({', '.join(c.replace(' ', '_') for c in classes)}) in {ddir}"
            )
    for split in ("train", "test"):
        _check_first(out[split][0], name, f"{domain}_{split}.pkl" if use_pickles else f"{base}/{domain}")
    return out


def _multi_factory(dataset: str, domain: str | None):
    folder, domains, classes = _MULTI[dataset]
    name = dataset if domain is None else f"{dataset}-{domain}"

    def build(root: str | None, seed: int, image_size: int = DEFAULT_IMAGE_SIZE, test_fraction: float = 0.2,
              val_fraction: float = 0.1) -> ClassificationData:
        size = _check_size(image_size)
        if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
            raise FedlitError(f"{name}: need 0 <= test_fraction, val_fraction and their sum < 1")
        data_root = _data_root(root, name)
        base = os.path.join(data_root, folder)
        if not os.path.isdir(base):
            raise FedlitError(f"{name}: folder not found: {base} (one sub-folder per domain: {', '.join(domains)}); "
                              f"see FedBN's README for how to get it")
        splits = {}
        per_domain = {d: _domain_items(dataset, name, data_root, d, int(seed), test_fraction, val_fraction)
                      for d in (domains if domain is None else (domain,))}
        for split in ("train", "val", "test"):
            paths, ys, dom = [], [], []
            for d, items in per_domain.items():
                paths += items[split][0]
                ys += items[split][1]
                dom += [d] * len(items[split][0])
            splits[split] = FileImageSplit(np.asarray(ys, dtype=np.int64), paths=paths, image_size=size,
                                           meta={"domain": np.asarray(dom, dtype=str)})
        return ClassificationData(name, list(classes), **splits, image_size=size)

    build.__doc__ = (f"{name}: FedBN layout $DATA/{folder}/<domain>/<class>/ (or <domain>_{{train,test}}.pkl); "
                     f"seeded per-class test/val split; split.meta['domain'] names each image's domain.")
    return build


for _ds, (_folder, _domains, _classes) in _MULTI.items():
    register_dataset(_ds)(_multi_factory(_ds, None))
    for _d in _domains:
        register_dataset(f"{_ds}-{_d}")(_multi_factory(_ds, _d))


# --- Fashion-MNIST (Debian package dataset-fashion-mnist) ----------------------------------------------------

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_FM_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) of unsigned bytes as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise FedlitError(f"cannot read {path} ({e}); reinstall it (apt-get install dataset-fashion-mnist)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise FedlitError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise FedlitError(f"{path}: expected {int(np.prod(dims))} bytes of data for shape {dims}, got {body.size}")
    return body.reshape(dims)


def _find_fashion_mnist(root: str | None) -> dict[str, str]:
    root = root or os.environ.get("FEDLIT_DATA")
    cands = []
    if root:
        root = os.path.expanduser(str(root))
        cands += [root, os.path.join(root, "fashion-mnist"), os.path.join(root, "fashion_mnist")]
    cands.append(FASHION_MNIST_DEBIAN_DIR)
    for d in cands:
        found = {}
        for key, stem in _FM_FILES.items():
            for fname in (stem + ".gz", stem):
                if os.path.isfile(os.path.join(d, fname)):
                    found[key] = os.path.join(d, fname)
                    break
        if len(found) == len(_FM_FILES):
            return found
    raise FedlitError(
        f"fashion_mnist: the four IDX files ({', '.join(s + '.gz' for s in _FM_FILES.values())}) are in none of "
        f"{', '.join(cands)}; install the Debian package: apt-get install dataset-fashion-mnist"
    )


@register_dataset("fashion_mnist")
def _fashion_mnist(root: str | None, seed: int, val_fraction: float = 0.1) -> ClassificationData:
    """Fashion-MNIST, 28 px grey (as RGB), in memory; val = a seeded ``val_fraction`` of train (overlapping it)."""
    files = _find_fashion_mnist(root)
    arrays = {k: read_idx(p) for k, p in files.items()}
    splits = {}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise FedlitError(f"fashion_mnist: {files[split + '_x']} / {files[split + '_y']} do not match")
        grey = torch.from_numpy(x.copy()).unsqueeze(1)  # [N, 1, 28, 28]
        splits[split] = TensorImageSplit(y.astype(np.int64), data=grey.expand(-1, 3, -1, -1))
    train = splits["train"]
    n_val = int(round(val_fraction * len(train)))
    val_idx = np.sort(np.random.default_rng([int(seed), 7]).choice(len(train), size=n_val, replace=False))
    grey = train.data[:, :1]
    splits["val"] = TensorImageSplit(train.labels[val_idx],
                                     data=grey[torch.as_tensor(val_idx)].expand(-1, 3, -1, -1))
    return ClassificationData("fashion_mnist", list(FASHION_MNIST_CLASSES), **splits, image_size=x.shape[-1])


del _name, _ds, _folder, _domains, _classes, _d
