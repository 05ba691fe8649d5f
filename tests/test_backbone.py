"""fedlit.backbones: prompt-injection paths equal open_clip's own forward; errors; frozen; offline.

All models are random-init (``pretrained="none"``) or local files; a fixture blocks socket connects.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time

import pytest
import torch

from fedlit.backbones import FrozenCLIP, list_backbones, load_backbone
from fedlit.errors import FedlitError

ARCHS = ["fedlit-toy", "ViT-B-16"]
CLASSES = ["dog", "sea lion", "wine_glass", "airplane", "bald_eagle"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (pytest-timeout may be absent)."""

    def boom(*_):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module", params=ARCHS)
def bb(request) -> FrozenCLIP:
    """Both architectures: only for the parity tests (ViT-B-16 is slow on 2 CPU cores)."""
    return load_backbone(request.param, pretrained="none")


@pytest.fixture(scope="module")
def toy() -> FrozenCLIP:
    return load_backbone("fedlit-toy", pretrained="none")


def _images(bb: FrozenCLIP, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return bb.normalize_images(torch.rand(n, 3, bb.image_size, bb.image_size, generator=g))


def _coop_inputs(bb: FrozenCLIP):
    """CoOp prompt "X X X X {class}." with positions 1..4 replaced by the embeddings of "a photo of a"."""
    names = [c.replace("_", " ") for c in CLASSES]
    tokens = bb.tokenize([f"X X X X {c}." for c in names])
    ctx = bb.token_embedding(bb.tokenize(["a photo of a"]))[0, 1:5]  # [4, W]
    emb = bb.token_embedding(tokens)
    emb = torch.cat([emb[:, :1], ctx.expand(len(names), -1, -1), emb[:, 5:]], dim=1)
    reference = bb.tokenize([f"a photo of a {c}." for c in names])
    return emb, bb.eot_index(tokens), ctx, reference


# ---------------------------------------------------------------------------------------------------- parity
def test_text_parity_with_open_clip(bb):
    emb, eot, _, reference = _coop_inputs(bb)
    with torch.no_grad():
        ours = bb.encode_text_embeddings(emb, eot)
        theirs = bb.model.encode_text(reference)
    assert ours.shape == (len(CLASSES), bb.embed_dim)
    diff = (ours - theirs).abs().max().item()
    print(f"{bb.name}: text max abs diff {diff:.3g}")
    assert diff <= 1e-5
    assert torch.equal(bb.encode_text(reference), theirs)
    # a multi-token class pools at a later EOT position than a one-token class
    assert eot[1] > eot[0] and eot[2] > eot[0]


def test_image_parity_and_tokens(bb):
    x = _images(bb)
    with torch.no_grad():
        ours = bb.encode_image(x)
        theirs = bb.model.encode_image(x)
        tokens = bb.encode_image_tokens(x)
        no_deep = bb.encode_image(x, deep_visual_prompts=[])
    diff = (ours - theirs).abs().max().item()
    print(f"{bb.name}: image max abs diff {diff:.3g}")
    assert ours.shape == (2, bb.embed_dim) and diff <= 1e-5
    n_patches = (bb.image_size // bb.model.visual.patch_size[0]) ** 2
    assert tokens.shape == (2, 1 + n_patches, bb.embed_dim)
    assert (tokens[:, 0] - ours).abs().max().item() <= 1e-5
    assert torch.equal(no_deep, ours)


@pytest.mark.parametrize("position", ["after_cls", "append"])
def test_visual_prompts(toy, position):
    bb = toy
    x = _images(bb)
    g = torch.Generator().manual_seed(1)
    p = torch.randn(3, bb.vision_width, generator=g) * 0.5
    with torch.no_grad():
        plain = bb.encode_image(x)
        shallow = bb.encode_image(x, visual_prompts=p, prompt_position=position)
        per_image = bb.encode_image(x, visual_prompts=p.expand(2, -1, -1), prompt_position=position)
        deep = bb.encode_image(x, visual_prompts=p, deep_visual_prompts=[p * 2], prompt_position=position)
        empty_deep = bb.encode_image(x, visual_prompts=p, deep_visual_prompts=[], prompt_position=position)
        tokens = bb.encode_image_tokens(x, visual_prompts=p, prompt_position=position)
    assert shallow.shape == plain.shape == deep.shape
    assert (shallow - plain).abs().max() > 1e-4
    assert (deep - shallow).abs().max() > 1e-4
    assert torch.allclose(per_image, shallow, atol=1e-5)
    assert torch.equal(empty_deep, shallow)
    assert tokens.shape[1] == bb.encode_image_tokens(x).shape[1]  # prompt tokens are dropped
    assert (tokens[:, 0] - shallow).abs().max().item() <= 1e-5


def test_deep_text_prompts_and_gradients(toy):
    bb = toy
    emb, eot, ctx, _ = _coop_inputs(bb)
    n_cls = emb.shape[0]
    shallow = ctx.clone().requires_grad_(True)
    deep = [torch.randn(4, bb.text_width) * 0.1 for _ in range(len(bb.model.transformer.resblocks) - 1)]
    deep = [d.requires_grad_(True) for d in deep]
    full = torch.cat([emb[:, :1], shallow.expand(n_cls, -1, -1), emb[:, 5:]], dim=1)
    out_deep = bb.encode_text_embeddings(full, eot, deep_prompts=deep)
    with torch.no_grad():
        out_plain = bb.encode_text_embeddings(full, eot)
        out_empty = bb.encode_text_embeddings(full, eot, deep_prompts=[])
    assert (out_deep - out_plain).abs().max() > 1e-4
    assert torch.equal(out_empty, out_plain)
    out_deep.square().sum().backward()
    assert shallow.grad is not None and shallow.grad.abs().sum() > 0
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in deep)
    assert all(p.grad is None for p in bb.parameters())
    # visual prompts get gradients too, the backbone none
    vp = torch.zeros(2, bb.vision_width, requires_grad=True)
    bb.encode_image(_images(bb), visual_prompts=vp).sum().backward()
    assert vp.grad is not None and vp.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())
    with pytest.raises(ValueError):  # more deep prompts than blocks after the first
        bb.encode_text_embeddings(full, eot, deep_prompts=[ctx] * len(bb.model.transformer.resblocks))


def test_autocast_bf16(toy):
    bb = toy
    emb, eot, _, reference = _coop_inputs(bb)
    x = _images(bb)
    p = torch.zeros(2, bb.vision_width, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = bb.encode_text_embeddings(emb, eot, deep_prompts=[emb[0, 1:5]])
        i = bb.encode_image(x, visual_prompts=p, deep_visual_prompts=[p])
        k = bb.encode_image_tokens(x)
    assert torch.isfinite(t.float()).all() and torch.isfinite(i.float()).all() and torch.isfinite(k.float()).all()
    i.float().sum().backward()
    assert p.grad is not None


# ---------------------------------------------------------------------------------------------------- frozen
def test_frozen_and_attributes(toy):
    bb = toy
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not bb.model.training
    assert bb.logit_scale.dtype == torch.float32 and bb.logit_scale.ndim == 0
    assert bb.tokenize(["a"]).shape == (1, bb.context_length)
    assert bb.token_embedding(bb.tokenize(["a"])).shape == (1, bb.context_length, bb.text_width)
    assert len(bb.mean) == len(bb.std) == 3
    assert load_backbone(bb.name, pretrained="none") is bb  # one instance per process


def test_normalize_and_transforms():
    bb = load_backbone("fedlit-toy", pretrained="none")
    x = torch.rand(2, 3, 48, 40)
    y = bb.normalize_images(x)
    assert y.shape == (2, 3, 32, 32)
    same = torch.rand(1, 3, 32, 32)
    mean = torch.tensor(bb.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.std).view(1, 3, 1, 1)
    assert torch.allclose(bb.normalize_images(same), (same - mean) / std)
    from PIL import Image

    img = Image.new("L", (50, 40), color=128)
    assert bb.test_transform()(img).shape == (3, 32, 32)
    assert bb.train_transform()(img).shape == (3, 32, 32)


def test_random_init_is_deterministic():
    import fedlit.backbones as backbones

    a = load_backbone("fedlit-toy", pretrained=None)
    backbones._CACHE.pop(("fedlit-toy", None, "cpu", "fp32"))
    b = load_backbone("fedlit-toy", pretrained="none")
    assert a is not b
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------------------------------------- errors
def test_unknown_backbone_lists_valid_names():
    with pytest.raises(FedlitError) as e:
        load_backbone("ViT-B-61", pretrained="none")
    msg = str(e.value)
    assert "unknown backbone 'ViT-B-61'" in msg and "did you mean 'ViT-B-16'" in msg and "fedlit backbones" in msg
    assert "fedlit-toy" in list_backbones() and "RN50" in list_backbones()


def test_alias_and_bad_pretrained():
    assert load_backbone("ViT-B/16", pretrained="none").name == "ViT-B-16"
    with pytest.raises(FedlitError, match="neither an existing file nor an open_clip tag"):
        load_backbone("fedlit-toy", pretrained="/no/such/file.safetensors")


def test_toy_default_weights_missing_or_present():
    import fedlit.backbones as backbones

    if backbones.TOY_WEIGHTS.is_file():
        bb = load_backbone("fedlit-toy")
        assert not any(p.requires_grad for p in bb.parameters())
    else:
        with pytest.raises(FedlitError, match="fedlit pretrain-toy"):
            load_backbone("fedlit-toy")


def test_tag_download_without_network_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    start = time.monotonic()
    with deadline(30), pytest.raises(FedlitError) as e:
        load_backbone("ViT-B-16", pretrained="laion2b_s34b_b88k")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("could not download 'laion2b_s34b_b88k' weights for ViT-B-16 (no network?); download them "
                   "elsewhere and pass `backbone.pretrained=/path/to/file`")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    from safetensors.torch import save_file

    import fedlit.backbones as backbones

    src = load_backbone("fedlit-toy", pretrained="none")
    with torch.no_grad():  # make the weights differ from the seed-0 random init
        src_sd = {k: v.clone() + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone()
                  for k, v in src.model.state_dict().items()}
    path = tmp_path / f"toy{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.half().contiguous() for k, v in src_sd.items()}, str(path))  # fp16, like the bundle
        expected = {k: v.half().float() for k, v in src_sd.items()}
    else:
        torch.save({"state_dict": src_sd}, path)
        expected = src_sd
    bb = load_backbone("fedlit-toy", pretrained=str(path))
    assert bb is not src and not any(p.requires_grad for p in bb.parameters())
    got = bb.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    emb, eot, _, reference = _coop_inputs(bb)
    x = _images(bb)
    with torch.no_grad():
        assert (bb.encode_text_embeddings(emb, eot) - bb.model.encode_text(reference)).abs().max() <= 1e-5
        assert (bb.encode_image(x) - src.encode_image(x)).abs().max() > 1e-4  # really other weights
    backbones._CACHE.pop(("fedlit-toy", str(path), "cpu", "fp32"))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive(tmp_path):
    """OpenAI-style TorchScript archives load via torch.jit.load (no pickles) and switch QuickGELU on."""
    import open_clip

    import fedlit.backbones as backbones

    src = load_backbone("fedlit-toy", pretrained="none")
    path = tmp_path / "toy-jit.pt"
    try:
        torch.jit.save(torch.jit.script(src.model), str(path))
    except Exception as e:  # TorchScript is deprecated; a future torch may not script open_clip any more
        pytest.skip(f"cannot script the toy model here: {e}")
    bb = load_backbone("fedlit-toy", pretrained=str(path))
    assert isinstance(bb.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert all(torch.equal(a, b) for a, b in zip(bb.model.state_dict().values(), src.model.state_dict().values()))
    backbones._CACHE.pop(("fedlit-toy", str(path), "cpu", "fp32"))


def test_garbage_checkpoint(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(FedlitError, match="could not read checkpoint"):
        load_backbone("fedlit-toy", pretrained=str(path))


@pytest.mark.slow
def test_resnet_tower():
    """RN50: plain encode_image, per-position attention-pool tokens (FedOTP), prompts refused."""
    bb = load_backbone("RN50", pretrained="none")
    x = _images(bb, n=1)
    with torch.no_grad():
        ours, theirs, tokens = bb.encode_image(x), bb.model.encode_image(x), bb.encode_image_tokens(x)
    assert torch.equal(ours, theirs)
    assert tokens.shape == (1, 1 + 7 * 7, bb.embed_dim)
    assert (tokens[:, 0] - ours).abs().max().item() <= 1e-5
    with pytest.raises(FedlitError, match="ViT tower"):
        bb.encode_image(x, visual_prompts=torch.zeros(2, 64))
