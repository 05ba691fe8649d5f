"""The classic prompt learners PLOT, ProGrad, PromptSRC, ProDA (spec 3c) and FedDnC (spec 3a §2): their equations on
hand-computed cases, shared vs personal keys, and the local-loop hooks they need (ProGrad's projection before the
optimiser step, PromptSRC's per-epoch GPA). Two rounds of each run in test_all_methods / test_resnet."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedlit import experiment
from fedlit.client import ClientModule
from fedlit.errors import FedlitError
from fedlit.methods.base import Update
from fedlit.methods.feddnc import FedDnC, ema_rate, fusion_weight
from fedlit.methods.fedotp import transport_plan
from fedlit.methods.plot import PLOT
from fedlit.methods.proda import ProDA, _gather_index, class_positions, diversity, surrogate_logits
from fedlit.methods.prograd import ProGrad, kd_loss, project, project_all, prograd_context, prograd_template
from fedlit.methods.promptsrc import PromptSRC, ensemble_features, gauss_weights, scl_kl
from fedlit.prompts import Task

ROOT = Path(__file__).resolve().parents[1]
TASK = Task(name="shapes", classnames=("circle", "square", "triangle"))


def _orch(name: str, *argv: str):
    parser = experiment.fit_parser()
    args = ["--config", str(ROOT / "configs" / f"{name}.yaml"), "--config", str(ROOT / "configs" / "embedded.yaml"),
            "--data.num_clients", "2", "--data.shots", "2", "--trainer.batch_size", "4", "--trainer.augment", "none",
            "--data.dataset_args", '{"test_per_class": 2, "train_per_class": 4}', *argv]
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_args(args))
    return experiment.build(parser, cfg, init)[0]


# ============================================================================================ PLOT
def test_balanced_sinkhorn_on_a_2x2_case_and_the_plot_logit():
    # cost [[0, 1], [1, 0]], ε = 1: G = [[1, e], [e, 1]] (e = exp(-1)); by symmetry T = G / (2(1 + e))
    e = math.exp(-1.0)
    plan = transport_plan(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), "sinkhorn", eps=1.0, thresh=1e-9)
    torch.testing.assert_close(plan[0], torch.tensor([[1, e], [e, 1]]) / (2 * (1 + e)), rtol=0, atol=1e-6)
    # PLOT: local features e1, e2; the class's two prompts e1, e2 -> S = I, logit = s · Σ T·S = s / (1 + e)
    method = PLOT(num_prompts=2, n_ctx=1, eps=1.0, thresh=1e-9)
    x = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # [B=1, 1 + M, D]: token 0 (pooled) is not transported
    text = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [N=2, C=1, D]
    clip = SimpleNamespace(logit_scale=100.0)
    out = method.logits(None, clip, x, Task("shapes", ("a",)), prepared=text)
    assert out.shape == (1, 1) and abs(out.item() - 100.0 / (1 + e)) < 1e-3


def test_plot_with_one_prompt_is_the_mean_local_cosine_and_imagenet_adds_the_pooled_term():
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(3, 5, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    text = text / text.norm(dim=-1, keepdim=True)
    clip = SimpleNamespace(logit_scale=100.0)
    loc = x[:, 1:] / x[:, 1:].norm(dim=-1, keepdim=True)
    mean_cos = 100.0 * torch.einsum("bmd,cd->bc", loc, text[0]) / loc.shape[1]
    out = PLOT(num_prompts=1, n_ctx=4).logits(None, clip, x, TASK, prepared=text)  # FLiP's collapsed PLOT
    torch.testing.assert_close(out, mean_cos, rtol=0, atol=1e-4)
    imnet = PLOT(num_prompts=1, n_ctx=4).logits(None, clip, x, Task("imagenet", TASK.classnames), prepared=text)
    pool = x[:, 0] / x[:, 0].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(imnet, mean_cos + 100.0 * pool @ text[0].t(), rtol=0, atol=1e-4)


# ============================================================================================ ProGrad
def test_prograd_projection_on_hand_made_vectors():
    g = torch.tensor([1.0, 0.0])
    # conflict: <g, ĝ_kd> = -1/√2 < 0 -> g - <g, ĝ>ĝ = (1, 0) + (-1/2, 1/2)
    torch.testing.assert_close(project(g, torch.tensor([-1.0, 1.0])), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(project(g, torch.tensor([-1.0, 1.0]), lam=0.5), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(project(g, torch.tensor([1.0, 1.0])), g)  # no conflict: unchanged
    # per tensor vs flat: a conflicts, b agrees; flattened the total inner product (−1 + 2) is positive
    grads = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0])}
    kd = {"a": torch.tensor([-1.0, 0.0]), "b": torch.tensor([1.0])}
    per = project_all(grads, kd)
    torch.testing.assert_close(per["a"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(per["b"], torch.tensor([2.0]))
    flat = project_all(grads, kd, scope="flat")
    torch.testing.assert_close(flat["a"], grads["a"])
    torch.testing.assert_close(flat["b"], grads["b"])


def test_prograd_kd_loss_and_templates_and_init(toy):
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])  # teacher uniform
    expected = -0.5 * (math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(1 / (math.exp(2) + 1)))
    assert abs(kd_loss(s, t).item() - expected) < 1e-6
    assert prograd_template("oxford_pets-client") == "a type of pet, a photo of a {}."
    assert prograd_template("shapes-dark") == "a photo of a {}."
    ctx = prograd_context(toy, 6)  # zeros, then the 4 words' embeddings in the last 4 positions
    assert ctx[:2].abs().sum() == 0 and ctx[2:].abs().sum() > 0


def test_prograd_projection_runs_before_the_optimiser_step(monkeypatch):
    """mode projection stores the KD gradient in the loss; the local loop hands the task gradient to
    before_optimizer_step before SGD steps, which projects the conflicting ones and consumes the stored gradient."""
    changed = []
    hook = ProGrad.before_optimizer_step

    def spy(self, prompt):
        before = prompt.ctx.grad.clone()
        hook(self, prompt)
        changed.append(not torch.equal(before, prompt.ctx.grad))
        assert prompt.kd_grads is None

    monkeypatch.setattr(ProGrad, "before_optimizer_step", spy)
    orch = _orch("prograd", "--method.init_args.n_ctx", "4", "--method.init_args.lr", "0.5")
    orch.train_round(0)
    assert len(changed) > 2 and any(changed)  # called at every step of both clients; some steps conflict


# ============================================================================================ PromptSRC
def test_gpa_weights_are_the_normalised_gaussian():
    w = gauss_weights(20, 15, 1)  # base-to-novel: epochs 12..18 carry .004/.054/.242/.399/.242/.054/.004
    assert abs(sum(w) - 1) < 1e-12
    for epoch, ref in zip(range(12, 19), (0.0044, 0.054, 0.242, 0.399, 0.242, 0.054, 0.0044)):
        assert abs(w[epoch - 1] - ref) < 1e-3
    assert gauss_weights(1, 15, 1) == [1.0]  # one local epoch: GPA is a no-op
    assert gauss_weights(3, 1, 1, start=0)[1] == max(gauss_weights(3, 1, 1, start=0))


def test_scl_kl_is_the_summed_kl_over_numel():
    z, zs = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])  # p = (1/4, 3/4), p_zs = (1/2, 1/2)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert abs(scl_kl(z, zs).item() - kl / 2) < 1e-6 and abs(scl_kl(z, zs, "batch").item() - kl) < 1e-6


def test_textual_diversity_averages_unnormalised_features(toy):
    tpls = ["a photo of a {}.", "itap of the {}."]
    got = ensemble_features(toy, TASK, tpls)
    feats = [toy.encode_text(toy.tokenize([t.format(c) for c in TASK.classnames])).float() for t in tpls]
    ref = (feats[0] + feats[1]) / 2
    torch.testing.assert_close(got, ref / ref.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)
    assert ensemble_features(toy, TASK).shape == got.shape  # the default: PromptSRC's 60 templates


def test_gpa_over_local_epochs_and_on_the_server():
    method = PromptSRC(gpa_mean=1.5, gpa_std=1.0)  # two epochs -> weights 1/2, 1/2
    prompt = nn.Linear(1, 1, bias=False)
    method.receive_payload(prompt, {})
    prompt.weight.data.fill_(2.0)
    method.end_local_epoch(prompt, 0, 2)
    prompt.weight.data.fill_(4.0)
    method.end_local_epoch(prompt, 1, 2)
    assert prompt.weight.item() == 3.0  # θ ← Σ g_e θ_e after the last epoch
    # FLiP: W_r = W_{r-1} + g_r · FedAvg_r, rounds 0..R-1
    srv = PromptSRC(gpa="server_rounds_fedback", gpa_rounds=2, gpa_mean=0.0, gpa_std=1.0)
    g = gauss_weights(2, 0.0, 1.0, start=0)
    ups = [Update(0, {"ctx": torch.tensor([1.0])}, {}, 1, 0.0), Update(1, {"ctx": torch.tensor([3.0])}, {}, 3, 0.0)]
    w0 = srv.aggregate(ups, {"ctx": torch.zeros(1)})["ctx"]
    assert abs(w0.item() - g[0] * 2.5) < 1e-6
    w1 = srv.aggregate(ups, {"ctx": w0})["ctx"]
    assert abs(w1.item() - 2.5) < 1e-6 and int(srv.server_state_dict()["round"]) == 2
    with pytest.raises(FedlitError, match="gpa_rounds"):
        PromptSRC(gpa="server_rounds_fedback")


def test_the_local_loop_calls_end_local_epoch_after_each_epochs_last_step(monkeypatch):
    calls = []
    monkeypatch.setattr(PromptSRC, "end_local_epoch",
                        lambda self, prompt, epoch, epochs: calls.append((epoch, epochs, float(prompt.ctx.detach().sum()))))
    orch = _orch("promptsrc", "--method.init_args.architecture", "flip_text_only", "--trainer.local_epochs", "2")
    before = float(orch.module.prompt.ctx.detach().sum())
    orch.train_round(0)
    assert [(e, n) for e, n, _ in calls] == [(0, 2), (1, 2)] * 2  # 2 clients × 2 epochs
    assert calls[0][2] != before  # after the epoch's steps


# ============================================================================================ ProDA
def test_proda_gaussian_surrogate_on_a_hand_case():
    # f = e1; class 0: prompts e1, e2; class 1: e2, e1 -> μ = (.5, .5); Σ_00 = Σ_11 = 1/6, Σ_01 = -1/6 on dim 0
    f = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # [P, C, D]
    z = surrogate_logits(f, t, torch.tensor([0]), scale=1.0)
    torch.testing.assert_close(z, torch.tensor([[0.5, 0.5 + 1 / 3]]))
    # one prompt (FLiP's b_p = 1): Σ = 0, plain cosine logits
    torch.testing.assert_close(surrogate_logits(f, t[:1], torch.tensor([1]), 100.0), 100.0 * f @ t[0].t())


def test_proda_diversity_positions_and_splicing():
    assert abs(diversity(torch.tensor([[1.0, 0.0], [0.6, 0.8]])).item() - 0.6) < 1e-6
    assert diversity(torch.tensor([[1.0, 0.0]])).item() == 0
    assert class_positions(32, "front_middle_end") == ["front"] * 8 + ["middle"] * 8 + ["end"] * 16
    assert class_positions(1, "front_middle_end") == ["end"] and set(class_positions(8, "end_only")) == {"end"}
    # name of 2 tokens, 2 context tokens, sequence of 8: rows index [frozen tokens 0..7 ‖ context 8, 9]
    assert _gather_index([2], 2, 8, "front").tolist() == [[0, 3, 4, 8, 9, 5, 6, 7]]
    assert _gather_index([2], 2, 8, "middle").tolist() == [[0, 8, 3, 4, 9, 5, 6, 7]]
    assert _gather_index([2], 2, 8, "end").tolist() == [[0, 8, 9, 3, 4, 5, 6, 7]]


def test_proda_prompt_batches_cycle_a_permutation(toy):
    method = ProDA(num_prompts=4, n_ctx=2, prompt_batch=2)
    prompt = method.build(toy)
    method.receive_payload(prompt, {})
    a, b, c = method.next_prompts(prompt), method.next_prompts(prompt), method.next_prompts(prompt)
    assert sorted(a + b) == [0, 1, 2, 3] and len(c) == 2  # one cycle covers every prompt once, then a new draw
    front = prompt.text_features(toy, TASK, [0])  # class-front prompt through the gather path
    assert front.shape[:2] == (1, 3)
    assert torch.isfinite(front).all() and not torch.allclose(front, prompt.text_features(toy, TASK, [3]))
    with pytest.warns(UserWarning, match="CoOp"):
        ProDA(num_prompts=1, prompt_batch=1)


# ============================================================================================ FedDnC
def test_feddnc_fusion_weight_and_ema():
    z_b, z_n = torch.tensor([[10.0, 0.0]]), torch.tensor([[0.0, 0.0]])  # shots 8: T_c 1; c_b ≈ 1, c_n = 1/2
    c_b = 1 / (1 + math.exp(-10))
    assert abs(fusion_weight(z_b, z_n, 8).item() - min(c_b / (c_b + 0.5 + 1e-8), 0.9)) < 1e-6
    assert fusion_weight(z_n, z_b, 8).item() == pytest.approx(0.5 / (0.5 + c_b), abs=1e-6)  # above the 0.3 floor
    # shots 2: T_c = 4, ceiling min(0.9, 0.6): c_b = sigmoid(2.5) ≈ .924 -> .649 clipped to 0.6
    assert fusion_weight(z_b, z_n, 2).item() == pytest.approx(0.6)
    assert fusion_weight(torch.tensor([[0.0, 0.0]]), torch.tensor([[50.0, 0.0]]), 8).item() == pytest.approx(1 / 3)
    assert ema_rate(0.9, 8) == pytest.approx(0.1) and ema_rate(-1, 16) == pytest.approx(0.025)
    m = FedDnC()
    ups = [Update(0, {"ctx_b": torch.ones(1), "ctx_n": torch.ones(1)}, {}, 1, 0.0),
           Update(1, {"ctx_b": 3 * torch.ones(1), "ctx_n": 3 * torch.ones(1)}, {}, 1, 0.0)]
    g1 = m.aggregate(ups, {"ctx_b": torch.zeros(1), "ctx_n": torch.zeros(1)})
    assert g1["ctx_b"].item() == 2.0 and g1["ctx_n"].item() == 2.0  # round 1: plain FedAvg for both
    g2 = m.aggregate(ups, {"ctx_b": g1["ctx_b"], "ctx_n": torch.tensor([10.0])})
    assert g2["ctx_b"].item() == 2.0 and g2["ctx_n"].item() == pytest.approx(0.9 * 10 + 0.1 * 2)


def test_feddnc_init_and_evaluation_logits(toy):
    m = FedDnC()
    prompt = m.build(toy)
    k = int(toy.eot_index(toy.tokenize(["a photo of a"]))[0]) - 1
    phrase = toy.token_embedding(toy.tokenize(["a photo of a"]))[0, 1: 1 + min(k, 4)].float()
    torch.testing.assert_close(prompt.ctx_n[:, : min(k, 4)].detach(), phrase.expand(2, -1, -1).detach())
    torch.testing.assert_close(prompt.ctx_n[:, min(k, 4):], prompt.ctx_b[:, min(k, 4):])
    x = torch.randn(5, prompt.streams(toy, TASK)[0].shape[1])
    with torch.no_grad():
        prep = m.prepare(prompt, toy, TASK)
        fused = m.logits(prompt, toy, x, TASK, prep)
        m.eval_logits = "official_b_only"
        b_only = m.logits(prompt, toy, x, TASK, prep)
    f = x / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(b_only, toy.logit_scale * f @ prep[0].t())
    assert not torch.allclose(fused, b_only)


# ============================================================================================ keys
@pytest.mark.parametrize("method", [PLOT(n_ctx=4), ProGrad(n_ctx=4), PromptSRC(prompt_depth_text=2, prompt_depth_vision=2),
                                    PromptSRC(architecture="flip_text_only"), ProDA(num_prompts=4, n_ctx=4),
                                    FedDnC()], ids=lambda m: f"{m.name}")
def test_every_tensor_is_shared_nothing_personal(toy, method):
    shared, personal = ClientModule(toy, method).split_state(ClientModule(toy, method).prompt_state())
    assert shared and not personal
