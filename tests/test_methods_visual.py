"""Visual-prompt methods: pFedPG (server-side prompt generator), FedVPT and LocalVPT (spec/pfedpg.md)."""

from __future__ import annotations

import math

import pytest
import torch

from fedlit.backbones import load_backbone
from fedlit.client import ClientModule
from fedlit.errors import FedlitError
from fedlit.methods import Update, method_class
from fedlit.methods.pfedpg import PFedPG, PromptGenerator
from fedlit.methods.vpt import FedVPT, LocalVPT, VisualPromptHead, vpt_init_bound
from fedlit.prompts import Task

TASK = Task("base", ("circle", "square", "triangle"))


@pytest.fixture(scope="module")
def clip():
    return load_backbone("fedlit-toy")


def _images(clip, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, clip.image_size, clip.image_size, generator=g)


def _method(cls, num_clients=3, **kw):
    m = cls(**kw)
    m.setup_federation(TASK, num_clients)
    return m


# ------------------------------------------------------------------------------- the component
def test_registry_and_defaults_follow_the_spec():
    assert method_class("pfedpg") is PFedPG
    assert method_class("fedvpt") is FedVPT and method_class("localvpt") is LocalVPT
    m = PFedPG()
    # spec/pfedpg.md §2.5: K = 10, client SGD lr 0.25 wd 1e-3, server lr 1e-3
    assert (m.n_prompts, m.lr, m.weight_decay, m.server_lr) == (10, 0.25, 0.001, 0.001)
    for cls in (PFedPG, FedVPT, LocalVPT):
        assert cls.image_input == "images" and cls.text_classifier is False
    assert vpt_init_bound(16, 768) == pytest.approx(0.0625)  # √(6/(3·16²+768))


def test_logits_shape_and_head_size_from_training_task(clip):
    m = _method(FedVPT)
    comp = m.build(clip)
    assert isinstance(comp, VisualPromptHead)
    assert tuple(comp.prompt.shape) == (10, clip.vision_width)
    assert (comp.head.in_features, comp.head.out_features) == (clip.embed_dim, len(TASK))
    x = _images(clip, n=5)
    assert tuple(m.logits(comp, clip, x, TASK).shape) == (5, 3)
    # the prompts change the image feature (they are really inserted into the tower)
    assert not torch.allclose(comp.features(clip, x), clip.encode_image(x), atol=1e-5)
    with pytest.raises(FedlitError):  # a linear head cannot classify another task (no novel evaluation)
        m.logits(comp, clip, x, Task("novel", ("a", "b")))
    with pytest.raises(FedlitError):  # head size unknown
        FedVPT().build(clip)


def test_head_acts_on_the_normalised_or_raw_feature(clip):
    x = _images(clip, n=3, seed=1)
    for norm in (True, False):
        torch.manual_seed(0)
        m = _method(LocalVPT, normalize_features=norm)
        comp = m.build(clip)
        f = comp.features(clip, x)
        f = f / f.norm(dim=-1, keepdim=True) if norm else f
        assert torch.allclose(m.logits(comp, clip, x, TASK), f @ comp.head.weight.t() + comp.head.bias, atol=1e-5)


def test_gradients_reach_prompt_and_head_not_backbone(clip):
    m = _method(PFedPG)
    module = ClientModule(clip, m)
    x, y = _images(clip, n=4), torch.tensor([0, 1, 2, 0])
    loss = m.loss(module, x, y, TASK)
    loss.backward()
    assert module.prompt.prompt.grad is not None and module.prompt.prompt.grad.abs().sum() > 0
    assert module.prompt.head.weight.grad is not None and module.prompt.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {"prompt.prompt", "prompt.head.weight",
                                                                            "prompt.head.bias"}


def test_sharing_rules(clip):
    keys = list(_method(PFedPG).build(clip).state_dict())
    assert sorted(keys) == ["head.bias", "head.weight", "prompt"]
    pg, fv, lv = PFedPG(), FedVPT(), LocalVPT()
    assert [k for k in keys if pg.is_shared(k)] == ["prompt"]  # prompts sent, head personal
    assert [k for k in keys if fv.is_shared(k)] == ["prompt"]  # FedVPT: K·l floats (pFedPG Table 1)
    assert sorted(k for k in keys if FedVPT(share_head=True).is_shared(k)) == sorted(keys)
    assert [k for k in keys if lv.is_shared(k)] == []  # LocalVPT shares nothing


def test_fedvpt_aggregation_is_the_sample_weighted_mean():
    m = FedVPT()
    a = Update(0, {"prompt": torch.tensor([[1.0, 2.0]])}, {"head.weight": torch.ones(1)}, num_samples=1, loss=0.0)
    b = Update(1, {"prompt": torch.tensor([[3.0, 6.0]])}, {"head.weight": torch.zeros(1)}, num_samples=3, loss=0.0)
    out = m.aggregate([a, b], {"prompt": torch.zeros(1, 2)})
    assert set(out) == {"prompt"}
    assert torch.allclose(out["prompt"], torch.tensor([[2.5, 5.0]]))  # (1·[1,2] + 3·[3,6]) / 4
    assert torch.allclose(FedVPT(weighted=False).aggregate([a, b], {})["prompt"], torch.tensor([[2.0, 4.0]]))
    # LocalVPT: nothing shared -> the (empty) global state is returned unchanged
    e = {}
    assert LocalVPT().aggregate([Update(0, {}, {"prompt": torch.ones(1)}, 1, 0.0)], e) is e


# ------------------------------------------------------------------------------- the generator
def test_generator_hand_computed_single_client():
    # K = 2, l = 2, identity projections, zero output bias: P = P_base + softmax(d·P_baseᵀ/√2)·P_base (broadcast)
    g = PromptGenerator(num_clients=1, n_prompts=2, width=2, attn_dim=2)
    with torch.no_grad():
        for lin in (g.q, g.k, g.v, g.o):
            lin.weight.copy_(torch.eye(2))
        g.o.bias.zero_()
        g.prompt_base.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        g.descriptors[0].copy_(torch.tensor([[math.sqrt(2) * math.log(3.0), 0.0]]))
    # scores = [log 3, 0] -> softmax = [3/4, 1/4] -> out = [3/4, 1/4]
    expected = torch.tensor([[1.75, 0.25], [0.75, 1.25]])
    assert torch.allclose(g(0), expected, atol=1e-6)


def test_client_state_differs_per_client_and_is_deterministic(clip):
    torch.manual_seed(0)
    m = _method(PFedPG, num_clients=3)
    gs = {"prompt": torch.zeros(10, clip.vision_width)}
    sent = [m.payload_for(c, gs)["prompt"] for c in range(3)]
    assert all(tuple(s.shape) == (10, clip.vision_width) and not s.requires_grad for s in sent)
    assert not torch.allclose(sent[0], sent[1]) and not torch.allclose(sent[1], sent[2])
    assert torch.equal(sent[0], m.payload_for(0, gs)["prompt"])  # pure read
    torch.manual_seed(0)
    m2 = _method(PFedPG, num_clients=3)
    assert torch.equal(m2.payload_for(2, gs)["prompt"], sent[2])  # same seed, same server


def _one_server_step(m, cid, delta, width, other=None):
    gs = {"prompt": torch.zeros(10, width)}
    sent = m.payload_for(cid, gs)
    upd = [Update(cid, {"prompt": sent["prompt"] + delta}, {}, 8, 0.0, sent=sent)]
    if other is not None:
        s2 = m.payload_for(other, gs)
        upd.append(Update(other, {"prompt": s2["prompt"]}, {}, 8, 0.0, sent=s2))
    out = m.aggregate(upd, gs)
    return sent["prompt"], m.payload_for(cid, gs)["prompt"], out


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_server_update_moves_the_generated_prompt_towards_the_trained_one(opt):
    width = 16
    torch.manual_seed(1)
    m = PFedPG(server_optimizer=opt, server_lr=1e-3 if opt == "adam" else 1e-2)
    m.setup_federation(TASK, 2)
    delta = 0.05 * torch.randn(10, width)
    p0, p1, out = _one_server_step(m, 0, delta, width)
    target = p0 + delta
    assert (p1 - target).norm() < (p0 - target).norm()  # closer to P̃
    assert torch.sum((p1 - p0) * delta) > 0  # moved along +ΔP (gradient step on −ΔP)
    assert torch.equal(out["prompt"], m.generator.prompt_base.detach())  # global state = the basis


def test_sgd_server_step_is_the_vjp_with_sent_minus_trained():
    # plain SGD: φ' = φ − lr · Jᵀ(P − P̃) = φ + lr · Jᵀ δ exactly
    width = 8
    torch.manual_seed(2)
    m = PFedPG(server_optimizer="sgd", server_lr=0.1)
    m.setup_federation(TASK, 2)
    gs = {"prompt": torch.zeros(10, width)}
    m.payload_for(0, gs)
    before = {k: v.detach().clone() for k, v in m.generator.named_parameters()}
    delta = torch.randn(10, width)
    p = m.generator(0)
    jt = dict(zip([k for k, _ in m.generator.named_parameters()],
                  torch.autograd.grad(p, list(m.generator.parameters()), grad_outputs=delta, allow_unused=True)))
    _one_server_step(m, 0, delta, width)
    for k, v in m.generator.named_parameters():
        expected = before[k] + 0.1 * jt[k] if jt[k] is not None else before[k]
        assert torch.allclose(v.detach(), expected, atol=1e-6), k
    # the descriptor of client 1 (not in the round) did not move; P_base did
    assert torch.equal(m.generator.descriptors[1].detach(), before["descriptors.1"])
    assert not torch.equal(m.generator.prompt_base.detach(), before["prompt_base"])


def test_clients_gradients_are_averaged_and_descriptors_only_get_their_own():
    width = 8
    torch.manual_seed(3)
    m = PFedPG(server_optimizer="sgd", server_lr=0.1)
    m.setup_federation(TASK, 3)
    gs = {"prompt": torch.zeros(10, width)}
    m.payload_for(0, gs)
    d0, d2 = m.generator.descriptors[0].detach().clone(), m.generator.descriptors[2].detach().clone()
    delta = torch.randn(10, width)
    g_d0 = torch.autograd.grad(m.generator(0), m.generator.descriptors[0], grad_outputs=delta)[0]
    _one_server_step(m, 0, delta, width, other=1)  # client 1 returns its prompt unchanged: zero feedback
    assert torch.allclose(m.generator.descriptors[0].detach(), d0 + 0.1 * g_d0 / 2, atol=1e-6)  # mean of 2
    assert torch.equal(m.generator.descriptors[2].detach(), d2)


def test_aggregate_needs_the_sent_prompt():
    m = PFedPG()
    m.setup_federation(TASK, 2)
    gs = {"prompt": torch.zeros(10, 8)}
    with pytest.raises(FedlitError):
        m.aggregate([Update(0, {"prompt": torch.zeros(10, 8)}, {}, 1, 0.0)], gs)


def test_server_state_round_trips():
    width = 8
    torch.manual_seed(4)
    m = PFedPG()
    m.setup_federation(TASK, 3)
    assert m.server_state_dict() == {}
    _one_server_step(m, 1, 0.1 * torch.randn(10, width), width)  # Adam now has moments
    state = m.server_state_dict()
    assert "generator.prompt_base" in state and "generator.descriptors.2" in state
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg") for k in state)
    fresh = PFedPG()
    fresh.load_server_state_dict(state)  # builds the server from the checkpoint's shapes
    gs = {"prompt": torch.zeros(10, width)}
    for c in range(3):
        assert torch.equal(fresh.payload_for(c, gs)["prompt"], m.payload_for(c, gs)["prompt"])
    # the same next step from both (optimizer state restored too)
    delta = 0.1 * torch.randn(10, width)
    _one_server_step(m, 2, delta, width)
    _one_server_step(fresh, 2, delta, width)
    assert torch.allclose(fresh.payload_for(2, gs)["prompt"], m.payload_for(2, gs)["prompt"], atol=1e-7)
    with pytest.raises(FedlitError):
        PFedPG().load_server_state_dict({"optimizer.x.step": torch.tensor(1.0)})
