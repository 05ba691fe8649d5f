"""Federations of several datasets / domains, the labeldir100 partitioner, CIFAR readers and protocol configs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlit.cli import main
from fedlit.data import registry
from fedlit.data.federation import FederatedData
from fedlit.data.protocol import partition_iid, partition_labeldir100
from fedlit.data.registry import ClassificationData, TensorImageSplit, get_dataset
from fedlit.errors import FedlitError

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")

# FedTPG cross-class: the 9 datasets with their class counts (spec §7.1)
FEDTPG_CLASSES = {"caltech101": 100, "oxford_flowers": 102, "fgvc_aircraft": 100, "ucf101": 101,
                  "oxford_pets": 37, "food101": 101, "dtd": 47, "stanford_cars": 196, "sun397": 397}


def _fake(num_classes: int, train_per_class: int = 10, test_per_class: int = 2):
    def build(root, seed, **kw):
        def split(per):
            y = np.repeat(np.arange(num_classes), per)
            return TensorImageSplit(y, data=torch.zeros(len(y), 3, 4, 4, dtype=torch.uint8))

        names = [f"c{num_classes}_{i}" for i in range(num_classes)]
        return ClassificationData(f"fake{num_classes}", names, split(train_per_class), split(1),
                                  split(test_per_class), 4)

    return build


def _register(name: str, num_classes: int) -> str:
    if name not in registry._FACTORIES:
        registry.register_dataset(name)(_fake(num_classes))
    return name


@pytest.fixture(scope="module")
def fedtpg_fakes():
    return [_register(f"test-like-{n}", c) for n, c in FEDTPG_CLASSES.items()]


# ------------------------------------------------------------------------------- partition arithmetic
def test_fedtpg_cross_class_gives_30_clients_with_the_spec_counts(fedtpg_fakes):
    fed = FederatedData(dataset=fedtpg_fakes, partition="contiguous", classes_per_client=20, shots=8,
                        subsample="base").setup(seed=43)
    per_group = {g: sum(c.group == g for c in fed.clients) for g in fed.groups}
    assert len(fed.clients) == 30
    # spec §7.2-1: Caltech 2, Flowers 3, Aircraft 2, UCF 3, Pets 1, Food 3, DTD 1, Cars 5, SUN 10
    assert list(per_group.values()) == [2, 3, 2, 3, 1, 3, 1, 5, 10]
    cars = [c for c in fed.clients if c.group == "test-like-stanford_cars"]
    assert [len(c.classes) for c in cars] == [20, 20, 20, 20, 18]  # 98 base classes, remainder to the last
    sun = [c for c in fed.clients if c.group == "test-like-sun397"]
    assert [len(c.classes) for c in sun] == [20] * 9 + [19]
    for c in fed.clients:  # 8 shots per class, labels in the client's dataset's base task, test = its classes
        assert c.num_samples == 8 * len(c.classes)
        assert c.train_y.max() < len(c.task) and len(c.test_idx) == 2 * len(c.classes)
        names = {fed.data.classnames[k] for k in c.classes}
        assert names <= set(c.task.classnames)
        assert set(fed.data.test.labels[c.test_idx]) == set(c.classes)
    # evaluation sets per dataset; a client's base/novel are its own dataset's
    assert set(fed.evals) == {f"{g}/{r}" for g in fed.groups for r in ("base", "novel")}
    assert len(fed.evals["test-like-dtd/base"].task) == 24 and len(fed.evals["test-like-dtd/novel"].task) == 23
    ce = fed.evals_of(cars[0].cid)
    assert ce.base == ["test-like-stanford_cars/base"] and ce.novel == ["test-like-stanford_cars/novel"]


def test_fedpgp_base_split_per_client_class_counts_through_the_data_layer():
    counts = {100: [5] * 10, 102: [5] * 9 + [6], 37: [2] * 9 + [1], 101: [5] * 9 + [6], 47: [2] * 9 + [6]}
    for n, expected in counts.items():
        fed = FederatedData(dataset=_register(f"test-fake-{n}", n), num_clients=10, shots=16,
                            partition_seed=2023).setup(seed=1)
        assert [len(c.classes) for c in fed.clients] == expected, n
    a = FederatedData(dataset="test-fake-100", num_clients=10, partition_seed=None).setup(seed=1)
    b = FederatedData(dataset="test-fake-100", num_clients=10, partition_seed=None).setup(seed=2)
    assert [c.classes for c in a.clients] != [c.classes for c in b.clients]


def test_labeldir100_two_level_dirichlet():
    fine = np.repeat(np.arange(100), 30)  # 20 coarse × 5 fine, 30 samples each
    coarse = fine // 5
    parts = partition_labeldir100(fine, coarse, num_clients=10, beta=0.3, seed=12345)
    assert [len(p) for p in parts] == [300] * 10
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == 3000  # disjoint and covering (3000 // 10 * 10)
    # skew: with beta = 0.3 a client's samples concentrate on few coarse labels
    top3 = [np.sort(np.bincount(coarse[p], minlength=20))[-3:].sum() / len(p) for p in parts]
    assert np.mean(top3) > 0.5
    again = partition_labeldir100(fine, coarse, 10, 0.3, 12345)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again))
    other = partition_labeldir100(fine, coarse, 10, 0.3, 1)
    assert not all(np.array_equal(x, y) for x, y in zip(parts, other))
    with pytest.raises(FedlitError, match="two coarse labels"):
        partition_labeldir100(np.array([0, 0, 1]), np.array([0, 1, 1]), 1, 0.3, 0)
    with pytest.raises(FedlitError, match="lower num_clients"):
        partition_labeldir100(fine[:5], coarse[:5], 10, 0.3, 0)


def test_partition_iid_near_equal_and_seeded():
    parts = partition_iid(10, 3, seed=0)
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(10, 3, seed=0)))
    with pytest.raises(FedlitError, match="non-empty"):
        partition_iid(2, 3, seed=0)


# ------------------------------------------------------------------------------- domains
DOMAINS = ["shapes-dark", "shapes-textured", "shapes-noisy"]
SMALL = {"train_per_class": 8, "test_per_class": 4}


def test_one_client_per_domain_and_leave_one_domain_out():
    fed = FederatedData(dataset=DOMAINS, partition="domain", subsample="all", shots=4, num_clients=1,
                        dataset_args=SMALL).setup(seed=0)
    assert [c.group for c in fed.clients] == DOMAINS and len(fed.data.classnames) == 48
    for c in fed.clients:
        ce = fed.evals_of(c.cid)
        assert ce.home == c.group and ce.novel == [d for d in DOMAINS if d != c.group]
        ev = fed.evals[c.group]
        assert np.array_equal(np.sort(c.test_idx), ev.idx)  # one client per domain: its whole test set
        assert c.num_samples == 48 * 4
    out = FederatedData(dataset=DOMAINS, partition="domain", subsample="all", shots=4, num_clients=2,
                        leave_out=["shapes-noisy"], dataset_args=SMALL).setup(seed=0)
    assert [c.group for c in out.clients] == ["shapes-dark"] * 2 + ["shapes-textured"] * 2
    assert all(out.evals_of(c.cid).novel == ["shapes-noisy"] for c in out.clients)
    a, b = out.clients[0], out.clients[1]
    assert not set(a.train_idx) & set(b.train_idx) and abs(a.num_samples - b.num_samples) <= 1


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": ["shapes-dark", "test-fake-37"], "partition": "domain"}, "same classes in every domain"),
    ({"dataset": ["shapes-dark", "shapes-dark"]}, "twice"),
    ({"dataset": ["shapes-dark"], "leave_out": ["shapes-dark"]}, "needs data.partition: domain"),
    ({"dataset": ["shapes-dark"], "partition": "domain", "leave_out": ["shapes-noisy"]}, "not in data.dataset"),
    ({"dataset": "shapes-dark", "eval_datasets": ["shapes-dark"]}, "both trained"),
    ({"dataset": "shapes-dark", "partition": "labeldir100"}, "needs coarse labels"),
    ({"dataset": "test-fake-37", "num_clients": 30}, "at most"),
    ({"dataset": [], "num_clients": 3}, "is empty"),
])
def test_federation_errors_name_the_fix(kwargs, message):
    _register("test-fake-37", 37)
    with pytest.raises(FedlitError, match=message):
        FederatedData(**{"dataset_args": None, **kwargs}).setup(seed=0)


# ------------------------------------------------------------------------------- CIFAR readers
def _write_cifar(root: Path, name: str, n_train: int = 12, n_test: int = 6) -> None:
    rng = np.random.default_rng(0)
    if name == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        with open(d / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [f"class_{i}".encode() for i in range(10)]}, f, protocol=2)
        for i, fname in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
            n = n_test if fname == "test_batch" else n_train
            with open(d / fname, "wb") as f:
                pickle.dump({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                             b"labels": [int(x) for x in np.arange(n) % 10]}, f, protocol=2)
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        with open(d / "meta", "wb") as f:
            pickle.dump({b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}, f, protocol=2)
        for fname, n in (("train", 600), ("test", 200)):
            y = np.arange(n) % 100
            with open(d / fname, "wb") as f:
                pickle.dump({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"fine_labels": y.tolist(),
                             b"coarse_labels": (y // 5).tolist()}, f, protocol=2)


def test_cifar_readers_from_a_root(tmp_path):
    _write_cifar(tmp_path, "cifar10")
    _write_cifar(tmp_path, "cifar100")
    c10 = get_dataset("cifar10", root=str(tmp_path))
    assert c10.classnames == [f"class {i}" for i in range(10)]
    assert len(c10.train) == 60 and len(c10.test) == 6 and c10.test.images([0]).shape == (1, 3, 32, 32)
    c100 = get_dataset("cifar100", root=str(tmp_path))
    assert len(c100.classnames) == 100 and np.array_equal(c100.train.meta["coarse"], c100.train.labels // 5)
    fed = FederatedData(dataset="cifar100", root=str(tmp_path), partition="labeldir100", subsample="all",
                        num_clients=8, shots=-1, partition_seed=12345).setup(seed=0)
    train = sum(c.num_samples for c in fed.clients)
    test = sum(len(c.test_idx) for c in fed.clients)
    assert train + test == 800 and 0 < test < train  # 800 // 8 = 100 per client, train and test mixed


def test_cifar_missing_and_malicious_files_are_clear_errors(tmp_path, no_network):
    with pytest.raises(FedlitError, match="cifar-10-batches-py/ with .* not found .*download: true"):
        get_dataset("cifar10", root=str(tmp_path / "nothing"))
    _write_cifar(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(FedlitError, match="not a CIFAR python batch .*refusing"):
        get_dataset("cifar10", root=str(tmp_path), val_fraction=0.2)


# ------------------------------------------------------------------------------- end to end
def _fit(tmp_path, name, *args) -> dict:
    out = tmp_path / name
    assert main(["fit", "--config", QUICK, "--out_dir", str(out), "--trainer.rounds", "1", *args]) == 0
    return json.loads((out / "results.json").read_text())


def test_two_datasets_in_one_federation_fedtpg_protocol(tmp_path):
    r = _fit(tmp_path, "tpg", "--method", "fedtpg", "--data.dataset", "[shapes-dark, shapes-stripes]",
             "--data.partition", "contiguous", "--data.classes_per_client", "8", "--data.shots", "4",
             "--data.dataset_args", json.dumps(SMALL))
    assert len(r["per_client"]) == 6  # 24 base classes / 8 per client = 3 clients per dataset
    assert set(r["per_group"]) == {"shapes-dark", "shapes-stripes"}
    g = r["per_group"]
    for k in ("local", "base", "novel"):  # mean over datasets of the mean over each dataset's clients
        assert r["final"][k] == pytest.approx((g["shapes-dark"][k] + g["shapes-stripes"][k]) / 2, abs=1e-6)
    assert g["shapes-dark"]["base"] != g["shapes-stripes"]["base"]
    assert "acc/shapes-dark/base" in r["per_client"]["0"]


def test_domain_federation_and_unseen_eval_dataset(tmp_path):
    r = _fit(tmp_path, "dom", "--method", "promptfl", "--data.dataset", json.dumps(DOMAINS),
             "--data.partition", "domain", "--data.subsample", "all", "--data.num_clients", "1",
             "--data.shots", "2", "--data.dataset_args", json.dumps(SMALL))
    per = r["per_client"]
    assert len(per) == 3 and "base" not in r["final"]
    for cid, d in enumerate(DOMAINS):
        others = [per[str(cid)][f"acc/{o}"] for o in DOMAINS if o != d]
        assert per[str(cid)]["novel"] == pytest.approx(np.mean(others))
    x = _fit(tmp_path, "xd", "--method", "promptfl", "--data.eval_datasets", "[shapes-stripes]",
             "--data.num_clients", "3", "--data.shots", "2", "--data.dataset_args", json.dumps(SMALL))
    c0 = x["per_client"]["0"]
    assert c0["novel"] == pytest.approx((c0["acc/shapes-dark/novel"] + c0["acc/shapes-stripes"]) / 2)
    assert set(x["per_client"]["1"]) >= {"acc/shapes-dark/base", "acc/shapes-stripes"}


def test_linear_head_method_refuses_several_class_lists(tmp_path, capsys):
    _register("test-fake-37", 37)
    rc = main(["fit", "--config", QUICK, "--out_dir", str(tmp_path / "v"), "--method", "fedvpt",
               "--data.dataset", "[shapes-dark, test-fake-37]", "--data.num_clients", "2"])
    assert rc != 0 and "linear head" in capsys.readouterr().err


# ------------------------------------------------------------------------------- protocol configs
PROTOCOLS = sorted((ROOT / "configs" / "protocols").glob("*.yaml"))


@pytest.mark.parametrize("path", PROTOCOLS, ids=[p.stem for p in PROTOCOLS])
def test_protocol_configs_parse_and_name_registered_datasets(path, capsys):
    import yaml

    method = next((m for m in ("fedtpg", "fedotp") if m in path.stem), "fedpgp")  # an overlay with a method's args
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "configs" / f"{method}.yaml"), "--config", str(path), "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    data = printed["data"]
    fd = FederatedData(**data)  # argument checks (leave_out, duplicates …) run here
    for name in fd.names + fd.eval_datasets:
        assert name in registry.list_datasets(), name


def test_embedded_domain_protocol_runs(tmp_path):
    out = tmp_path / "dom"
    assert main(["fit", "--config", str(ROOT / "configs" / "fedpgp.yaml"), "--config",
                 str(ROOT / "configs" / "embedded.yaml"), "--config",
                 str(ROOT / "configs" / "protocols" / "embedded_domains.yaml"),
                 "--trainer.rounds", "1", "--out_dir", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert len(r["per_client"]) == 4 and {"local", "novel", "hm"} <= set(r["final"])
    assert all(f"acc/{d}" in r["per_client"]["0"] for d in ("shapes-textured", "shapes-noisy", "shapes-stripes"))


def test_cifar_official_preprocessing_is_normalise_then_bilinear_resize(tmp_path):
    """preprocess: official = the official CIFAR code's ToTensor → Normalize(CIFAR mean/std) → Resize([S, S]),
    written here with torchvision's own transforms on the HWC uint8 array; the default keeps CLIP's path."""
    import types

    from torchvision import transforms as T

    from fedlit.backbones.frozen_clip import FrozenCLIP
    from fedlit.data.arrays import CIFAR_OFFICIAL_NORM

    _write_cifar(tmp_path, "cifar10")
    off = get_dataset("cifar10", root=str(tmp_path), preprocess="official")
    plain = get_dataset("cifar10", root=str(tmp_path))
    assert off.test.pixel_norm == CIFAR_OFFICIAL_NORM["cifar10"] and plain.test.pixel_norm is None
    assert off.train.cache_key() != plain.train.cache_key()  # a feature cache never mixes the two
    fake = types.SimpleNamespace(device=torch.device("cpu"), _size_hw=(64, 64), mean=(0.5,) * 3, std=(0.25,) * 3)
    x = off.test.images([0, 1])
    got = FrozenCLIP.normalize_images(fake, x, off.test.pixel_norm)
    stats = CIFAR_OFFICIAL_NORM["cifar10"]
    ref = T.Compose([T.ToTensor(), T.Normalize(stats["mean"], stats["std"]), T.Resize([64, 64])])
    hwc = off.test.data[:2].permute(0, 2, 3, 1).numpy()
    want = torch.stack([ref(img) for img in hwc])
    assert got.shape == (2, 3, 64, 64) and torch.allclose(got, want, atol=1e-5)
    clip_path = FrozenCLIP.normalize_images(fake, x)
    assert not torch.allclose(clip_path, want, atol=1e-2)  # the CLIP path is a different pre-processing
    with pytest.raises(FedlitError, match="preprocess='bgr'.*official"):
        get_dataset("cifar100", root=str(tmp_path), preprocess="bgr")


def test_feature_bank_applies_the_splits_own_preprocessing(tmp_path):
    from fedlit.backbones import load_backbone
    from fedlit.features import FeatureBank

    _write_cifar(tmp_path, "cifar10")
    clip = load_backbone("fedlit-toy")
    off = get_dataset("cifar10", root=str(tmp_path), preprocess="official")
    plain = get_dataset("cifar10", root=str(tmp_path))
    x_off = FeatureBank(clip, {"test": off.test}).images("test", [0, 1])
    x_plain = FeatureBank(clip, {"test": plain.test}).images("test", [0, 1])
    assert torch.allclose(x_off, clip.normalize_images(off.test.images([0, 1]), off.test.pixel_norm))
    assert not torch.allclose(x_off, x_plain, atol=1e-2)
