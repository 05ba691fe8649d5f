"""Clients in lock-step (``trainer.lockstep``, issue 15 item 3): the same final prompts and optimiser state as one
client at a time, each client's own step count, the joint text pass equal to the per-client ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlit import experiment
from fedlit.backbones import load_backbone
from fedlit.errors import FedlitError
from fedlit.engine import LocalRun
from fedlit.prompts import Task, encode_context, prompt_template
from fedlit.text_batch import FusedText
from fedlit.trainer import FedTrainer

QUICK = str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml")
KEEP = [64, 40, 17, 64, 9, 33]  # unequal data: 4, 2, 1, 4, 1 (short), 2 batches of 16 per epoch


def _orchestrator(method: str, lockstep: int, *argv: str):
    parser = experiment.fit_parser()
    args = ["--config", QUICK, "--method", method, "--trainer.lockstep", str(lockstep), "--trainer.local_epochs", "2",
            "--trainer.optimizer_state", "fresh", *argv]  # lock-step trains clients together: no chained optimiser
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_args(
        experiment.rewrite_method_shortcut(args, say=lambda note: None)))
    orch, _ = experiment.build(parser, cfg, init)
    for c, keep in zip(orch.fed.clients, KEEP):
        c.train_idx, c.train_y = c.train_idx[:keep], c.train_y[:keep]
    return orch


def _assert_same_round(method: str, lockstep: int, *argv: str, rounds: int = 1):
    seq, lock = _orchestrator(method, 1, *argv), _orchestrator(method, lockstep, *argv)
    for rnd in range(rounds):
        seq.train_round(rnd)
        lock.train_round(rnd)
    g1, g2 = seq.protocol.global_state, lock.protocol.global_state
    assert set(g1) == set(g2)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=0, atol=1e-5, msg=f"{method}: shared {k}")
    assert set(seq.protocol.clients) == set(lock.protocol.clients)
    for cid, st in seq.protocol.clients.items():
        other = lock.protocol.clients[cid]
        assert set(st.personal) == set(other.personal) and set(st.optim) == set(other.optim)
        for k, v in st.personal.items():
            torch.testing.assert_close(other.personal[k], v, rtol=0, atol=1e-5, msg=f"{method}: client {cid} {k}")
        for k, v in st.optim.items():  # momentum buffers: sums of gradients, whose rounding differences over a few
            # steps reach ~1e-4 (as between two thread counts of the sequential loop)
            torch.testing.assert_close(other.optim[k].float(), v.float(), rtol=1e-3, atol=1e-3,
                                       msg=f"{method}: client {cid} optimiser {k}")
    return seq, lock


# ------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("method, lockstep, argv", [
    ("promptfl", 0, ()),
    ("fedpgp", 4, ()),  # groups of 4 and 2
    ("fedtpg", 0, ()),  # each client among its own classes: the joint pass over different class lists
    ("pfedmoap", 0, ()),  # round 2: expert features computed (without gradient) and kept inside the loss
])
def test_lockstep_equals_one_client_at_a_time(method, lockstep, argv):
    _assert_same_round(method, lockstep, *argv, rounds=2 if method in ("fedtpg", "pfedmoap") else 1)


@pytest.mark.slow
@pytest.mark.parametrize("method, argv", [
    ("coop", ()), ("fedprox", ()), ("fedkgcoop", ()), ("promptfolio", ()), ("fedpha", ()), ("fedotp", ()),
    ("fedcocoop", ()), ("central", ()), ("fedlocoop", ()), ("fedgallop", ()),
    ("fedtpg", ("--method.init_args.depth", "2")),  # deep prompts in the joint pass
    ("promptfl", ("--backbone.text_path", "plain")),
    ("fedtpg", ("--backbone.text_path", "plain")),
    ("fedpgp", ("--trainer.augment", "dassl")),
])
def test_lockstep_equals_one_client_at_a_time_every_method(method, argv):
    _assert_same_round(method, 0, *argv)


def test_lockstep_clients_take_exactly_their_own_steps(monkeypatch):
    steps: dict[int, int] = {}
    step = LocalRun.step

    def counting(self, loss):
        assert all(p.grad is not None for p in self.module.prompt.parameters() if p.requires_grad)
        steps[self.cid] = steps.get(self.cid, 0) + 1
        return step(self, loss)

    monkeypatch.setattr(LocalRun, "step", counting)
    orch = _orchestrator("promptfl", 0)
    updates = orch.train_clients(list(range(6)), 0, orch.protocol.configure(0))
    expected = {c.cid: 2 * len(orch.plan.batch_starts(c.num_samples)) for c in orch.fed.clients}
    assert expected == {0: 8, 1: 4, 2: 2, 3: 8, 4: 2, 5: 4}
    assert steps == expected
    assert {u.cid: u.steps for u in updates} == expected


def test_lockstep_setting_and_which_methods_can():
    assert FedTrainer().lockstep == 1 and FedTrainer(lockstep=0).lockstep == 0
    with pytest.raises(FedlitError, match="trainer.lockstep"):
        FedTrainer(lockstep=-1)
    from fedlit.methods import method_class

    for name in ("promptfl", "fedpgp", "fedtpg", "fedotp", "coop"):
        assert method_class(name)().lockstep
    for name in ("ivlp", "fedvlp", "pfedpg", "fedvpt", "zeroshot"):
        assert not method_class(name)().lockstep


def test_lockstep_keeps_the_config_digest():  # a run resumes whatever lockstep the rerun asks for
    def digest(*argv):
        parser = experiment.fit_parser()
        cfg, _ = experiment.parse_fit(parser, lambda: parser.parse_args(["--config", QUICK, *argv]))
        return experiment.config_digest(parser, cfg)

    assert digest() == digest("--trainer.lockstep", "0") != digest("--trainer.batch_size", "8")


def test_a_raising_lockstep_group_falls_back_to_one_client_at_a_time(monkeypatch):
    """The group trained (steps taken, FedTPG's persistent momentum moved), then raised: its clients rerun one at a
    time from their untouched state and give the sequential round."""
    from fedlit import engine

    def broken(fabric, runs):
        engine.train_lockstep(fabric, runs)
        raise RuntimeError("joint pass failed")

    seq, lock = _orchestrator("fedtpg", 1), _orchestrator("fedtpg", 0)
    for orch in (seq, lock):
        orch.train_round(0)
    monkeypatch.setattr("fedlit.engine.train_lockstep", broken)
    seq.train_round(1)
    updates = lock.train_clients(list(range(6)), 1, lock.protocol.configure(1))
    assert [u.cid for u in updates] == list(range(6)) and all(u.ok for u in updates)
    lock.apply(updates)
    for k, v in seq.protocol.global_state.items():
        torch.testing.assert_close(lock.protocol.global_state[k], v, rtol=0, atol=1e-5)
    for cid, st in seq.protocol.clients.items():
        for k, v in st.optim.items():
            torch.testing.assert_close(lock.protocol.clients[cid].optim[k].float(), v.float(), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------ the joint text pass
@pytest.mark.parametrize("path", ["shared_prefix", "plain"])
def test_joint_text_pass_equals_the_per_client_passes(path):
    clip = load_backbone("fedlit-toy")
    clip.set_text_path(path)
    try:
        names = ("circle", "square", "red_triangle", "star", "blue_circle", "hexagon", "red_star")
        tasks = [Task("a", names[:4]), Task("b", names[2:5]), Task("a", names[:4]), Task("c", names[4:] + names[:1])]
        g = torch.Generator().manual_seed(0)
        ctxs = [torch.randn(*shape, clip.text_width, generator=g) * 0.02 for shape in ((4,), (2, 4), (4,), (3, 4))]
        deeps = [[torch.randn(4, clip.text_width, generator=g) * 0.02] for _ in tasks]
        for deep in (False, True):
            calls = [(prompt_template(clip, t, 4), c.requires_grad_(), d if deep else None)
                     for t, c, d in zip(tasks, ctxs, deeps)]
            text = FusedText()
            done = text.run(clip, [lambda tpl=tpl, c=c, d=d: encode_context(clip, tpl, c, d) for tpl, c, d in calls])
            assert text.passes == 1 and all(e is None for _, e in done)
            joint = [j for j, _ in done]
            for (tpl, c, d), j in zip(calls, joint):
                ref = encode_context(clip, tpl, c, d)
                assert j.shape == ref.shape
                torch.testing.assert_close(j, ref, rtol=0, atol=1e-6)
                gj, = torch.autograd.grad(j.sum(), c, retain_graph=True)
                gr, = torch.autograd.grad(ref.sum(), c)
                torch.testing.assert_close(gj, gr, rtol=1e-5, atol=1e-5)
    finally:
        clip.set_text_path("shared_prefix")


def test_each_loss_runs_once_and_the_text_tower_once_per_wave(monkeypatch):
    """No second forward: every job runs once; a job's two text passes give two joint passes, not 2·M; passes
    without gradient and passes of other threads are not intercepted; a job's error comes back as its own."""
    clip = load_backbone("fedlit-toy")
    tpl = prompt_template(clip, Task("a", ("circle", "square", "star")), 4)
    tower = {"n": 0}
    real = clip.encode_text_shared

    def counted(*a, **k):
        tower["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(clip, "encode_text_shared", counted)
    ctxs = [torch.randn(4, clip.text_width, requires_grad=True) for _ in range(3)]
    runs = {"n": 0}

    def job(c):
        runs["n"] += 1
        with torch.no_grad():
            encode_context(clip, tpl, c)  # direct: no gradient
        first = encode_context(clip, tpl, c)
        return encode_context(clip, tpl, c * 2) + first

    text = FusedText()
    done = text.run(clip, [lambda c=c: job(c) for c in ctxs])
    assert runs["n"] == 3 and text.passes == 2 and tower["n"] == 3 + 2  # 3 no-grad passes + 2 joint ones
    for c, (out, err) in zip(ctxs, done):
        assert err is None
        torch.testing.assert_close(out, (encode_context(clip, tpl, c * 2) + encode_context(clip, tpl, c)).detach(),
                                   rtol=1e-5, atol=1e-6)
    assert clip.text_service is None

    def bad():
        encode_context(clip, tpl, ctxs[0])
        raise ValueError("client bug")

    done = text.run(clip, [lambda: encode_context(clip, tpl, ctxs[1]), bad])
    assert done[0][1] is None and isinstance(done[1][1], ValueError)
    done = text.run(clip, [lambda: FusedText().run(clip, [lambda: None])])
    assert isinstance(done[0][1], RuntimeError) and "do not nest" in str(done[0][1])
