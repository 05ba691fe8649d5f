"""ModifiedResNet (RN50-style) image towers: every text-prompt method trains on one, FedOTP's local features are the
attention pool with every position as a query, the feature cache works with BatchNorm frozen, and methods that put
prompts or adapters inside the image tower refuse it with one line naming the fix.

The tower is ``fedlit-toy-rn`` (``fedlit/backbones/fedlit-toy-rn.json``: layers [1, 1, 1, 1], width 8, 64 px, 2-layer
text tower): the same open_clip ``ModifiedResNet`` / ``AttentionPool2d`` code as RN50, in seconds on a CPU. Its
weights are random, with non-trivial BatchNorm statistics written into a local checkpoint, so that a BatchNorm left
in training mode would change the features (and the statistics). The full RN50 runs once, marked slow.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlit.backbones import FrozenCLIP, load_backbone
from fedlit.cli import main
from fedlit.client import ClientModule
from fedlit.data.registry import get_dataset
from fedlit.errors import FedlitError
from fedlit.features import FeatureBank, tower_digest
from fedlit.methods import list_methods
from fedlit.methods.promptfl import PromptFL
from fedlit.prompts import Task

ROOT = Path(__file__).resolve().parents[1]
RN = "fedlit-toy-rn"
#: methods that only prompt the text side (or nothing): they must run on a ResNet tower
TEXT_METHODS = ["zeroshot", "coop", "promptfl", "fedprox", "fedpgp", "fedotp", "fedtpg", "fedkgcoop", "fedcocoop",
                "central", "promptfolio", "fedpha", "dpfpl", "pfedmoap", "plot", "prograd", "proda", "feddnc",
                "fedsept", "focoop", "fedlapt", "fedlocoop",
                "fedgallop"]
#: methods with prompts / adapters inside the image tower -> the fix their one-line error must name
VISION_METHODS = {"fedmaple": "vision_prompts false", "fedvlp": "ViT-B-16", "ivlp": "ViT-B-16",
                  "fedvpt": "ViT-B-16", "localvpt": "ViT-B-16", "pfedpg": "ViT-B-16", "pfedmma": "ViT-B-16",
                  "promptsrc": "architecture flip_text_only", "fedmgp": "ViT-B-16", "fedmvp": "ViT-B-16"}
EXTRA = {"fedpha": ["--method.init_args.local_lengths", "[4, 16, 8]"],
         "pfedmoap": ["--method.init_args.gating_dim", "32"],  # d' divides the toy's width 64 (RN50: 1024 / 128)
         "fedmaple": ["--method.init_args.prompt_depth", "2"]}
ROWS = np.array([5, 3, 3, 100, 7, 191])


@pytest.fixture(scope="module")
def rn_file(tmp_path_factory) -> str:
    """A local checkpoint of fedlit-toy-rn with non-trivial BatchNorm statistics and affine parameters."""
    from safetensors.torch import save_file

    src = load_backbone(RN, pretrained="none")
    g = torch.Generator().manual_seed(1)
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    for k, v in sd.items():
        if k.endswith("running_mean") or k.endswith(".bias") and k.replace(".bias", ".running_mean") in sd:
            sd[k] = 0.2 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(".weight") and k.replace(".weight", ".running_mean") in sd:
            sd[k] = 0.8 + 0.4 * torch.rand(v.shape, generator=g)
    path = tmp_path_factory.mktemp("rn") / "toy-rn.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def rn(rn_file) -> FrozenCLIP:
    return load_backbone(RN, pretrained=rn_file)


@pytest.fixture(scope="module")
def data():
    return get_dataset("shapes-dark", seed=0, train_per_class=4, val_per_class=1, test_per_class=2)


def _images(clip, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return clip.normalize_images(torch.rand(n, 3, clip.image_size, clip.image_size, generator=g))


def _tower_hash(clip) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k, t in sorted(clip.model.visual.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _bn_layers(clip):
    return [m for m in clip.model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]


# ------------------------------------------------------------------------------------------- the tower
def test_toy_rn_is_a_modified_resnet_loaded_from_a_local_checkpoint(rn, rn_file):
    import open_clip

    assert isinstance(rn.model.visual, open_clip.modified_resnet.ModifiedResNet) and not rn.is_vit
    assert rn.image_size == 64 and rn.embed_dim == 64 and rn.vision_width is None
    from safetensors.torch import load_file

    want = load_file(rn_file)
    got = rn.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # BatchNorm buffers included
    assert not any(p.requires_grad for p in rn.parameters())
    x = _images(rn)
    with torch.no_grad():
        assert torch.equal(rn.encode_image(x), rn.model.encode_image(x))


def test_fedotp_tokens_are_the_attention_pool_with_every_position_as_query(rn):
    """Token 0 (the mean query) is encode_image's output; tokens 1..HW equal a hand-written multi-head attention."""
    x = _images(rn, n=3)
    with torch.no_grad():
        tokens, pooled = rn.encode_image_tokens(x), rn.encode_image(x)
        v = rn.model.visual
        f = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # [B, C, H, W]
        ap = v.attnpool
        t = f.flatten(2).transpose(1, 2)  # [B, HW, C]
        t = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1) + ap.positional_embedding
        b, n, c = t.shape
        h = ap.num_heads

        def heads(z):
            return z.reshape(b, n, h, c // h).transpose(1, 2)  # [B, h, L, d]

        q, k, val = heads(ap.q_proj(t)), heads(ap.k_proj(t)), heads(ap.v_proj(t))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), dim=-1)
        want = ap.c_proj((att @ val).transpose(1, 2).reshape(b, n, c))
    side = rn.image_size // 32
    assert tokens.shape == (3, 1 + side * side, rn.embed_dim)
    assert (tokens[:, 0] - pooled).abs().max().item() <= 1e-5
    assert (tokens - want).abs().max().item() <= 1e-5
    with pytest.raises(FedlitError, match="ViT tower"):
        rn.encode_image_tokens(x, visual_prompts=torch.zeros(2, 8))


def test_batchnorm_stays_frozen_features_do_not_depend_on_the_batch(rn):
    """Eval-mode BatchNorm is a per-sample affine map: an image's feature is the same alone or in any batch, and a
    training step never touches the running statistics."""
    x = _images(rn, n=7, seed=3)
    with torch.no_grad():
        full = rn.encode_image(x)
        alone = torch.cat([rn.encode_image(x[i : i + 1]) for i in range(len(x))])
        mixed = rn.encode_image(torch.cat([x[4:], _images(rn, n=5, seed=9), x[:4]]))
        mixed = torch.cat([mixed[-4:], mixed[:3]])
    assert torch.allclose(full, alone, rtol=1e-4, atol=1e-5) and torch.allclose(full, mixed, rtol=1e-4, atol=1e-5)
    live = copy.deepcopy(rn.model.visual).train()  # what a BatchNorm in training mode would give: batch statistics
    with torch.no_grad():
        assert (live(x[:2]) - full[:2]).abs().max().item() > 1e-3  # so the tolerance above does detect it

    before = _tower_hash(rn)
    module = ClientModule(rn, PromptFL(n_ctx=4))
    module.train()
    assert not any(m.training for m in _bn_layers(rn)) and len(_bn_layers(rn)) >= 10
    task = Task("four", ("red circle", "blue square", "green ring", "yellow cross"))
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = module.method.loss(module, rn.encode_image(x[:4]), torch.arange(4), task)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert _tower_hash(rn) == before


# ------------------------------------------------------------------------------------------- feature cache
@pytest.mark.parametrize("kind", ["features", "tokens"])
def test_feature_bank_on_a_resnet_tower(rn, data, kind):
    """Cached rows equal the bank's fixed layout encoded one row at a time (bit-exact), and a plain batch of the
    same images up to kernel rounding."""
    encode = rn.encode_image_tokens if kind == "tokens" else rn.encode_image
    bank = FeatureBank(rn, {"train": data.train}, kind=kind)
    got = bank.features("train", ROWS)
    block = 32
    with torch.no_grad():
        ref = []
        for r in ROWS:
            img = rn.normalize_images(data.train.images(np.array([r])))
            full = img.new_zeros(block, *img.shape[1:])
            full[r % block] = img[0]
            ref.append(encode(full)[r % block])
        plain = encode(rn.normalize_images(data.train.images(ROWS)))
    assert torch.equal(got, torch.stack(ref))
    assert torch.allclose(got, plain, rtol=1e-4, atol=1e-5)
    assert got.shape == ((len(ROWS), 5, rn.embed_dim) if kind == "tokens" else (len(ROWS), rn.embed_dim))
    assert bank.encoded == len(np.unique(ROWS))


def test_the_cache_key_covers_batchnorm_statistics(rn):
    other = copy.deepcopy(rn.model)
    other.visual.bn1.running_var.mul_(1.5)
    twin = FrozenCLIP(other, rn.tokenizer, rn.name)
    assert tower_digest(twin) != tower_digest(rn)


# ------------------------------------------------------------------------------------------- every method
def _fit(tmp_path, name, pretrained, *extra):
    config = ROOT / "configs" / f"{name}.yaml"
    return main(["fit", "--config", str(config), "--config", str(ROOT / "configs" / "embedded.yaml"),
                 "--backbone.name", RN, "--backbone.pretrained", pretrained,
                 "--trainer.rounds", "2", "--trainer.eval_every", "2", "--data.num_clients", "3", "--data.shots", "2",
                 "--data.dataset_args", '{"test_per_class": 2, "train_per_class": 2}', "--trainer.batch_size", "8",
                 "--out_dir", str(tmp_path / name), *extra])


def test_every_method_is_classified_for_resnet_towers():
    assert set(TEXT_METHODS) | set(VISION_METHODS) == set(list_methods())


@pytest.mark.parametrize("name", [*TEXT_METHODS, "fedmaple-text", "promptsrc-text"])
def test_text_prompt_method_runs_two_rounds_on_a_resnet_tower(tmp_path, rn, rn_file, name):
    method, extra = name.removesuffix("-text"), []
    if name == "fedmaple-text":  # MaPLe with its vision prompts off is a deep text-prompt method
        extra = ["--method.init_args.vision_prompts", "false"]
    if name == "promptsrc-text":  # FLiP's PromptSRC: a CoOp context with the SCL losses, no vision prompts
        extra = ["--method.init_args.architecture", "flip_text_only"]
    before = _tower_hash(rn)
    assert _fit(tmp_path, method, rn_file, *EXTRA.get(method, []), *extra) == 0
    res = json.loads((tmp_path / method / "results.json").read_text())
    assert res["method"] == method and len(res["per_client"]) == 3
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in res["final"].values()), res["final"]
    assert _tower_hash(rn) == before  # BatchNorm statistics untouched by training and evaluation


@pytest.mark.parametrize("name", sorted(VISION_METHODS))
def test_image_tower_methods_refuse_a_resnet_with_one_line_naming_the_fix(tmp_path, rn_file, capsys, name):
    assert _fit(tmp_path, name, rn_file) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and RN in err[0], err
    assert VISION_METHODS[name] in err[0] and "ViT" in err[0]
    assert not (tmp_path / name / "results.json").exists()


# ------------------------------------------------------------------------------------------- weights
def test_openai_rn50_tag_offline_fails_fast_with_one_line(monkeypatch, tmp_path, no_network):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(FedlitError) as e:
        load_backbone("RN50", pretrained="openai")
    assert str(e.value) == ("could not download 'openai' weights for RN50 (no network?); download them elsewhere "
                            "and pass `backbone.pretrained=/path/to/file`")
    assert time.monotonic() - start < 30


def test_toy_rn_has_no_default_weights():
    with pytest.raises(FedlitError, match="backbone.pretrained=none"):
        load_backbone(RN, pretrained="default")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openai_style_torchscript_archive_of_a_resnet_tower(rn, tmp_path):
    """OpenAI ships RN50 as a TorchScript archive: BatchNorm buffers load and QuickGELU is switched on."""
    import open_clip

    import fedlit.backbones as backbones

    path = tmp_path / "rn-jit.pt"
    try:
        torch.jit.save(torch.jit.script(rn.model), str(path))
    except Exception as e:  # noqa: BLE001 - TorchScript is deprecated; a future torch may not script it
        pytest.skip(f"cannot script the ResNet toy here: {e}")
    bb = load_backbone(RN, pretrained=str(path))
    try:
        assert isinstance(bb.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
        want = rn.model.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in bb.model.state_dict().items())
        x = _images(rn)
        with torch.no_grad():
            assert torch.equal(bb.encode_image(x), rn.encode_image(x))
    finally:
        backbones._CACHE.pop((RN, str(path), "cpu", "fp32"))


@pytest.mark.slow
def test_full_rn50_random_init_from_a_local_checkpoint_takes_a_promptfl_step(tmp_path):
    """The real RN50 architecture (224 px, 7×7 attention pool, embed 1024): a random-init model saved as a local
    state dict (what a user passes offline) loads, and one PromptFL step runs; FedOTP gets 1 + 49 tokens."""
    import fedlit.backbones as backbones

    src = load_backbone("RN50", pretrained="none")
    path = tmp_path / "rn50.pt"
    torch.save(src.model.state_dict(), path)
    clip = load_backbone("RN50", pretrained=str(path))
    try:
        assert clip is not src and all(torch.equal(a, b) for a, b in
                                       zip(clip.model.state_dict().values(), src.model.state_dict().values()))
        x = _images(clip, n=2)
        module = ClientModule(clip, PromptFL(n_ctx=16))
        module.train()
        task = Task("ten", tuple(f"class {i}" for i in range(10)))
        with torch.no_grad():
            feats, tokens = clip.encode_image(x), clip.encode_image_tokens(x)
        assert feats.shape == (2, 1024) and tokens.shape == (2, 50, 1024)
        assert (tokens[:, 0] - feats).abs().max().item() <= 1e-5
        ctx = module.prompt.ctx.detach().clone()
        loss = module.method.loss(module, feats, torch.tensor([0, 1]), task)
        loss.backward()
        torch.optim.SGD([module.prompt.ctx], lr=0.1).step()
        assert math.isfinite(loss.item()) and not torch.equal(module.prompt.ctx, ctx)
        assert not any(m.training for m in _bn_layers(clip))
    finally:
        backbones._CACHE.pop(("RN50", str(path), "cpu", "fp32"))


# ------------------------------------------------------------------------------------------- configs
def _printed(capsys, *configs) -> dict:
    import yaml

    args = [a for c in configs for a in ("--config", str(ROOT / "configs" / c))]
    with pytest.raises(SystemExit) as e:
        main(["fit", *args, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_rn50_overlay_swaps_only_the_backbone(capsys):
    base = _printed(capsys, "promptfl.yaml")
    rn50 = _printed(capsys, "promptfl.yaml", "backbones/rn50.yaml")
    assert rn50["backbone"]["name"] == "RN50" and rn50["backbone"]["pretrained"] == "openai"
    assert {k: v for k, v in rn50.items() if k != "backbone"} == {k: v for k, v in base.items() if k != "backbone"}


def test_fedotp_few_shot_config_is_the_scripts_rn50_setting(capsys):
    cfg = _printed(capsys, "fedotp_few_shot.yaml")
    assert cfg["backbone"]["name"] == "RN50"
    ot = cfg["method"]["init_args"]
    assert (ot["eps"], ot["thresh"], ot["top_percent"], ot["n_ctx"], ot["num_prompts"]) == (0.01, 0.001, 0.8, 16, 2)
    assert (cfg["data"]["subsample"], cfg["data"]["num_clients"], cfg["data"]["partition_seed"]) == ("all", 10, 2023)
    assert (cfg["trainer"]["rounds"], cfg["trainer"]["local_epochs"], cfg["trainer"]["batch_size"]) == (10, 5, 16)
    baseline = _printed(capsys, "promptfl.yaml", "protocols/fedotp_few_shot.yaml")
    assert baseline["backbone"]["name"] == "RN50" and baseline["data"] == cfg["data"]
    assert {k: baseline["trainer"][k] for k in ("rounds", "local_epochs", "batch_size")} == {
        k: cfg["trainer"][k] for k in ("rounds", "local_epochs", "batch_size")}


def test_fedotp_few_shot_config_runs_on_the_resnet_toy(tmp_path, rn_file):
    out = tmp_path / "otp"
    assert main(["fit", "--config", str(ROOT / "configs" / "fedotp_few_shot.yaml"), "--config",
                 str(ROOT / "configs" / "embedded.yaml"), "--backbone.name", RN, "--backbone.pretrained", rn_file,
                 "--data.subsample", "all", "--data.num_clients", "3", "--data.shots", "1", "--trainer.batch_size", "4",
                 "--data.dataset_args", '{"test_per_class": 2, "train_per_class": 2}', "--trainer.rounds", "1",
                 "--trainer.local_epochs", "1", "--out_dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "fedotp" and math.isfinite(res["final"]["local"])
