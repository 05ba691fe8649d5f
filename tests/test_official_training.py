"""Train as the papers trained (issue 14): Dassl's drop_last rule, the CoOp baseline's restart, the official
Prompt+Prox config, the protocol overlays, per-method default augmentation and the view bank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlit import cli, experiment
from fedlit.errors import FedlitError
from fedlit.trainer import FedTrainer

ROOT = Path(__file__).resolve().parent.parent
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def _parse(*argv):
    parser = experiment.fit_parser()
    return parser, *experiment.parse_fit(parser, lambda: parser.parse_args(
        experiment.rewrite_method_shortcut(list(argv), say=lambda note: None)))


def _orchestrator(*argv):
    parser, cfg, init = _parse("--config", QUICK, *argv)
    orch, _ = experiment.build(parser, cfg, init)
    return orch


# ------------------------------------------------------------------------------------------ drop_last
def test_dassl_drop_last_rule():
    t = FedTrainer(batch_size=16)
    assert list(t.batch_starts(40, "dassl")) == [0, 16]          # ≥ one full batch: the short last one is dropped
    assert list(t.batch_starts(32, "dassl")) == [0, 16]
    assert list(t.batch_starts(10, "dassl")) == [0]              # fewer than a batch: its one short batch is kept
    assert list(t.batch_starts(40, "never")) == [0, 16, 32]
    with pytest.raises(FedlitError, match="drop_last"):
        FedTrainer(drop_last="sometimes")


def test_local_update_drops_the_last_incomplete_batch():
    orch = _orchestrator("--trainer.batch_size", "24", "--trainer.local_epochs", "1")
    n = orch.fed.clients[0].num_samples
    assert n % 24 and n > 24
    assert orch.local_update(0, 0).steps == n // 24
    orch = _orchestrator("--trainer.batch_size", "24", "--trainer.local_epochs", "1", "--trainer.drop_last", "never")
    assert orch.local_update(0, 0).steps == -(-n // 24)


# ------------------------------------------------------------------------------------------ CoOp baseline
@pytest.mark.parametrize("persistent", [False, True])
def test_coop_restarts_from_its_initial_context_unless_persistent(persistent):
    orch = _orchestrator("--method", "coop", "--method.init_args.persistent", str(persistent).lower(),
                         "--trainer.optimizer_state", "fresh")  # chain would carry the momentum into the rerun
    assert orch.method.restart_personal is (not persistent)
    first = orch.local_update(0, 0)
    orch.apply([first])
    again = orch.local_update(0, 0)  # same round → same batch order: identical iff it restarted from the init
    same = all(torch.equal(first.personal[k], again.personal[k]) for k in first.personal)
    assert same is (not persistent)
    assert not torch.equal(first.personal["ctx"], orch.init_personal["ctx"])


def test_promptfl_is_unaffected_by_the_restart():
    parser, cfg, init = _parse("--config", QUICK)
    assert init.method.restart_personal is False


# ------------------------------------------------------------------------------------------ configs
def test_prompt_prox_config_is_the_official_detached_term_and_the_fix_is_named():
    _, _, off = _parse("--config", str(ROOT / "configs" / "fedprox.yaml"))
    _, _, live = _parse("--config", str(ROOT / "configs" / "fedprox_live.yaml"))
    assert off.method.prox_detached is True and off.method.mu == 0.5
    assert live.method.prox_detached is False and live.method.mu > 0


@pytest.mark.parametrize("overlay,epochs,batch,shots,rounds", [
    ("cifar10_dirichlet", 10, 32, -1, 150),
    ("cifar100_dirichlet", 1, 32, -1, 150),
    ("office_caltech10_domains", 2, 64, -1, 25),  # official: the whole train pickle (issue 21 item 4)
    ("domainnet_domains", 2, 64, -1, 25),  # official: the whole train pickle (issue 21 item 4)
])
def test_protocol_overlays_set_the_official_script_values(overlay, epochs, batch, shots, rounds):
    _, _, init = _parse("--config", str(ROOT / "configs" / "fedpgp.yaml"),
                        "--config", str(ROOT / "configs" / "protocols" / f"{overlay}.yaml"))
    t = init.trainer
    assert (t.local_epochs, t.batch_size, init.data.shots, t.rounds) == (epochs, batch, shots, rounds)
    if "cifar" in overlay:  # the official CIFAR pipeline: its own mean/std + bilinear resize, no augmentation
        assert init.data.dataset_args["preprocess"] == "official" and t.augment == "none"
    if "domains" in overlay:
        assert init.data.leave_out == []  # every domain trains (Table 2/4); leave_out is the named option


# ------------------------------------------------------------------------------------------ augmentation
def test_each_method_defaults_to_its_official_augmentation():
    from fedlit.methods import method_class

    t = FedTrainer()
    for name in ("coop", "promptfl", "fedprox", "fedpgp", "fedotp", "fedcocoop", "fedmaple"):
        assert method_class(name)().augmentation(t) == "dassl", name
    for name in ("fedtpg", "fedvlp", "fedkgcoop", "zeroshot"):
        assert method_class(name)().augmentation(t) == "none", name
    assert method_class("fedpgp")().augmentation(FedTrainer(augment="none")) == "none"
    assert method_class("fedtpg")().augmentation(FedTrainer(augment="dassl")) == "dassl"
    with pytest.raises(FedlitError, match="trainer.augment"):
        FedTrainer(augment="autoaugment")


# ------------------------------------------------------------------------------------------ the view bank
@pytest.fixture(scope="module")
def toy():
    from fedlit.backbones import load_backbone
    from fedlit.data.registry import get_dataset

    clip = load_backbone("fedlit-toy")
    data = get_dataset("shapes-dark", seed=0, train_per_class=2, val_per_class=1, test_per_class=1)
    return clip, {"train": data.train, "test": data.test}


def test_view_bank_one_fresh_view_per_epoch_encoded_once_and_seeded_by_the_run(toy):
    from fedlit.features import FeatureBank

    clip, splits = toy
    bank = FeatureBank(clip, splits, epoch_views=6, local_epochs=2, seed=1)
    assert bank.seed == 1 and bank.augment_views == 6
    rows = np.array([0, 3, 5])
    # round r, epoch e → view r·E + e for every sample, in order
    assert [bank.train_views((1, r, 0, e), 10, rows)[0] for r in range(3) for e in range(2)] == list(range(6))
    with pytest.raises(FedlitError, match="trainer.rounds"):
        bank.train_views((1, 3, 0, 0), 10, rows)
    idx = np.array([4, 9, 4])
    f0 = bank.features("train", idx, np.array([0, 0, 5]))
    assert bank.encoded == 2 * 6  # all six views of the two images, once
    f1 = bank.features("train", idx, np.array([1, 2, 3]))
    assert bank.encoded == 12 and not torch.equal(f0, f1)
    want = clip.encode_image(bank.augmented_images("train", idx, np.array([0, 0, 5]))).float()
    torch.testing.assert_close(f0, want, rtol=1e-4, atol=1e-5)
    # another run seed: other views (the official stream follows the run's seed), under another cache key;
    # the same seed (any method of it): the same views and key
    other = FeatureBank(clip, splits, epoch_views=6, local_epochs=2, seed=2)
    assert other.cache_key("train", augmented=True) != bank.cache_key("train", augmented=True)
    assert not torch.equal(other.augmented_images("train", idx, np.array([0, 0, 5])),
                           bank.augmented_images("train", idx, np.array([0, 0, 5])))
    same = FeatureBank(clip, splits, epoch_views=6, local_epochs=2, seed=1)
    assert same.cache_key("train", augmented=True) == bank.cache_key("train", augmented=True)
    assert torch.equal(same.augmented_images("train", idx, np.array([0, 0, 5])),
                       bank.augmented_images("train", idx, np.array([0, 0, 5])))
    # where views cannot be kept (patch tokens, partial participation) the tower runs on each augmented batch
    live = FeatureBank(clip, splits, epoch_views=6, local_epochs=2, seed=1, cache_views=False)
    torch.testing.assert_close(live.features("train", idx, np.array([0, 0, 5])), f0, rtol=1e-4, atol=1e-5)
    live.features("train", idx, np.array([0, 0, 5]))
    assert live.encoded == 6  # 3 per call, nothing cached


def test_file_views_are_cut_from_the_original_image(tmp_path):
    from PIL import Image

    from fedlit.data.coop import FileImageSplit

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)  # H 200, W 300: not the 224 centre crop
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    split = FileImageSplit(labels=np.array([0]), paths=[str(path)], image_size=224)
    seen = []

    def params(k, h, w):
        seen.append((h, w))
        return 10, 250, 100, 40, True  # a box on the right edge: outside the 200-px centre crop

    got = split.view_crops([0], params, (32, 32))
    assert seen == [(200, 300)]
    im = Image.fromarray(arr).resize((32, 32), Image.BICUBIC, box=(250, 10, 290, 110)).transpose(Image.FLIP_LEFT_RIGHT)
    assert torch.equal(got[0], torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)


def test_file_views_decode_each_file_once_per_call(tmp_path, monkeypatch):
    """The view bank asks for all E views of a row at once: one decode of the file, the same crops as one
    decode per view (each view cut from its own decode)."""
    from PIL import Image

    from fedlit.data.coop import FileImageSplit
    from fedlit.features import augment_params

    rng = np.random.default_rng(1)
    paths = []
    for k, (h, w) in enumerate([(60, 90), (80, 50)]):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(paths[-1])
    split = FileImageSplit(labels=np.array([0, 1]), paths=paths, image_size=32)
    rows, views = np.array([1, 0, 1, 1, 0]), np.array([0, 3, 1, 2, 0])

    def params(k, h, w):
        return augment_params(7, int(rows[k]), int(views[k]), h, w)

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **kw: opened.append(p) or real_open(p, *a, **kw))
    got = split.view_crops(rows, params, (16, 16))
    assert sorted(opened) == sorted(paths)  # 2 files, 5 views: 2 decodes
    for k in range(len(rows)):  # each view alone (its own decode) is the same crop, bit for bit
        one = split.view_crops(rows[k:k + 1], lambda _, h, w, k=k: params(k, h, w), (16, 16))
        assert torch.equal(got[k], one[0])
    assert len(opened) == 2 + len(rows)


def test_dassl_augmentation_end_to_end_encodes_each_training_image_once_per_epoch(tmp_path):
    import json

    out = tmp_path / "aug"
    assert cli.main(["fit", "--config", QUICK, "--out_dir", str(out), "--trainer.rounds", "1",
                     "--trainer.augment", "dassl"]) == 0
    r = json.loads((out / "results.json").read_text())
    n_train = 6 * 4 * 16
    assert n_train * 2 <= r["images_encoded"] <= n_train * 2 + 48 * 32  # 1 round × 2 epochs of views + test
    assert r["selection"] == "best_local"  # results.json names how "final" was chosen (PromptFL: FedPGP Table 1)


# ------------------------------------------------------------------------------------------ Dirichlet evaluation
def test_dirichlet_clients_are_tested_only_on_classes_they_trained_on():
    from fedlit.data.protocol import partition_dirichlet_train_test

    train = np.repeat(np.arange(18), 4)  # a 4-shot pool: rounding empties many (client, class) cells
    test = np.repeat(np.arange(18), 50)
    tr, te = partition_dirichlet_train_test(train, test, 10, 0.3, seed=0, min_size=1)
    assert sum(len(t) for t in te) == len(test)  # every test image is still used once
    for t_tr, t_te in zip(tr, te):
        assert set(test[t_te]) <= set(train[t_tr])
    # on a full training set the per-class test shares follow the training shares (same proportions)
    train = np.repeat(np.arange(5), 500)
    test = np.repeat(np.arange(5), 100)
    tr, te = partition_dirichlet_train_test(train, test, 4, 0.5, seed=1)
    for t_tr, t_te in zip(tr, te):
        for c in range(5):
            assert abs(np.sum(test[t_te] == c) / 100 - np.sum(train[t_tr] == c) / 500) <= 0.03


def test_dirichlet_federation_with_shots_evaluates_local_on_trained_classes():
    from fedlit.data.federation import FederatedData

    fed = FederatedData(dataset="shapes-dark", shots=4, num_clients=6, partition="dirichlet", beta=0.3,
                        subsample="base", min_samples=1).setup(0)
    for c in fed.clients:
        assert set(np.unique(c.test_y)) <= set(np.unique(c.train_y)), c.cid


# ------------------------------------------------------------------------------------------ precision
EXTRA_INIT = {"fedmaple": {"prompt_depth": 2}, "fedvlp": {"prompt_depth": 1}}


@pytest.mark.parametrize("name", ["coop", "promptfl", "fedprox", "fedpgp", "fedotp", "fedcocoop", "fedmaple",
                                  "fedtpg", "fedkgcoop", "fedvlp", "fedvpt", "pfedpg", "zeroshot"])
def test_logits_and_losses_are_fp32_under_bf16_autocast(name, toy):
    from fedlit.client import ClientModule
    from fedlit.features import FeatureBank
    from fedlit.methods import method_class
    from fedlit.prompts import Task

    clip, splits = toy
    method = method_class(name)(**EXTRA_INIT.get(name, {}))
    task = Task("shapes-dark", ("red circle", "red square", "blue ring", "green cross"))
    method.setup_federation(task, 2)
    module = ClientModule(clip, method)
    shared, _ = module.export()
    received = method.payload_for(0, shared)
    x = FeatureBank(clip, splits, kind=method.image_input).inputs("train", [0, 1, 2])
    y = torch.tensor([0, 1, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = module(x, task)
        assert logits.dtype == torch.float32, name
        if method.trainable:
            loss = module.training_step((x, y), 0, task, [0, 1, 2, 3], received)
            assert loss.dtype == torch.float32, name
            loss.backward()
