"""OOD detection and covariate shift (fedlit.ood, fedlit.metrics, fedlit.data.shift / shift_readers): scores and
metrics on hand-made numbers, the embedded corrupted / OOD sets, the real readers on tiny folders written here,
and the protocol end to end."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from fedlit.data import get_dataset
from fedlit.data.shift import CORRUPTIONS, OOD_KINDS, corrupt, render_ood
from fedlit.errors import FedlitError
from fedlit.metrics import auroc, energy_score, fpr_at_95_tpr, msp_score, neglabel_score
from fedlit.ood import OODEval

ID, OOD = [0.9, 0.8, 0.7, 0.6], [0.65, 0.5]


# ------------------------------------------------------------------------------------------ metrics
def test_auroc_counts_pairs_and_half_ties():
    assert auroc(ID, OOD) == pytest.approx(100 * 7 / 8)  # 0.6 loses to 0.65 only
    assert auroc([1.0, 1.0], [1.0]) == pytest.approx(50.0)  # ties count 1/2
    assert auroc([0.3, 0.2], [0.1, 0.3]) == pytest.approx(100 * (1 + 0.5 + 1 + 0) / 4)
    assert math.isnan(auroc([], [0.1]))


def test_fpr95_both_conventions_by_hand():
    # id_positive: tau = 0.6 keeps all 4 ID (>= 95 %); OOD >= 0.6: {0.65} -> 1/2
    assert fpr_at_95_tpr(ID, OOD, "id_positive") == pytest.approx(50.0)
    # ood_positive: tau' = 0.65 keeps both OOD below-or-at; ID <= 0.65: {0.6} -> 1/4
    assert fpr_at_95_tpr(ID, OOD, "ood_positive") == pytest.approx(25.0)
    # 20 ID scores: 95 % = 19 kept, tau = the 19th largest; an OOD score equal to tau is accepted
    ids = np.arange(20, 0, -1) / 20.0  # 1.0 … 0.05; 19th largest = 0.10
    assert fpr_at_95_tpr(ids, [0.10, 0.09, 0.5, 0.0]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        fpr_at_95_tpr(ID, OOD, "nearest")


def test_scores_by_hand():
    z = torch.tensor([[0.0, math.log(3.0)]])
    assert float(msp_score(z)) == pytest.approx(0.75)
    assert float(energy_score(z)) == pytest.approx(math.log(4.0))
    assert float(energy_score(z, temperature=2.0)) == pytest.approx(2 * math.log(1 + math.sqrt(3)))
    assert float(neglabel_score(z, torch.tensor([[math.log(4.0)]]))) == pytest.approx(0.5)


def test_ood_section_checks_and_conventions(tmp_path):
    with pytest.raises(FedlitError, match="ood.scores"):
        OODEval(ood_datasets=["x"], scores=["maxlogit"])
    with pytest.raises(FedlitError, match="ood.fpr95"):
        OODEval(fpr95="nearest")
    cfg = OODEval(ood_datasets=["x"], fpr95="focoop")
    assert cfg.enabled and not OODEval().enabled
    assert [cfg.convention(s) for s in ("msp", "energy", "neglabel")] == ["ood_positive", "id_positive", "ood_positive"]
    f = tmp_path / "neg.txt"
    f.write_text("dog\n\ncat\n")
    assert OODEval(neg_labels=str(f)).words() == ("dog", "cat")
    with pytest.raises(FedlitError, match="not a file"):
        OODEval(neg_labels=str(tmp_path / "missing.txt")).words()


# ------------------------------------------------------------------------------------------ embedded sets
def test_corrupted_shapes_layout_and_determinism():
    base = get_dataset("shapes-dark", seed=3, test_per_class=1, train_per_class=1, val_per_class=1)
    ds = get_dataset("shapes-dark-c", seed=3, test_per_class=1, train_per_class=1, val_per_class=1,
                     types=["gaussian_noise", "contrast"], severities=[1, 5])
    n = len(base.test)
    assert len(ds.test) == 4 * n and ds.test.corruptions == ("gaussian_noise", "contrast")
    assert ds.test.meta["severity"][[0, n, 2 * n, 3 * n]].tolist() == [1, 5, 1, 5]
    assert ds.test.meta["corruption"][[0, n, 2 * n, 3 * n]].tolist() == [0, 0, 1, 1]
    assert np.array_equal(ds.test.meta["source"][3 * n:], np.arange(n))
    assert np.array_equal(ds.test.labels[n:2 * n], base.test.labels)
    rows = np.array([5, n + 5, 3 * n + 7])
    alone = torch.cat([ds.test.images([r]) for r in rows])
    assert torch.equal(ds.test.images(rows), alone)  # never depends on the batch it is computed in
    clean = base.test.images(np.array([5, 5]))
    noisy = ds.test.images(np.array([5, n + 5]))
    gap = (noisy - clean).abs().mean(dim=(1, 2, 3))
    assert 0 < gap[0] < gap[1]  # severity 5 is further from the clean image than severity 1
    with pytest.raises(FedlitError, match="corruption types"):
        get_dataset("shapes-dark-c", seed=3, types=["fog"])


def test_each_corruption_moves_the_image_more_with_severity():
    x = get_dataset("shapes", seed=0, test_per_class=1, train_per_class=1, val_per_class=1).test.images(np.arange(8))
    for kind in CORRUPTIONS:
        gaps = [float((corrupt(x, kind, s, np.arange(8)) - x).abs().mean()) for s in (1, 3, 5)]
        assert gaps[0] < gaps[1] < gaps[2], kind


def test_ood_shapes_are_no_id_class():
    ood = get_dataset("shapes-dark-ood", seed=0, test_per_class=2)
    ids = get_dataset("shapes-dark", seed=0, test_per_class=1, train_per_class=1, val_per_class=1)
    assert ood.classnames == list(OOD_KINDS) and len(ood.test) == 2 * len(OOD_KINDS)
    id_words = {w for c in ids.classnames for w in c.split()}
    assert not id_words & set(OOD_KINDS)
    x = ood.test.images()
    assert x.shape[1:] == (3, 32, 32)
    kinds = np.arange(len(OOD_KINDS))
    assert torch.equal(render_ood(kinds, kinds, "dark", 7), render_ood(kinds, kinds, "dark", 7))
