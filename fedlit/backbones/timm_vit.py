"""A frozen, image-only timm ``VisionTransformer`` with VPT prompt injection (pFedPG's ImageNet-21k ViT-B/16).

pFedPG's backbone is a ViT-B/16 pre-trained on ImageNet-21k, not CLIP (spec/pfedpg.md §2.5). ``load_backbone``
dispatches names of the form ``timm/<model>[.<tag>][@<img_size>]`` here, e.g.
``timm/vit_base_patch16_224.augreg_in21k`` or, for tests, ``timm/vit_tiny_patch16_224@32`` (the optional ``@N``
builds the model for N×N inputs: the only timm constructor option fedlit passes, and it travels inside the name so
that ``backbone.name`` alone identifies the model everywhere: CLI, cache keys, checkpoints).

The model is always built with ``timm.create_model(name, pretrained=False, num_classes=0)`` (seed 0, so random init
is deterministic); weights are then read by *us*:

* ``pretrained: default``: the tag's ``model.safetensors`` (or ``pytorch_model.bin``) from the Hugging Face hub
  repo named in the model's pretrained cfg (the local HF cache first; offline this fails fast with a one-line
  :class:`~fedlit.errors.FedlitError` asking for a local file);
* ``pretrained: /path/to/file``: ``.safetensors`` (no pickle), a ``.pt/.pth/.bin`` state dict
  (``torch.load(weights_only=True)``), both passed through timm's ``checkpoint_filter_fn`` (timm / JAX-converted /
  OpenAI-CLIP layouts, position-embedding resampling), or an original Google ``.npz`` checkpoint such as
  ``imagenet21k_ViT-B_16.npz`` (timm's ``VisionTransformer.load_pretrained``, ``numpy.load(allow_pickle=False)``);
* ``pretrained: none``: random init.

:class:`TimmViT` exposes the part of :class:`~fedlit.backbones.frozen_clip.FrozenCLIP`'s interface that
image-prompt, linear-head methods use (pFedPG, FedVPT, LocalVPT): ``name``, ``is_vit``, ``vision_width``,
``embed_dim`` (the pooled feature width; there is no projection), ``patch_size``, ``device``, ``image_size``,
``mean``/``std``/``interpolation``, ``normalize_images``, ``encode_image``, ``encode_image_tokens``, ``model.visual``
(the timm model, which the feature cache hashes). The forward re-states timm's ``forward_features`` →
``forward_head(pre_logits=True)`` over timm's own modules: ``patch_embed`` → ``_pos_embed`` (class/register tokens
and position embedding) → ``patch_drop`` → [prompts inserted] → ``norm_pre`` → blocks one by one (deep prompts
replaced before block ``j + first_deep_block``) → ``norm`` → [prompts dropped] → ``forward_head(pre_logits=True)``
(the model's own pooling and ``fc_norm``; CLS token for ViT-B/16). Same conventions as FrozenCLIP: prompts get no
position embedding and are inserted before the pre-norm; ``"after_cls"`` puts them right after the prefix tokens
(the CLS token, plus register tokens where a model has them), ``"append"`` after the patches. Without prompts the
output equals timm's own forward exactly (tests/test_timm_backbone.py).

Text functionality (``encode_text``, ``tokenize``, ``token_embedding``, ``logit_scale``, ``text_width`` …) raises
``FedlitError("backbone X has no text tower; use a CLIP backbone for text-prompt methods")`` at first access, so a
text method fails while the orchestrator builds it, before any training.
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from fedlit.backbones import visual_prompts as vp
from fedlit.backbones.frozen_clip import FrozenCLIP, _replace, _TensorList
from fedlit.errors import FedlitError

PREFIX = "timm/"
#: FrozenCLIP's text interface: each raises the no-text-tower error on a TimmViT.
TEXT_ATTRS = ("tokenizer", "context_length", "text_width", "logit_scale", "tokenize", "eot_index",
              "token_embedding", "encode_text", "encode_text_embeddings", "encode_tokens", "encode_text_shared",
              "set_text_path", "text_path", "shares_prefix", "can_truncate", "can_share_prefix")
#: open_clip ``CLIP`` text parts that methods reach through ``clip.model``.
MODEL_TEXT_ATTRS = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection",
                    "logit_scale", "attn_mask", "text_pool_type", "text_eos_id", "encode_text", "context_length",
                    "vocab_size")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_DOWNLOAD_TIMEOUT_S = 30.0


def is_timm_name(name) -> bool:
    return str(name).strip().lower().startswith(PREFIX)


def no_text_tower(name: str) -> FedlitError:
    return FedlitError(f"backbone {name} has no text tower; use a CLIP backbone for text-prompt methods")


def parse_name(name: str) -> tuple[str, int | None]:
    """``timm/<model>[.<tag>][@<img_size>]`` -> (timm model name, img_size or None)."""
    body = str(name).strip()[len(PREFIX):]
    size = None
    if "@" in body:
        body, _, s = body.rpartition("@")
        if not s.isdigit() or int(s) < 1:
            raise FedlitError(f"backbone '{name}': the part after '@' must be an input size in pixels "
                              f"(e.g. timm/vit_tiny_patch16_224@32)")
        size = int(s)
    if not body:
        raise FedlitError(f"backbone '{name}' names no timm model; e.g. timm/vit_base_patch16_224.augreg_in21k")
    return body, size


class _ImageOnlyModel(nn.Module):
    """``backbone.model``: the timm ViT as ``.visual`` (what the feature cache hashes); CLIP text parts raise."""

    def __init__(self, vit: nn.Module, name: str):
        super().__init__()
        self.visual = vit
        self.backbone_name = name

    def __getattr__(self, attr: str):
        if attr in MODEL_TEXT_ATTRS:
            raise no_text_tower(self.__dict__.get("backbone_name", "?"))
        return super().__getattr__(attr)


def _text_attr(attr: str) -> property:
    def get(self):
        raise no_text_tower(self.name)

    get.__doc__ = f"Not available: a timm backbone has no text tower (FrozenCLIP.{attr})."
    return property(get)


class TimmViT(nn.Module):
    """A frozen timm ``VisionTransformer`` (no classifier head) with VPT-style prompt injection.

    All parameters have ``requires_grad=False`` and the model stays in eval mode even when a parent module calls
    ``.train()``; gradients still flow *through* it to prompts passed in as arguments.
    """

    #: no text tower: methods classifying with text prompts refuse this backbone before anything runs
    has_text = False

    def __init__(self, vit: nn.Module, name: str):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(vit, VisionTransformer):
            raise FedlitError(f"backbone '{name}' is a timm {type(vit).__name__}, not a VisionTransformer; visual "
                              "prompts need one (e.g. timm/vit_base_patch16_224.augreg_in21k)")
        self.name = name
        self.model = _ImageOnlyModel(vit, name)
        vit.requires_grad_(False)
        vit.eval()
        self.is_vit = True
        self.vision_width = int(vit.embed_dim)
        self.embed_dim = int(getattr(vit, "head_hidden_size", vit.num_features))
        self.patch_size = int(vit.patch_embed.patch_size[0])
        size = tuple(int(s) for s in vit.patch_embed.img_size)
        self.image_size = size[0] if size[0] == size[1] else size
        self._size_hw = size
        cfg = dict(getattr(vit, "pretrained_cfg", None) or {})
        self.mean = tuple(float(m) for m in cfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(float(s) for s in cfg.get("std", (0.5, 0.5, 0.5)))
        self.interpolation = cfg.get("interpolation", "bicubic")

    # FrozenCLIP's image pre-processing (resize to ``image_size``, mean/std of *this* model), shared code.
    normalize_images = FrozenCLIP.normalize_images
    _transform = FrozenCLIP._transform
    train_transform = FrozenCLIP.train_transform
    test_transform = FrozenCLIP.test_transform

    # ----------------------------------------------------------------------------------------------- basics
    def train(self, mode: bool = True):  # noqa: D102 - frozen: always eval (no dropout, no patch dropout)
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.visual.patch_embed.proj.weight.device

    @property
    def vit(self) -> nn.Module:
        """The timm ``VisionTransformer``."""
        return self.model.visual

    # ----------------------------------------------------------------------------------------------- vision
    def _tokens(self, images, visual_prompts, deep_visual_prompts, prompt_position, first_deep_block):
        """Tokens after the final ``norm``, prompt tokens removed: [B, prefix + M, vision_width]."""
        vp.check_position(prompt_position)
        v = self.model.visual
        w = v.patch_embed.proj.weight
        x = v.patch_embed(images.to(device=w.device, dtype=w.dtype))
        x = v._pos_embed(x)  # class / register tokens + position embedding (+ pos_drop)
        x = v.patch_drop(x)
        x, start, n = vp.insert(x, visual_prompts, v.num_prefix_tokens, prompt_position)
        deep = vp.check_deep(deep_visual_prompts, n)
        blocks = v.blocks
        if first_deep_block < 0 or len(deep) > len(blocks) - first_deep_block:
            raise ValueError(f"{len(deep)} deep prompts from block {first_deep_block} exceed {len(blocks)} blocks")
        x = v.norm_pre(x)
        for i, blk in enumerate(blocks):
            j = i - first_deep_block
            if 0 <= j < len(deep) and deep[j] is not None:
                x = _replace(x, deep[j], start)
            x = blk(x)
        x = v.norm(x)
        return vp.remove(x, start, n)

    def encode_image(
        self,
        images: torch.Tensor,
        visual_prompts: torch.Tensor | None = None,
        deep_visual_prompts: _TensorList | None = None,
        prompt_position: str = "after_cls",
        first_deep_block: int = 1,
    ) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> pooled features [B, embed_dim] (timm's
        ``forward_head(forward_features(x), pre_logits=True)``: the CLS token after the final norm for ViT-B/16).

        ``visual_prompts`` [n, W] or [B, n, W]: extra tokens (VPT-shallow); ``deep_visual_prompts[j]`` replaces them
        at the input of block ``j + first_deep_block``.
        """
        x = self._tokens(images, visual_prompts, deep_visual_prompts, prompt_position, first_deep_block)
        return self.model.visual.forward_head(x, pre_logits=True)

    def encode_image_tokens(
        self,
        images: torch.Tensor,
        visual_prompts: torch.Tensor | None = None,
        deep_visual_prompts: _TensorList | None = None,
        prompt_position: str = "after_cls",
        first_deep_block: int = 1,
    ) -> torch.Tensor:
        """[B, 1+M, embed_dim]: token 0 = :meth:`encode_image`, 1..M the patch tokens (final norm and ``fc_norm``;
        prefix tokens other than the pooled one are dropped)."""
        v = self.model.visual
        x = self._tokens(images, visual_prompts, deep_visual_prompts, prompt_position, first_deep_block)
        pooled = v.forward_head(x, pre_logits=True)
        return torch.cat([pooled[:, None], v.fc_norm(x[:, v.num_prefix_tokens:])], dim=1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, image_size={self.image_size}"


for _attr in TEXT_ATTRS:  # FrozenCLIP's text interface: absent
    setattr(TimmViT, _attr, _text_attr(_attr))
del _attr


# ----------------------------------------------------------------------------------------------- loading
def _create(name: str, arch: str, img_size: int | None) -> nn.Module:
    import timm

    kwargs = {"img_size": img_size} if img_size else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        except RuntimeError as e:
            if "Unknown model" not in str(e):
                raise
            valid = timm.list_models()
            close = difflib.get_close_matches(arch.split(".")[0], valid, n=1)
            hint = f" (did you mean 'timm/{close[0]}'?)" if close else ""
            raise FedlitError(f"unknown timm model '{arch}' in backbone '{name}'{hint}; "
                              "timm.list_models('vit_*') lists them") from None
        except TypeError as e:
            raise FedlitError(f"backbone '{name}': timm could not build '{arch}' with {kwargs or 'its defaults'} "
                              f"({e})") from None


def _hub_file(name: str, cfg: dict) -> str:
    """The tag's weights file from the Hugging Face hub: local cache first, then (after a 5 s connect probe) a
    download under a socket timeout; fails fast offline."""
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import hf_hub_download

    from fedlit.backbones.files import quiet as _quiet
    from fedlit.backbones.files import socket_timeout as _socket_timeout

    repo = cfg.get("hf_hub_id")
    fix = "download the weights elsewhere and pass `--backbone.pretrained /path/to/weights.safetensors`"
    if not repo:
        raise FedlitError(f"backbone {name} has no Hugging Face hub weights in timm; {fix}")
    repo, _, rev = repo.partition("@")
    failed = FedlitError(f"could not download the weights of {name} from the Hugging Face hub ({repo}; no "
                         f"network?); {fix}")
    with _quiet():
        for fname in _HUB_FILES:  # 1) the local cache only
            try:
                return hf_hub_download(repo, fname, revision=rev or None, local_files_only=True)
            except Exception:  # noqa: BLE001 - not cached
                pass
    if bool(hf_constants.HF_HUB_OFFLINE):
        raise failed
    url = urlparse(hf_constants.ENDPOINT)
    try:  # 2) one connect probe, 3) the download
        socket.create_connection((url.hostname, url.port or 443), timeout=5.0).close()
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout
        raise failed from e
    last: Exception | None = None
    with _socket_timeout(_DOWNLOAD_TIMEOUT_S), _quiet():
        for fname in _HUB_FILES:
            try:
                return hf_hub_download(repo, fname, revision=rev or None)
            except Exception as e:  # noqa: BLE001 - missing file or hub error: try the next, then fail
                last = e
    raise failed from last


def _load_file(vit: nn.Module, name: str, path: str) -> None:
    from fedlit.backbones.files import read_state_dict

    p = Path(path)
    if p.suffix == ".npz":  # an original Google JAX checkpoint; numpy.load(allow_pickle=False) inside timm
        try:
            vit.load_pretrained(str(p))
        except Exception as e:  # noqa: BLE001 - a bad or foreign file
            raise FedlitError(f"could not load {p} into backbone {name} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
        return
    sd, _ = read_state_dict(p)
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        sd = checkpoint_filter_fn(sd, vit)
    except Exception as e:  # noqa: BLE001 - a layout timm does not know
        raise FedlitError(f"checkpoint {p} does not fit backbone {name} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    if isinstance(vit.head, nn.Identity):  # num_classes=0: the checkpoint's classifier is not used
        sd = {k: v for k, v in sd.items() if not (k.startswith("head.") or k.startswith("head_dist."))}
    try:
        missing, unexpected = vit.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise FedlitError(f"checkpoint {p} does not fit backbone {name}: "
                          f"{str(e).splitlines()[1 if len(str(e).splitlines()) > 1 else 0].strip()[:200]}") from e
    if missing or unexpected:
        raise FedlitError(f"checkpoint {p} does not fit backbone {name}: {len(missing)} missing keys "
                          f"(e.g. {list(missing)[:3]}), {len(unexpected)} unexpected (e.g. {list(unexpected)[:3]})")


def load_timm_backbone(name: str, pretrained: str | None = "default", device: str | torch.device = "cpu",
                       precision: str = "fp32") -> TimmViT:
    """Build a frozen :class:`TimmViT` (not cached: ``fedlit.backbones.load_backbone`` caches it per process).

    Args:
        name: ``timm/<model>[.<tag>][@<img_size>]``.
        pretrained: ``default`` (the tag's hub weights), ``none`` (random init, seed 0) or a local file.
        device: where the model lives.
        precision: ``fp32``, ``fp16`` or ``bf16`` weights.
    """
    name = str(name).strip()
    arch, img_size = parse_name(name)
    vit = _create(name, arch, img_size)
    p = None if pretrained is None else str(pretrained).strip()
    if p is None or p.lower() in ("", "none", "random"):
        pass
    elif p == "default":
        path = _hub_file(name, dict(vit.pretrained_cfg or {}))
        _load_file(vit, name, path)
    elif os.path.isfile(os.path.expanduser(p)):
        _load_file(vit, name, os.path.expanduser(p))
    else:
        raise FedlitError(f"pretrained '{p}' for backbone {name} is not an existing file; use 'default' (the hub "
                          "weights of the model's tag), a local .safetensors/.bin/.npz file, or 'none' for random init")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    vit = vit.to(device=device, dtype=dtype)
    return TimmViT(vit, name)
