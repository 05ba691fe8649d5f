"""The optimiser-state policy (``trainer.optimizer_state``, issue 21 item 1): ``chain`` hands ONE optimiser state
from client to client in the official training order (the Dassl code bases), ``fresh`` restarts it every
client-round, ``per_client`` keeps each client's own (FedTPG)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlit import experiment
from fedlit.errors import FedlitError
from fedlit.methods import method_class
from fedlit.optimizer_state import training_order
from fedlit.trainer import FedTrainer

ROOT = Path(__file__).resolve().parent.parent
QUICK = str(ROOT / "configs" / "quickstart.yaml")
SMALL = ["--data.num_clients", "3", "--data.shots", "4", "--trainer.local_epochs", "1", "--trainer.batch_size", "4",
         "--data.dataset_args", '{"train_per_class": 8, "test_per_class": 4}']


def _orchestrator(*argv):
    parser = experiment.fit_parser()
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_args(
        experiment.rewrite_method_shortcut(["--config", QUICK, *SMALL, *argv], say=lambda note: None)))
    return experiment.build(parser, cfg, init)[0]


def test_each_method_declares_its_official_policy():
    t = FedTrainer()
    for name in ("coop", "promptfl", "fedprox", "fedpgp", "fedotp", "fedcocoop", "fedmaple", "promptfolio", "fedpha",
                 "pfedmoap", "pfedmma"):
        assert t.optimizer_state_of(method_class(name)()) == "chain", name
    for name in ("fedtpg", "fedvlp", "fedkgcoop", "central"):
        assert t.optimizer_state_of(method_class(name)()) == "per_client", name
    assert t.optimizer_state_of(method_class("fedtpg")(persistent_optimizer=False)) == "fresh"
    assert t.optimizer_state_of(method_class("fedkgcoop")(persistent_optimizer=False)) == "fresh"
    for name in ("pfedpg", "fedvpt", "localvpt", "ivlp", "zeroshot"):
        assert t.optimizer_state_of(method_class(name)()) == "fresh", name
    assert t.optimizer_state_of(method_class("dpfpl")()) == "step"  # step mode keeps its own state
    assert FedTrainer(optimizer_state="fresh").optimizer_state_of(method_class("fedpgp")()) == "fresh"
    with pytest.raises(FedlitError, match="trainer.optimizer_state"):
        FedTrainer(optimizer_state="shared")
    # in step mode the key is the step loop's policy (fedlit.steps): DP-FPL's official one is chain
    assert FedTrainer().step_policies(method_class("dpfpl")())["optimizer_state"] == "chain"
    assert FedTrainer(optimizer_state="fresh").step_policies(method_class("dpfpl")())["optimizer_state"] == "fresh"


def test_training_order_is_the_official_draw():
    cids = list(range(6))
    assert training_order(1, 3, cids, drawn=False, first_round_all=True) == cids
    assert training_order(1, 0, cids, drawn=True, first_round_all=True) == cids  # list(range(K)) in round 0
    drawn = training_order(1, 3, cids, drawn=True, first_round_all=True)
    assert sorted(drawn) == cids and drawn != cids  # np.random.choice order even at full participation
    assert drawn == training_order(1, 3, cids, drawn=True, first_round_all=True)  # a function of (seed, round)
    assert training_order(1, 0, cids, drawn=True, first_round_all=False) != cids
    assert training_order(2, 3, cids, drawn=True, first_round_all=True) != drawn


def test_chain_hands_the_momentum_to_the_next_client_and_fresh_does_not(toy):
    chain = _orchestrator("--trainer.optimizer_state", "chain")
    assert chain.optim.policy == "chain" and chain.optim.chain == {}
    chain.local_update(0, 0)
    buf = chain.optim.chain["0/momentum_buffer"]
    assert buf.abs().sum() > 0
    opt, _, _ = chain._client_optimizer(chain.protocol.state_of(1))  # client 1 starts from client 0's momentum
    (state,) = opt.state_dict()["state"].values()
    assert torch.equal(state["momentum_buffer"], buf)
    # client 1's first step: buf <- 0.9 buf_0 + g (+ wd), so its update differs from a fresh optimiser's
    u_chain = chain.local_update(1, 0)
    fresh = _orchestrator("--trainer.optimizer_state", "fresh")
    fresh.local_update(0, 0)
    assert fresh.optim.chain == {}
    opt, _, _ = fresh._client_optimizer(fresh.protocol.state_of(1))
    assert opt.state_dict()["state"] == {}
    u_fresh = fresh.local_update(1, 0)
    assert not torch.allclose(u_chain.shared["ctx"], u_fresh.shared["ctx"])


def test_chain_refuses_parallel_clients_with_the_fix():
    from fedlit.run_plan import checked_policy as _checked_policy

    fedpgp, fedtpg, maple = method_class("fedpgp")(), method_class("fedtpg")(), method_class("fedmaple")()
    for trainer in (FedTrainer(lockstep=0), FedTrainer(lockstep=4), FedTrainer(devices=2), FedTrainer(num_nodes=2)):
        with pytest.raises(FedlitError, match="--trainer.optimizer_state fresh"):
            _checked_policy(trainer, fedpgp)
    assert _checked_policy(FedTrainer(lockstep=0, optimizer_state="fresh"), fedpgp) == "fresh"
    assert _checked_policy(FedTrainer(devices=2), fedtpg) == "per_client"
    assert _checked_policy(FedTrainer(lockstep=0), maple) == "chain"  # image-prompt methods train one at a time
    with pytest.raises(FedlitError, match="--trainer.optimizer_state fresh"):  # the run refuses before it starts
        _orchestrator("--trainer.lockstep", "0", "--trainer.optimizer_state", "chain")


CHAIN = ("--trainer.optimizer_state", "chain")  # the quickstart trains fresh


@pytest.mark.slow  # the default suite covers it in tests/test_reliability.py (CoOp, chain, SIGKILL + resume)
def test_a_resumed_run_continues_the_chain(tmp_path):
    """Killed after round 1 and resumed = uninterrupted: the chained state travels in the checkpoint."""
    from fedlit import checkpoint as ckpt

    ref = _orchestrator("--trainer.rounds", "2", *CHAIN).fit(tmp_path / "ref")
    assert ref["optimizer_state"] == "chain"
    half = _orchestrator("--trainer.rounds", "1", *CHAIN)  # stops after round 1 with its checkpoint, as a run killed there would
    half.fit(tmp_path / "half")
    state = ckpt.load(tmp_path / "half" / ckpt.NAME)
    assert any(k.startswith("optim_chain/") and k.endswith("momentum_buffer") for k in state.server)
    resumed = _orchestrator("--trainer.rounds", "2", *CHAIN).fit(tmp_path / "resumed", resume=state)
    assert resumed["history"] == ref["history"] and resumed["per_client"] == ref["per_client"]
