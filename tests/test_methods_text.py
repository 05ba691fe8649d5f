"""FedKgCoOp, FedPGP and FedTPG: losses against hand-computed values, what is shared, aggregation, shapes.

The backbone tests use fedlit-toy (bundled weights, 128-wide) and tiny tasks; everything runs on CPU in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedlit.client import ClientModule
from fedlit.errors import FedlitError
from fedlit.methods import method_class
from fedlit.methods.base import Update
from fedlit.methods.fedkgcoop import FedKgCoOp, kg_score
from fedlit.methods.fedpgp import FedPGP, contrastive_loss
from fedlit.data.task import client_task
from fedlit.methods.fedtpg import FedTPG, PromptGenerator
from fedlit.prompts import ContextPrompt, Task, handcrafted_features

TASK = Task("tiny", ("circle", "square", "red_triangle", "star"))


def _batch(clip, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, clip.embed_dim, generator=g)
    y = torch.arange(n) % len(TASK)
    return x, y


# ---------------------------------------------------------------------------------------------------- FedKgCoOp
def test_kg_score_matches_formula_on_hand_built_features():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    hand = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cos = 1 and 1/sqrt(2): 1 - (1 + 0.70710678)/2
    assert kg_score(t, hand).item() == pytest.approx(1 - (1 + 1 / math.sqrt(2)) / 2, abs=1e-6)
    assert kg_score(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_fedkgcoop_loss_is_ce_plus_w_times_kg(toy):
    torch.manual_seed(0)
    method = FedKgCoOp(w=8.0, own_classes=False)
    m = ClientModule(toy, method)
    x, y = _batch(toy)
    text = m.prompt.text_features(toy, TASK)
    ce = F.cross_entropy(method.logits(m.prompt, toy, x, TASK, text), y)
    kg = 1 - (text * handcrafted_features(toy, TASK, "a photo of a {}.")).sum(-1).mean()
    assert method.loss(m, x, y, TASK).item() == pytest.approx((ce + 8.0 * kg).item(), rel=1e-5)
    assert FedKgCoOp(w=0.0, own_classes=False).loss(m, x, y, TASK).item() == pytest.approx(ce.item(), rel=1e-5)


def test_fedkgcoop_defaults_and_errors():
    m = FedKgCoOp()
    assert (m.n_ctx, m.w, m.lr, m.weight_decay, m.weighted, m.eval_protocol) == (4, 8.0, 0.003, 1e-5, False, "global")
    with pytest.raises(FedlitError, match="template"):
        FedKgCoOp(template="a photo")
    assert FedKgCoOp(eval_protocol="personalized").eval_protocol == "personalized"


def test_fedkgcoop_uses_each_datasets_official_template():
    from fedlit.prompts import Task as T

    m = FedKgCoOp()
    assert m.template == "dataset"
    assert m.template_for(T("oxford_pets", ("a",))) == "a photo of a {}, a type of pet."
    assert m.template_for(T("oxford_pets-client", ("a",))) == "a photo of a {}, a type of pet."  # own-class task
    assert m.template_for(T("dtd", ("a",))) == "a photo of a {}, a type of texture."  # FedTPG's DTD wording
    assert m.template_for(T("food101", ("a",))) == "a photo of {}, a type of food."
    assert m.template_for(T("shapes-dark", ("a",))) == "a photo of a {}."  # embedded datasets keep theirs
    assert FedKgCoOp(template="itap of a {}.").template_for(T("oxford_pets", ("a",))) == "itap of a {}."


# ---------------------------------------------------------------------------------------------------- FedPGP
def test_fedpgp_contrastive_loss_matches_formula():
    z_c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_g = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    z_i = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    tau = 0.5
    # class 0: pos = cos([1,0],[1,1]) = 1/√2, neg = cos([1,1],[2,0]) = 1/√2 → −log(1/2)
    # class 1: pos = 1, neg = 0 → −log(e^2 / (e^2 + e^0))
    l0 = -math.log(0.5)
    l1 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0 / tau)))
    assert contrastive_loss(z_c, z_g, z_i, tau).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # N = 2 prompts: the anchor broadcasts over prompts and the mean runs over all N·C rows
    z_g2, z_i2 = torch.stack([z_g, z_g]), torch.stack([z_i, z_g])  # second prompt: neg = 1 everywhere
    l2 = [-math.log(math.exp(p / tau) / (math.exp(p / tau) + math.exp(1 / tau))) for p in (1 / math.sqrt(2), 1.0)]
    assert contrastive_loss(z_c, z_g2, z_i2, tau).item() == pytest.approx((l0 + l1 + sum(l2)) / 4, rel=1e-6)


def test_fedpgp_shares_only_sigma_and_gradients_reach_all(toy):
    torch.manual_seed(0)
    method = FedPGP(n_ctx=4, rank=2)
    m = ClientModule(toy, method)
    state = m.prompt.state_dict()
    assert set(state) == {"sigma", "U", "V"}
    assert [k for k in state if method.is_shared(k)] == ["sigma"]
    shared, personal = m.export()
    assert set(shared) == {"sigma"} and set(personal) == {"U", "V"}
    assert state["sigma"].shape == (1, 4, toy.text_width)
    assert state["U"].shape == (1, 4, 2) and state["V"].shape == (1, 2, toy.text_width)
    assert 0.01 < float(state["sigma"].std()) < 0.03  # N(0, 0.02²), not zero-initialised
    assert 0.01 < float(state["U"].std()) and 0.01 < float(state["V"].std())
    x, y = _batch(toy)
    loss = method.loss(m, x, y, TASK)
    loss.backward()
    for name, p in m.prompt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fedpgp_loss_is_ce_plus_mu_contrastive(toy):
    torch.manual_seed(1)
    method = FedPGP(n_ctx=4, rank=2, mu=0.5, tau=0.5)
    m = ClientModule(toy, method)
    x, y = _batch(toy)
    p = m.prompt
    z_g = ContextPrompt(toy, 4).text_features(toy, TASK, ctx=p.sigma[0])
    z_i = ContextPrompt(toy, 4).text_features(toy, TASK, ctx=p.personal_context()[0])
    anchor = handcrafted_features(toy, TASK, "X X X X {}.")  # official anchor: literal "X X X X {class}."
    pos, neg = (anchor * z_g).sum(-1), (z_g * z_i).sum(-1)
    con = (-torch.log(torch.exp(pos / 0.5) / (torch.exp(pos / 0.5) + torch.exp(neg / 0.5)))).mean()
    ce = F.cross_entropy(toy.logit_scale * F.normalize(x, dim=-1) @ z_i.t(), y)
    assert method.loss(m, x, y, TASK).item() == pytest.approx((ce + 0.5 * con).item(), rel=1e-4)
    # the "template" anchor is a different, named choice
    assert torch.equal(FedPGP(n_ctx=4, anchor="template").anchor_features(toy, TASK),
                       handcrafted_features(toy, TASK, "a photo of a {}."))
    assert not torch.allclose(method.anchor_features(toy, TASK), handcrafted_features(toy, TASK, "a photo of a {}."))


def test_fedpgp_with_zero_uv_equals_coop_with_sigma(toy):
    torch.manual_seed(2)
    method = FedPGP(n_ctx=4, rank=3)
    m = ClientModule(toy, method)
    with torch.no_grad():
        m.prompt.U.zero_()
    coop = ContextPrompt(toy, 4)
    with torch.no_grad():
        coop.ctx.copy_(m.prompt.sigma[0])
    x, _ = _batch(toy)
    ours = method.logits(m.prompt, toy, x, TASK)
    ref = toy.logit_scale * F.normalize(x, dim=-1) @ coop.text_features(toy, TASK).t()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_fedpgp_multiple_prompts_average_logits(toy):
    torch.manual_seed(3)
    method = FedPGP(n_ctx=4, rank=2, num_prompts=2)
    m = ClientModule(toy, method)
    x, y = _batch(toy)
    logits = method.logits(m.prompt, toy, x, TASK)
    assert logits.shape == (len(x), len(TASK))  # not N·C columns (the official N=2 bug)
    ctx = m.prompt.personal_context()
    per = [toy.logit_scale * F.normalize(x, dim=-1) @ ContextPrompt(toy, 4).text_features(toy, TASK, ctx=c).t()
           for c in ctx]
    torch.testing.assert_close(logits, (per[0] + per[1]) / 2, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(method.loss(m, x, y, TASK))


def test_fedpgp_defaults_and_errors():
    m = FedPGP()
    assert (m.n_ctx, m.rank, m.num_prompts, m.mu, m.tau, m.anchor) == (16, 8, 1, 0.5, 0.5, "official")
    assert (m.lr, m.momentum, m.weight_decay, m.weighted, m.eval_protocol) == (0.001, 0.9, 5e-4, True, "personalized")
    for bad in ({"tau": 0.0}, {"rank": 0}, {"anchor": "photo"}, {"mu": -1.0}):
        with pytest.raises(FedlitError):
            FedPGP(**bad)


# ---------------------------------------------------------------------------------------------------- FedTPG
def test_fedtpg_generator_parameter_count_and_shape():
    gen = PromptGenerator(dim=512, text_dim=512, n_ctx=4, depth=1, model_depth=0, heads=4)
    # soft_prompt 2 048 + MHA 1 050 624 + 2 LayerNorms 2 048 + FF 3 151 360 (spec §2.1)
    assert sum(p.numel() for p in gen.parameters()) == 4_206_080
    assert gen.soft_prompt.shape == (4, 512)
    ctx = gen(F.normalize(torch.randn(7, 512), dim=-1))
    assert ctx.shape == (1, 4, 512)
    ff = [p.shape for p in gen.ff.parameters()]
    assert ff == [(512,), (512,), (4096, 512), (4096,), (512, 2048), (512,)]
    deep = PromptGenerator(dim=64, text_dim=32, n_ctx=2, depth=3, model_depth=1)
    assert deep(torch.randn(5, 32)).shape == (3, 2, 64)


def test_fedtpg_no_residual_around_cross_attention():
    torch.manual_seed(0)
    gen = PromptGenerator(dim=16, text_dim=8, n_ctx=2)
    kv = torch.randn(3, 8)
    q = gen.norm_q(gen.soft_prompt).unsqueeze(0)
    k = gen.norm_kv(kv).unsqueeze(0)
    a = gen.cross_attn(q, k, k)[0]
    torch.testing.assert_close(gen(kv), (gen.ff(a) + a).reshape(1, 2, 16))


def test_fedtpg_builds_from_backbone_and_trains_on_own_classes(toy):
    torch.manual_seed(0)
    method = FedTPG()
    m = ClientModule(toy, method)
    assert m.prompt.soft_prompt.shape == (4, toy.text_width)  # derived from the backbone, not 512
    assert all(method.is_shared(k) for k in m.prompt.state_dict())
    x, y = _batch(toy)
    assert method.logits(m.prompt, toy, x, TASK).shape == (len(x), len(TASK))
    # the client holds classes 1 and 3 of the task: labels 3, 1 become 1, 0 and logits have 2 columns
    own, y_own = client_task(TASK, [1, 3], torch.tensor([3, 1, 3]))
    assert own.classnames == ("square", "star") and y_own.tolist() == [1, 0, 1]
    keep = (y == 1) | (y == 3)
    loss = method.loss(m, x[keep], y[keep], TASK, classes=[1, 3])
    expected = F.cross_entropy(method.logits(m.prompt, toy, x[keep], own), client_task(TASK, [1, 3], y[keep])[1])
    assert client_task(TASK, [1, 3], y[keep])[1].tolist() == [0, 1, 0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert m.prompt.soft_prompt.grad.abs().sum() > 0 and m.prompt.cross_attn.in_proj_weight.grad.abs().sum() > 0


def test_fedtpg_context_depends_on_the_class_list(toy):
    torch.manual_seed(0)
    gen = FedTPG().build(toy)
    a = gen(FedTPG.class_context(toy, TASK))
    b = gen(FedTPG.class_context(toy, Task("other", ("circle", "square"))))
    assert not torch.allclose(a, b)
    assert FedTPG.class_context(toy, TASK) is FedTPG.class_context(toy, TASK)  # cached once per class list


def test_fedtpg_deep_offset_option(toy):
    fixed = torch.randn(2, 4, toy.text_width) * 0.02
    other = fixed.clone()
    other[0] += 1.0
    feats = {}
    for official in (False, True):
        method = FedTPG(depth=2, official_deep_offset=official)
        gen = method.build(toy)
        for name, ctx in (("a", fixed), ("b", other)):
            gen.forward = lambda context, c=ctx: c
            feats[official, name] = method.text_features(gen, toy, TASK)
    assert not torch.allclose(feats[False, "a"], feats[False, "b"])
    torch.testing.assert_close(feats[True, "a"], feats[True, "b"])  # official: ctx[0] overwritten at layer 0


# ---------------------------------------------------------------------------------------------------- aggregation
def test_aggregation_fedtpg_unweighted_fedpgp_weighted():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 4.0)
    ups = [Update(0, {"w": a}, {}, num_samples=1, loss=0.0), Update(1, {"w": b}, {}, num_samples=3, loss=0.0)]
    torch.testing.assert_close(FedTPG().aggregate(ups, {})["w"], torch.full((2, 3), 2.0))
    torch.testing.assert_close(FedKgCoOp().aggregate(ups, {})["w"], torch.full((2, 3), 2.0))
    torch.testing.assert_close(FedPGP().aggregate(ups, {})["w"], torch.full((2, 3), 3.0))


@pytest.mark.parametrize("name", ["fedkgcoop", "fedpgp", "fedtpg"])
def test_registry_builds_and_computes_a_loss(toy, name):
    torch.manual_seed(0)
    method = method_class(name)()
    m = ClientModule(toy, method)
    x, y = _batch(toy)
    loss = method.loss(m, x, y, TASK)
    assert loss.ndim == 0 and torch.isfinite(loss)
    prepared = method.prepare(m.prompt, toy, TASK)
    assert method.logits(m.prompt, toy, x, TASK, prepared).shape == (len(x), len(TASK))
