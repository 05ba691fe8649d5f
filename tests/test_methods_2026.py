"""Central, IVLP, PromptFolio and FedPHA: equations on hand-built tensors, what is shared, aggregation, shapes.

Toy backbone (fedlit-toy, bundled weights) and tiny tasks; CPU, seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlit.client import ClientModule
from fedlit.data.federation import ClientData, Federation
from fedlit.errors import FedlitError
from fedlit.methods import method_class
from fedlit.methods.base import Update
from fedlit.methods.central import Central
from fedlit.methods.fedmaple import prefixed_template
from fedlit.methods.fedpha import FedPHA, encode_padded, projection_matrix, push_loss
from fedlit.methods.ivlp import IVLP
from fedlit.methods.promptfolio import PromptFolio, mix_features
from fedlit.prompts import Task, prompt_template

TASK = Task("tiny", ("circle", "square", "red_triangle", "star"))


def _batch(clip, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, clip.embed_dim, generator=g), torch.arange(n) % len(TASK)


def _images(toy, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return toy.normalize_images(torch.rand(n, 3, toy.image_size, toy.image_size, generator=g))


def _features(clip, ctx: torch.Tensor, n_ctx: int) -> torch.Tensor:
    tpl = prompt_template(clip, TASK, n_ctx)
    f = clip.encode_text_embeddings(tpl.splice(ctx), tpl.eot)
    return f / f.norm(dim=-1, keepdim=True)


def _update(cid, shared, personal=None, n=10):
    return Update(cid, shared, personal or {}, n, 0.0)


def test_new_methods_are_registered():
    for name, cls in (("central", Central), ("ivlp", IVLP), ("promptfolio", PromptFolio), ("fedpha", FedPHA)):
        assert method_class(name) is cls


# ============================================================================================ Central
def _federation(tasks=(None, None, None)):
    clients = [ClientData(cid=i, classes=[i], train_idx=np.arange(3 * i, 3 * i + 3), train_y=np.full(3, i),
                          test_idx=np.arange(100 + 2 * i, 102 + 2 * i), test_y=np.full(2, i), task=t)
               for i, t in enumerate(tasks)]
    return Federation(data=None, clients=clients, train_task=TASK, evals={})


def test_central_pools_every_training_image_into_client_0_and_keeps_test_splits():
    fed = _federation()
    pooled = Central().arrange_clients(fed)
    assert np.array_equal(pooled.clients[0].train_idx, np.arange(9))
    assert np.array_equal(pooled.clients[0].train_y, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert [c.num_samples for c in pooled.clients] == [9, 0, 0]
    for before, after in zip(fed.clients, pooled.clients):
        assert np.array_equal(before.test_idx, after.test_idx) and before.classes == after.classes
    assert fed.clients[1].num_samples == 3  # the input federation is left untouched


def test_central_refuses_clients_with_different_class_lists():
    with pytest.raises(FedlitError, match="different class lists"):
        Central().arrange_clients(_federation((Task("a", ("x",)), Task("b", ("y",)), None)))


def test_central_aggregate_takes_the_pooled_learner_and_everything_is_shared(toy):
    m = Central()
    assert m.persistent_optimizer and (m.n_ctx, m.lr) == (16, 0.001)
    shared, personal = ClientModule(toy, m).export()
    assert set(shared) == {"ctx"} and personal == {}
    a, b = {"ctx": torch.ones(2)}, {"ctx": torch.full((2,), 5.0)}
    out = m.aggregate([_update(0, a, n=9), _update(1, b, n=0), _update(2, b, n=0)], {"ctx": torch.zeros(2)})
    assert torch.equal(out["ctx"], a["ctx"])
    g = {"ctx": torch.zeros(2)}
    assert m.aggregate([_update(1, b, n=0)], g) is g


# ============================================================================================ IVLP
def test_ivlp_text_init_from_phrase_and_frozen_rest_of_phrase(toy):
    torch.manual_seed(0)
    p = IVLP().build(toy)
    tokens = toy.tokenize(["a photo of a"])
    with torch.no_grad():
        emb = toy.token_embedding(tokens)[0]
    assert torch.allclose(p.ctx, emb[1:3].float())  # "a photo" learnable
    tpl = prefixed_template(toy, TASK, "a photo of a", 2)
    ref = toy.encode_text_embeddings(tpl.splice(p.ctx), tpl.eot)
    assert torch.allclose(p.text_features(toy, TASK), ref / ref.norm(dim=-1, keepdim=True), atol=1e-6)
    # the official rule: an init phrase only for at most 4 tokens, otherwise random with "X" placeholders
    assert IVLP(n_ctx_text=5).build(toy).ctx_init is None


def test_ivlp_towers_are_independent_and_every_prompt_is_shared(toy):
    torch.manual_seed(0)
    m = IVLP(prompt_depth_text=2, prompt_depth_vision=2)
    module = ClientModule(toy, m)
    p = module.prompt
    assert p.vis_ctx.shape == (2, toy.vision_width) and len(p.deep_text) == 1 and len(p.deep_vision) == 1
    shared, personal = module.export()
    assert personal == {} and set(shared) == {"ctx", "deep_text.0", "vis_ctx", "deep_vision.0"}
    x = _images(toy)
    m.image_features(p, toy, x).sum().backward()
    assert p.ctx.grad is None and p.deep_text[0].grad is None  # no text→vision coupling
    assert p.vis_ctx.grad.abs().sum() > 0 and p.deep_vision[0].grad.abs().sum() > 0
    m.text_features(p, toy, TASK).sum().backward()
    assert p.ctx.grad.abs().sum() > 0 and p.deep_text[0].grad.abs().sum() > 0
    # appended vision tokens, deep ones replacing them: the backbone's own append path
    ref = toy.encode_image(x, visual_prompts=p.vis_ctx, deep_visual_prompts=[p.deep_vision[0]],
                           prompt_position="append")
    assert torch.allclose(m.image_features(p, toy, x), ref)
    assert not torch.allclose(ref, toy.encode_image(x), atol=1e-4)


def test_ivlp_defaults_and_errors(toy):
    m = IVLP()
    assert (m.n_ctx_text, m.n_ctx_vision, m.prompt_depth_text, m.prompt_depth_vision, m.lr, m.weighted) == \
        (2, 2, 1, 1, 0.001, True)
    assert m.image_input == "images"
    with pytest.raises(FedlitError, match="exceeds"):
        IVLP(prompt_depth_vision=3).build(toy)
    with pytest.raises(FedlitError, match="n_ctx_text"):
        IVLP(n_ctx_text=0)


def test_ivlp_language_only_config_is_accepted_and_leaves_the_image_tower_untouched(toy):
    """Issue 21 item 13: the official language-only IVLP (N_CTX_VISION 0, PROMPT_DEPTH_VISION 0)."""
    for kw in ({"n_ctx_vision": 0, "prompt_depth_vision": 0}, {"prompt_depth_vision": 0}, {"n_ctx_vision": 0}):
        m = IVLP(**kw)
        assert m.language_only and m.image_input == "features"  # cached pooled features, no vision tensors
        module = ClientModule(toy, m)
        assert set(module.export()[0]) == {"ctx"}
        x = _images(toy)
        assert torch.equal(m.image_features(module.prompt, toy, toy.encode_image(x)), toy.encode_image(x))
    with pytest.raises(FedlitError, match="n_ctx_vision=-1"):
        IVLP(n_ctx_vision=-1)


def test_ivlp_vision_depth_is_bounded_by_the_vision_tower_only():
    """Issue 21 item 13: a 2-layer text tower with a 4-layer vision tower accepts vision depth 4, not 5."""
    from types import SimpleNamespace as NS

    from fedlit.prompts import check_prompt_depth

    clip = NS(name="fake", model=NS(transformer=NS(resblocks=[0] * 2), visual=NS(transformer=NS(resblocks=[0] * 4))))
    check_prompt_depth(clip, 4, vision=True, only_vision=True, key="prompt_depth_vision")
    with pytest.raises(FedlitError, match="prompt_depth_vision=5 exceeds the 4"):
        check_prompt_depth(clip, 5, vision=True, only_vision=True, key="prompt_depth_vision")
    with pytest.raises(FedlitError, match="exceeds the 2"):  # coupled prompts (MaPLe): both towers
        check_prompt_depth(clip, 3, vision=True)


# ============================================================================================ PromptFolio
def test_promptfolio_mixture_on_hand_built_features():
    tg, tl = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(mix_features(tg, tl, 0.4), torch.tensor([[0.6, 0.4]]))  # not re-normalised
    n = mix_features(tg, tl, 0.4, renormalize=True)
    assert torch.allclose(n, torch.tensor([[0.6, 0.4]]) / (0.6**2 + 0.4**2) ** 0.5)


def test_promptfolio_text_features_and_loss(toy):
    torch.manual_seed(0)
    m = PromptFolio()
    module = ClientModule(toy, m)
    p = module.prompt
    expected = 0.6 * _features(toy, p.global_ctx, 8) + 0.4 * _features(toy, p.local_ctx, 8)
    assert torch.allclose(m.text_features(p, toy, TASK), expected, atol=1e-6)
    x, y = _batch(toy)
    img = x / x.norm(dim=-1, keepdim=True)
    ce = F.cross_entropy(toy.logit_scale * img @ expected.t(), y)
    loss = m.loss(module, x, y, TASK)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5)
    loss.backward()
    assert p.global_ctx.grad.abs().sum() > 0 and p.local_ctx.grad.abs().sum() > 0  # both rows learn each step


def test_promptfolio_frac_0_is_fully_global(toy):
    torch.manual_seed(0)
    m = PromptFolio(frac=0.0)
    p = m.build(toy)
    m.text_features(p, toy, TASK).sum().backward()
    assert p.local_ctx.grad is None or p.local_ctx.grad.abs().sum() == 0


def test_promptfolio_shares_only_the_global_prompt_and_averages_it_weighted(toy):
    m = PromptFolio()
    shared, personal = ClientModule(toy, m).export()
    assert set(shared) == {"global_ctx"} and set(personal) == {"local_ctx"}
    ups = [_update(0, {"global_ctx": torch.zeros(2)}, n=10), _update(1, {"global_ctx": torch.ones(2)}, n=30)]
    assert torch.allclose(m.aggregate(ups, {})["global_ctx"], torch.full((2,), 0.75))
    with pytest.raises(FedlitError, match="frac"):
        PromptFolio(frac=1.5)
    assert (m.n_ctx, m.frac, m.lr) == (8, 0.4, 0.002)


# ============================================================================================ FedPHA
def _diag_g(values, width=8):
    g = torch.zeros(len(values), width)
    for i, v in enumerate(values):
        g[i, i] = v
    return g


def test_fedpha_projection_official_vs_null_space_on_hand_built_prompt():
    g = _diag_g([5.0, 4.0, 3.0, 2.0, 1.0])  # right-singular vectors e_0 … e_4, strongest first
    # ratio 0.6: c = ⌊5·0.4⌋ = 2 → V₂ = e_2, e_3, e_4 (weak directions of G's rows): rank 3
    assert torch.allclose(projection_matrix(g, 0.6), torch.diag(torch.tensor([0, 0, 1, 1, 1, 0, 0, 0.0])), atol=1e-6)
    # the paper's null space: also the complement e_5 … e_7, i.e. I − V₁V₁ᵀ
    assert torch.allclose(projection_matrix(g, 0.6, "null_space"),
                          torch.diag(torch.tensor([0, 0, 1, 1, 1, 1, 1, 1.0])), atol=1e-6)
    # official shapes: 16 rows, ρ = 0.8 → c = 3, rank 13
    p = projection_matrix(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)), 0.8)
    assert torch.linalg.matrix_rank(p).item() == 13 and torch.allclose(p @ p, p, atol=1e-5)


def test_fedpha_push_loss_on_hand_built_features():
    tl = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    tg = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # distances √2 and 0
    assert push_loss(tl, tg, 1.0).item() == pytest.approx((0.0 + 1.0) / 2)
    assert push_loss(tl, tg, 2.0).item() == pytest.approx((2 - 2**0.5 + 2.0) / 2, rel=1e-6)


def test_fedpha_loss_is_two_ce_plus_pull_plus_push_and_inference_uses_local_only(toy):
    torch.manual_seed(0)
    m = FedPHA(n_ctx=4)
    module = ClientModule(toy, m)
    p = module.prompt
    x, y = _batch(toy)
    img = x / x.norm(dim=-1, keepdim=True)
    proj = projection_matrix(p.global_ctx, 0.8)
    t_l, t_g = _features(toy, p.local_ctx, 4), _features(toy, p.global_ctx, 4)
    t_p = _features(toy, p.local_ctx @ proj, 4)
    s = toy.logit_scale
    ref = (F.cross_entropy(s * img @ t_l.t(), y) + F.cross_entropy(s * img @ t_g.t(), y) + F.mse_loss(t_l, t_p)
           + F.relu(1.0 - (t_l - t_g).norm(dim=-1)).mean())
    assert m.loss(module, x, y, TASK).item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(m.text_features(p, toy, TASK), t_l, atol=1e-6)
    with torch.no_grad():
        p.global_ctx.add_(1.0)
    assert torch.allclose(m.text_features(p, toy, TASK), t_l, atol=1e-6)  # G unused at test time


def test_fedpha_svd_gradient_reaches_the_global_prompt_only_when_faithful(toy):
    grads = {}
    for svd_grad in (True, False):
        torch.manual_seed(0)
        m = FedPHA(n_ctx=4, svd_grad=svd_grad)
        p = m.build(toy)
        proj = projection_matrix(p.global_ctx if svd_grad else p.global_ctx.detach(), 0.8)
        (p.local_ctx @ proj).sum().backward()
        grads[svd_grad] = p.global_ctx.grad
    assert grads[True] is not None and grads[True].abs().sum() > 0 and grads[False] is None


def test_fedpha_shares_global_only_and_sends_each_client_its_length(toy):
    m = FedPHA(n_ctx=4, local_lengths=[2, 6, 4])
    m.setup_federation(TASK, 3)
    module = ClientModule(toy, m)
    shared, personal = module.export()
    assert set(personal) == {"local_ctx"} and "local_ctx" not in shared
    assert module.prompt.local_ctx.shape[0] == 6
    sent = m.payload_for(0, shared)
    assert int(sent["local_len"]) == 2 and "local_ctx" not in sent
    module.load_prompt_state(sent, personal)
    assert module.prompt.local().shape[0] == 2
    ups = [_update(0, {"global_ctx": torch.zeros(2), "local_len": torch.tensor(2)}, n=1),
           _update(1, {"global_ctx": torch.ones(2), "local_len": torch.tensor(6)}, n=3)]
    out = m.aggregate(ups, {"global_ctx": torch.zeros(2), "local_len": torch.tensor(4)})
    assert torch.allclose(out["global_ctx"], torch.full((2,), 0.75)) and int(out["local_len"]) == 4
    with pytest.raises(FedlitError, match="one per client"):
        m.setup_federation(TASK, 4)


def test_fedpha_heterogeneous_eot_offset_is_faithful_by_default(toy):
    torch.manual_seed(0)
    ctx = torch.randn(2, toy.text_width) * 0.02
    tpl = prompt_template(toy, TASK, 6)  # ℓ_max = 6 placeholders
    emb = torch.cat([tpl.splice(ctx), torch.zeros(len(TASK), 4, toy.text_width)], dim=1)
    ref = toy.encode_text_embeddings(emb, tpl.eot)  # read at the ℓ_max EOT, inside the zero padding
    ref = ref / ref.norm(dim=-1, keepdim=True)
    assert torch.allclose(encode_padded(toy, TASK, ctx, 6, true_eot=False), ref, atol=1e-6)
    fixed = encode_padded(toy, TASK, ctx, 6, true_eot=True)
    assert torch.allclose(fixed, _features(toy, ctx, 2), atol=1e-6)
    assert not torch.allclose(fixed, ref, atol=1e-4)


def test_fedpha_defaults_and_errors():
    m = FedPHA()
    assert (m.n_ctx, m.ratio, m.alpha, m.projection, m.svd_grad, m.true_eot, m.lr) == \
        (16, 0.8, 1.0, "official", True, False, 0.001)
    with pytest.raises(FedlitError, match="projection"):
        FedPHA(projection="full")
    with pytest.raises(FedlitError, match="ratio"):
        FedPHA(ratio=1.5)


# ============================================================================================ pFedMMA
from fedlit.methods.pfedmma import MMAdapters, PFedMMA, adapter_branch, grad_scale  # noqa: E402


def test_grad_scale_is_identity_forward_and_scales_backward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 0.25))


def test_adapter_branch_value_and_official_gradient_scaling():
    torch.manual_seed(0)
    a = MMAdapters(6, 8, [0], dim=3, scale=0.01)
    down, shared, up = a.text_down[0], a.shared[0], a.text_up[0]
    h = torch.randn(4, 6, requires_grad=True)
    out = adapter_branch(h, down, shared, up, 0.01)
    plain = up(torch.relu(shared(torch.relu(down(h)))))
    assert torch.allclose(out, 0.01 * plain, atol=1e-7)
    out.sum().backward()
    got = [p.grad.clone() for p in (down.weight, shared.weight, up.weight)] + [h.grad.clone()]
    for p in (down.weight, shared.weight, up.weight):
        p.grad = None
    h2 = h.detach().clone().requires_grad_(True)
    up(torch.relu(shared(torch.relu(down(h2))))).sum().backward()  # the unscaled adapter
    for g, p in zip(got, (down.weight, shared.weight, up.weight)):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)  # parameters: gradient of the unscaled adapter
    assert torch.allclose(got[3], 0.01 * h2.grad, rtol=1e-4, atol=1e-9)  # input: exact gradient of s·adapter


def test_pfedmma_adds_the_branch_to_the_block_output_and_detaches_afterwards(toy):
    torch.manual_seed(0)
    m = PFedMMA(adapter_start=1, adapter_end=2)
    p = m.build(toy)
    x = _images(toy)
    plain = toy.encode_image(x)
    blk = toy.model.visual.transformer.resblocks[0]
    inp = torch.randn(2, 5, toy.vision_width)
    ref = blk(inp) + adapter_branch(blk.ln_1(inp), p.vis_down[0], p.shared[0], p.vis_up[0], 0.001)
    with p.attached(toy.model.visual.transformer.resblocks, "vision"):
        assert torch.allclose(blk(inp), ref, atol=1e-6)
    assert torch.allclose(toy.encode_image(x), plain)  # hooks removed
    adapted = m.image_features(p, toy, x)  # the hooks fire through the backbone's own forward path
    assert not torch.equal(adapted, plain) and torch.allclose(adapted, plain, atol=1e-2)
    # zero up-projections: the frozen CLIP features exactly
    with torch.no_grad():
        for up in [*p.vis_up, *p.text_up]:
            up.weight.zero_()
    assert torch.allclose(m.image_features(p, toy, x), plain, atol=1e-6)
    ref_t = toy.encode_text(toy.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in TASK.classnames]))
    assert torch.allclose(m.text_features(p, toy, TASK), ref_t / ref_t.norm(dim=-1, keepdim=True), atol=1e-5)


def test_pfedmma_shares_only_the_shared_projection(toy):
    m = PFedMMA(adapter_start=1, adapter_end=2)
    shared, personal = ClientModule(toy, m).export()
    assert set(shared) == {f"shared.{i}.{w}" for i in range(2) for w in ("weight", "bias")}
    assert all(k.split(".")[0] in ("text_down", "text_up", "vis_down", "vis_up") for k in personal)
    ups = [_update(0, {"shared.0.bias": torch.zeros(2)}, n=1), _update(1, {"shared.0.bias": torch.ones(2)}, n=3)]
    assert torch.allclose(m.aggregate(ups, {})["shared.0.bias"], torch.full((2,), 0.75))


def test_pfedmma_parameter_counts_on_vit_b16_widths():
    a = MMAdapters(512, 768, list(range(4, 12)))
    count = lambda name: sum(p.numel() for n, p in a.named_parameters() if n.startswith(name))  # noqa: E731
    assert count("text_") == 266_496 and count("vis_") == 399_616 and count("shared") == 8_448


def test_pfedmma_stale_text_cache_is_faithful_by_default(toy):
    for stale in ("first_evaluated", False):
        torch.manual_seed(0)
        m = PFedMMA(adapter_start=1, adapter_end=2, stale_text_cache=stale)
        p = m.build(toy)
        first = m.prepare(p, toy, TASK)
        with torch.no_grad():
            for up in p.text_up:
                up.weight.add_(1.0)
        second = m.prepare(p, toy, TASK)
        assert torch.equal(first, second) == (stale == "first_evaluated")


def test_pfedmma_cache_is_the_first_clients_model_after_its_first_training(toy):
    """Issue 21 item 12: the official cache is filled by the first client's after_train test, right after its own
    round-1 training and before aggregation — not by the first (post-aggregation) evaluation."""
    torch.manual_seed(0)
    m = PFedMMA(adapter_start=1, adapter_end=2)
    assert m.stale_text_cache == "first_trained" and PFedMMA(stale_text_cache=True).stale_text_cache == "first_trained"
    p = m.build(toy)
    m.finish_local(p)  # the build-time export

    def bump(v):
        with torch.no_grad():
            for up in p.text_up:  # not a constant: LayerNorm removes those
                up.bias.add_(v * torch.randn(up.bias.shape, generator=torch.Generator().manual_seed(int(v))))
        return m.text_features(p, toy, TASK).detach()

    trained = bump(50.0)  # client 0's first local training
    m.finish_local(p)  # its update is exported
    later = bump(80.0)  # aggregation, other clients, later rounds
    cached = m.prepare(p, toy, TASK)
    assert torch.allclose(cached, trained, atol=1e-6) and not torch.allclose(cached, later, atol=1e-4)
    assert torch.allclose(m.text_features(p, toy, TASK), later, atol=1e-6)  # the live state is restored
    with pytest.raises(FedlitError, match="stale_text_cache"):
        PFedMMA(stale_text_cache="sometimes")
    with pytest.raises(FedlitError, match="adapter_end"):
        PFedMMA().build(toy)
