"""FedLoCoOp and FedGalLoP (the FOCoOp repository's LoCoOp / GalLoP baselines, spec 3b §2.9): LoCoOp's entropy
regulariser, GalLoP's top-k local logits and prompt dropout on hand-made tensors, shared vs personal keys, batch
weights, the evaluation outputs. The 2-round runs on the embedded default are in ``test_all_methods.py`` (configs
picked up), the RN50-toy runs in ``test_resnet.py``, the OOD protocol in ``test_ood.py``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedlit.client import ClientModule
from fedlit.errors import FedlitError
from fedlit.methods import method_class
from fedlit.methods.base import Update
from fedlit.methods.fedgallop import FedGalLoP, keep_count, prompt_dropout, template_context, topk_reduce
from fedlit.methods.fedlocoop import FedLoCoOp, ood_entropy
from fedlit.methods.roles import FOCOOP_REPO
from fedlit.prompts import Task
from fedlit.trainer import FedTrainer

TASK = Task("tiny", ("circle", "square", "red_triangle", "star"))


def _entropy(p):  # the official −Σ p log(p + 1e-5), by hand
    return -sum(q * math.log(q + 1e-5) for q in p)


def _tokens(clip, b: int = 3, m: int = 6, seed: int = 0):
    return torch.randn(b, 1 + m, clip.embed_dim, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ FedLoCoOp
def test_locoop_entropy_selects_the_patches_whose_top_k_miss_the_label():
    rows = [[0.4, 0.3, 0.2, 0.1],   # label 0, top-2 {0, 1}: holds the label → not selected
            [0.1, 0.2, 0.3, 0.4],   # label 0, top-2 {3, 2}: selected
            [0.5, 0.1, 0.1, 0.3],   # label 1, top-2 {0, 3}: selected
            [0.1, 0.6, 0.2, 0.1]]   # label 1, top-2 {1, 2}: not selected
    logits = torch.tensor(rows).log() + 3.0  # any shift: softmax(log p + c) = p
    labels = torch.tensor([0, 0, 1, 1])
    h = ood_entropy(logits, labels, top_k=2)
    assert float(h) == pytest.approx((_entropy(rows[1]) + _entropy(rows[2])) / 2, rel=1e-5)
    # top-1: row 0 (argmax 0 = label) out, row 3 (argmax 1 = label) out, the same two rows in
    assert float(ood_entropy(logits, labels, top_k=1)) == pytest.approx(float(h), rel=1e-6)
    # row 1 with top-3 {3, 2, 1}: still selected
    assert float(ood_entropy(logits[1:2], labels[1:2], top_k=3)) == pytest.approx(_entropy(rows[1]), rel=1e-5)
    assert float(ood_entropy(logits[1:2], labels[1:2], top_k=4)) == 0.0  # K ≥ C: every top-K holds the label
    none = logits[[0, 3]].clone().requires_grad_(True)
    out = ood_entropy(none, labels[[0, 3]], top_k=2)
    out.backward()
    assert float(out.detach()) == 0.0 and torch.equal(none.grad, torch.zeros_like(none))


def test_locoop_loss_is_ce_on_the_pooled_token_minus_lambda_entropy_of_the_patches(toy):
    m = FedLoCoOp(n_ctx=2)
    m.setup_federation(TASK, 2)
    mod = ClientModule(toy, m)
    x, y = _tokens(toy), torch.tensor([0, 2, 3])
    t = m.text_features(mod.prompt, toy, TASK)
    z = toy.logit_scale * F.normalize(x, dim=-1) @ t.t()
    torch.testing.assert_close(mod(x, TASK), z[:, 0])  # evaluation: the global logits only
    assert float(ood_entropy(z[:, 1:].reshape(-1, 4), y.repeat_interleave(6), 5).detach()) == 0.0  # K = 5 ≥ C = 4
    m1 = FedLoCoOp(n_ctx=2, top_k=1)
    m1.setup_federation(TASK, 2)
    h1 = ood_entropy(z[:, 1:].reshape(-1, 4), y.repeat_interleave(6), 1)
    assert float(h1.detach()) > 0
    with torch.no_grad():
        mod1 = ClientModule(toy, m1)
        mod1.prompt.ctx.copy_(mod.prompt.ctx)
        got = m1.loss(mod1, x, y, TASK)
    torch.testing.assert_close(got, F.cross_entropy(z[:, 0], y) - 0.1 * h1)
    m0 = FedLoCoOp(n_ctx=2, lambda_local=0.0)
    m0.setup_federation(TASK, 2)
    with torch.no_grad():
        mod0 = ClientModule(toy, m0)
        mod0.prompt.ctx.copy_(mod.prompt.ctx)
        torch.testing.assert_close(m0.loss(mod0, x, y, TASK), F.cross_entropy(z[:, 0], y))


def test_locoop_ctx_class_specific_by_default_shared_and_the_generic_option(toy):
    m = FedLoCoOp(n_ctx=3)
    m.setup_federation(TASK, 2)
    mod = ClientModule(toy, m)
    shared, personal = mod.export()
    assert set(shared) == {"ctx"} and personal == {}
    assert shared["ctx"].shape == (4, 3, toy.text_width)  # the official prompt learner: class-specific
    novel = Task("n", ("square", "hexagon"))
    ctx = m.contexts(mod.prompt, novel)
    torch.testing.assert_close(ctx[0], mod.prompt.ctx[1])
    torch.testing.assert_close(ctx[1], mod.prompt.ctx.mean(0))
    assert m.text_features(mod.prompt, toy, novel).shape == (2, toy.embed_dim)
    g = FedLoCoOp(n_ctx=3, class_specific=False)
    g.setup_federation(TASK, 2)
    assert ClientModule(toy, g).export()[0]["ctx"].shape == (3, toy.text_width)  # LoCoOp's generic context
    assert FedLoCoOp.policy == FOCOOP_REPO and FOCOOP_REPO.optimizer_state == "per_client"
    assert m.momentum == 0.9 and m.weight_decay == 5e-4 and m.lr == 0.001 and m.image_input == "value_tokens"
    assert FedLoCoOp(local_features="output").image_input == "tokens"


@pytest.mark.parametrize("name", ["fedlocoop", "fedgallop"])
def test_aggregation_weighted_by_training_batches_or_samples(name):
    m = method_class(name)()
    m.plan_rounds(FedTrainer(batch_size=8), [9, 40])  # 2 batches (the last of one image counts) and 5
    key = "ctx" if name == "fedlocoop" else "global_prompt"
    ups = [Update(0, {key: torch.zeros(2)}, {}, 9, 0.0), Update(1, {key: torch.full((2,), 7.0)}, {}, 40, 0.0)]
    torch.testing.assert_close(m.aggregate(ups, {})[key], torch.full((2,), 5.0))  # 7 · 5/7, not 7 · 40/49
    s = method_class(name)(weights="samples")
    s.plan_rounds(FedTrainer(batch_size=8), [9, 40])
    torch.testing.assert_close(s.aggregate(ups, {})[key], torch.full((2,), 7.0 * 40 / 49))


# ------------------------------------------------------------------------------------------------ FedGalLoP
def test_gallop_topk_local_logits_by_hand():
    local = torch.tensor([[0.1, 0.2], [0.9, 0.4], [0.5, 0.8], [0.3, 0.6]]).view(1, 4, 1, 2)  # [B, M=4, C=1, L=2]
    out = topk_reduce(local, [1, 3])
    torch.testing.assert_close(out, torch.tensor([[[0.9, (0.8 + 0.6 + 0.4) / 3]]]))
    torch.testing.assert_close(topk_reduce(local, [2]), torch.tensor([[[0.7, 0.7]]]))  # one k for every prompt
    torch.testing.assert_close(topk_reduce(local, [5, 20]), local.mean(1))  # k capped at the 4 patches
    with pytest.raises(FedlitError, match="one k per prompt"):
        topk_reduce(local, [1, 2, 3])


def test_gallop_prompt_dropout_keeps_max_1_n_minus_floor_pn_prompts_per_image():
    assert [keep_count(n, 0.9) for n in (1, 2, 4, 10, 11, 20)] == [1, 1, 1, 1, 2, 2]
    assert keep_count(10, 0.5) == 5 and keep_count(3, 0.0) == 3 and keep_count(3, 1.0) == 1
    glob = torch.tensor([1.0, 10.0, 100.0, 1000.0]).repeat(5, 3, 1) * torch.arange(1, 4.0).view(1, 3, 1)
    out = prompt_dropout(glob, 0.5, torch.Generator().manual_seed(0))  # G = 4 → keep 2, with replacement
    pairs = {(a + b) / 2 for a in (1.0, 10.0, 100.0, 1000.0) for b in (1.0, 10.0, 100.0, 1000.0)}
    for row in out:
        assert float(row[0]) in pairs
        torch.testing.assert_close(row, row[0] * torch.arange(1, 4.0))  # the same draw for every class
    one = torch.randn(2, 3, 1)
    assert torch.equal(prompt_dropout(one, 0.9), one[..., 0])


def test_gallop_keys_init_from_the_template_and_identity_projection(toy):
    m = FedGalLoP()
    mod = ClientModule(toy, m)
    shared, personal = mod.export()
    assert set(shared) == {"global_prompt"} and set(personal) == {"local_prompts", "local_proj.weight"}
    assert template_context("A photo of a {}") == "A photo of a"
    tokens = toy.tokenize(["A photo of a"])
    n = int(toy.eot_index(tokens)[0]) - 1
    assert m.n_ctx == n == 4
    init = toy.token_embedding(tokens)[0, 1:1 + n].float()
    assert shared["global_prompt"].shape == (1, 4, toy.text_width)
    torch.testing.assert_close(shared["global_prompt"][0], init)
    torch.testing.assert_close(personal["local_prompts"], init.expand(4, -1, -1))
    torch.testing.assert_close(personal["local_proj.weight"], torch.eye(toy.embed_dim))
    assert FedGalLoP.policy == FOCOOP_REPO and m.image_input == "value_tokens" and m.lockstep
    assert FedGalLoP(local_features="output").image_input == "tokens"
    assert not FedGalLoP(num_global=3).lockstep


def test_gallop_loss_and_the_three_evaluation_outputs(toy):
    m = FedGalLoP(top_k=[1, 2, 3, 4])
    mod = ClientModule(toy, m)
    with torch.no_grad():
        mod.prompt.local_proj.weight.add_(0.1 * torch.randn(toy.embed_dim, toy.embed_dim,
                                                            generator=torch.Generator().manual_seed(3)))
        mod.prompt.local_prompts.add_(0.05 * torch.randn(mod.prompt.local_prompts.shape,
                                                         generator=torch.Generator().manual_seed(4)))
    x, y = _tokens(toy, b=3, m=5), torch.tensor([1, 0, 3])
    tg, tl = m.prepare(mod.prompt, toy, TASK)
    assert tg.shape == (1, 4, toy.embed_dim) and tl.shape == (4, 4, toy.embed_dim)
    f = F.normalize(x[:, 0], dim=-1)
    loc = F.normalize(x[:, 1:] @ mod.prompt.local_proj.weight.t(), dim=-1)
    g = f @ tg[0].t()  # [B, C]
    locs = [(loc @ tl[i].t()).topk(k, dim=1).values.mean(1) for i, k in enumerate([1, 2, 3, 4])]  # L × [B, C]
    s = toy.logit_scale
    want = F.cross_entropy(s * g, y) + sum(F.cross_entropy(s * li, y) for li in locs) / 4
    with torch.no_grad():
        torch.testing.assert_close(m.loss(mod, x, y, TASK), want)
        gl = s * (g + sum(locs) / 4) / 2
        probs = mod(x, TASK)
        torch.testing.assert_close(probs, gl.softmax(-1))  # official: the probabilities of global + local
        m.eval_output = "logits"
        torch.testing.assert_close(mod(x, TASK), gl)
        m.eval_output = "global"
        torch.testing.assert_close(mod(x, TASK), s * g)


def test_gallop_refuses_bad_settings_in_one_line():
    for kw, word in (({"top_k": [5, 10]}, "top_k"), ({"global_dropout": 1.5}, "global_dropout"),
                     ({"eval_output": "mix"}, "eval_output"), ({"ctx_init": "{}"}, "ctx_init"),
                     ({"weights": "uniform"}, "weights")):
        with pytest.raises(FedlitError, match=word) as err:
            FedGalLoP(**kw)
        assert "\n" not in str(err.value)
    with pytest.raises(FedlitError, match="lambda_local"):
        FedLoCoOp(lambda_local=-1.0)
    with pytest.raises(FedlitError, match="local_features"):
        FedLoCoOp(local_features="attention")


# ------------------------------------------------------------------------------------------------ value-path features
def test_value_tokens_are_the_output_tokens_of_a_last_block_that_attends_only_to_itself(toy):
    """With the last block's attention replaced by each token attending to itself alone (output = out_proj(v)),
    the block's output is the value path: the value tokens must then equal the ordinary output tokens."""
    import copy

    from fedlit.backbones import FrozenCLIP

    g = torch.Generator().manual_seed(1)
    x = toy.normalize_images(torch.rand(2, 3, toy.image_size, toy.image_size, generator=g))
    with torch.no_grad():
        vt = toy.encode_image_value_tokens(x)
        torch.testing.assert_close(vt[:, 0], toy.encode_image(x))  # token 0: the pooled feature
        model = copy.deepcopy(toy.model)
        last = model.visual.transformer.resblocks[-1]
        attn, w = last.attn, last.attn.embed_dim
        last.attention = lambda q_x, k_x=None, v_x=None, attn_mask=None: attn.out_proj(
            F.linear(q_x, attn.in_proj_weight[2 * w:], attn.in_proj_bias[2 * w:]))
        twin = FrozenCLIP(model, toy.tokenizer, toy.name)
        torch.testing.assert_close(vt[:, 1:], twin.encode_image_tokens(x)[:, 1:], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(vt[:, 1:], toy.encode_image_tokens(x)[:, 1:], atol=1e-3)  # real attention differs


def test_value_tokens_on_a_resnet_tower_and_through_the_feature_bank(toy):
    from fedlit.backbones import load_backbone
    from fedlit.data.registry import get_dataset
    from fedlit.features import FeatureBank

    rn = load_backbone("fedlit-toy-rn", pretrained="none")
    x = rn.normalize_images(torch.rand(2, 3, rn.image_size, rn.image_size, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        vt = rn.encode_image_value_tokens(x)
        torch.testing.assert_close(vt[:, 0], rn.encode_image(x))
        v = rn.model.visual
        feat = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # [B, C, h, w]
        ap = v.attnpool
        ref = ap.c_proj(ap.v_proj(feat[:, :, 0, 1]))  # position (0, 1) = patch 1 (row-major)
        torch.testing.assert_close(vt[:, 2], ref)
    data = get_dataset("shapes-dark", seed=0, train_per_class=2, val_per_class=1, test_per_class=1)
    rows = [0, 3, 5]
    got = FeatureBank(toy, {"train": data.train}, kind="value_tokens").features("train", rows)
    with torch.no_grad():
        plain = toy.encode_image_value_tokens(toy.normalize_images(data.train.images(torch.tensor(rows).numpy())))
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-5)


def test_training_batches_and_the_batch_weighted_server_by_hand():
    from types import SimpleNamespace

    from fedlit.methods.roles import BatchWeightedFedAvg, FedAvg, batch_weighted, training_batches
    from fedlit.trainer import FedTrainer

    method = SimpleNamespace(default_drop_last="never")
    t = FedTrainer(batch_size=4, drop_last="never")
    # 9 samples: batches of 4, 4, 1 -> 3 (len(loader)); FOCoOp skips the batch of one -> 2; 1 sample -> at least 1
    assert training_batches(t, method, [9, 8, 1]) == (3, 2, 1)
    assert training_batches(t, method, [9, 8, 1], min_size=2) == (2, 2, 1)
    ups = [SimpleNamespace(cid=0, shared={"w": torch.tensor([0.0])}, num_samples=9),
           SimpleNamespace(cid=1, shared={"w": torch.tensor([3.0])}, num_samples=1)]
    server = batch_weighted((3, 1), "batches")
    assert isinstance(server, BatchWeightedFedAvg)
    assert server.aggregate(ups, {})["w"].item() == pytest.approx(3.0 * 1 / 4)  # (3·0 + 1·3) / 4
    assert isinstance(batch_weighted((), "batches"), FedAvg) and isinstance(batch_weighted((3, 1), "samples"), FedAvg)
    assert batch_weighted((3, 1), "samples").aggregate(ups, {})["w"].item() == pytest.approx(0.3)  # (9·0 + 1·3) / 10
