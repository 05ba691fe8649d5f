"""The official loops around the steps (issue 21 items 3, 5, 6, 7, 9): per-method last-batch rule, FedCoCoOp's
federated settings, FedOTP's CIFAR-100 script, the skipped client of FedPGP's released baselines, participation
from round 0, zero-shot precision and the CIFAR-10 Dirichlet split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlit import experiment
from fedlit.errors import FedlitError
from fedlit.methods import method_class
from fedlit.rounds import RoundProtocol
from fedlit.trainer import FedTrainer

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _init(*configs: str, argv: tuple[str, ...] = ()):
    parser = experiment.fit_parser()
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))] + list(argv)
    return experiment.parse_fit(parser, lambda: parser.parse_args(
        experiment.rewrite_method_shortcut(args, say=lambda note: None)))[1]


# ------------------------------------------------------------------------------------------ item 7: drop_last
def test_fedtpg_family_never_drops_a_last_batch_and_dassl_does():
    t = FedTrainer(batch_size=16)
    assert t.drop_last == "method"
    for name in ("fedtpg", "fedkgcoop", "fedvlp"):  # FedTPG's loaders (dm_federated.py:91-97): no drop_last
        assert t.drop_last_of(method_class(name)()) == "never", name
    for name in ("promptfl", "fedpgp", "fedotp", "coop"):
        assert t.drop_last_of(method_class(name)()) == "dassl", name
    fedtpg, fedpgp = method_class("fedtpg")(), method_class("fedpgp")()
    assert list(t.batch_starts(40, t.drop_last_of(fedtpg))) == [0, 16, 32]  # two 240-image clients keep their short batch
    assert list(t.batch_starts(40, t.drop_last_of(fedpgp))) == [0, 16]
    forced = FedTrainer(batch_size=16, drop_last="dassl")
    assert list(forced.batch_starts(40, forced.drop_last_of(fedtpg))) == [0, 16]


# ------------------------------------------------------------------------------------------ item 3: FedCoCoOp
def test_fedcocoop_is_fedpgps_federated_cocoop():
    init = _init("fedcocoop.yaml")
    assert (init.method.n_ctx, init.method.ctx_init, init.trainer.precision) == (16, None, "32-true")
    m = method_class("fedcocoop")()
    assert (m.n_ctx, m.ctx_init) == (16, None)


# ------------------------------------------------------------------------------------------ item 6: FedOTP CIFAR-100
def test_fedotp_cifar100_overlay_is_the_official_script():
    init = _init("fedotp.yaml", "protocols/cifar100_dirichlet.yaml", "protocols/fedotp_cifar100.yaml")
    m, t = init.method, init.trainer
    assert (m.n_ctx, m.thresh, t.precision, t.rounds, t.participation) == (4, 0.001, "16-mixed", 150, 0.1)
    protocol = RoundProtocol(m, t, 0, [1] * 100, {})
    assert [r + 1 for r in range(t.rounds) if protocol.eval_due(r)] == list(range(141, 151))  # epoch >= 140
    with pytest.raises(FedlitError, match="eval_from"):
        FedTrainer(eval_from=0)


# ------------------------------------------------------------------------------------------ item 5: client 5
def test_skip_clients_neither_trains_nor_evaluates_them():
    t = FedTrainer(skip_clients=[5])
    protocol = RoundProtocol(method_class("promptfl")(), t, 0, [10] * 10, {})
    assert protocol.select(0) == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # idxs_users.pop(5)
    assert protocol.evaluated() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    default = RoundProtocol(method_class("promptfl")(), FedTrainer(), 0, [10] * 10, {})
    assert default.select(3) == default.evaluated() == list(range(10))
    with pytest.raises(FedlitError, match="skip_clients"):
        RoundProtocol(method_class("promptfl")(), FedTrainer(skip_clients=[12]), 0, [10] * 10, {})


def test_a_skipped_client_is_missing_from_the_results(tmp_path):
    import json

    from fedlit.cli import main

    out = tmp_path / "run"
    assert main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.rounds", "1",
                 "--data.num_clients", "3", "--data.shots", "2", "--trainer.skip_clients", "[1]",
                 "--data.dataset_args", '{"train_per_class": 4, "test_per_class": 2}', "--out_dir", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert sorted(r["per_client"]) == ["0", "2"]


# ------------------------------------------------------------------------------------------ item 9
@pytest.mark.parametrize("config", ["promptfl.yaml", "fedprox.yaml", "fedprox_live.yaml", "coop.yaml"])
def test_fedotp_code_base_baselines_sample_from_round_0(config):
    init = _init(config, "protocols/cifar100_dirichlet.yaml")
    t = init.trainer
    assert t.first_round_all is False
    assert len(RoundProtocol(init.method, t, 0, [1] * 100, {}).select(0)) == 10  # 10 % from round 0


def test_zero_shot_clip_runs_fp32():
    assert _init("zeroshot.yaml").trainer.precision == "32-true"


def test_cifar10_split_follows_the_run_seed_and_checks_test_sizes():
    from fedlit.data.protocol import partition_dirichlet_train_test

    init = _init("fedpgp.yaml", "protocols/cifar10_dirichlet.yaml")
    assert init.data.partition_seed is None  # the run's seed, not the pathological split's 2023
    train = np.repeat(np.arange(10), 60)
    test = np.repeat(np.arange(10), 6)  # 60 test images over 6 clients: the train-only draw often leaves < 5
    tr, te = partition_dirichlet_train_test(train, test, 6, 0.3, seed=3, min_size=5)
    assert min(len(t) for t in tr) >= 5 and min(len(t) for t in te) >= 5
    assert sorted(np.concatenate(te).tolist()) == list(range(60))
