"""Typed, frozen trainer settings; the run digest and the reports derived from the fields' metadata.

Adding a trainer option that changes results touches two files: ``fedlit/trainer.py`` (the field, with
``metadata={"results": True}``, and its line in the docstring's Args) and the engine where it acts (e.g.
``fedlit/engine.py`` reading ``rt.plan.settings.<option>``). The parser, the run digest (resume), TensorBoard's HParams,
the report groups and the run plan pick it up from the field. :func:`test_a_new_results_option_reaches_everything`
adds one at test time (a dataclass subclass standing in for the edited class) without editing fedlit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from fedlit import experiment
from fedlit.errors import FedlitError
from fedlit.settings import NOT_NUMBERS, hparams, report_config
from fedlit.trainer import SPEED, FedTrainer, digest_fields, result_fields

QUICK = "configs/quickstart.yaml"

#: ``config_digest`` of configs/quickstart.yaml computed by the code before the digest was derived from the
#: field metadata (hand-kept ``_NOT_IN_DIGEST``, commit ce3c376): old runs must still be found and resumed.
QUICKSTART_DIGEST = "6a76e4d11c8a"


@dataclass(frozen=True)
class LossScaled(FedTrainer):
    loss_scale: float = field(default=1.0, metadata={"results": True})
    trace: bool = field(default=False, metadata=SPEED)  # a speed-only option, for contrast


def _parse(*argv):
    parser = experiment.fit_parser()
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_args(["--config", QUICK, *argv]))
    return parser, cfg, init


def test_the_quickstart_digest_is_the_one_the_hand_kept_list_gave():
    parser, cfg, _ = _parse()
    assert experiment.config_digest(parser, cfg) == QUICKSTART_DIGEST


def test_every_field_says_whether_it_changes_results():
    for f in dataclasses.fields(FedTrainer):
        assert isinstance(f.metadata.get("results"), bool), f"FedTrainer.{f.name} has no results metadata"
    speed = {"devices", "num_nodes", "strategy", "accelerator", "progress", "checkpoint_every", "feature_cache",
             "cache_dir", "threads", "lockstep"}
    names = {f.name for f in dataclasses.fields(FedTrainer)}
    assert set(result_fields(FedTrainer)) == names - speed  # rounds and eval_batch_size change results
    assert set(digest_fields(FedTrainer)) == names - speed - {"rounds"}  # a resumed run may be given more rounds
    assert {k for k in NOT_NUMBERS if k.startswith("trainer.")} == {f"trainer.{k}" for k in speed}


def test_settings_are_frozen_and_checked():
    t = FedTrainer()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.rounds = 3
    assert dataclasses.replace(t, rounds=3).rounds == 3 and t.rounds == 10
    assert FedTrainer(skip_clients=[5, 2, 5]).skip_clients == [2, 5]
    for kw, msg in (({"rounds": 0}, "trainer.rounds=0: needs at least 1 round"),
                    ({"participation": 1.5}, r"trainer.participation=1.5: a fraction in \(0, 1\]"),
                    ({"eval_batch_size": 0}, "trainer.eval_batch_size=0"), ({"num_nodes": 0}, "trainer.num_nodes=0"),
                    ({"statistic": "best"}, "trainer.statistic='best': use one of method, last_round, best_local"),
                    ({"feature_cache": None}, "trainer.feature_cache=None: use one of memory, disk")):
        with pytest.raises(FedlitError, match=msg):
            FedTrainer(**kw)


def test_a_bad_literal_through_the_cli_is_one_line():
    for key, value in (("statistic", "best"), ("sync", "async"), ("precision", "bf16-mix")):
        with pytest.raises(FedlitError) as err:
            _parse(f"--trainer.{key}", value)
        msg = str(err.value)
        assert msg.startswith(f"trainer.{key}: expected Literal[") and f"got '{value}'" in msg and "\n" not in msg


def test_a_new_results_option_reaches_everything(monkeypatch):
    """(a) the digest changes with it, (b) HParams and the report groups list it, (c) the parser takes
    ``--trainer.loss_scale 2``; a speed-only option changes none of them."""
    import fedlit.trainer
    from fedlit.methods import PromptFL

    monkeypatch.setattr(fedlit.trainer, "FedTrainer", LossScaled)  # what fit_parser() builds the trainer: from
    parser, cfg, init = _parse("--trainer.loss_scale", "2")
    assert type(init.trainer) is LossScaled and init.trainer.loss_scale == 2.0  # (c)
    digest = experiment.config_digest(parser, cfg)
    base = experiment.config_digest(*_parse()[:2])
    assert digest != base  # (a)
    assert experiment.config_digest(*_parse("--trainer.trace", "true")[:2]) == base  # speed only
    assert experiment.config_digest(*_parse("--trainer.rounds", "3")[:2]) == base  # resumable with more rounds
    hp = hparams(PromptFL(), init.trainer, {}, 0)
    assert hp["trainer/loss_scale"] == 2.0 and "trainer/trace" not in hp and "trainer/devices" not in hp  # (b)
    import yaml

    assert report_config(yaml.safe_load(parser.dump(cfg, skip_validation=True)))["trainer.loss_scale"] == 2.0
    # (d) the resolved run plan carries it, and the plan's digest (results.json ``plan_digest``) follows it
    from fedlit.run_plan import RunPlan

    plan = RunPlan.resolve(init.trainer, PromptFL())
    assert plan.settings.loss_scale == 2.0
    assert plan.digest() != RunPlan.resolve(LossScaled(), PromptFL()).digest()
    assert RunPlan.resolve(LossScaled(trace=True), PromptFL()).digest() == RunPlan.resolve(LossScaled(),
                                                                                          PromptFL()).digest()
