"""Exact text-side savings (issue 15): truncation at the last EOT and the shared-prefix text path.

Reference = the plain path over the full context length (no truncation). Checked on the embedded fedlit-toy model
and on random-init small open_clip CLIP text towers (77 tokens, with and without LayerScale): features and the
gradients of every prompt parameter, for every text method, within 1e-5 (fp32).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fedlit.backbones import FrozenCLIP, load_backbone
from fedlit.errors import FedlitError
from fedlit.methods import method_class
from fedlit.prompts import Task, encode_context, handcrafted_features, prompt_template, text_cache

TASK = Task("speed", ("circle", "red_triangle", "golden retriever dog", "star", "sea lion", "bell pepper"))
SAME_HEAD = Task("same-head", ("sea lion", "sea turtle", "sea urchin"))  # class names share their first token


def _small_clip(ls: float | None) -> FrozenCLIP:
    import open_clip

    torch.manual_seed(0)
    text = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3}
    if ls is not None:
        text["ls_init_value"] = ls
    model = open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                                                     "patch_size": 8}, text_cfg=text)
    for p in model.parameters():  # random init is tame; widen it so that rounding differences would show
        p.data.add_(torch.randn_like(p) * 0.02)
    pre = {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    return FrozenCLIP(model, open_clip.get_tokenizer("ViT-B-16"), name=f"small-ls{ls}", preprocess_cfg=pre)


@pytest.fixture(scope="module", params=["fedlit-toy", "small", "small-ls"])
def clip(request):
    if request.param == "fedlit-toy":
        return load_backbone("fedlit-toy")
    return _small_clip(0.5 if request.param == "small-ls" else None)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """max |a − b| ≤ tol · max(1, max |b|): float rounding of unnormalised features scales with their size."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@contextlib.contextmanager
def _path(clip: FrozenCLIP, text_path: str, truncate: bool = True):
    saved = clip.text_path, clip.can_truncate
    clip.text_path = text_path
    clip.can_truncate = truncate and saved[1]
    try:
        yield
    finally:
        clip.text_path, clip.can_truncate = saved


# ------------------------------------------------------------------------------------------------ truncation
def test_tower_is_causal_and_shareable(clip):
    assert clip.can_truncate and clip.can_share_prefix


def test_truncated_tokens_equal_open_clip_full_pass(clip):
    texts = [f"a photo of a {c.replace('_', ' ')}." for c in TASK.classnames]
    tokens = clip.tokenize(texts)
    assert int(clip.eot_index(tokens).max()) + 1 < tokens.shape[1]  # something is cut
    with torch.no_grad():
        full = clip.encode_text(tokens)
        cut = clip.encode_tokens(tokens)
    assert _close(cut, full, 1e-6)


def test_truncated_deep_prompt_pass_equals_full(clip):
    tpl = prompt_template(clip, TASK, 4)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(4, clip.text_width, generator=g) * 0.5
    deep = [torch.randn(4, clip.text_width, generator=g) * 0.5]
    with torch.no_grad(), _path(clip, "plain", truncate=False):
        full = clip.encode_text_embeddings(tpl.splice(ctx), tpl.eot, deep_prompts=deep)
    with torch.no_grad(), _path(clip, "plain"):
        cut = clip.encode_text_embeddings(tpl.splice(ctx), tpl.eot, deep_prompts=deep)
    assert _close(cut, full, 1e-6)


def test_handcrafted_features_use_the_truncated_pass(clip):
    text_cache(clip).features.clear()
    feats = handcrafted_features(clip, TASK, "a photo of a {}, a type of object.")
    with torch.no_grad():
        ref = F.normalize(clip.encode_text(clip.tokenize(
            [f"a photo of a {c.replace('_', ' ')}, a type of object." for c in TASK.classnames])), dim=-1)
    assert (feats - ref).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------------------------ shared prefix
def test_template_common_prefix(clip):
    assert prompt_template(clip, TASK, 4).common == 5  # [SOS] + 4 context tokens
    assert prompt_template(clip, SAME_HEAD, 4).common == 6  # + the shared "sea"
    one = Task("one", ("circle",))
    tpl = prompt_template(clip, one, 4)
    assert tpl.common == int(tpl.eot[0])  # one class: everything before its EOT is shared


@pytest.mark.parametrize("task", [TASK, SAME_HEAD], ids=["mixed", "same-head"])
@pytest.mark.parametrize("n_pre", [0, 3])
def test_encode_context_shared_equals_full_plain(clip, task, n_pre):
    g = torch.Generator().manual_seed(2)
    shape = (4, clip.text_width) if n_pre == 0 else (n_pre, 4, clip.text_width)
    deep = [torch.randn(4, clip.text_width, generator=g) * 0.5, None]
    out = {}
    for key, path, trunc in (("full", "plain", False), ("plain", "plain", True), ("shared", "shared_prefix", True)):
        ctx = (torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 0.5).requires_grad_()
        dp = [d.clone().requires_grad_() if d is not None else None for d in deep]
        with _path(clip, path, trunc):
            f = encode_context(clip, prompt_template(clip, task, 4), ctx, deep_prompts=dp[:1], normalize=False)
        w = torch.randn(f.shape, generator=torch.Generator().manual_seed(4))
        (f * w).sum().backward()
        out[key] = (f.detach(), ctx.grad, dp[0].grad)
    for key in ("plain", "shared"):
        for a, b in zip(out[key], out["full"]):
            assert _close(a, b, 1e-5), key


def test_shared_prefix_refuses_a_tower_without_causal_mask():
    clip = _small_clip(None)
    clip.model.attn_mask = None
    fresh = FrozenCLIP(clip.model, clip.tokenizer, name="noncausal",
                       preprocess_cfg={"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert not fresh.can_truncate and not fresh.shares_prefix
    with pytest.raises(FedlitError, match="text_path=plain"):
        fresh.encode_text_shared(torch.zeros(1, 5, 64), torch.zeros(2, 3, 64), torch.tensor([6, 7]))
    with pytest.raises(FedlitError, match="text_path"):
        fresh.set_text_path("fast")


# ------------------------------------------------------------------------------------------------ every method
METHODS = [
    ("coop", {"n_ctx": 4}),
    ("promptfl", {"n_ctx": 16}),
    ("fedkgcoop", {"n_ctx": 4}),
    ("fedcocoop", {"n_ctx": 4}),
    ("fedotp", {"n_ctx": 4, "num_prompts": 2}),
    ("fedpgp", {"n_ctx": 8, "num_prompts": 2}),
    ("fedmaple", {"n_ctx": 2, "prompt_depth": 2}),
    ("fedvlp", {"n_ctx": 4, "prompt_depth": 2}),
    ("fedtpg", {"n_ctx": 4}),
    ("fedtpg", {"n_ctx": 4, "depth": 2}),
    ("fedtpg", {"n_ctx": 4, "depth": 2, "official_deep_offset": True}),
]


def _method_text(clip: FrozenCLIP, name: str, kwargs: dict):
    """(text output, grads of every prompt parameter) of the method's text side, fixed random prompt."""
    torch.manual_seed(5)
    method = method_class(name)(**kwargs)
    prompt = method.build(clip)
    params = [p for p in prompt.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    if name == "fedcocoop":
        img = F.normalize(torch.randn(3, clip.embed_dim, generator=torch.Generator().manual_seed(6)), dim=-1)
        out = prompt.text_features(clip, TASK, img)
    elif name == "fedotp":
        out = prompt.text_features(clip, TASK)  # [N, C, D]
    elif name == "fedpgp":
        from fedlit.methods.fedpgp import encode_contexts

        out = encode_contexts(clip, TASK, torch.cat([prompt.sigma, prompt.personal_context()]))
    else:
        out = method.text_features(prompt, clip, TASK)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((out * w).sum(), params, allow_unused=True)
    return out.detach(), [g for g in grads if g is not None]


@pytest.mark.parametrize("name,kwargs", METHODS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(METHODS)])
def test_every_text_method_shared_prefix_equals_full_plain(clip, name, kwargs):
    if name in ("fedmaple", "fedvlp") and clip.vision_width is None:
        pytest.skip("vision prompts need a ViT tower")
    with _path(clip, "plain", truncate=False):
        ref, ref_g = _method_text(clip, name, kwargs)
    for path in ("plain", "shared_prefix"):
        with _path(clip, path):
            out, grads = _method_text(clip, name, kwargs)
        assert _close(out, ref, 1e-5), path
        assert len(grads) == len(ref_g) and grads
        for g, r in zip(grads, ref_g):
            assert _close(g, r, 1e-5), path


def test_cli_backbone_text_path_option():
    from fedlit import experiment

    parser = experiment.fit_parser()
    base = ["--config", "configs/quickstart.yaml"]
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_args(base))
    assert init.backbone.text_path == "shared_prefix"
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_args([*base, "--backbone.text_path", "plain"]))
    assert init.backbone.text_path == "plain"
    with pytest.raises(FedlitError):
        experiment.parse_fit(parser, lambda: parser.parse_args([*base, "--backbone.text_path", "fast"]))
