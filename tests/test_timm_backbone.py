"""The image-only timm ViT backbone (pFedPG's ImageNet-21k ViT-B/16 family): parity with timm, VPT prompts,
weights from local files, end-to-end runs of the visual-prompt methods, a one-line error for text methods.

Tiny random-init models only (``@32``: 32×32 inputs, 2×2 patches; mostly timm's ``test_vit``: width 64, 6 blocks,
a class token, token pooling — the layout of ViT-B/16), no network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedlit.backbones import load_backbone
from fedlit.cli import main
from fedlit.errors import FedlitError

ROOT = Path(__file__).resolve().parents[1]
TINY = "timm/test_vit@32"  # 6 blocks, width 64, class token, final norm, token pooling (ViT-B/16's layout)
VIT_TI = "timm/vit_tiny_patch16_224@32"  # a real ViT family member: 12 blocks, width 192
REG = "timm/test_vit2@32"  # no class token, 1 register token, average pooling with fc_norm


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY, "none")


def _images(n=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _timm_features(bb, x):
    v = bb.model.visual
    with torch.no_grad():
        return v.forward_head(v.forward_features(x), pre_logits=True)


# ----------------------------------------------------------------------------------------------- (a) parity
@pytest.mark.parametrize("name", [TINY, VIT_TI, REG])
def test_no_prompt_features_equal_timm(name):
    bb = load_backbone(name, "none")
    x = _images()
    with torch.no_grad():
        out = bb.encode_image(x)
    ref = _timm_features(bb, x)
    assert out.shape == (3, bb.embed_dim)
    assert torch.equal(out, ref)
    tokens = bb.encode_image_tokens(x)
    assert tokens.shape == (3, 1 + 4, bb.embed_dim)  # pooled + 2×2 patches
    assert torch.equal(tokens[:, 0], ref)


def test_attributes_frozen_and_cached(tiny):
    assert tiny.is_vit and tiny.name == TINY
    assert (tiny.vision_width, tiny.embed_dim, tiny.patch_size, tiny.image_size) == (64, 64, 16, 32)
    assert tiny.mean == (0.5, 0.5, 0.5) and tiny.std == (0.5, 0.5, 0.5)  # timm's augreg cfg, not CLIP's
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.model.visual.training
    assert load_backbone(TINY, "none") is tiny  # once per process
    from fedlit.methods.vpt import patch_size_of, vpt_init_bound

    assert patch_size_of(tiny) == 16
    assert vpt_init_bound(16, 768) == pytest.approx(0.0625)


def test_random_init_is_deterministic(tiny):
    from fedlit.backbones.timm_vit import load_timm_backbone

    other = load_timm_backbone(TINY, "none")  # uncached: a second build from seed 0
    assert other is not tiny
    for (k, a), (_, b) in zip(tiny.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_normalize_images_uses_timm_mean_std_and_size(tiny):
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(tiny.normalize_images(x), (x - 0.5) / 0.5)
    big = torch.full((2, 3, 64, 64), 0.75)  # resized to the model's 32 px; a constant image stays constant
    out = tiny.normalize_images(big)
    assert out.shape == (2, 3, 32, 32) and torch.allclose(out, torch.full_like(out, 0.5), atol=1e-6)


# ----------------------------------------------------------------------------------------------- (b) prompts
def test_shallow_prompts_change_output_and_only_prompts_get_gradients(tiny):
    x = _images()
    base = tiny.encode_image(x).detach()
    prompt = torch.nn.Parameter(torch.empty(4, tiny.vision_width).uniform_(-0.0625, 0.0625))
    out = tiny.encode_image(x, visual_prompts=prompt)
    assert out.shape == base.shape and (out - base).abs().max() > 1e-3
    out.pow(2).sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_prompts_sit_after_cls_without_position_embedding(tiny):
    """Prompts carry no position embedding and attention ignores token order, so the pooled CLS token is the same
    whether they follow CLS or the patches, and for any order of the prompt rows; a prompt *before* CLS (or one
    that were pooled) would break this."""
    x, p = _images(2), torch.randn(3, tiny.vision_width) * 0.1
    with torch.no_grad():
        after = tiny.encode_image(x, visual_prompts=p, prompt_position="after_cls")
        append = tiny.encode_image(x, visual_prompts=p, prompt_position="append")
        flipped = tiny.encode_image(x, visual_prompts=p.flip(0))
    assert torch.allclose(after, append, atol=1e-5) and torch.allclose(after, flipped, atol=1e-5)
    # per-sample prompts [B, n, W] equal a shared [n, W] prompt expanded
    with torch.no_grad():
        batched = tiny.encode_image(x, visual_prompts=p.expand(2, -1, -1))
    assert torch.equal(batched, after)
    with pytest.raises(ValueError, match="after_cls"):
        tiny.encode_image(x, visual_prompts=p, prompt_position="front")


def test_deep_prompts(tiny):
    x, p = _images(2), torch.randn(2, tiny.vision_width) * 0.1
    with torch.no_grad():
        shallow = tiny.encode_image(x, visual_prompts=p)
        skipped = tiny.encode_image(x, visual_prompts=p, deep_visual_prompts=[None, None])
    assert torch.equal(shallow, skipped)
    deep = [torch.nn.Parameter(torch.randn(2, tiny.vision_width) * 0.1) for _ in range(5)]
    out = tiny.encode_image(x, visual_prompts=p, deep_visual_prompts=deep)
    assert (out - shallow).abs().max() > 1e-4
    out.pow(2).sum().backward()  # (a plain sum of a LayerNorm output with unit weight has zero gradient)
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in deep)
    with pytest.raises(ValueError, match="exceed"):
        tiny.encode_image(x, visual_prompts=p, deep_visual_prompts=deep + [deep[0]])
    with pytest.raises(ValueError, match="need visual_prompts"):
        tiny.encode_image(x, deep_visual_prompts=deep[:1])


# ----------------------------------------------------------------------------------------------- text: absent
@pytest.mark.parametrize("attr", ["encode_text", "tokenize", "token_embedding", "logit_scale", "text_width",
                                  "eot_index", "encode_text_embeddings", "context_length"])
def test_text_attributes_raise(tiny, attr):
    with pytest.raises(FedlitError, match="has no text tower; use a CLIP backbone"):
        getattr(tiny, attr)


def test_text_parts_of_model_raise(tiny):
    with pytest.raises(FedlitError, match="no text tower"):
        tiny.model.transformer  # noqa: B018 - what fedlit.prompts.check_prompt_depth reads
    from fedlit.features import tower_digest

    assert len(tower_digest(tiny)) == 32  # the feature cache hashes model.visual


# ----------------------------------------------------------------------------------------------- (e) weights
def _foreign_vit(seed: int, **kw):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, img_size=32, **kw).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_local_weights_round_trip(tmp_path, tiny, suffix):
    vit = _foreign_vit(1, num_classes=10)  # a checkpoint with a classifier head: the head is dropped on load
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    bb = load_backbone(TINY, str(path))
    x = _images()
    with torch.no_grad():
        ref = vit.forward_head(vit.forward_features(x), pre_logits=True)
        out = bb.encode_image(x)
    assert torch.equal(out, ref)
    assert not torch.allclose(out, tiny.encode_image(x).detach())  # really not the seed-0 init


def test_bad_weights_and_names(tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"blocks.0.norm1.weight": torch.ones(7)}, str(wrong))
    with pytest.raises(FedlitError, match="does not fit backbone"):
        load_backbone(TINY, str(wrong))
    with pytest.raises(FedlitError, match="not an existing file"):
        load_backbone(TINY, str(tmp_path / "missing.safetensors"))
    with pytest.raises(FedlitError, match="did you mean 'timm/vit_tiny_patch16_224'"):
        load_backbone("timm/vit_tiyn_patch16_224@32", "none")
    with pytest.raises(FedlitError, match="input size"):
        load_backbone("timm/test_vit@big", "none")
    with pytest.raises(FedlitError, match="not a VisionTransformer"):
        load_backbone("timm/resnet18", "none")


def test_default_weights_offline_fail_fast(monkeypatch, tmp_path, no_network):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # even "online": the connect probe fails at once
    t = time.monotonic()
    with pytest.raises(FedlitError, match=r"backbone.pretrained /path/to/weights.safetensors"):
        load_backbone("timm/test_vit.r160_in1k@32", "default")
    assert time.monotonic() - t < 10


# ----------------------------------------------------------------------------------------------- (c)(d) CLI
def _fit(tmp_path, method: str, *extra: str) -> tuple[int, Path]:
    out = tmp_path / method
    rc = main(["fit", "--config", str(ROOT / "configs" / f"{method}.yaml"),
               "--config", str(ROOT / "configs" / "embedded.yaml"),
               "--backbone.name", TINY, "--backbone.pretrained", "none",
               "--trainer.rounds", "1", "--data.num_clients", "2", "--data.shots", "1", "--data.subsample", "all",
               "--data.dataset_args", '{"test_per_class": 1, "train_per_class": 2}', "--trainer.batch_size", "16",
               "--out_dir", str(out), *extra])
    return rc, out


@pytest.mark.parametrize("method", ["pfedpg", "fedvpt"])
def test_visual_prompt_methods_run_on_timm_backbone(tmp_path, method):
    rc, out = _fit(tmp_path, method)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == method and len(res["per_client"]) == 2
    assert set(res["final"]) >= {"local", "base"}
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in res["final"].values())
    assert TINY in (out / "config.yaml").read_text()


@pytest.mark.parametrize("method", ["promptfl", "zeroshot"])
def test_text_method_on_timm_backbone_is_one_line_error(tmp_path, capsys, method):
    rc, out = _fit(tmp_path, method)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and "text tower" in err[0] and err[0].startswith("error:")
    assert not out.exists()  # failed while building the method, before any run directory or training
