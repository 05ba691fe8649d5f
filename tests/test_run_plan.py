"""The run plan (fedlit/run_plan.py) and the method roles (fedlit/methods/roles.py): resolved once, frozen, every
incompatible combination refused with one line, FedProx's μ taken from the plan (the method is not mutated)."""

from __future__ import annotations

import dataclasses

import pytest

from fedlit.errors import FedlitError
from fedlit.methods import method_class
from fedlit.methods.roles import DASSL_CHAIN, ClientPolicy, FedAvg
from fedlit.run_plan import RunPlan
from fedlit.trainer import FedTrainer


def plan(name: str, **trainer) -> RunPlan:
    return RunPlan.resolve(FedTrainer(**trainer), method_class(name)())


def test_the_plan_resolves_each_methods_official_loop():
    p = plan("fedpgp")
    assert (p.sync, p.optimizer_state, p.train_order, p.drop_last, p.augment) == ("round", "chain", "drawn", "dassl",
                                                                                 "dassl")
    assert p.statistic == "best_local" and p.step_loop is None and p.on_client_failure == "skip"
    assert p.epoch_views == 10  # rounds × local epochs: one fresh view per image and epoch
    t = plan("fedtpg")
    assert (t.optimizer_state, t.drop_last, t.augment, t.statistic) == ("per_client", "never", "none", "last_round")
    d = plan("dpfpl")
    assert d.sync == "step" and d.optimizer_state == "step" and d.on_client_failure == "stop"
    assert (d.step_loop.step_start, d.step_loop.optimizer_state, d.step_loop.personal_grad) == ("round", "chain",
                                                                                                "last_client")
    assert any("on_client_failure=skip" in n for n in d.notes)  # said, not silently bypassed
    assert "optimizer_state=chain (drawn order)" in p.describe() and "step_loop=(round, chain" in d.describe()


def test_the_plan_is_frozen_and_applies_the_trainers_overrides():
    p = plan("fedpgp", optimizer_state="fresh", augment="none", drop_last="never", statistic="last_round")
    assert (p.optimizer_state, p.augment, p.drop_last, p.statistic) == ("fresh", "none", "never", "last_round")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.prox_mu = 1.0
    assert plan("zeroshot", lockstep=0).lockstep == 1 and plan("ivlp", lockstep=0, optimizer_state="fresh").lockstep == 1
    assert plan("promptfl", lockstep=0, optimizer_state="fresh").lockstep == 0


def test_incompatible_settings_are_refused_once_with_the_fix():
    with pytest.raises(FedlitError, match="trainer.lockstep=1"):
        plan("promptfl", sync="step", lockstep=2)  # step mode used to bypass lock-step silently
    with pytest.raises(FedlitError, match="devices=1"):
        RunPlan.resolve(FedTrainer(sync="step"), method_class("promptfl")(), world_size=2)
    with pytest.raises(FedlitError, match="needs trainer.sync=step"):
        plan("dpfpl", sync="round")
    with pytest.raises(FedlitError, match="optimizer_state fresh"):
        plan("fedpgp", lockstep=0)
    with pytest.raises(FedlitError, match="its own tensors"):
        plan("pfedpg", sync="step")


def test_fedprox_mu_comes_from_the_plan_and_the_method_is_untouched():
    method = method_class("promptfl")()
    p = RunPlan.resolve(FedTrainer(prox_mu=0.1), method)
    assert p.prox_mu == 0.1 and method.prox_mu == 0.0  # the method object is not rewritten any more
    assert plan("fedprox").prox_mu == 0.01 and plan("fedprox", prox_mu=0.5).prox_mu == 0.5
    from fedlit.settings import hparams

    h = hparams(method, FedTrainer(prox_mu=0.1), {}, 0, p)
    assert h["plan/prox_mu"] == 0.1 and h["plan/optimizer_state"] == "chain"


def test_the_plan_digest_follows_the_fields_that_change_results():
    base = plan("promptfl", optimizer_state="fresh")
    assert base.digest() == plan("promptfl", optimizer_state="fresh").digest()
    assert base.digest() != plan("promptfl", optimizer_state="fresh", prox_mu=0.1).digest()
    assert base.digest() != plan("promptfl").digest()  # chain
    d = base.as_dict()
    assert d["prox_mu"] == 0.0 and "settings" not in d and d["step_loop"] is None


def test_legacy_flags_fold_into_the_policy():
    from fedlit.methods.coop import CoOp

    class Legacy(CoOp):  # a method written against the flags (no name: not registered)
        official_optimizer_state = "per_client"
        default_augment = "none"
        loop_defaults = {"step_start": "round"}

    assert "official_optimizer_state" not in Legacy.__dict__ and "loop_defaults" not in Legacy.__dict__
    assert Legacy.policy == CoOp.policy.replace(optimizer_state="per_client", augment="none",
                                                step_loop=(("step_start", "round"),))
    m = Legacy()
    assert m.optimizer_policy() == "per_client" and m.default_augment == "none" and m.loop_defaults == {
        "step_start": "round"}
    m.persistent_optimizer = False  # an instance writes its own policy; the class keeps its own
    assert m.optimizer_policy() == "fresh" and Legacy.policy.optimizer_state == "per_client"
    assert method_class("fedpgp").policy == DASSL_CHAIN


def test_the_client_policy_schedule_and_fedavg_by_hand():
    import torch

    from fedlit.methods.base import Update

    cosine = ClientPolicy(lr_schedule="cosine", schedule_rounds=4)
    assert cosine.lr_at(1.0, 0) == 1.0 and cosine.lr_at(1.0, 2) == pytest.approx(0.5) and ClientPolicy().lr_at(1.0, 3) == 1.0
    ups = [Update(0, {"w": torch.tensor([0.0])}, {}, 1, 0.0), Update(1, {"w": torch.tensor([3.0])}, {}, 2, 0.0)]
    assert FedAvg(True).aggregate(ups, {})["w"].item() == pytest.approx(2.0)  # (0·1 + 3·2) / 3
    assert FedAvg(False).aggregate(ups, {})["w"].item() == pytest.approx(1.5)
    assert FedAvg().combine_gradients([], []) == {}


def test_the_old_payload_hook_name_still_works():
    from fedlit.methods.promptfl import PromptFL

    class OldStyle(PromptFL):  # overrides the hook under its old name (it collided with rounds.ClientState)
        def client_state(self, cid, global_state):
            return {"cid": cid}

    assert OldStyle().payload_for(3, {}) == {"cid": 3} and OldStyle().client_specific
    assert not PromptFL().client_specific


def test_privacy_is_in_the_plan_with_its_resolved_noise():
    from fedlit.dp_sgd import PrivacySettings

    p = plan("fedpgp", privacy=PrivacySettings(clip=1.0, noise_multiplier=1.1), optimizer_state="fresh")
    assert p.privacy.clip == 1.0 and p.noise_multiplier == 1.1 and "privacy=dp-sgd (C=1, sigma=1.1" in p.describe()
    assert p.as_dict()["privacy"]["tensors"] == "all" and p.digest() != plan("fedpgp", optimizer_state="fresh").digest()
    calibrated = RunPlan.resolve(FedTrainer(rounds=2, privacy=PrivacySettings(clip=1.0, target_epsilon=3.0)),
                                 method_class("promptfl")(), client_sizes=(32, 64))
    assert calibrated.noise_multiplier > 0
    assert plan("promptfl").noise_multiplier == 0.0 and plan("promptfl").privacy is None
    with pytest.raises(FedlitError, match="trainer.lockstep=1"):
        plan("promptfl", privacy=PrivacySettings(clip=1.0, noise_multiplier=1.0), lockstep=2, optimizer_state="fresh")
