"""FedMVP's domain-generalisation protocols (fedlit.data.dg + configs/protocols/fedmvp_*.yaml, embedded_dg_*.yaml):
the per-domain readers on tiny folders written here, the overlays' client counts and the embedded counterpart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedlit.data import get_dataset
from fedlit.data.dg import DG_DATASETS, split_every_fifth
from fedlit.data.federation import FederatedData
from fedlit.data.protocol import partition_contiguous
from fedlit.errors import FedlitError

PROTOCOLS = Path(__file__).resolve().parents[1] / "configs" / "protocols"


def _jpeg(path, value):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_every_fifth_rule():
    assert split_every_fifth([0] * 10 + [1] * 4).tolist() == ([False] * 4 + [True]) * 2 + [False] * 4


def test_dg_reader_folders_and_split_files(tmp_path):
    for d in ("art_painting", "sketch"):
        for c in ("dog", "guitar_player"):
            for i in range(6):
                _jpeg(tmp_path / "pacs" / d / c / f"{i}.jpg", i)
    art = get_dataset("pacs_art_painting", root=str(tmp_path), seed=0, image_size=8)
    assert art.classnames == ["dog", "guitar player"]
    assert len(art.train) == 10 and len(art.test) == 2 and art.test.paths[0].endswith("dog/4.jpg")
    base = tmp_path / "VLCS" / "SUN"
    for i in range(2):
        _jpeg(base / "full" / "car" / f"{i}.jpg", i)
    split = {"train": [["car/0.jpg", 0, "car"]], "val": [], "test": [["car/1.jpg", 0, "car"]]}
    (base / "split_sun.json").write_text(json.dumps(split))
    sun = get_dataset("vlcs_SUN", root=str(tmp_path), seed=0, image_size=8)
    assert sun.classnames == ["car"] and sun.test.paths[0] == str(base / "full" / "car" / "1.jpg")
    with pytest.raises(FedlitError, match="pacs_photo"):
        get_dataset("pacs_photo", root=str(tmp_path), seed=0)
    # the multi-source overlay's data section builds on these folders: 1 client per source domain, target novel
    fd = FederatedData(dataset=["pacs_art_painting"], eval_datasets=["pacs_sketch"], partition="contiguous",
                       classes_per_client=20, shots=8, subsample="all", root=str(tmp_path),
                       dataset_args={"image_size": 8})
    fed = fd.setup(0)
    assert len(fed.clients) == 1 and fed.client_evals[0].novel == ["pacs_sketch"]
    assert fed.evals["pacs_sketch"].task.classnames == ("dog", "guitar player")


@pytest.mark.parametrize("key, classes, clients", [("pacs", 7, 3), ("office", 65, 9), ("vlcs", 5, 3),
                                                   ("terra", 10, 3), ("domainnet", 345, 85)])
def test_overlays_give_fedmvps_client_counts(key, classes, clients):
    multi = yaml.safe_load((PROTOCOLS / f"fedmvp_multisource_singletarget_{key}.yaml").read_text())["data"]
    single = yaml.safe_load((PROTOCOLS / f"fedmvp_singlesource_multitarget_{key}.yaml").read_text())["data"]
    per_domain = len(partition_contiguous(range(classes), multi["classes_per_client"]))
    assert per_domain * len(multi["dataset"]) == clients and len(multi["eval_datasets"]) == 1
    assert len(single["dataset"]) == 1 and len(single["eval_datasets"]) == len(multi["dataset"])
    assert set(multi["dataset"]) | set(multi["eval_datasets"]) == set(single["dataset"]) | set(single["eval_datasets"])
    ds = {"office": "officehome"}.get(key, key)
    assert {f"{ds}_{d}" for d in DG_DATASETS[ds][1]} == set(multi["dataset"]) | set(multi["eval_datasets"])


def test_embedded_dg_overlays_build():
    for name, n_train, n_eval in (("multisource", 3, 1), ("singlesource", 1, 3)):
        data = yaml.safe_load((PROTOCOLS / f"embedded_dg_{name}.yaml").read_text())["data"]
        fed = FederatedData(**data, dataset_args={"train_per_class": 8, "val_per_class": 1, "test_per_class": 2}).setup(0)
        assert len(fed.groups) == n_train and len(fed.clients) == 2 * n_train  # 48 classes, 20 a client -> 2
        assert all(len(fed.client_evals[c.cid].novel) == n_eval for c in fed.clients)
