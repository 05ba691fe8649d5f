"""FedOTP's OT solvers and sharing, FedCoCoOp, FedMaPLe and FedVLP on hand-built inputs (toy backbone, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from fedlit.backbones import load_backbone
from fedlit.client import ClientModule
from fedlit.errors import FedlitError
from fedlit.methods import Update, method_class
from fedlit.methods.fedcocoop import FedCoCoOp
from fedlit.methods.fedmaple import FedMaPLe, MaPLePrompt
from fedlit.methods.fedotp import FedOTP, cot_log, sinkhorn_log, transport_plan
from fedlit.methods.fedvlp import FedVLP
from fedlit.prompts import ContextPrompt, Task

TASK = Task("t", ("dog", "sea lion", "red circle"))


@pytest.fixture(scope="module")
def toy():
    return load_backbone("fedlit-toy", pretrained="none")


@pytest.fixture(scope="module")
def images(toy):
    g = torch.Generator().manual_seed(0)
    return toy.normalize_images(torch.rand(3, 3, toy.image_size, toy.image_size, generator=g))


def _reference_cot(cost, a, b, eps, iters):
    """Textbook scaling iterations in float64 (no log domain), for comparison."""
    k = torch.exp(-cost.double() / eps)
    u, v = torch.ones_like(a.double()), torch.ones_like(b.double())
    for _ in range(iters):
        u = torch.minimum(a / (k @ v), torch.ones_like(u))
        v = b / (k.t() @ u)
    return u[:, None] * k * v[None, :]


# ============================================================================================ OT solvers
def test_cot_constant_cost_gives_hand_computed_plan():
    # equal costs: by symmetry T_mn = top_percent / (M·N) (row sums 0.8/M ≤ a = 1/M, column sums 0.8/N)
    cost = torch.full((1, 4, 2), 0.7)
    t = transport_plan(cost, "cot", eps=0.1, top_percent=0.8, max_iter=1000, thresh=1e-9)
    assert torch.allclose(t, torch.full_like(t, 0.8 / 8), atol=1e-6)


def test_cot_marginals_on_hand_built_costs():
    cost = torch.tensor([[[0.1, 0.9], [0.5, 0.5], [0.9, 0.2]],
                         [[0.3, 0.3], [0.2, 0.8], [0.6, 0.1]]])
    t = transport_plan(cost, "cot", eps=0.1, top_percent=0.8, max_iter=1000, thresh=1e-9)
    assert torch.allclose(t.sum(dim=1), torch.full((2, 2), 0.4), atol=1e-5)  # columns = b = top_percent/N
    assert (t.sum(dim=2) <= 1 / 3 + 1e-5).all()  # rows ≤ a = 1/M
    assert torch.allclose(t.sum(dim=(1, 2)), torch.full((2,), 0.8), atol=1e-5)  # total mass = top_percent
    assert t[0, 0, 0] > t[0, 0, 1] and t[0, 2, 1] > t[0, 2, 0]  # mass follows the cheap entries
    ref = _reference_cot(cost[0], torch.full((3,), 1 / 3, dtype=torch.float64),
                         torch.full((2,), 0.4, dtype=torch.float64), 0.1, 5000)
    assert torch.allclose(t[0].double(), ref, atol=1e-6)


def test_sinkhorn_2x2_matches_closed_form():
    # a = b = (1/2, 1/2): T = [[p, 1/2-p], [1/2-p, p]] with p/(1/2-p) = sqrt(K11·K22 / (K12·K21))
    cost = torch.tensor([[[0.2, 0.6], [0.5, 0.1]]])
    eps = 0.25
    k = torch.exp(-cost[0].double() / eps)
    s = math.sqrt(float(k[0, 0] * k[1, 1] / (k[0, 1] * k[1, 0])))
    p = s / (2 * (1 + s))
    t = transport_plan(cost, "sinkhorn", eps=eps, max_iter=1000, thresh=1e-9)[0]
    assert torch.allclose(t.double(), torch.tensor([[p, 0.5 - p], [0.5 - p, p]], dtype=torch.float64), atol=1e-6)


def test_sinkhorn_marginals_exact():
    g = torch.Generator().manual_seed(1)
    cost = 1 - torch.rand(5, 7, 2, generator=g) * 0.4
    t = transport_plan(cost, "sinkhorn", eps=0.05, max_iter=1000, thresh=1e-9)
    assert torch.allclose(t.sum(dim=2), torch.full((5, 7), 1 / 7), atol=1e-4)
    assert torch.allclose(t.sum(dim=1), torch.full((5, 2), 1 / 2), atol=1e-4)


def test_fp32_log_survives_fp16_underflow_where_official_fp16_gives_nan():
    # typical CLIP sims 0.2-0.35 → costs 0.65-0.8; with ε = 0.01 exp(-C/ε) ≈ e^-70 is 0 in fp16
    g = torch.Generator().manual_seed(2)
    cost = (0.65 + 0.15 * torch.rand(4, 6, 2, generator=g)).half()
    official = transport_plan(cost, "cot", eps=0.01, precision="official_fp16")
    assert not torch.isfinite(official).all()
    fixed = transport_plan(cost, "cot", eps=0.01, precision="fp32_log")
    assert fixed.dtype == torch.float32 and torch.isfinite(fixed).all()
    assert torch.allclose(fixed.sum(dim=1), torch.full((4, 2), 0.4), atol=1e-4)
    assert not torch.isfinite(transport_plan(cost, "sinkhorn", eps=0.01, precision="official_fp16")).all()
    assert torch.isfinite(transport_plan(cost, "sinkhorn", eps=0.01)).all()


def test_official_fp16_is_the_same_algorithm_when_it_does_not_underflow():
    g = torch.Generator().manual_seed(3)
    cost = 0.6 + 0.3 * torch.rand(3, 5, 2, generator=g)
    for ot in ("cot", "sinkhorn"):
        a = transport_plan(cost, ot, eps=0.5, max_iter=50, thresh=0.0, precision="official_fp16").float()
        b = transport_plan(cost, ot, eps=0.5, max_iter=50, thresh=0.0, precision="fp32_log")
        assert torch.allclose(a, b, atol=2e-3), ot


def test_solvers_stop_early_and_plan_has_no_gradient():
    cost = torch.full((1, 3, 2), 0.5, requires_grad=True)
    t = transport_plan(cost, "cot")
    assert not t.requires_grad
    # one iteration with thresh=inf equals the first scaling step: v = b / (Kᵀ·1) with u = min(a/(K·1), 1)
    c = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]])
    k = torch.exp(-c[0] / 1.0)
    u = torch.minimum((1 / 3) / k.sum(1), torch.ones(3))
    v = 0.4 / (k.t() @ u)
    a, b = torch.full((1, 3), 1 / 3), torch.full((1, 2), 0.4)
    assert torch.allclose(cot_log(c, a, b, 1.0, max_iter=1, thresh=float("inf"))[0], u[:, None] * k * v, atol=1e-6)
    assert torch.isfinite(sinkhorn_log(c, a, torch.full((1, 2), 0.5), 1.0, max_iter=1)).all()


# ============================================================================================ FedOTP
def test_fedotp_shares_only_the_global_prompt(toy):
    method = FedOTP(n_ctx=4)
    module = ClientModule(toy, method)
    shared, personal = module.export()
    assert set(shared) == {"ctx_global"} and set(personal) == {"ctx_local"}
    assert torch.equal(shared["ctx_global"], module.prompt.ctx[:1].detach())
    assert torch.equal(personal["ctx_local"], module.prompt.ctx[1:].detach())
    ups = [Update(0, {"ctx_global": torch.zeros(1, 4, 128)}, {}, 1, 0.0),
           Update(1, {"ctx_global": torch.ones(1, 4, 128)}, {}, 3, 0.0)]
    assert torch.allclose(method.aggregate(ups, shared)["ctx_global"], torch.full((1, 4, 128), 0.75))


def test_fedotp_logits_on_identical_patches_are_mean_similarity(toy):
    # all M patches equal f: every row of K is the same, so T_mn = top_percent/(M·N) (COT) and
    # logits = scale · top_percent · mean_n <f, t_{n,c}>; the CLS token (different) is ignored
    method = FedOTP(n_ctx=4, max_iter=1000, thresh=1e-10)
    prompt = method.build(toy)
    text = method.prepare(prompt, toy, TASK)  # [N, C, D]
    assert text.shape == (2, 3, toy.embed_dim)
    g = torch.Generator().manual_seed(4)
    f = torch.randn(2, 1, toy.embed_dim, generator=g)
    tokens = torch.cat([torch.randn(2, 1, toy.embed_dim, generator=g), f.expand(-1, 9, -1)], dim=1)
    logits = method.logits(prompt, toy, tokens, TASK, text)
    fn = f[:, 0] / f[:, 0].norm(dim=-1, keepdim=True)
    expected = toy.logit_scale * 0.8 * torch.einsum("bd,ncd->bc", fn, text) / 2
    assert torch.allclose(logits, expected, atol=1e-4)
    with_cls = FedOTP(n_ctx=4, use_cls=True).logits(prompt, toy, tokens, TASK, text)
    assert not torch.allclose(with_cls, logits, atol=1e-3)


def test_fedotp_trains_both_prompts(toy, images):
    method = FedOTP(n_ctx=4)
    prompt = method.build(toy)
    tokens = toy.encode_image_tokens(images)
    loss = torch.nn.functional.cross_entropy(method.logits(prompt, toy, tokens, TASK), torch.tensor([0, 1, 2]))
    loss.backward()
    assert prompt.ctx_global.grad.abs().sum() > 0 and prompt.ctx_local.grad.abs().sum() > 0
    with pytest.raises(FedlitError):
        FedOTP(num_global=3)


# ============================================================================================ FedCoCoOp
def test_cocoop_logits_shape_and_meta_net_gradients(toy, images):
    method = FedCoCoOp(n_ctx=4, ctx_init="a photo of a")  # CoCoOp's ctxv1 (the default is FedPGP's 16, random)
    prompt = method.build(toy)
    assert method.prepare(prompt, toy, TASK) is None
    # 4×128 ctx + Linear(128→8) + Linear(8→128)
    assert sum(p.numel() for p in prompt.parameters()) == 4 * 128 + (128 * 8 + 8) + (8 * 128 + 128)
    feats = toy.encode_image(images)
    logits = method.logits(prompt, toy, feats, TASK)
    assert logits.shape == (3, 3)
    img = feats / feats.norm(dim=-1, keepdim=True)
    per_image = prompt.text_features(toy, TASK, img)
    assert per_image.shape == (3, 3, toy.embed_dim)
    assert not torch.allclose(per_image[0], per_image[1], atol=1e-6)  # each image has its own prompts
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, p in prompt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(method.is_shared(k) for k in prompt.state_dict())


def test_cocoop_with_zero_meta_net_is_coop(toy, images):
    method = FedCoCoOp(n_ctx=4, ctx_init="a photo of a")
    prompt = method.build(toy)
    with torch.no_grad():
        prompt.meta_net.linear2.weight.zero_()
        prompt.meta_net.linear2.bias.zero_()
    coop = ContextPrompt(toy, 4, "a photo of a")
    assert torch.equal(coop.ctx, prompt.ctx)
    feats = toy.encode_image(images)
    img = feats / feats.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        expected = toy.logit_scale * img @ coop.text_features(toy, TASK).t()
        assert torch.allclose(method.logits(prompt, toy, feats, TASK), expected, atol=1e-4)


# ============================================================================================ FedMaPLe
def test_maple_degenerate_is_coop(toy):
    # depth 1 and no vision coupling, random ctx ("X X {class}.") = CoOp with the same ctx
    maple = FedMaPLe(ctx_init=None, prompt_depth=1, vision_prompts=False)
    assert maple.image_input == "features"
    prompt = maple.build(toy)
    coop = ContextPrompt(toy, 2)
    with torch.no_grad():
        coop.ctx.copy_(prompt.ctx)
        assert torch.allclose(prompt.text_features(toy, TASK), coop.text_features(toy, TASK), atol=1e-5)
    # ctx_init "a photo of a": positions 1..2 learnable, "of a" in the suffix = CoOp with ctx [ctx; emb("of a")]
    maple = FedMaPLe(prompt_depth=1, vision_prompts=False)
    prompt = maple.build(toy)
    head = toy.token_embedding(toy.tokenize(["a photo of a"]))[0, 1:5]
    assert torch.allclose(prompt.ctx, head[:2])
    coop = ContextPrompt(toy, 4)
    with torch.no_grad():
        coop.ctx.copy_(torch.cat([prompt.ctx, head[2:]]))
        assert torch.allclose(prompt.text_features(toy, TASK), coop.text_features(toy, TASK), atol=1e-5)


def test_maple_vision_prompts_change_features_and_only_prompts_get_gradients(toy, images):
    method = FedMaPLe(prompt_depth=2)
    prompt = method.build(toy)
    # ctx 2×128, one deep text prompt 2×128, two couplings Linear(128→128)
    assert sum(p.numel() for p in prompt.parameters()) == 2 * 128 + 2 * 128 + 2 * (128 * 128 + 128)
    three = MaPLePrompt(toy, depth=3)  # MaPLe clones one initial coupling for every deep layer
    assert torch.equal(three.deep_proj[0].weight, three.deep_proj[1].weight)
    assert not torch.equal(three.proj.weight, three.deep_proj[0].weight)
    with torch.no_grad():
        plain = toy.encode_image(images)
        prompted = prompt.image_features(toy, images)
    assert not torch.allclose(plain, prompted, atol=1e-4)
    logits = method.logits(prompt, toy, images, TASK)
    assert logits.shape == (3, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, p in prompt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in toy.parameters())
    assert all(method.is_shared(k) for k in prompt.state_dict())


def test_maple_depth_beyond_backbone_is_a_user_error(toy):
    with pytest.raises(FedlitError, match="prompt_depth 2"):
        FedMaPLe(prompt_depth=9).build(toy)
    with pytest.raises(FedlitError):
        FedMaPLe(prompt_depth=0)


# ============================================================================================ FedVLP
def test_vlp_shares_both_prompts_and_averages_uniformly(toy, images):
    method = FedVLP()
    module = ClientModule(toy, method)
    shared, personal = module.export()
    assert set(shared) == {"text_ctx", "vis_ctx"} and personal == {}
    assert shared["text_ctx"].shape == (1, 4, toy.text_width) and shared["vis_ctx"].shape == (1, 4, toy.vision_width)
    ups = [Update(0, {k: torch.zeros_like(v) for k, v in shared.items()}, {}, 1, 0.0),
           Update(1, {k: torch.ones_like(v) for k, v in shared.items()}, {}, 3, 0.0)]
    out = method.aggregate(ups, shared)
    assert all(torch.allclose(v, torch.full_like(v, 0.5)) for v in out.values())  # not 0.75: unweighted


def test_vlp_prompts_both_towers(toy, images):
    method = FedVLP(prompt_depth=2)
    prompt = method.build(toy)
    with torch.no_grad():
        assert not torch.allclose(prompt.image_features(toy, images), toy.encode_image(images), atol=1e-4)
    torch.nn.functional.cross_entropy(method.logits(prompt, toy, images, TASK), torch.tensor([0, 1, 2])).backward()
    assert prompt.text_ctx.grad[1].abs().sum() > 0 and prompt.vis_ctx.grad[1].abs().sum() > 0  # deep layer too
    with pytest.raises(FedlitError, match="prompt_depth"):
        FedVLP(prompt_depth=3).build(toy)


def test_vlp_official_layout_text_context_after_positions_and_visual_prompts_after_ln_pre(toy, images):
    import copy

    toy = load_backbone("fedlit-toy")  # trained weights: the random init's attention barely mixes tokens
    change = {}
    for official in (True, False):
        torch.manual_seed(0)
        prompt = FedVLP(official_layout=official).build(toy)
        shifted = copy.deepcopy(toy)
        with torch.no_grad():  # change the positional embedding under the context tokens only
            pos = shifted.model.positional_embedding
            pos[1:5] += torch.randn(pos[1:5].shape, generator=torch.Generator().manual_seed(0))  # not a constant: LN
            a, b = prompt.text_features(toy, TASK), prompt.text_features(shifted, TASK)
            # ln_pre makes the prompt tokens (nearly) scale-free only when they go through it (MaPLe's convention)
            f1 = prompt.image_features(toy, images)
            prompt.vis_ctx.mul_(10.0)
            change[official] = (prompt.image_features(toy, images) - f1).abs().max().item()
        assert torch.allclose(a, b, atol=1e-5) is official  # official: the context gets no positional embedding
    assert change[True] > 20 * change[False], change


def test_vlp_trains_over_the_clients_own_classes_relabelled(toy, images):
    method = FedVLP()
    module = ClientModule(toy, method)
    classes = [2, 0]  # the client holds "red circle" and "dog"
    y = torch.tensor([0, 2, 0])
    own = Task("t-client", ("red circle", "dog"))
    want = torch.nn.functional.cross_entropy(method.logits(module.prompt, toy, images, own), torch.tensor([1, 0, 1]))
    assert torch.allclose(method.loss(module, images, y, TASK, classes), want)
    method.own_classes = False
    full = torch.nn.functional.cross_entropy(method.logits(module.prompt, toy, images, TASK), y)
    assert torch.allclose(method.loss(module, images, y, TASK, classes), full)


def test_registry_resolves_the_four_methods():
    assert method_class("fedcocoop") is FedCoCoOp and method_class("fedotp") is FedOTP
    assert method_class("fedmaple") is FedMaPLe and method_class("fedvlp") is FedVLP
