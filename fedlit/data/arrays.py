"""Datasets held in memory as arrays: Fashion-MNIST (Debian's ``dataset-fashion-mnist``) and CIFAR-10/100.

CIFAR is read from torchvision's folders under the data root (``cifar-10-batches-py/``, ``cifar-100-python/``),
with a restricted unpickler (no code in a data file can run); ``dataset_args: {download: true}`` fetches the
archive first when the network allows. CIFAR-100 splits carry ``meta['coarse']`` (the 20 superclasses) for the
two-level Dirichlet partition ``noniid-labeldir100``.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle

import numpy as np

from ..lazy import lazy
from fedlit.data.registry import ClassificationData, TensorImageSplit, register_dataset
from fedlit.errors import FedlitError

torch = lazy("torch", __name__, "torch")

__all__ = ["FASHION_MNIST_CLASSES", "CIFAR_OFFICIAL_NORM", "SafeUnpickler", "read_idx", "load_cifar"]


class SafeUnpickler(pickle.Unpickler):
    """Loads only built-in containers/str/bytes/numbers and numpy arrays; refuses every other global (no code runs)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # bytes in protocol-2 pickles
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


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
    splits["val"] = _seeded_val(splits["train"], seed, val_fraction)
    return ClassificationData("fashion_mnist", list(FASHION_MNIST_CLASSES), **splits, image_size=x.shape[-1])


# --- CIFAR-10 / CIFAR-100 (torchvision's python folders) -------------------------------------------------------

#: name → (folder torchvision extracts, archive URL, archive md5, train files, test file, meta file, label key)
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "labels"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", ["train"], "test", "meta", "fine_labels"),
}


def _unpickle(path: str, name: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except OSError as e:
        raise FedlitError(f"{name}: cannot read {path} ({e})") from None
    except Exception as e:  # noqa: BLE001 - any failure of an untrusted file is a user error
        raise FedlitError(f"{name}: {path} is not a CIFAR python batch ({e}); re-extract the archive") from None
    if not isinstance(obj, dict):
        raise FedlitError(f"{name}: {path} is not a CIFAR python batch (a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _find_cifar(root: str | None, name: str, download: bool) -> str:
    folder, url, md5, train_files, test_file, meta_file, _ = _CIFAR[name]
    root = root or os.environ.get("FEDLIT_DATA")
    if not root:
        raise FedlitError(f"{name}: no data root is set; set data.root (or $FEDLIT_DATA) to the folder holding "
                          f"{folder}/ (torchvision's layout)")
    root = os.path.expanduser(str(root))
    cands = [os.path.join(root, folder), os.path.join(root, name, folder), os.path.join(root, "cifar", folder)]
    needed = [*train_files, test_file, meta_file]
    for d in cands:
        if all(os.path.isfile(os.path.join(d, f)) for f in needed):
            return d
    if download:
        import socket

        from torchvision.datasets.utils import download_and_extract_archive

        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            download_and_extract_archive(url, download_root=root, md5=md5)
        except Exception as e:  # noqa: BLE001 - no network, disk full …: say what to do instead
            raise FedlitError(f"{name}: download of {url} failed ({type(e).__name__}: {e}); download it by hand "
                              f"and extract it into {root}") from None
        finally:
            socket.setdefaulttimeout(old)
        return _find_cifar(root, name, download=False)
    raise FedlitError(f"{name}: {folder}/ with {', '.join(needed)} not found in {root}; extract {url} there, or set "
                      f"data.dataset_args: {{download: true}} where the network allows")


def load_cifar(name: str, root: str | None, download: bool = False) -> tuple[list[str], dict[str, tuple]]:
    """CIFAR-10/100 arrays: ``(classnames, {"train": (x uint8 [N,3,32,32], y, coarse|None), "test": …})``."""
    folder, _, _, train_files, test_file, meta_file, key = _CIFAR[name]
    d = _find_cifar(root, name, download)
    meta = _unpickle(os.path.join(d, meta_file), name)
    names_key = "label_names" if name == "cifar10" else "fine_label_names"
    if names_key not in meta:
        raise FedlitError(f"{name}: {os.path.join(d, meta_file)} has no '{names_key}'")
    classnames = [(c.decode() if isinstance(c, bytes) else str(c)).replace("_", " ") for c in meta[names_key]]
    out = {}
    for split, files in (("train", train_files), ("test", [test_file])):
        xs, ys, coarse = [], [], []
        for f in files:
            batch = _unpickle(os.path.join(d, f), name)
            if "data" not in batch or key not in batch:
                raise FedlitError(f"{name}: {os.path.join(d, f)} has no 'data'/'{key}' entries")
            x = np.asarray(batch["data"], dtype=np.uint8)
            y = np.asarray(batch[key], dtype=np.int64)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
                raise FedlitError(f"{name}: {os.path.join(d, f)} holds data of shape {x.shape} for {len(y)} labels; "
                                  f"expected [N, 3072]")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y)
            if "coarse_labels" in batch:
                coarse.append(np.asarray(batch["coarse_labels"], dtype=np.int64))
        y = np.concatenate(ys)
        if y.size and (y.min() < 0 or y.max() >= len(classnames)):
            raise FedlitError(f"{name}: labels outside 0..{len(classnames) - 1} in {d}")
        out[split] = (np.concatenate(xs), y, np.concatenate(coarse) if coarse else None)
    return classnames, out


def _seeded_val(train: TensorImageSplit, seed: int, fraction: float) -> TensorImageSplit:
    """A seeded ``fraction`` of the training split (overlapping it), as the in-memory datasets' ``val``."""
    n_val = int(round(fraction * len(train)))
    rows = np.sort(np.random.default_rng([int(seed), 7]).choice(len(train), size=n_val, replace=False))
    meta = {k: v[rows] for k, v in train.meta.items()}
    return TensorImageSplit(train.labels[rows], data=train.data[torch.as_tensor(rows)], meta=meta)


#: The official FedPGP / FedOTP CIFAR pipeline (their ``DatasetCifar100``): ``ToTensor → Normalize(mean, std) →
#: Resize([224, 224])`` on the 32-px image (torchvision's tensor resize: bilinear), in training and evaluation
#: alike, with no augmentation. The statistics are the ones that code hard-codes for each dataset.
CIFAR_OFFICIAL_NORM = {
    "cifar10": {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010), "resize": "bilinear"},
    "cifar100": {"mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762), "resize": "bilinear"},
}


def _cifar_factory(name: str):
    def build(root: str | None, seed: int, download: bool = False, val_fraction: float = 0.1,
              preprocess: str = "clip") -> ClassificationData:
        if preprocess not in ("clip", "official"):
            raise FedlitError(f"{name}: dataset_args preprocess={preprocess!r}; use 'clip' (the backbone's resize "
                              f"and mean/std) or 'official' (FedPGP/FedOTP: CIFAR mean/std, bilinear resize)")
        classnames, arrays = load_cifar(name, root, download)
        splits = {}
        for split, (x, y, coarse) in arrays.items():
            meta = {} if coarse is None else {"coarse": coarse}
            splits[split] = TensorImageSplit(y, data=torch.from_numpy(x), meta=meta)
        splits["val"] = _seeded_val(splits["train"], seed, val_fraction)
        if preprocess == "official":
            for s in splits.values():
                s.pixel_norm = dict(CIFAR_OFFICIAL_NORM[name])
        return ClassificationData(name, classnames, **splits, image_size=32)

    build.__doc__ = (f"{name}: torchvision's {_CIFAR[name][0]}/ under the data root, in memory (32 px); "
                     f"val = a seeded val_fraction of train (overlapping it); download: true fetches it; "
                     f"preprocess: clip (the backbone's bicubic resize and mean/std) or official (FedPGP/FedOTP: "
                     f"CIFAR mean/std, then bilinear resize to the tower's size, as their code does).")
    return build


for _name in _CIFAR:
    register_dataset(_name)(_cifar_factory(_name))
del _name
