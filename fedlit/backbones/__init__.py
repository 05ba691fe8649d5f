"""Frozen CLIP backbones: the bundled ``fedlit-toy`` model or any open_clip CLIP architecture.

``load_backbone(name, pretrained)`` builds the architecture with open_clip (random init, seeded), then loads weights
that *we* read from a file: ``.safetensors`` (no pickle), ``.pt/.pth/.bin`` state dicts (``torch.load(...,
weights_only=True)``) or OpenAI's TorchScript archives (``torch.jit.load`` then ``state_dict()``; no Python pickle is
executed). An open_clip tag (``openai``, ``laion2b_s34b_b88k``, ...) is first downloaded by open_clip into its cache;
without network this fails fast with a one-line :class:`~fedlit.errors.FedlitError`.

``pretrained`` values: ``"default"`` (the bundled weights for ``fedlit-toy``, the ``openai`` tag otherwise), ``None``
or ``"none"`` (random init, deterministic), a tag, or a path. One instance per (name, pretrained, device, precision)
per process.

Image-only backbones: names ``timm/<model>[.<tag>][@<img_size>]`` (e.g. ``timm/vit_base_patch16_224.augreg_in21k``,
pFedPG's ImageNet-21k ViT-B/16) build a frozen timm ViT (:mod:`fedlit.backbones.timm_vit`) for the image-prompt,
linear-head methods (pFedPG, FedVPT, LocalVPT); ``pretrained`` is ``default`` (the tag's hub weights), ``none`` or
a local file. Text methods fail on them with a one-line error.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from fedlit.backbones.files import quiet as _quiet
from fedlit.backbones.files import read_state_dict
from fedlit.backbones.files import socket_timeout as _socket_timeout
from fedlit.backbones.frozen_clip import FrozenCLIP
from fedlit.errors import FedlitError, unknown_name

__all__ = ["FrozenCLIP", "load_backbone", "list_backbones", "register_toy_config", "read_state_dict"]

TOY = "fedlit-toy"
TOY_CONFIG = Path(__file__).with_name("fedlit-toy.json")
#: a tiny ModifiedResNet-tower CLIP (``layers`` [1, 1, 1, 1], width 8, 64 px, 2-layer text tower; no bundled weights:
#: ``pretrained=none``): the RN50 code paths (attention pooling, BatchNorm, FedOTP's RN tokens) in seconds on a CPU
TOY_RN = "fedlit-toy-rn"
TOY_RN_CONFIG = Path(__file__).with_name("fedlit-toy-rn.json")
TOY_WEIGHTS = Path(__file__).parent / "weights" / "fedlit-toy.safetensors"
_PRECISIONS = ("fp32", "fp16", "bf16")
_DOWNLOAD_TIMEOUT_S = 30.0
_CACHE: dict[tuple, FrozenCLIP] = {}


def register_toy_config() -> str:
    """Register ``fedlit-toy.json`` and ``fedlit-toy-rn.json`` with open_clip (idempotent); returns ``fedlit-toy``."""
    import open_clip

    known = open_clip.list_models()
    for name, path in ((TOY, TOY_CONFIG), (TOY_RN, TOY_RN_CONFIG)):
        if name not in known:
            open_clip.add_model_config(path)
    return TOY


def _is_plain_clip(cfg: dict) -> bool:
    return not (cfg.get("custom_text") or "hf_model_name" in cfg["text_cfg"] or "multimodal_cfg" in cfg)


def list_backbones() -> list[str]:
    """Architectures ``load_backbone`` accepts: ``fedlit-toy`` and open_clip's plain-CLIP configs."""
    import open_clip
    from open_clip.factory import get_model_config

    register_toy_config()
    return [n for n in open_clip.list_models() if _is_plain_clip(get_model_config(n))]


def _resolve_name(name: str) -> str:
    valid = list_backbones()
    arch = str(name).strip().replace("/", "-")  # CoOp / OpenAI spelling: ViT-B/16 -> ViT-B-16
    if arch in valid:
        return arch
    lower = {v.lower(): v for v in valid}
    if arch.lower() in lower:
        return lower[arch.lower()]
    raise unknown_name("backbone", name, valid)


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], arch: str, source: str) -> None:
    if "logit_scale" in sd and sd["logit_scale"].shape != model.logit_scale.shape:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    persistent = model.state_dict().keys()
    for k in [k for k, _ in model.named_buffers() if k not in persistent]:  # e.g. attn_mask in scripted models
        sd.pop(k, None)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        sizes = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise FedlitError(f"checkpoint {source} does not fit backbone {arch}: "
                          f"{len(sizes)} tensors of the wrong shape (e.g. {sizes[0][:160] if sizes else e}); "
                          "use a checkpoint of this architecture or change backbone.name") from None
    if missing or unexpected:
        raise FedlitError(
            f"checkpoint {source} does not fit backbone {arch}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def _download(arch: str, tag: str, cfg: dict) -> str:
    """open_clip's download of a tag, made to fail fast offline.

    huggingface_hub retries a failed request with back-off (about a minute per file), so: 1) look in the local
    cache only (HF offline mode, scoped to this call); 2) if that misses, one connect probe to the hub (5 s);
    3) only then the real download, under a default socket timeout.
    """
    import open_clip
    from huggingface_hub import constants as hf_constants

    failed = FedlitError(
        f"could not download '{tag}' weights for {arch} (no network?); download them elsewhere and pass "
        "`backbone.pretrained=/path/to/file`")
    user_offline = bool(hf_constants.HF_HUB_OFFLINE)
    if cfg.get("hf_hub"):
        hf_constants.HF_HUB_OFFLINE = True
        try:
            with _quiet():
                return open_clip.download_pretrained(cfg)
        except Exception:  # noqa: BLE001 - not in the cache
            if user_offline:
                raise failed from None
        finally:
            hf_constants.HF_HUB_OFFLINE = user_offline
        url = urlparse(hf_constants.ENDPOINT)
    else:
        url = urlparse(cfg.get("url", ""))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5.0).close()
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S), _quiet():
            path = open_clip.download_pretrained(cfg)
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, hub errors of every kind
        raise failed from e
    if not path:
        raise failed
    return path


def _weights_source(arch: str, pretrained: str | None) -> tuple[str, str | None]:
    """-> (kind, value) with kind in {"random", "file", "tag"}."""
    import open_clip

    if pretrained is None or str(pretrained).strip().lower() in ("", "none", "random"):
        return "random", None
    p = str(pretrained).strip()
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if p == "default":
        if arch == TOY:
            if not TOY_WEIGHTS.is_file():
                raise FedlitError(
                    f"the fedlit-toy weights are missing ({TOY_WEIGHTS}); run `fedlit pretrain-toy` first, "
                    "or pass `backbone.pretrained=none` for a random-init model")
            return "file", str(TOY_WEIGHTS)
        if not tags:
            raise FedlitError(f"backbone {arch} has no open_clip weights; pass `backbone.pretrained=/path/to/file`, "
                              "or `backbone.pretrained=none` for a random-init model")
        return "tag", "openai" if "openai" in tags else tags[0]
    if os.path.isfile(os.path.expanduser(p)):
        return "file", os.path.expanduser(p)
    if p in tags:
        return "tag", p
    raise FedlitError(
        f"pretrained '{p}' for backbone {arch} is neither an existing file nor an open_clip tag; "
        f"valid tags: {', '.join(tags) or '(none)'}, or 'none' for random init")


def load_backbone(
    name: str,
    pretrained: str | None = "default",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> FrozenCLIP:
    """Build (once per process) a frozen CLIP backbone.

    Args:
        name: ``fedlit-toy``, ``fedlit-toy-rn`` (tiny ModifiedResNet tower, no bundled weights) or an open_clip
            architecture (``ViT-B-16``, CoOp's ``ViT-B/16``, ``RN50``, ...), or
            ``timm/<model>[.<tag>][@<img_size>]`` for an image-only timm ViT (returns a ``TimmViT``).
        pretrained: ``"default"``, ``None``/``"none"`` (random init, seed 0), an open_clip tag or a checkpoint path.
            OpenAI weights need QuickGELU: the ``openai`` tag and OpenAI TorchScript files switch it on
            automatically; for an OpenAI state dict saved as ``.pt``/``.safetensors`` use ``ViT-B-16-quickgelu``
            (``RN50-quickgelu``).
        device: where the model lives.
        precision: ``fp32`` (default), ``fp16`` or ``bf16`` weights (open_clip's own casting).
    """
    if str(name).strip().lower().startswith("timm/"):  # image-only timm ViT (fedlit.backbones.timm_vit)
        if precision not in _PRECISIONS:
            raise unknown_name("precision", precision, _PRECISIONS)
        tkey = ("timm", str(name).strip(), None if pretrained is None else str(pretrained), str(torch.device(device)),
                precision)
        if tkey not in _CACHE:
            from fedlit.backbones.timm_vit import load_timm_backbone

            _CACHE[tkey] = load_timm_backbone(name, pretrained, device=device, precision=precision)
        return _CACHE[tkey]
    import open_clip

    arch = _resolve_name(name)
    if precision not in _PRECISIONS:
        raise unknown_name("precision", precision, _PRECISIONS)
    key = (arch, None if pretrained is None else str(pretrained), str(torch.device(device)), precision)
    if key in _CACHE:
        return _CACHE[key]

    kind, value = _weights_source(arch, pretrained)
    sd, quick_gelu, tag_cfg = None, False, {}
    if kind == "tag":
        tag_cfg = open_clip.get_pretrained_cfg(arch, value)
        sd, jit = read_state_dict(_download(arch, value, tag_cfg))
        quick_gelu = bool(tag_cfg.get("quick_gelu", False)) or jit
    elif kind == "file":
        sd, quick_gelu = read_state_dict(value)

    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(0)
        model = open_clip.create_model(
            arch, pretrained=None, precision=precision, device="cpu", force_quick_gelu=quick_gelu)
    if sd is not None:
        _load_into(model, sd, arch, value)
    model = model.to(device)
    pre = dict(open_clip.get_model_preprocess_cfg(model))
    pre.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    tokenizer = open_clip.get_tokenizer(arch)
    backbone = FrozenCLIP(model, tokenizer, name=arch, preprocess_cfg=pre)
    _CACHE[key] = backbone
    return backbone
