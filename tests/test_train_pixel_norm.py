"""FLiP's un-normalised training images (spec 3c §0.7, quirk F1) as ``trainer.train_pixel_norm: none``: training
images reach the tower resized but not mean/std normalised, test images as before; its own cache key; refused
with a dataset's own pre-processing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlit import experiment
from fedlit.data.registry import UNNORMALISED, TensorImageSplit, unnormalised
from fedlit.errors import FedlitError
from fedlit.features import FeatureBank

ROOT = Path(__file__).resolve().parents[1]


def _split(n=3, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorImageSplit(labels=np.arange(n) % 2, data=(torch.rand(n, 3, size, size, generator=g) * 255)
                            .to(torch.uint8))


def test_unnormalised_images_are_the_clip_images_without_mean_and_std(toy):
    split = _split()
    raw = split.images(np.arange(3))
    bank = FeatureBank(toy, {"train": unnormalised(split), "test": split})
    got = bank.images("train", [0, 1, 2])
    normalised = bank.images("test", [0, 1, 2])  # the backbone's path: bicubic resize, clamp, mean/std
    mean = torch.tensor(toy.mean).view(1, 3, 1, 1)
    std = torch.tensor(toy.std).view(1, 3, 1, 1)
    torch.testing.assert_close(got, normalised * std + mean, rtol=0, atol=1e-5)
    assert got.min() >= 0 and got.max() <= 1 and got.shape[-2:] != raw.shape[-2:]  # resized, in [0, 1]
    assert not torch.allclose(got, normalised, atol=1e-2)


def test_its_own_cache_key_and_a_dataset_preprocessing_is_refused():
    split = _split()
    key = split.cache_key()  # memoised on the original: the copy must not inherit it
    copy = unnormalised(split)
    assert copy.pixel_norm == UNNORMALISED and split.pixel_norm is None
    assert copy.cache_key() != key and split.cache_key() == key
    official = _split()
    official.pixel_norm = {"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2), "resize": "bilinear"}
    with pytest.raises(FedlitError, match="preprocess"):
        unnormalised(official)


def _orch(*argv):
    parser = experiment.fit_parser()
    args = ["--config", str(ROOT / "configs" / "promptfl.yaml"), "--config", str(ROOT / "configs" / "embedded.yaml"),
            "--data.num_clients", "2", "--data.shots", "2", "--trainer.batch_size", "4", "--trainer.rounds", "1",
            "--trainer.augment", "none", "--trainer.checkpoint_every", "0",
            "--data.dataset_args", '{"test_per_class": 2, "train_per_class": 4}', *argv]
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_args(args))
    return experiment.build(parser, cfg, init)[0]


def test_a_run_trains_on_unnormalised_features_and_tests_as_before():
    clip_run, flip_run = _orch(), _orch("--trainer.train_pixel_norm", "none")
    assert "train_pixel_norm=none" in flip_run.plan.describe()
    assert "train_pixel_norm" not in clip_run.plan.describe()
    assert clip_run.plan.digest() != flip_run.plan.digest()
    rows = clip_run.fed.clients[0].train_idx[:2]
    test_rows = clip_run.fed.clients[0].test_idx[:2]
    assert not torch.allclose(clip_run.bank.inputs("train", rows), flip_run.bank.inputs("train", rows), atol=1e-3)
    assert torch.equal(clip_run.bank.inputs("test", test_rows), flip_run.bank.inputs("test", test_rows))


def test_the_option_at_its_default_keeps_earlier_runs_digest():
    parser = experiment.fit_parser()

    def digest(*argv):
        cfg, _ = experiment.parse_fit(parser, lambda: parser.parse_args(["--config", str(ROOT / "configs" / "quickstart.yaml"), *argv]))
        return experiment.config_digest(parser, cfg)

    # test_trainer_option pins the quickstart's digest from before the option existed
    assert digest() == digest("--trainer.train_pixel_norm", "clip") != digest("--trainer.train_pixel_norm", "none")


def test_reports_group_a_run_from_before_the_option_with_one_at_its_default():
    from fedlit.settings import report_config

    before = {"method": {"class_path": "promptfl"}, "trainer": {"rounds": 2}}
    default = {"method": {"class_path": "promptfl"}, "trainer": {"rounds": 2, "train_pixel_norm": "clip"}}
    flip = {"method": {"class_path": "promptfl"}, "trainer": {"rounds": 2, "train_pixel_norm": "none"}}
    assert report_config(before) == report_config(default) != report_config(flip)
    assert report_config(flip)["trainer.train_pixel_norm"] == "none"


def test_an_ood_option_added_later_is_left_out_at_its_default_too():
    from fedlit.settings import drop_added_defaults, report_config

    old = {"ood": {"scores": ["msp"]}, "trainer": {"rounds": 2}}
    new = {"ood": {"scores": ["msp"], "score_logits": "method"}, "trainer": {"rounds": 2, "train_pixel_norm": "clip"}}
    assert drop_added_defaults(new) == old and report_config(new) == report_config(old)
    ids = {"ood": {"scores": ["msp"], "score_logits": "id"}, "trainer": {"rounds": 2}}
    assert drop_added_defaults(ids) == ids and report_config(ids)["ood.score_logits"] == "id"


def test_the_listed_ood_defaults_are_the_sections_own():
    import inspect

    from fedlit.ood import OODEval
    from fedlit.settings import OOD_ADDED

    params = inspect.signature(OODEval).parameters
    assert all(params[k].default == v for k, v in OOD_ADDED.items())
