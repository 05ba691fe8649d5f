"""Domain-generalisation datasets of FedMVP's protocols (spec 3a §3.8): one registered dataset per domain,
``<dataset>_<domain>``, read from the data root:

| dataset | folder | domains |
|---|---|---|
| ``pacs`` | ``pacs/<domain>/`` | art_painting, cartoon, photo, sketch |
| ``officehome`` | ``officehome/<domain>/`` | art, clipart, product, realworld |
| ``vlcs`` | ``VLCS/<DOMAIN>/`` (images in ``full/``) | CALTECH, LABELME, PASCAL, SUN |
| ``terra`` | ``terra_incognita/location_<n>/`` | L38, L43, L46, L100 |
| ``domainnet`` | ``domainnet/<domain>/`` (the full 345 classes) | clipart, infograph, painting, quickdraw, real, sketch |

A domain folder holding a CoOp split file (``split*.json``: ``{"train"|"val"|"test": [[relpath, label, classname],
…]}``, paths relative to the folder, or to ``full/`` for VLCS) is read as it says — FedMVP's own splits are such
files, not shipped. Without one, the images under ``<class>/`` (``full/<class>/`` for VLCS) are split per class
with a fixed rule: every 5th file (sorted names, starting with the 5th) is a test image, the rest train
(80/20; val = test). Class names are the folder names (``_`` → space) in sorted order, so every domain of a dataset
has the same class list.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from ..errors import FedlitError
from .coop import DEFAULT_IMAGE_SIZE, _classnames_from_items, _file_split, _read_split_json, check_size, resolve_data_root
from .registry import ClassificationData, register_dataset
from .shift_readers import image_folder

#: dataset → (folder, {domain name: sub-folder}, image sub-folder inside a domain)
DG_DATASETS: dict[str, tuple[str, dict[str, str], str]] = {
    "pacs": ("pacs", {d: d for d in ("art_painting", "cartoon", "photo", "sketch")}, ""),
    "officehome": ("officehome", {d: d for d in ("art", "clipart", "product", "realworld")}, ""),
    "vlcs": ("VLCS", {d: d for d in ("CALTECH", "LABELME", "PASCAL", "SUN")}, "full"),
    "terra": ("terra_incognita", {f"L{n}": f"location_{n}" for n in (38, 43, 46, 100)}, ""),
    "domainnet": ("domainnet", {d: d for d in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")}, ""),
}


def split_every_fifth(labels: np.ndarray) -> np.ndarray:
    """Boolean test mask of the fixed 80/20 rule: within each class (in file order) positions 4, 9, 14 … are test."""
    labels = np.asarray(labels)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        test[rows[4::5]] = True
    return test


def _dg_factory(dataset: str, domain: str):
    folder, domains, images = DG_DATASETS[dataset]
    name = f"{dataset}_{domain}"

    def build(root, seed, image_size: int = DEFAULT_IMAGE_SIZE) -> ClassificationData:
        del seed  # one fixed split per domain (FedMVP has no rotation)
        size = check_size(image_size)
        base = os.path.join(resolve_data_root(root, name), folder, domains[domain])
        image_dir = os.path.join(base, images) if images else base
        splits_json = sorted(glob.glob(os.path.join(base, "split*.json")))
        if splits_json:
            items = _read_split_json(splits_json[0], name)
            classnames = _classnames_from_items(items, name, os.path.basename(splits_json[0]))
            splits = {s: _file_split(items[s], image_dir, size) for s in ("train", "val", "test")}
        else:
            classes, whole = image_folder(image_dir, name, size)
            classnames = [c.replace("_", " ") for c in classes]
            test = split_every_fifth(whole.labels)
            part = {k: type(whole)(whole.labels[m], paths=[p for p, t in zip(whole.paths, m) if t], image_size=size)
                    for k, m in (("train", ~test), ("test", test))}
            splits = {"train": part["train"], "val": part["test"], "test": part["test"]}
        if not len(splits["train"]) or not len(splits["test"]):
            raise FedlitError(f"{name}: {image_dir} gives an empty train or test split; check data.root")
        return ClassificationData(name, classnames, **splits, image_size=size)

    build.__doc__ = f"{dataset} domain {domain} (FedMVP DG): $DATA/{folder}/{domains[domain]}/ (fedlit.data.dg)."
    return build


for _ds, (_f, _domains, _i) in DG_DATASETS.items():
    for _d in _domains:
        register_dataset(f"{_ds}_{_d}")(_dg_factory(_ds, _d))
del _ds, _f, _domains, _i, _d

__all__ = ["DG_DATASETS", "split_every_fifth"]
