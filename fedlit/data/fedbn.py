"""FedBN's multi-domain datasets: Office-Caltech10 and DomainNet (spec/methods.md §7.2-5).

Layout: ``$DATA/office_caltech_10/<domain>/<class>/`` (or FedBN's ``<domain>_{train,test}.pkl`` lists) and
``$DATA/DomainNet/<domain>/<class>/``. Class order is FedBN's ``label_dict`` index order, never a Python set's
order (the official code's class-order bug). ``office_caltech10`` pools every domain (``split.meta['domain']``
names each image's domain); ``office_caltech10-<domain>`` holds one domain, for one-client-per-domain federations.

Data volume: with FedBN's pickles the whole ``<domain>_train.pkl`` trains and ``<domain>_test.pkl`` tests, as the
official FedPGP code does (``data_utils.py:258-297``, ``OfficeDataset`` ``:632-653``: no shot sampling — its
``--num_shots 64`` only sets the batch; pair it with ``data.shots: -1``). ``val_fraction`` (default 0, the official
volume) cuts a seeded validation share out of the training list instead (``0.1``: fedlit's former protocol; with
``data.shots: 64`` that is 3–8× less DomainNet training data). Not reproduced, documented: the released code's
test sets are hand-edited per experiment — Office-Caltech10 gives every client the same set, amazon + caltech + dslr
train AND test images (``data_utils.py:296``), DomainNet infograph's train + test (``:97``) — so its seen-domain
accuracies are measured partly on training images; fedlit tests each domain on its own test list only.
Without pickles (class folders) a seeded per-class ``test_fraction`` (0.2) is held out for testing.
"""

from __future__ import annotations

import io
import os

import numpy as np

from fedlit.data.arrays import SafeUnpickler
from fedlit.data.coop import DEFAULT_IMAGE_SIZE, FileImageSplit, check_first, check_size, resolve_data_root, list_visible
from fedlit.data.registry import ClassificationData, register_dataset
from fedlit.errors import FedlitError

__all__ = ["OFFICE_DOMAINS", "OFFICE_CLASSES", "DOMAINNET_DOMAINS", "DOMAINNET_CLASSES"]

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


def _load_list_pickle(path: str, name: str) -> tuple[list[str], list]:
    """FedBN's ``{domain}_{train,test}.pkl``: ``(paths, labels)``, labels as class-name strings or ints."""
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(io.BytesIO(f.read())).load()
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
            files = [os.path.join(cdir, f) for f in list_visible(cdir) if os.path.isfile(os.path.join(cdir, f))]
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
        check_first(out[split][0], name, f"{domain}_{split}.pkl" if use_pickles else f"{base}/{domain}")
    return out


def _multi_factory(dataset: str, domain: str | None):
    folder, domains, classes = _MULTI[dataset]
    name = dataset if domain is None else f"{dataset}-{domain}"

    def build(root: str | None, seed: int, image_size: int = DEFAULT_IMAGE_SIZE, test_fraction: float = 0.2,
              val_fraction: float = 0.0) -> ClassificationData:
        size = check_size(image_size)
        if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
            raise FedlitError(f"{name}: need 0 <= test_fraction, val_fraction and their sum < 1")
        data_root = resolve_data_root(root, name)
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
                     f"seeded per-class test split (val_fraction: a validation cut, default 0 = the official whole "
                     f"train list); split.meta['domain'] names each image's domain.")
    return build


for _ds, (_folder, _domains, _classes) in _MULTI.items():
    register_dataset(_ds)(_multi_factory(_ds, None))
    for _d in _domains:
        register_dataset(f"{_ds}-{_d}")(_multi_factory(_ds, _d))


del _ds, _folder, _domains, _classes, _d
