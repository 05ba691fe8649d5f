"""OOD detection and covariate shift (fedlit.ood, fedlit.metrics, fedlit.data.shift / shift_readers): scores and
metrics on hand-made numbers, the embedded corrupted / OOD sets, the real readers on tiny folders written here,
and the protocol end to end."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlit.cli import main
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


# ------------------------------------------------------------------------------------------ real readers
def _write_cifar10(root, labels):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"c{i}" for i in range(10)]
    pickle.dump({"label_names": names}, open(d / "batches.meta", "wb"))
    rng = np.random.default_rng(0)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = labels if f == "test_batch" else [0, 1]
        pickle.dump({"data": rng.integers(0, 255, (len(y), 3072), dtype=np.uint8), "labels": [int(v) for v in y]},
                    open(d / f, "wb"))


def test_cifar10_c_reader_maps_rows_to_the_test_images(tmp_path):
    labels = np.array([3, 1, 4, 1], dtype=np.int64)
    d = tmp_path / "CIFAR-10-C"
    d.mkdir()
    np.save(d / "labels.npy", np.tile(labels, 5))
    for t in ("fog", "snow"):
        np.save(d / f"{t}.npy", np.random.default_rng(1).integers(0, 255, (20, 32, 32, 3), dtype=np.uint8))
    ds = get_dataset("cifar10_c", root=str(tmp_path), seed=0)  # no CIFAR-10 folder: no per-image map
    assert ds.test.corruptions == ("fog", "snow") and len(ds.test) == 40 and "source" not in ds.test.meta
    _write_cifar10(tmp_path, labels)
    ds = get_dataset("cifar10_c", root=str(tmp_path), seed=1, severities=[2, 5])
    assert len(ds.test) == 16 and ds.classnames[3] == "c3"
    assert ds.test.meta["source"].tolist() == [0, 1, 2, 3] * 4
    assert ds.test.meta["severity"].tolist() == [2] * 4 + [5] * 4 + [2] * 4 + [5] * 4
    snow = np.load(d / "snow.npy")
    assert torch.equal(ds.test.images([9])[0], torch.from_numpy(snow[5]).permute(2, 0, 1).float() / 255)
    assert ds.test.base is get_dataset("cifar10", root=str(tmp_path), seed=1).test
    np.save(d / "labels.npy", np.tile(labels[::-1], 5))
    with pytest.raises(FedlitError, match="does not repeat"):
        get_dataset("cifar10_c", root=str(tmp_path), seed=2)
    with pytest.raises(FedlitError, match="no glass_blur"):
        get_dataset("cifar10_c", root=str(tmp_path), seed=0, types=["glass_blur"])


def _jpeg(path, value):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_texture_and_tinyimagenet_readers(tmp_path):
    for c, n in (("banded", 2), ("zigzagged", 3)):
        for i in range(n):
            _jpeg(tmp_path / "dtd" / "images" / c / f"{c}_{i}.jpg", 10 * i)
    tex = get_dataset("texture", root=str(tmp_path), seed=0, image_size=8)
    assert tex.classnames == ["banded", "zigzagged"] and tex.test.labels.tolist() == [0, 0, 1, 1, 1]
    t = tmp_path / "tiny-imagenet-200"
    t.mkdir()
    (t / "wnids.txt").write_text("n02\nn01\n")
    (t / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\n")
    for w in ("n01", "n02"):
        _jpeg(t / "train" / w / "images" / f"{w}_0.JPEG", 1)
    for i, w in enumerate(("n02", "n01", "n02")):
        _jpeg(t / "val" / "images" / f"val_{i}.JPEG", i)
    (t / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\nval_1.JPEG\tn01\nval_2.JPEG\tn02\n")
    tiny = get_dataset("tinyimagenet", root=str(tmp_path), seed=0, image_size=8)
    assert tiny.classnames == ["goldfish", "salamander"] and tiny.test.labels.tolist() == [1, 0, 1]
    for s in (1, 3):
        for i, w in ((2, "n02"), (1, "n01")):
            _jpeg(tmp_path / "Tiny-ImageNet-C" / "fog" / str(s) / w / f"val_{i}.JPEG", 100 + s)
    tc = get_dataset("tinyimagenet_c", root=str(tmp_path), seed=0, image_size=8)
    assert tc.test.corruptions == ("fog",) and tc.test.meta["severity"].tolist() == [1, 1, 3, 3]
    assert tc.test.meta["source"].tolist() == [1, 2, 1, 2] and tc.test.labels.tolist() == [0, 1, 0, 1]
    assert tc.test.base is tiny.test
    with pytest.raises(FedlitError, match="texture: folder"):
        get_dataset("texture", root=str(tmp_path / "tiny-imagenet-200"), seed=0)


# ------------------------------------------------------------------------------------------ end to end
ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "configs" / "protocols" / "ood_embedded.yaml"
SMALL = ["--trainer.rounds", "2", "--trainer.eval_every", "2", "--data.num_clients", "3", "--data.shots", "2",
         "--data.dataset_args", '{"test_per_class": 4, "train_per_class": 4, "val_per_class": 1}',
         "--trainer.batch_size", "8", "--ood.dataset_args", '{"types": [gaussian_noise, contrast], "severities": [1, 5]}']


def _fit_ood(tmp_path, name, *extra) -> dict:
    out = tmp_path / name
    rc = main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--config", str(ROOT / "configs" / "embedded.yaml"),
               "--config", str(OVERLAY), *SMALL, "--out_dir", str(out), *extra])
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def _check_ood_results(res: dict) -> None:
    f = res["final"]
    keys = ["ood/acc", "ood/cacc", "ood/cacc/gaussian_noise", "ood/cacc/contrast/s5", "ood/cacc/s1"]
    keys += [f"ood/{s}/{m}" for s in ("msp", "energy", "neglabel") for m in ("fpr95", "auroc")]
    for k in keys:
        assert k in f and 0 <= f[k] <= 100, (k, f.get(k))
    for r in res["per_client"].values():
        assert r["ood/cacc"] == pytest.approx((r["ood/cacc/gaussian_noise"] + r["ood/cacc/contrast"]) / 2)
        assert r["ood/cacc/contrast"] == pytest.approx((r["ood/cacc/contrast/s1"] + r["ood/cacc/contrast/s5"]) / 2)
    assert res["ood"]["fpr95"]["msp"] == "id_positive" and res["ood"]["ood_images"] == {"shapes-dark-ood": 24}


@pytest.mark.parametrize("name", ["zeroshot", "promptfl"])
def test_ood_protocol_runs_for_a_method(tmp_path, name):
    res = _fit_ood(tmp_path, name)
    _check_ood_results(res)
    for r in res["per_client"].values():  # ID = the client's own test images among its task = Local
        assert r["ood/acc"] == pytest.approx(r["local"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / name / "tensorboard")).Reload().Tags()["scalars"]
    assert {"eval/ood/cacc", "eval/ood/energy/auroc", "eval/ood/msp/fpr95"} <= set(tags)


def _text_prompt_methods() -> list[str]:
    from fedlit.methods import list_methods, method_class

    return [m for m in list_methods() if method_class(m).text_classifier and (ROOT / "configs" / f"{m}.yaml").exists()]


@pytest.mark.slow
@pytest.mark.parametrize("name", _text_prompt_methods())
def test_ood_protocol_runs_for_every_text_prompt_method(tmp_path, name):
    from test_all_methods import EXTRA

    if name == "fedmvp":  # no attribute phrases for the negative labels: NegLabel refused, the other scores run
        res = _fit_ood(tmp_path, name, *EXTRA.get(name, []), "--ood.scores", "[msp, energy]")
        assert all(f"ood/{s}/auroc" in res["final"] for s in ("msp", "energy")) and "ood/neglabel/auroc" not in res["final"]
        assert 0 <= res["final"]["ood/cacc"] <= 100
        return
    _check_ood_results(_fit_ood(tmp_path, name, *EXTRA.get(name, [])))


def test_neglabel_is_refused_in_one_line_where_the_method_cannot_prompt_the_labels(tmp_path, capsys):
    from fedlit.methods import method_class

    assert not method_class("fedmvp")().encodes_any_label(["table", "cloud"])
    assert method_class("fedmvp")().encodes_any_label(["red circle"]) and method_class("promptfl")().encodes_any_label(
        ["table"])
    rc = main(["fit", "--config", str(ROOT / "configs" / "fedmvp.yaml"), "--config", str(ROOT / "configs" / "embedded.yaml"),
               "--config", str(OVERLAY), *SMALL, "--out_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc != 0 and "drop neglabel from ood.scores" in err and not (tmp_path / "r" / "results.json").exists()


def test_summarize_adds_the_ood_columns(tmp_path):
    from fedlit.apps.summarize import summarize

    for seed, (acc, fpr) in enumerate(((40.0, 60.0), (50.0, 80.0))):
        d = tmp_path / f"run{seed}"
        d.mkdir()
        final = {"local": acc, "base": acc, "novel": 20.0, "ood/acc": acc, "ood/cacc": 30.0, "ood/msp/fpr95": fpr}
        (d / "results.json").write_text(json.dumps({"method": "promptfl", "dataset": "shapes-dark", "seed": seed,
                                                    "backbone": "fedlit-toy", "final": final}))
    md, rows, _ = summarize([tmp_path], out=tmp_path / "t", paper="none")
    head = md.splitlines()[0]
    assert "| ID | CACC | FPR95 msp |" in head and "AUROC" not in head
    assert "| 45.00 ± 7.07 | 30.00 ± 0.00 | 70.00 ± 14.14 |" in md
    assert "ood/msp/fpr95_mean" in (tmp_path / "t.csv").read_text().splitlines()[0]


def test_every_ood_overlay_parses_into_the_ood_section():
    from fedlit.experiment import fit_parser, parse_fit

    parser = fit_parser()
    for overlay in sorted((ROOT / "configs" / "protocols").glob("ood_*.yaml")):
        argv = ["--config", str(ROOT / "configs" / "promptfl.yaml"), "--config", str(overlay)]
        _, init = parse_fit(parser, lambda: parser.parse_args(argv))
        assert init.ood.enabled and init.ood.ood_datasets, overlay.name
        assert init.ood.fpr95 == ("id_positive" if overlay.name == "ood_embedded.yaml" else "focoop")
    with pytest.raises(FedlitError, match="fpr95"):
        parse_fit(parser, lambda: parser.parse_args(["--config", str(ROOT / "configs" / "promptfl.yaml"),
                                                     "--ood.fpr95", "nearest"]))


def test_msp_and_energy_score_the_ood_prompts_of_a_method_that_has_them():
    import torch

    from fedlit.metrics import neglabel_score
    from fedlit.ood import OODEval, OODEvaluator

    ev = OODEvaluator.__new__(OODEvaluator)  # the scoring alone, no run
    ev.cfg = OODEval(scores=["msp", "energy", "neglabel"])
    z = torch.tensor([[2.0, 0.0, 5.0]])  # two ID logits, then one OOD-prompt logit
    neg = torch.tensor([[1.0, -1.0]])
    s = ev._scores(z, neg, 2)
    e = np.exp([2.0, 0.0, 5.0])
    assert s["msp"][0] == pytest.approx(e.max() / e.sum())  # the OOD prompt takes the softmax mass
    assert s["energy"][0] == pytest.approx(np.log(e.sum()), rel=1e-6)
    assert s["neglabel"][0] == pytest.approx(float(neglabel_score(z[:, :2], neg)[0]))  # ID logits only


@pytest.mark.parametrize("score_logits", ["method", "id"])
def test_focoop_is_scored_over_its_ood_prompts_and_its_accuracy_over_the_id_logits(tmp_path, score_logits):
    res = _fit_ood(tmp_path, "focoop", "--ood.score_logits", score_logits)
    _check_ood_results(res)
    assert res["ood"]["score_logits"] == ("id + ood prompts" if score_logits == "method" else "id")
    for r in res["per_client"].values():
        assert r["ood/acc"] == pytest.approx(r["local"])
