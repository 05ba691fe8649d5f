"""Real-dataset loaders on tiny fake trees mirroring each on-disk layout (CoOp $DATA, FedBN, Fashion-MNIST)."""

from __future__ import annotations

import gzip
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fedlit.data import arrays as AR
from fedlit.data import coop as C
from fedlit.data import fedbn as FB
from fedlit.data import protocol as P
from fedlit.data import registry as R
from fedlit.errors import FedlitError


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("FEDLIT_DATA", raising=False)
    R.clear_cache()
    yield
    R.clear_cache()


def write_image(path, colour=(200, 10, 10), size=(8, 8), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def write_split_json(root, folder, image_folder, split_file, classes, per_split=(3, 1, 2), ext="jpg"):
    """Images ``<class>/<split>_<i>.<ext>`` for each class; JSON with train/val/test ``[relpath, label, name]``."""
    base = os.path.join(root, folder)
    image_dir = os.path.join(base, image_folder) if image_folder else base
    split = {}
    for s, n in zip(("train", "val", "test"), per_split):
        split[s] = []
        for label, cname in enumerate(classes):
            for i in range(n):
                rel = f"{cname.replace(' ', '_')}/{s}_{i}.{ext}"
                write_image(os.path.join(image_dir, rel), colour=(label * 20 % 256, 0, 0))
                split[s].append([rel, label, cname])
    with open(os.path.join(base, split_file), "w") as f:
        json.dump(split, f)
    return base


# --- CoOp split-JSON datasets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(C.COOP_JSON_DATASETS))
def test_coop_json_layout(tmp_path, name):
    folder, image_folder, split_file = C.COOP_JSON_DATASETS[name]
    classes = ["zebra", "apple pie", "Annual Crop Land"]  # label order deliberately not alphabetical
    write_split_json(tmp_path, folder, image_folder, split_file, classes)
    data = R.get_dataset(name, root=str(tmp_path))
    assert data.name == name and data.classnames == classes
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 6)
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x = data.test.images([0, 5])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    # label 0 is pure black, label 2 has red = 40/255 everywhere
    assert x[0].abs().max().item() == 0.0
    assert torch.allclose(x[1, 0], torch.full((224, 224), 40 / 255), atol=2 / 255)


def test_split_json_labels_define_order_and_sizes(tmp_path):
    # labels in the JSON, not file order or names, define the class order
    base = tmp_path / "oxford_pets"
    for rel in ("b/1.jpg", "a/1.jpg"):
        write_image(str(base / "images" / rel))
    (base / "split_zhou_OxfordPets.json").write_text(json.dumps(
        {"train": [["b/1.jpg", 1, "beagle"], ["a/1.jpg", 0, "abyssinian"]], "val": [], "test": [["a/1.jpg", 0, "abyssinian"]]}))
    data = R.get_dataset("oxford_pets", root=str(tmp_path), image_size=16)
    assert data.classnames == ["abyssinian", "beagle"]
    assert data.train.labels.tolist() == [1, 0] and len(data.val) == 0
    assert data.image_size == 16 and data.train.images().shape == (2, 3, 16, 16)
    assert data.val.images().shape == (0, 3, 16, 16)


def test_resize_shorter_side_and_centre_crop(tmp_path):
    # 18x6 image: left third red, middle third green, right third blue. Size 6: shorter side already 6, so no
    # resize, and the centre 6x6 crop is exactly the green third.
    img = np.zeros((6, 18, 3), dtype=np.uint8)
    img[:, :6, 0] = 255
    img[:, 6:12, 1] = 255
    img[:, 12:, 2] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(img).save(path)
    out = C.load_image(str(path), 6)
    assert out.shape == (6, 6, 3)
    assert (out[:, :, 1] == 255).all() and (out[:, :, 0] == 0).all() and (out[:, :, 2] == 0).all()
    tall = C.load_image(str(path), 3)  # 18x6 → 9x3, crop columns 3..5 of 9 = the green third
    assert tall.shape == (3, 3, 3) and tall[:, :, 1].min() > 200 and tall[:, :, 0].max() < 60
    # grey and palette images come back as RGB
    Image.new("L", (5, 5), 77).save(tmp_path / "grey.png")
    assert C.load_image(str(tmp_path / "grey.png"), 5).tolist() == np.full((5, 5, 3), 77).tolist()


def test_base_novel_counts_on_fake_flowers_and_dtd(tmp_path):
    flowers = [f"flower {i}" for i in range(102)]
    dtd = [f"texture {i}" for i in range(47)]
    write_split_json(tmp_path, "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", flowers, (1, 0, 1))
    write_split_json(tmp_path, "dtd", "images", "split_zhou_DescribableTextures.json", dtd, (1, 0, 1))
    for name, n, counts in (("oxford_flowers", 102, (51, 51)), ("dtd", 47, (24, 23))):
        data = R.get_dataset(name, root=str(tmp_path))
        assert data.num_classes == n and len(data.test) == n
        base, novel = P.base_novel_classes(data.num_classes)
        assert (len(base), len(novel)) == counts
        assert [data.classnames[c] for c in novel][:1] == [data.classnames[counts[0]]]
        # K-shot sampling still comes from protocol.sample_kshot, on the dataset's labels
        idx = P.sample_kshot(data.train.labels, base, 1, seed=0)
        assert data.train.labels[idx].tolist() == base


def test_missing_root_split_file_and_image_folder(tmp_path):
    with pytest.raises(FedlitError, match=r"data\.root.*FEDLIT_DATA"):
        R.get_dataset("oxford_pets", root=None)
    with pytest.raises(FedlitError, match="does not exist"):
        R.get_dataset("oxford_pets", root=str(tmp_path / "nope"))
    with pytest.raises(FedlitError, match=r"split_zhou_OxfordPets\.json.*DATASETS\.md"):
        R.get_dataset("oxford_pets", root=str(tmp_path))
    (tmp_path / "caltech-101").mkdir()
    (tmp_path / "caltech-101" / "split_zhou_Caltech101.json").write_text('{"train": [], "val": [], "test": []}')
    with pytest.raises(FedlitError, match=r"image folder.*101_ObjectCategories"):
        R.get_dataset("caltech101", root=str(tmp_path))
    # a split file that points at images that are not there
    (tmp_path / "caltech-101" / "101_ObjectCategories").mkdir()
    (tmp_path / "caltech-101" / "split_zhou_Caltech101.json").write_text(
        json.dumps({"train": [["x/1.jpg", 0, "x"]], "val": [], "test": []}))
    with pytest.raises(FedlitError, match=r"x/1\.jpg"):
        R.get_dataset("caltech101", root=str(tmp_path))


def test_root_from_environment(tmp_path, monkeypatch):
    write_split_json(tmp_path, "eurosat", "2750", "split_zhou_EuroSAT.json", ["Forest"], (1, 1, 1))
    monkeypatch.setenv("FEDLIT_DATA", str(tmp_path))
    assert R.get_dataset("eurosat").classnames == ["Forest"]


def test_malformed_split_json(tmp_path):
    base = tmp_path / "dtd"
    (base / "images").mkdir(parents=True)
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": [["a.jpg", "0", "x"]], "val": [], "test": []}))
    with pytest.raises(FedlitError, match="bad entry"):
        R.get_dataset("dtd", root=str(tmp_path))
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": [["a.jpg", 1, "x"]], "val": [], "test": []}))
    with pytest.raises(FedlitError, match=r"label\(s\) \[0\]"):
        R.get_dataset("dtd", root=str(tmp_path))


def test_corrupt_image_names_the_file(tmp_path):
    base = write_split_json(tmp_path, "food-101", "images", "split_zhou_Food101.json", ["pizza", "sushi"])
    bad = os.path.join(base, "images", "sushi", "test_1.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg at all")
    data = R.get_dataset("food101", root=str(tmp_path))
    assert data.test.images([0, 1, 2]).shape == (3, 3, 224, 224)
    with pytest.raises(FedlitError, match=r"sushi/test_1\.jpg"):
        data.test.images(np.arange(len(data.test)))  # batch on the thread pool
    with pytest.raises(FedlitError, match=r"sushi/test_1\.jpg"):
        data.test.images([3])  # single image, same thread
    os.remove(os.path.join(base, "images", "pizza", "test_0.jpg"))
    with pytest.raises(FedlitError, match=r"not found.*pizza/test_0\.jpg"):
        data.test.images(torch.tensor([0]))


def test_file_split_indices_forms(tmp_path):
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        write_image(paths[-1], colour=(i * 60, 0, 0))
    split = C.FileImageSplit(np.arange(4), paths=paths, image_size=4)
    reds = lambda x: (x[:, 0, 0, 0] * 255).round().tolist()  # noqa: E731
    assert reds(split.images()) == [0, 60, 120, 180]
    assert reds(split.images(slice(1, 3))) == [60, 120]
    assert reds(split.images(torch.tensor([3, 0]))) == [180, 0]
    split.image_size = 2  # the caller sets the size
    assert split.images([1]).shape == (1, 3, 2, 2)
    with pytest.raises(ValueError):
        C.FileImageSplit(np.arange(3), paths=paths)


# --- FGVC-Aircraft ----------------------------------------------------------------------------------------------

def test_fgvc_aircraft(tmp_path):
    base = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    rows = {"train": [("0001", 2), ("0002", 0), ("0003", 1)], "val": [("0004", 1)], "test": [("0005", 2), ("0006", 0)]}
    for split, items in rows.items():
        for im, _ in items:
            write_image(str(base / "images" / f"{im}.jpg"))
        (base / f"images_variant_{split}.txt").write_text("".join(f"{im} {variants[y]}\n" for im, y in items))
    data = R.get_dataset("fgvc_aircraft", root=str(tmp_path))
    assert data.classnames == variants
    assert data.train.labels.tolist() == [2, 0, 1] and data.test.labels.tolist() == [2, 0]
    assert data.train.paths[0].endswith(os.path.join("images", "0001.jpg"))
    assert data.val.images().shape == (1, 3, 224, 224)
    os.remove(base / "images_variant_val.txt")
    R.clear_cache()
    with pytest.raises(FedlitError, match=r"images_variant_val\.txt"):
        R.get_dataset("fgvc_aircraft", root=str(tmp_path))


# --- ImageNet and variants --------------------------------------------------------------------------------------

WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def write_classnames(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{w} {n}\n" for w, n in WNIDS.items())


def test_imagenet(tmp_path):
    base = tmp_path / "imagenet"
    write_classnames(str(base / "classnames.txt"))
    for split, n in (("train", 2), ("val", 1)):
        for w in WNIDS:
            for i in range(n):
                write_image(str(base / "images" / split / w / f"{w}_{i}.JPEG"))
    data = R.get_dataset("imagenet", root=str(tmp_path))
    assert data.classnames == ["tench", "goldfish", "great white shark"]
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and data.test.labels.tolist() == [0, 1, 2]
    assert data.val is data.test  # CoOp: ImageNet's val folder is the test set
    (base / "images" / "val" / "n99999999").mkdir()
    R.clear_cache()
    with pytest.raises(FedlitError, match="n99999999"):
        R.get_dataset("imagenet", root=str(tmp_path))


def test_imagenet_variants(tmp_path):
    write_classnames(str(tmp_path / "imagenet" / "classnames.txt"))
    # v2: numbered folders = index into the sorted wnids; classnames.txt found in imagenet/
    for i in range(3):
        write_image(str(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(i) / "a.jpeg"))
    v2 = R.get_dataset("imagenetv2", root=str(tmp_path))
    assert v2.classnames == list(WNIDS.values()) and v2.test.labels.tolist() == [0, 1, 2]
    # -A / -R: a subset of wnid folders; labels = position among the folders present
    for name, folder, sub in (("imagenet_a", "imagenet-adversarial", "imagenet-a"),
                              ("imagenet_r", "imagenet-rendition", "imagenet-r"),
                              ("imagenet_sketch", "imagenet-sketch", "images")):
        for w in ("n01484850", "n01440764"):
            write_image(str(tmp_path / folder / sub / w / "x.png"))
        write_classnames(str(tmp_path / folder / "classnames.txt"))
        data = R.get_dataset(name, root=str(tmp_path))
        assert data.classnames == ["tench", "great white shark"], name
        assert data.test.labels.tolist() == [0, 1] and data.train is data.test
    os.remove(tmp_path / "imagenet" / "classnames.txt")
    R.clear_cache()
    with pytest.raises(FedlitError, match=r"classnames\.txt"):
        R.get_dataset("imagenetv2", root=str(tmp_path))


# --- FedBN: Office-Caltech10 and DomainNet ----------------------------------------------------------------------

def write_fedbn_folders(root, folder, domains, classes, per_class=10):
    for d in domains:
        for c in classes:
            for i in range(per_class):
                write_image(os.path.join(root, folder, d, c.replace(" ", "_"), f"{i}.jpg"))


def test_office_caltech10_folders(tmp_path):
    write_fedbn_folders(tmp_path, "office_caltech_10", FB.OFFICE_DOMAINS, FB.OFFICE_CLASSES)
    data = R.get_dataset("office_caltech10", root=str(tmp_path), seed=3, val_fraction=0.1)
    # fixed label order (FedBN label_dict), never a set
    assert data.classnames == ["back pack", "bike", "calculator", "headphones", "keyboard", "laptop computer",
                               "monitor", "mouse", "mug", "projector"]
    # per (domain, class) of 10 images: 2 test, 1 val, 7 train
    assert (len(data.train), len(data.val), len(data.test)) == (4 * 70, 4 * 10, 4 * 20)
    assert np.bincount(data.test.labels).tolist() == [8] * 10
    dom = data.train.meta["domain"]
    assert sorted(set(dom.tolist())) == sorted(FB.OFFICE_DOMAINS) and (dom == "dslr").sum() == 70
    # disjoint splits, deterministic per seed, different across seeds
    sets = [set(s.paths) for s in (data.train, data.val, data.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    R.clear_cache()
    assert R.get_dataset("office_caltech10", root=str(tmp_path), seed=3, val_fraction=0.1).test.paths == \
        data.test.paths
    assert R.get_dataset("office_caltech10", root=str(tmp_path), seed=4, val_fraction=0.1).test.paths != \
        data.test.paths
    one = R.get_dataset("office_caltech10-webcam", root=str(tmp_path), seed=3, val_fraction=0.1)
    assert one.test.paths == [p for p, d in zip(data.test.paths, data.test.meta["domain"]) if d == "webcam"]
    assert one.classnames == data.classnames


def test_domainnet_ignores_other_classes_and_needs_domain(tmp_path):
    write_fedbn_folders(tmp_path, "DomainNet", FB.DOMAINNET_DOMAINS, FB.DOMAINNET_CLASSES[:2] + ("aircraft carrier",), 5)
    data = R.get_dataset("domainnet", root=str(tmp_path))
    assert data.classnames[3] == "ice cream" and data.num_classes == 10
    assert set(data.train.labels.tolist()) == {0, 1}  # the 345-class download's other folders are ignored
    assert len(data.test) == 6 * 2 * 1  # round(0.2 * 5) = 1 per (domain, class)
    assert R.get_dataset("domainnet-quickdraw", root=str(tmp_path)).train.meta["domain"].tolist() == ["quickdraw"] * 8
    import shutil
    shutil.rmtree(tmp_path / "DomainNet" / "sketch")
    R.clear_cache()
    with pytest.raises(FedlitError, match=r"DomainNet[/\\]sketch"):
        R.get_dataset("domainnet", root=str(tmp_path))
    with pytest.raises(FedlitError, match="office_caltech_10"):
        R.get_dataset("office_caltech10-amazon", root=str(tmp_path))


def test_fedbn_pickles_train_on_the_whole_train_list_by_default(tmp_path):
    """Issue 21 item 4: the official code trains on each domain's whole train pickle (no validation cut, no shot
    sampling); ``val_fraction: 0.1`` is fedlit's former protocol, a named option."""
    write_fedbn_folders(tmp_path, "office_caltech_10", ["dslr"], FB.OFFICE_CLASSES[:2], per_class=6)
    base = tmp_path / "office_caltech_10"
    rows = [f"office_caltech_10/dslr/{c}/{i}.jpg" for c in ("back_pack", "bike") for i in range(5)]
    with open(base / "dslr_train.pkl", "wb") as f:
        pickle.dump((rows, ["back_pack"] * 5 + ["bike"] * 5), f)
    with open(base / "dslr_test.pkl", "wb") as f:
        pickle.dump((["dslr/bike/5.jpg"], ["bike"]), f)
    data = R.get_dataset("office_caltech10-dslr", root=str(tmp_path))
    assert len(data.train) == 10 and len(data.val) == 0 and len(data.test) == 1
    R.clear_cache()
    cut = R.get_dataset("office_caltech10-dslr", root=str(tmp_path), val_fraction=0.1)
    assert (len(cut.train), len(cut.val)) == (9, 1)


def test_fedbn_pickles(tmp_path):
    write_fedbn_folders(tmp_path, "office_caltech_10", ["amazon"], FB.OFFICE_CLASSES[:2], per_class=3)
    base = tmp_path / "office_caltech_10"
    train = (np.array(["office_caltech_10/amazon/back_pack/0.jpg", "office_caltech_10/amazon/bike/0.jpg",
                       "office_caltech_10/amazon/bike/1.jpg"]), np.array(["back_pack", "bike", "bike"]))
    test = (["amazon/bike/2.jpg"], [1])  # relative to the dataset folder, int labels
    with open(base / "amazon_train.pkl", "wb") as f:
        pickle.dump(train, f)
    with open(base / "amazon_test.pkl", "wb") as f:
        pickle.dump(test, f, protocol=5)
    data = R.get_dataset("office_caltech10-amazon", root=str(tmp_path), val_fraction=0.0)
    assert data.train.labels.tolist() == [0, 1, 1] and data.test.labels.tolist() == [1]
    assert data.test.paths == [str(base / "amazon" / "bike" / "2.jpg")]
    assert data.test.images().shape == (1, 3, 224, 224)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(base / "amazon_train.pkl", "wb") as f:
        pickle.dump(([Evil()], [0]), f)
    R.clear_cache()
    with pytest.raises(FedlitError, match=r"amazon_train\.pkl.*refusing"):
        R.get_dataset("office_caltech10-amazon", root=str(tmp_path))
    assert not (tmp_path / "pwned").exists()
    with open(base / "amazon_train.pkl", "wb") as f:
        pickle.dump({"paths": []}, f)
    with pytest.raises(FedlitError, match=r"\(paths, labels\)"):
        R.get_dataset("office_caltech10-amazon", root=str(tmp_path))


# --- Fashion-MNIST ----------------------------------------------------------------------------------------------

def write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_fashion_mnist_from_root(tmp_path, monkeypatch):
    monkeypatch.setattr(AR, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "absent"))
    with pytest.raises(FedlitError, match="dataset-fashion-mnist"):
        R.get_dataset("fashion_mnist", root=str(tmp_path))
    x = np.arange(20 * 4 * 4).reshape(20, 4, 4) % 256
    y = np.arange(20) % 10
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    for split in ("train", "t10k"):
        write_idx(d / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    data = R.get_dataset("fashion_mnist", root=str(tmp_path), seed=1)
    assert data.classnames[0] == "T-shirt/top" and data.classnames[9] == "Ankle boot"
    assert (len(data.train), len(data.val), len(data.test)) == (20, 2, 20) and data.image_size == 4
    img = data.train.images([3])
    assert img.shape == (1, 3, 4, 4)
    assert torch.equal(img[0, 0], img[0, 2]) and img[0, 1, 0, 1].item() == pytest.approx(49 / 255)
    # val images are train images (a seeded 10%), with their labels
    vx = data.val.images()
    match = [int(torch.nonzero((data.train.images() == v).flatten(1).all(1))[0]) for v in vx]
    assert data.val.labels.tolist() == data.train.labels[match].tolist()


def test_fashion_mnist_debian_package():
    if not os.path.isdir(AR.FASHION_MNIST_DEBIAN_DIR):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    data = R.get_dataset("fashion_mnist")
    assert (len(data.train), len(data.test)) == (60000, 10000) and len(data.val) == 6000
    assert data.classnames == list(AR.FASHION_MNIST_CLASSES) and data.num_classes == 10
    assert np.bincount(data.test.labels).tolist() == [1000] * 10
    x = data.test.images([0])
    assert x.shape == (1, 3, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
