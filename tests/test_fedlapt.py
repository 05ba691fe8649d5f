"""FedLAPT (spec 3b §2.9): the cross-modal mixing and the soft CE on hand cases, the folded λ, the per-step cosine
schedule, one optimiser step per local epoch (the official quirk) vs one per batch, shared keys and batch weights, and
a 2-round fit on the embedded default. Toy backbone, CPU, seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlit import experiment
from fedlit.cli import main
from fedlit.client import ClientModule
from fedlit.errors import FedlitError
from fedlit.methods.base import Update
from fedlit.methods.fedlapt import (FEDLAPT_CLIENT, TIP_TEMPLATES_CLEAN, TIP_TEMPLATES_OFFICIAL, FedLAPT, draw_lambda,
                                    fold_lambda, padded_onehot, soft_cross_entropy, wccm_mix)
from fedlit.prompts import Task
from fedlit.trainer import FedTrainer

ROOT = Path(__file__).resolve().parents[1]
TASK = Task("tiny", ("circle", "square", "red_triangle", "star"))
SMALL = ["--method.init_args.num_ood_prompts", "3", "--method.init_args.ood_candidates", "200",
         "--method.init_args.n_ctx", "4"]


# ------------------------------------------------------------------------------------------------ pure parts
def test_wccm_mixing_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    h = torch.tensor([[[0.0, 1.0], [1.0, 0.0]],          # class 0, templates 0 / 1
                      [[-1.0, 0.0], [0.6, 0.8]]])        # class 1
    y, r = torch.tensor([0, 1]), torch.tensor([0, 1])
    out = wccm_mix(f, h, y, r, 0.25)
    # sample 0: 0.25·(1, 0) + 0.75·(0, 1) = (0.25, 0.75) / √0.625; sample 1: 0.25·(0, 1) + 0.75·(0.6, 0.8)
    torch.testing.assert_close(out[0], torch.tensor([0.25, 0.75]) / math.sqrt(0.625))
    v = torch.tensor([0.45, 0.85])
    torch.testing.assert_close(out[1], v / v.norm())
    torch.testing.assert_close(wccm_mix(f, h, y, torch.tensor([1, 0]), 0.0), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


def test_lambda_is_folded_to_at_most_one_half():
    assert fold_lambda(0.8) == pytest.approx(0.2) and fold_lambda(0.3) == 0.3 and fold_lambda(0.5) == 0.5
    assert draw_lambda(np.random.default_rng(0), 0.0) == 0.0  # α ≤ 0: λ = 1, folded to 0 (the code's order)
    rng = np.random.default_rng(1)
    lams = [draw_lambda(rng, 0.1) for _ in range(200)]
    assert all(0 <= x <= 0.5 for x in lams) and np.mean(lams) < 0.2  # Beta(0.1, 0.1) piles at the ends


def test_soft_cross_entropy_by_hand():
    z = torch.tensor([[0.0, math.log(3.0), 0.0]])  # softmax = (1/5, 3/5, 1/5)
    q = torch.tensor([[0.5, 0.5, 0.0]])
    assert float(soft_cross_entropy(z, q)) == pytest.approx(0.5 * math.log(5) + 0.5 * math.log(5 / 3))
    q1 = padded_onehot(torch.tensor([1, 0]), 2, 3)
    assert q1.tolist() == [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    zz = torch.randn(2, 5)
    torch.testing.assert_close(soft_cross_entropy(zz, q1), F.cross_entropy(zz, torch.tensor([1, 0])))
    with pytest.raises(ValueError):
        soft_cross_entropy(zz, q1[:, :4])


def test_per_step_cosine_schedule_values():
    p = FEDLAPT_CLIENT
    m = 1e-8
    assert p.lr_at_step(0.001, 0, 8) == pytest.approx(0.001)
    assert p.lr_at_step(0.001, 4, 8) == pytest.approx(0.001 * (m + (1 - m) * 0.5))
    assert p.lr_at_step(0.001, 2, 8) == pytest.approx(0.001 * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi / 4))))
    assert p.lr_at_step(0.001, 8, 8) == pytest.approx(0.001 * m)
    assert p.lr_at_step(0.001, 12, 8) == pytest.approx(p.lr_at_step(0.001, 4, 8))  # the LambdaLR cosine rises again
    assert p.replace(lr_schedule="constant").lr_at_step(0.001, 4, 8) == 0.001


def test_official_templates_keep_the_trailing_quote_comma():
    assert len(TIP_TEMPLATES_OFFICIAL) == 7 and TIP_TEMPLATES_OFFICIAL[0] == "a bad photo of the {}.',"
    assert TIP_TEMPLATES_CLEAN[-1] == "itap of a {}."


# ------------------------------------------------------------------------------------------------ the method
def _lapt(toy, **kw):
    m = FedLAPT(n_ctx=2, num_ood_prompts=3, ood_candidates=200, **kw)
    m.setup_federation(TASK, 2)
    return m, ClientModule(toy, m)


def test_keys_logits_and_batch_weights(toy):
    m, mod = _lapt(toy)
    shared, personal = mod.export()
    assert set(shared) == {"ctx"} and not personal  # unified: one tensor serves the ID and the OOD prompts
    m2, mod2 = _lapt(toy, prompt_type="dis_aware")
    shared2, personal2 = mod2.export()
    assert set(shared2) == {"ctx", "ctx_ood"} and not personal2
    assert len(m.ood_words) == 3 and not {"circle", "square", "red", "triangle", "star"} & set(m.ood_words)
    x = torch.randn(2, toy.embed_dim)
    full = m.full_logits(mod.prompt, toy, x, TASK)
    assert full.shape == (2, 4 + 3)
    torch.testing.assert_close(mod(x, TASK), full[:, :4])
    m.plan_rounds(FedTrainer(batch_size=8), [10, 40])  # len(loader), no drop_last: 2 and 5 batches
    assert m._batches == (2, 5)
    ups = [Update(0, {"ctx": torch.zeros(1)}, {}, 10, 0.0), Update(1, {"ctx": torch.ones(1) * 7}, {}, 40, 0.0)]
    assert float(m.aggregate(ups, {})["ctx"]) == pytest.approx(5.0)  # 7 · 5/7, not 7 · 40/50
    with pytest.raises(FedlitError, match="step_per"):
        FedLAPT(step_per="sometimes")


def test_loss_is_the_weighted_soft_ce_on_the_mixed_features(toy):
    m, mod = _lapt(toy)
    x, y = torch.randn(3, toy.embed_dim), torch.tensor([0, 2, 3])
    loss = m.loss(mod, x, y, TASK)
    rng = np.random.default_rng([0x1A97, 0])  # the first draw of the method's stream
    h = m.class_text_bank(toy, TASK)
    assert h.shape == (4, 7, toy.embed_dim)
    torch.testing.assert_close(h.norm(dim=-1), torch.ones(4, 7))
    lam = draw_lambda(rng, 0.1)
    r = torch.as_tensor(rng.integers(0, 7, size=3))
    t, o = m.prepare(mod.prompt, toy, TASK)
    z = toy.logit_scale * wccm_mix(F.normalize(x, dim=-1), h, y, r, lam) @ torch.cat([t, o]).t()
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(z, y))
    m_none, mod_none = _lapt(toy, mix_strategy="none")
    mod_none.load_prompt_state(mod.export()[0], {})
    z0 = m_none.full_logits(mod_none.prompt, toy, x, TASK)
    torch.testing.assert_close(m_none.loss(mod_none, x, y, TASK), 0.5 * F.cross_entropy(z0, y))
    loss.backward()
    assert mod.prompt.ctx.grad is not None and mod.prompt.ctx.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ the client loop
def _orchestrator(*argv):
    parser = experiment.fit_parser()
    args = ["--config", str(ROOT / "configs" / "fedlapt.yaml"), "--config", str(ROOT / "configs" / "embedded.yaml"),
            "--data.num_clients", "2", "--data.shots", "4", "--trainer.batch_size", "4", "--trainer.local_epochs",
            "2", *SMALL, *argv]
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_args(args))
    orch, _ = experiment.build(parser, cfg, init)
    return orch


@pytest.mark.parametrize("step_per", ["epoch_last_batch", "batch"])
def test_optimizer_steps_per_epoch_and_the_per_step_lr(monkeypatch, step_per):
    lrs = []
    real = torch.optim.SGD.step

    def recording(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    orch = _orchestrator("--method.init_args.step_per", step_per)
    assert orch.plan.step_per == step_per and orch.plan.lr_schedule == "cosine_steps"
    assert orch.plan.optimizer_state == "per_client" and orch.plan.drop_last == "never"
    n = orch.fed.clients[0].num_samples
    batches = -(-n // 4)
    assert batches > 1
    up = orch.local_update(0, 0)
    per_epoch = 1 if step_per == "epoch_last_batch" else batches
    assert up.steps == 2 * per_epoch and len(lrs) == 2 * per_epoch
    total = 2 * batches  # E · len(loader)
    assert lrs == pytest.approx([FEDLAPT_CLIENT.lr_at_step(0.001, k, total) for k in range(2 * per_epoch)])
    assert int(up.optim["lr_steps"]) == up.steps and any(k.endswith("momentum_buffer") for k in up.optim)
    assert up.lr == pytest.approx(lrs[-1])  # the round reports its last step's lr
    orch.apply([up])  # the client's schedule runs on in its next round
    lrs.clear()
    up2 = orch.local_update(0, 1)
    assert lrs == pytest.approx([FEDLAPT_CLIENT.lr_at_step(0.001, k, total)
                                 for k in range(up.steps, up.steps + up2.steps)])
    assert int(up2.optim["lr_steps"]) == up.steps + up2.steps


def test_quirk_steps_on_the_epochs_last_batch_only():
    orch = _orchestrator()
    rt = orch.runtime
    epochs = [list(rt.epoch_rows(0, 0, e)) for e in range(2)]
    from fedlit.engine import LocalRun

    run = LocalRun(rt, orch.module, 0, 0, orch.protocol.payload(0), orch.protocol.state_of(0))
    fed = [rows for rows in run.batches]
    want = [rt.inputs(0, 0, e, ep[-1]) for e, ep in enumerate(epochs)]
    assert len(fed) == 2
    for (x, y), (wx, wy) in zip(fed, want):
        torch.testing.assert_close(x, wx)
        assert torch.equal(y, wy)


def test_step_mode_refuses_the_once_per_epoch_step():
    with pytest.raises(FedlitError, match="step_per"):
        _orchestrator("--trainer.sync", "step")


def test_two_round_fit_on_the_embedded_default(tmp_path):
    out = tmp_path / "r"
    rc = main(["fit", "--config", str(ROOT / "configs" / "fedlapt.yaml"), "--config",
               str(ROOT / "configs" / "embedded.yaml"), "--trainer.rounds", "2", "--trainer.eval_every", "2",
               "--data.num_clients", "2", "--data.shots", "2", "--data.dataset_args",
               '{"test_per_class": 4, "train_per_class": 8}', "--trainer.batch_size", "8", *SMALL,
               "--out_dir", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "fedlapt" and res["plan"]["step_per"] == "epoch_last_batch"
    assert res["plan"]["lr_schedule"] == "cosine_steps"
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in res["final"].values())
