"""FedMGP, FedSEPT, FOCoOp, FedMVP: equations on hand-built tensors, shared vs personal keys, server rules.

Toy backbone (fedlit-toy, bundled weights) and tiny tasks; CPU, seconds. The 2-round runs of every method are in
``test_all_methods.py`` (configs picked up), the RN50-toy runs of the text-only ones in ``test_resnet.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedlit.client import ClientModule
from fedlit.methods.base import Update
from fedlit.methods.fedmgp import FedMGP, pair_distance, select_groups
from fedlit.methods.fedsept import FedSEPT, diversity, fused_logits
from fedlit.prompts import Task

TASK = Task("tiny", ("circle", "square", "red_triangle", "star"))


def _images(clip, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return clip.normalize_images(torch.rand(n, 3, clip.image_size, clip.image_size, generator=g))


# ------------------------------------------------------------------------------------------------ FedMGP
def test_fedmgp_pair_distance_by_hand():
    x = torch.tensor([[[0.0, 0.0]], [[1.0, 2.0]], [[3.0, 0.0]]])  # G = 3, N = 1, D = 2
    assert float(pair_distance(x, "l1")) == pytest.approx((1.5 + 1.5 + 2.0) / 3)
    assert float(pair_distance(x, "l2")) == pytest.approx((2.5 + 4.5 + 4.0) / 3)


def test_fedmgp_selection_round0_permutation_then_softmax_of_max_cosine():
    groups = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).unsqueeze(1)  # [G=3, n=1, 2]
    assert torch.equal(select_groups(groups, None, 2, 42 + 1),
                       torch.randperm(3, generator=torch.Generator().manual_seed(43))[:2])
    ranks = torch.tensor([[[1.0, 0.0]], [[1.0, 0.2]]])
    s = torch.tensor([max(1.0, 1 / math.sqrt(1.04)), max(0.0, 0.2 / math.sqrt(1.04)),
                      max(1 / math.sqrt(2), 1.2 / math.sqrt(2 * 1.04))])
    # small T: the draws are the groups in decreasing similarity
    assert select_groups(groups, ranks, 2, 0, temperature=0.02).tolist() == torch.argsort(s, descending=True)[:2].tolist()
    # T = 1: the first draw follows softmax(s)
    first = torch.tensor([int(select_groups(groups, ranks, 2, seed)[0]) for seed in range(3000)])
    freq = torch.bincount(first, minlength=3).float() / 3000
    assert torch.allclose(freq, torch.softmax(s, 0), atol=0.03)


def _mgp_round(m, mod, cids, state, personal, bump):
    ups = []
    for cid in cids:
        mod.load_prompt_state(state, personal.get(cid, INIT[0]), m.server_payload(cid, state, {}))
        with torch.no_grad():  # stands for local training
            mod.prompt.ctx.add_(bump * (cid + 1))
            mod.prompt.vpt.add_(bump * (cid + 1))
        shared, pers = mod.export()
        ups.append(Update(cid, shared, pers, 4, 0.0))
    return ups


INIT: list = []


def test_fedmgp_rankwise_mean_writeback_only_for_the_round_clients_and_shared_keys(toy):
    m = FedMGP(num_groups=3, topk=2)
    mod = ClientModule(toy, m)
    shared0, personal0 = mod.export()
    INIT[:] = [personal0]
    assert set(shared0) == {"upload_text", "upload_vis"}
    assert set(personal0) == {"ctx", "vpt", "sel_text", "sel_vis"}
    ups = _mgp_round(m, mod, [0, 1], shared0, {}, 0.1)
    for u in ups:  # round 0: the same permutation (seed 42 + cid) for both towers
        perm = torch.randperm(3, generator=torch.Generator().manual_seed(42 + u.cid))[:2]
        assert torch.equal(u.personal["sel_text"], perm) and torch.equal(u.personal["sel_vis"], perm)
        assert torch.equal(u.shared["upload_text"], u.personal["ctx"][perm])
    g1 = m.aggregate(ups, shared0)
    torch.testing.assert_close(g1["upload_text"], (ups[0].shared["upload_text"] + ups[1].shared["upload_text"]) / 2)
    personal = {u.cid: u.personal for u in ups}
    # client 0 after round 0: its selected rows hold the global ranks, the other row its own group
    mod.load_prompt_state(g1, personal[0], m.server_payload(0, g1, {}))
    sel = personal[0]["sel_text"]
    assert torch.equal(mod.prompt.ctx[sel], g1["upload_text"])
    rest = [g for g in range(3) if g not in sel.tolist()]
    assert torch.equal(mod.prompt.ctx[rest], personal[0]["ctx"][rest])
    assert torch.equal(mod.prompt.vpt[personal[0]["sel_vis"]], g1["upload_vis"])
    # round 1: only client 1 trains; client 0 keeps the round-0 write-back, client 1 gets the new one
    ups2 = _mgp_round(m, mod, [1], g1, personal, 0.05)
    g2 = m.aggregate(ups2, g1)
    personal[1] = ups2[0].personal
    mod.load_prompt_state(g2, personal[0], m.server_payload(0, g2, {}))
    assert torch.equal(mod.prompt.ctx[sel], g1["upload_text"])
    mod.load_prompt_state(g2, personal[1], m.server_payload(1, g2, {}))
    assert torch.equal(mod.prompt.ctx[personal[1]["sel_text"]], g2["upload_text"])
    # server state round-trips (checkpoint)
    m2 = FedMGP(num_groups=3, topk=2)
    m2.load_server_state_dict(m.server_state_dict())
    assert m2._round == 2 and torch.equal(m2._writeback[0]["upload_text"], g1["upload_text"])


def test_fedmgp_official_vision_reload_restores_the_initial_vision_groups(toy):
    m = FedMGP(num_groups=3, topk=2, vision_prompt_reload="official_init")
    mod = ClientModule(toy, m)
    shared0, personal0 = mod.export()
    trained = dict(personal0, vpt=personal0["vpt"] + 1.0, ctx=personal0["ctx"] + 1.0)
    mod.load_prompt_state(shared0, trained, m.server_payload(0, shared0, {}))
    assert torch.equal(mod.prompt.vpt, personal0["vpt"])  # initial V, whatever the client trained
    assert torch.equal(mod.prompt.ctx, trained["ctx"])
    m.vision_prompt_reload = "trained"
    mod2 = ClientModule(toy, FedMGP(num_groups=3, topk=2))
    mod2.load_prompt_state(shared0, trained, {})
    assert torch.equal(mod2.prompt.vpt, trained["vpt"])


def test_fedmgp_loss_is_mean_group_ce_plus_signed_divergence_and_inference_averages(toy):
    x, y = _images(toy, 3), torch.tensor([0, 1, 2])
    mods = {s: ClientModule(toy, FedMGP(num_groups=3, divergent_sign=s)) for s in ("official", "diverse")}
    base = ClientModule(toy, FedMGP(num_groups=3, divergent_weight=0.0))
    state = {**mods["official"].export()[0], **mods["official"].export()[1]}
    for mod in (*mods.values(), base):
        mod.load_prompt_state(state)
    m = base.method
    z, f, t = m.group_logits(base.prompt, toy, x, TASK)
    ce = torch.stack([F.cross_entropy(zg, y) for zg in z]).mean()
    d = 0.5 * (pair_distance(t) + pair_distance(f))
    assert float(d.detach()) > 0
    torch.testing.assert_close(m.loss(base, x, y, TASK), ce)
    torch.testing.assert_close(mods["official"].method.loss(mods["official"], x, y, TASK), ce + d)
    torch.testing.assert_close(mods["diverse"].method.loss(mods["diverse"], x, y, TASK), ce - d)
    torch.testing.assert_close(base(x, TASK), z.mean(0))
    assert z.shape == (3, 3, len(TASK.classnames))


# ------------------------------------------------------------------------------------------------ FedSEPT
def test_fedsept_diversity_and_fused_logits_by_hand():
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[3.0, 3.0]]])  # M = 3 experts, vec = rows
    # cos²: (1,2) 0, (1,3) 1/2, (2,3) 1/2 → mean over the 6 ordered pairs = 2·(0 + 1/2 + 1/2) / 6
    assert float(diversity(a)) == pytest.approx(1 / 3)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # [M=2, C=2, D=2]
    pi = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    z = fused_logits(f, t, pi, 10.0)
    torch.testing.assert_close(z, torch.tensor([[10.0, 0.0], [7.5, 2.5]]))


def test_fedsept_shares_only_a_and_the_basis_is_not_state(toy):
    m = FedSEPT(num_experts=2, rank=4, n_ctx=4, dp_epsilon=0)
    mod = ClientModule(toy, m)
    shared, personal = mod.export()
    assert set(shared) == {"A"}
    assert "B0" not in personal and {"R", "dp_steps"} <= set(personal) and any(k.startswith("router.") for k in personal)
    p = mod.prompt
    torch.testing.assert_close(p.contexts(), p.A @ p.B0 + p.R)
    assert torch.equal(p.B0, ClientModule(toy, FedSEPT(num_experts=2, rank=4, n_ctx=4)).prompt.B0)  # same basis


def test_fedsept_dp_step_clips_a_per_sample_and_leaves_r_and_router_ordinary(toy):
    """The module's loss + backward: A.grad = mean of jointly clipped per-sample gradients (σ ≈ 0); R and the
    router keep their ordinary batch gradient."""
    torch.manual_seed(0)
    m = FedSEPT(num_experts=2, rank=4, n_ctx=4, dp_sigma=1e-12, dp_clip=1e-3, router_dropout=0.0, dp_microbatch=2)
    mod = ClientModule(toy, m)
    with torch.no_grad():
        mod.prompt.R.normal_(0, 0.02)
    mod.train()
    x, y = torch.randn(3, toy.embed_dim), torch.tensor([0, 1, 3])

    def sample_loss(i):
        z = mod(x[i:i + 1], TASK)
        return F.cross_entropy(z, y[i:i + 1]) + m.lambda_div * diversity(mod.prompt.A)

    ref = torch.zeros_like(mod.prompt.A)
    for i in range(3):
        g = torch.autograd.grad(sample_loss(i), mod.prompt.A)[0]
        ref += g * min(1.0, 1e-3 / float(g.norm())) / 3
    ordinary = torch.autograd.grad(torch.stack([sample_loss(i) for i in range(3)]).mean(),
                                   [mod.prompt.R, mod.prompt.router.head.weight])
    loss = m.loss(mod, x, y, TASK)
    loss.backward()
    torch.testing.assert_close(mod.prompt.A.grad, ref, atol=1e-9, rtol=1e-4)
    assert not torch.allclose(mod.prompt.A.grad, ref * 0)
    torch.testing.assert_close(mod.prompt.R.grad, ordinary[0], atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(mod.prompt.router.head.weight.grad, ordinary[1], atol=1e-7, rtol=1e-4)
    assert int(mod.prompt.dp_steps) == 1


# ------------------------------------------------------------------------------------------------ FOCoOp
from fedlit.methods.focoop import FOCoOp, dro_loss, mm_unbalanced_kl, negative_labels, two_means, uot_calibrate  # noqa: E402
from fedlit.trainer import FedTrainer  # noqa: E402


def test_focoop_mm_unbalanced_by_hand():
    a, b = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    torch.testing.assert_close(mm_unbalanced_kl(a, b, torch.zeros(2, 2)), (a[:, None] * b[None, :]).double())
    # one point each: minimise π·m + 2·reg·(π log π − π + 1) → π = exp(−m / 2reg)
    pi = mm_unbalanced_kl(torch.ones(1), torch.ones(1), torch.tensor([[0.3]]), reg_m=0.1)
    assert float(pi) == pytest.approx(math.exp(-0.3 / 0.2))
    # a cheap pair gets more mass than an expensive one
    plan = mm_unbalanced_kl(a, torch.tensor([0.5, 0.5]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert plan[0, 0] > plan[0, 1] and plan[1, 1] > plan[1, 0]


def test_focoop_two_means_and_uot_calibration():
    gen = torch.Generator().manual_seed(0)
    assert two_means(torch.tensor([0.1, 0.11, 0.9, 0.95, 0.12]), gen).tolist() == [False, False, True, True, False]
    g = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # C = 2 class prompts, n = 1, W = 2
    o_all = torch.tensor([[[1.0, 0.1]], [[0.1, 1.0]], [[-5.0, -5.0]], [[-6.0, -4.0]], [[-4.0, -6.0]]])
    new_g, new_o, info = uot_calibrate(g, o_all, 2, torch.Generator().manual_seed(0))
    assert info["seeming_id"] == 2  # the two prompts near the class prompts
    cost = torch.cdist(o_all.flatten(1).double(), g.flatten(1).double()).pow(2)
    plan = mm_unbalanced_kl(torch.full((5,), 0.2), torch.full((2,), 0.5), cost / cost.max())
    mass = plan.sum(1)
    expect_g = 0.5 * g.flatten(1).double() + 0.5 * plan[:2].t() @ o_all[:2].flatten(1).double()
    torch.testing.assert_close(new_g.flatten(1).double(), expect_g)
    far = torch.argsort(mass[2:])[:2] + 2
    torch.testing.assert_close(new_o, o_all[far])
    bary, _, _ = uot_calibrate(g, o_all, 2, torch.Generator().manual_seed(0), update="barycentre")
    p = plan[:2] / plan[:2].sum(0, keepdim=True)
    torch.testing.assert_close(bary.flatten(1).double(), 0.5 * g.flatten(1).double() + 0.5 * p.t() @ o_all[:2].flatten(1).double())


def test_focoop_dro_gamma_update_and_the_official_nan_at_zero():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(4, 8), dim=-1)
    t = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    o = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    y = torch.tensor([0, 1, 2, 0])
    gammas = torch.full((2,), 10.0)
    loss = dro_loss(f, t, o, y, 100.0, gammas)
    assert torch.isfinite(loss)
    loss.backward()
    assert t.grad.abs().sum() > 0 and o.grad.abs().sum() > 0
    assert ((9.95 < gammas) & (gammas <= 9.97)).all()  # γ − 0.005·(10 − mean|δ|), 0 < mean|δ| ≤ 4 steps of ≤ 1
    assert not torch.isfinite(dro_loss(f, t, o, y, 100.0, torch.tensor([10.0, 0.0])))  # official floor 0 → NaN
    g = torch.tensor([10.0, 0.01])
    dro_loss(f, t, o, y, 100.0, g, floor=1e-3)
    assert float(g[1]) == pytest.approx(1e-3)


def _focoop(toy, **kw):
    m = FOCoOp(n_ctx=2, num_ood_prompts=3, ood_candidates=200, **kw)
    m.setup_federation(TASK, 2)
    return m, ClientModule(toy, m)


def test_focoop_keys_novel_class_context_ood_words_and_batch_weights(toy):
    m, mod = _focoop(toy, uot=False)
    shared, personal = mod.export()
    assert set(shared) == {"G", "O"} and set(personal) == {"L", "gammas"}
    assert torch.equal(shared["G"], personal["L"])  # G starts as a copy of L
    assert len(m.ood_words) == 3 and not {"circle", "square", "red", "triangle", "star"} & set(m.ood_words)
    words = negative_labels(toy, TASK.classnames, 3, ["circle", "apple", "zebra", "house", "music", "square"])
    assert not {"circle", "square"} & set(words)
    p = mod.prompt
    mix = 0.8 * p.L + 0.2 * p.G
    novel = Task("n", ("circle", "hexagon"))
    ctx = m._contexts(p, novel)
    torch.testing.assert_close(ctx[0], mix[0])
    torch.testing.assert_close(ctx[1], mix.mean(0))
    x = torch.randn(2, toy.embed_dim)
    assert m.full_logits(p, toy, x, TASK).shape == (2, len(TASK.classnames) + 3)
    torch.testing.assert_close(mod(x, TASK), m.full_logits(p, toy, x, TASK)[:, :4])
    m.plan_rounds(FedTrainer(batch_size=8), [10, 40])  # 1 and 5 batches (the partial last batch is dropped)
    ups = [Update(0, {"G": torch.zeros(1), "O": torch.zeros(1)}, {}, 10, 0.0),
           Update(1, {"G": torch.ones(1) * 6, "O": torch.ones(1)}, {}, 40, 0.0)]
    out = m.aggregate(ups, {})
    assert float(out["G"]) == pytest.approx(5.0)  # 6 · 5/6, not 6 · 40/50


# ------------------------------------------------------------------------------------------------ FedMVP
from fedlit.errors import FedlitError  # noqa: E402
from fedlit.methods.fedmvp import FedMVP, band_pool, connector, load_attributes, sentence, shapes_attributes  # noqa: E402

SHAPES_TASK = Task("shapes", ("red circle", "blue square", "green ring"))


def test_fedmvp_sentence_rules_truncation_and_band_pool():
    assert connector("alternating stripes") == "which is" and connector("used for sport") == "which is"
    assert connector("has four legs") == "which" and connector("often red") == "which"
    assert connector("eyes") == "which has"
    assert sentence("a photo of a", "Apply_Eye_Makeup", "", "eyes") == "a photo of a Apply Eye Makeup, which has eyes"
    long = sentence("a photo of a", "x", "a type of flower, ", "a" * 100)
    assert len(long) == 77 and long.startswith("a photo of a x, a type of flower, which is a")
    assert len(sentence("a photo of a", "x", "", "a" * 100, truncate=0)) > 77
    tokens = torch.arange(8.0).view(1, 8, 1)  # 8 patches → 4 bands of 2
    torch.testing.assert_close(band_pool(tokens), torch.tensor([[[0.5], [2.5], [4.5], [6.5]]]))


def test_fedmvp_attributes_procedural_for_shapes_and_a_clear_error_otherwise(tmp_path, toy):
    attrs = shapes_attributes(SHAPES_TASK.classnames)
    assert all(len(v) == 10 for v in attrs.values()) and "red colour" in attrs["red circle"]
    assert shapes_attributes(("dog", "cat")) is None
    m = FedMVP()
    with pytest.raises(FedlitError, match="attributes_dir"):
        m.phrases(Task("pets", ("dog", "cat")))
    with pytest.raises(FedlitError, match="no attribute files"):
        load_attributes(str(tmp_path / "missing"))
    (tmp_path / "pets.json").write_text('{"Dog": ["four legs", "a tail"], "cat": ["whiskers", "a tail"]}')
    m2 = FedMVP(attributes_dir=str(tmp_path))
    assert m2.phrases(Task("pets", ("dog", "cat"))) == [["four legs", "a tail"], ["whiskers", "a tail"]]
    with pytest.raises(FedlitError, match="'bird' has no entry"):
        m2.phrases(Task("pets", ("dog", "bird")))
    (tmp_path / "bad.json").write_text('{"bird": "a beak"}')
    with pytest.raises(FedlitError, match="lists of phrases"):
        load_attributes(str(tmp_path))


def test_fedmvp_prompts_come_from_the_patch_tokens_classifier_is_the_descriptor_mean_and_loss(toy):
    m = FedMVP(flip="none")
    mod = ClientModule(toy, m)
    shared, personal = mod.export()
    assert not personal and "linear.weight" in shared and "attn.in_proj_weight" in shared
    seen = {}

    def spy(patches):
        seen["shape"] = tuple(patches.shape)
        return torch.zeros(patches.shape[0], 4, patches.shape[-1])

    x, y = _images(toy, 2), torch.tensor([0, 2])
    toy.encode_image(x, visual_prompts=spy, prompt_position="append")
    grid = (toy.image_size // 4) ** 2  # fedlit-toy: 32 px, patch 4
    assert seen["shape"] == (2, grid, toy.vision_width)
    t, keys = m.prepare(mod.prompt, toy, SHAPES_TASK)
    e = m.description_features(toy, SHAPES_TASK)
    assert e.shape[:2] == (3, 10) and keys.shape[0] == 30
    torch.testing.assert_close(t, e.mean(1))
    f = F.normalize(m.image_features(mod.prompt, toy, x, keys), dim=-1)
    torch.testing.assert_close(mod(x, SHAPES_TASK), toy.logit_scale * f @ t.t())
    f_zs = F.normalize(toy.encode_image(x), dim=-1)
    expect = F.cross_entropy(toy.logit_scale * f @ t.t(), y) + 10 * (1 - (f * f_zs).sum(-1).mean())
    torch.testing.assert_close(m.loss(mod, x, y, SHAPES_TASK), expect)
    # the prompts depend on the image: zeroing the PromptFormer's output path changes the features
    with torch.no_grad():
        mod.prompt.ff[-1].weight.zero_()
        mod.prompt.ff[-1].bias.zero_()
        mod.prompt.attn.out_proj.weight.zero_()
        mod.prompt.attn.out_proj.bias.zero_()
    assert not torch.allclose(F.normalize(m.image_features(mod.prompt, toy, x, keys), dim=-1), f, atol=1e-4)


def test_fedmvp_without_attributes_fails_in_one_line_before_the_run_starts(tmp_path, capsys):
    from fedlit.cli import main

    rc = main(["fit", "--config", "configs/fedmvp.yaml", "--config", "configs/embedded.yaml",
               "--method.init_args.attributes_dir", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "run")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "attributes_dir" in err[0] and "<dataset>.json" in err[0], err
    assert not (tmp_path / "run").exists()


def test_fedsept_per_client_calibration_reproduces_the_spec_table():
    """Spec 3b §1.4: n_i 160, B 32, R 50, E 1 → q 0.2, T 250, σ 12.97; DTD's last client (32 images) → q 1, T 50."""
    m = FedSEPT()
    m.plan_rounds(FedTrainer(rounds=50, local_epochs=1, batch_size=32), [160, 32])
    p0, p1 = m.client_plan(0), m.client_plan(1)
    assert (p0["sample_rate"], p0["planned_steps"]) == (0.2, 250) and p0["sigma"] == pytest.approx(12.97, abs=0.01)
    assert (p1["sample_rate"], p1["planned_steps"]) == (1.0, 50) and p1["sigma"] == pytest.approx(28.75, abs=0.01)
    half = FedSEPT(dp_calibration="expected")
    half.plan_rounds(FedTrainer(rounds=50, local_epochs=1, batch_size=32, participation=0.5, first_round_all=False),
                     [160])
    assert half.client_plan(0)["planned_steps"] == 125
