"""``global_eval_set: official_client0`` (FedDnC's released code, spec 3a §2.6): Base / Novel of every client on
client 0's test split and on client 0's share of the novel classes; ``full_split`` (default) the whole splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedlit.cli import main
from fedlit.data.federation import FederatedData
from fedlit.data.partitioners import get_partitioner
from fedlit.data.protocol import base_novel_classes
from fedlit.data.registry import get_dataset
from fedlit.errors import FedlitError
from fedlit.methods.feddnc import FedDnC

ROOT = Path(__file__).resolve().parents[1]
ARGS = {"train_per_class": 4, "test_per_class": 3}


def _data(**kw):
    return FederatedData(dataset="shapes-dark", num_clients=3, shots=2, partition="disjoint", subsample="base",
                         partition_seed=2023, dataset_args=ARGS, **kw)


def test_client0_sets_are_client0s_test_split_and_novel_share():
    data = _data()
    full = data.setup(0)
    fed = data.setup(0, global_eval_set="official_client0")
    c0 = fed.clients[0]
    base = fed.evals["client0/base"]
    assert base.task == full.evals["base"].task  # classified among all base classes
    assert np.array_equal(base.idx, c0.test_idx) and np.array_equal(base.y, c0.test_y)
    assert "novel" not in fed.evals and "base" in fed.evals  # Local still reads its own rows of the whole base split
    # client 0's novel share, computed here independently: the novel half split by the same partitioner and seed
    ds = get_dataset("shapes-dark", seed=0, **ARGS)
    novel = base_novel_classes(len(ds.classnames))[1]
    held, _, tests = get_partitioner("disjoint")(ds, novel, data._spec("shapes-dark"), 2023)
    nov = fed.evals["client0/novel"]
    assert nov.task == full.evals["novel"].task  # classified among all novel classes
    assert np.array_equal(np.sort(nov.idx), np.sort(np.asarray(tests[0])))
    got = {ds.classnames[novel[int(y)]] for y in nov.y}
    assert got == {ds.classnames[c] for c in held[0]} and 0 < len(got) < len(novel)
    for cid in range(3):
        ce = fed.evals_of(cid)
        assert ce.base == ["client0/base"] and ce.novel == ["client0/novel"] and ce.home == "base"
    assert full.evals_of(1).base == ["base"] and full.evals_of(1).novel == ["novel"]


def test_client0_sets_refuse_domain_partitions_and_bad_values():
    with pytest.raises(FedlitError, match="class-level partition"):
        FederatedData(dataset=["shapes-dark", "shapes-noisy"], num_clients=1, shots=2, partition="domain",
                      dataset_args=ARGS).setup(0, global_eval_set="official_client0")
    with pytest.raises(FedlitError, match="global_eval_set"):
        FedDnC(global_eval_set="client7")


def test_feddnc_official_client0_base_is_client0s_local(tmp_path):
    out = tmp_path / "r"
    rc = main(["fit", "--config", str(ROOT / "configs" / "feddnc.yaml"), "--config", str(ROOT / "configs" / "embedded.yaml"),
               "--trainer.rounds", "1", "--trainer.eval_every", "1", "--data.num_clients", "3", "--data.shots", "2",
               "--data.dataset_args", json.dumps(ARGS), "--trainer.batch_size", "8",
               "--method.init_args.global_eval_set", "official_client0", "--out_dir", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["plan"]["global_eval_set"] == "official_client0"
    per = res["per_client"]
    # the global model on client 0's own images among all base classes = client 0's Local (from the whole split)
    for r in per.values():
        assert r["base"] == pytest.approx(per["0"]["local"])
        assert r["novel"] == pytest.approx(per["0"]["novel"])
        assert r["acc/client0/base"] == pytest.approx(r["base"])
