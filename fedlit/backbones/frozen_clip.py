"""A frozen open_clip ``CLIP`` model with prompt-injection entry points.

Prompt learning needs to feed *embeddings* (not token ids) into CLIP's text tower, and extra tokens into its
vision tower, at the input and between transformer blocks. open_clip's own ``encode_text`` / ``encode_image``
take token ids / pixels only, so this module re-states the following parts of open_clip (checked against
open_clip 3.3.0, ``open_clip/model.py`` and ``open_clip/transformer.py``) over the *same* modules and weights:

* ``CLIP.encode_text``: token embedding -> cast to the transformer's dtype -> ``+ positional_embedding`` ->
  text ``Transformer`` (blocks run one by one with the causal ``attn_mask``) -> ``ln_final`` -> pool at the EOT
  position (``text_global_pool``) -> ``text_projection``.
* ``VisionTransformer.forward``: ``conv1`` -> flatten -> class token -> ``+ positional_embedding`` ->
  ``patch_dropout`` -> ``ln_pre`` -> blocks -> ``_pool`` (its attentional-pool / ``final_ln_after_pool`` /
  ``ln_post`` branches and ``tok``/``avg``/``none`` global pooling) -> ``@ proj``.
* ``AttentionPool2d.forward`` of the ModifiedResNet tower, with every position as a query (FedOTP's local
  features for RN50).

Each block itself (``ResidualAttentionBlock``), every norm and every projection is open_clip's own module, called as
open_clip calls it; only the loop around them is ours, so that prompts can be written in between. With no prompt
the results equal open_clip's ``encode_text`` / ``encode_image`` (tests/test_backbone.py checks this to 1e-5).

Prompt conventions:

* Text: the caller builds the full embedding sequence (CoOp: ``[SOS] ctx ... ctx class . [EOT] pad``), so
  shallow context tokens receive positional embeddings like the "X" tokens they replace. ``deep_prompts[j]``
  replaces positions ``deep_start : deep_start + n`` at the input of block ``j + first_deep_block`` (default:
  block ``j + 1``; MaPLe / IVLP style, no positional embedding).
* Vision: ``visual_prompts`` are inserted after the positional embedding and *before* ``ln_pre`` (MaPLe / IVLP
  convention for CLIP; the prompts get no positional embedding, as in VPT), either right after the CLS token
  (``"after_cls"``: VPT, pFedPG's ``[c, P, z]``) or after the patch tokens (``"append"``); FedTPG's VLP appends
  them *after* ``ln_pre`` instead (``"append_after_ln_pre"``: they skip it).
  ``deep_visual_prompts[j]`` replaces those tokens at the input of block ``j + first_deep_block``. Prompt tokens
  are dropped before pooling, so the pooled token is CLS (or the patch average) as in open_clip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedlit.backbones import shared_prefix as _sp
from fedlit.backbones import visual_prompts as vp
from fedlit.backbones.visual_prompts import expand as _expand
from fedlit.errors import FedlitError

TEXT_PATHS = ("plain", "shared_prefix")
_TensorList = Sequence[torch.Tensor]


def _to_rgb(img):
    """PIL image -> RGB (a named function so that transforms pickle into DataLoader workers)."""
    return img.convert("RGB")


def _replace(x: torch.Tensor, p: torch.Tensor, start: int) -> torch.Tensor:
    """Out-of-place ``x[:, start:start+n] = p`` (keeps autograd happy)."""
    p = _expand(p, x.shape[0])
    n = p.shape[1]
    if p.shape[-1] != x.shape[-1] or start + n > x.shape[1]:
        raise ValueError(f"prompt of shape {tuple(p.shape)} does not fit tokens {tuple(x.shape)} at {start}")
    return torch.cat([x[:, :start], p.to(x.dtype), x[:, start + n:]], dim=1)


class FrozenCLIP(nn.Module):
    """A frozen ``open_clip.CLIP`` plus its tokenizer, with CoOp / VPT / deep-prompt injection.

    All parameters have ``requires_grad=False`` and the model stays in eval mode even when a parent module calls
    ``.train()``. Gradients still flow *through* the backbone to prompts passed in as arguments.
    """

    has_text = True
    #: ``shared_prefix`` (default): encode a CoOp-style prompt's shared ``[SOS][ctx]`` prefix once per distinct
    #: context (:mod:`fedlit.backbones.shared_prefix`); ``plain``: one full pass per (context, class) prompt.
    #: Both truncate at the batch's last EOT. Set per run by the ``backbone.text_path`` option.
    text_path: str = "shared_prefix"
    #: While clients train in lock-step: the :class:`fedlit.text_batch.FusedText` service that answers the text passes
    #: of its own worker threads (set and cleared by the service itself); ``None`` otherwise.
    text_service = None

    def __init__(self, model: nn.Module, tokenizer, name: str, preprocess_cfg: dict | None = None):
        super().__init__()
        import open_clip

        if not isinstance(model, open_clip.CLIP):
            raise FedlitError(
                f"backbone '{name}' is a {type(model).__name__}, not a plain open_clip CLIP "
                "(custom/HF text towers are not supported); pick a CLIP architecture such as ViT-B-16")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        model.requires_grad_(False)
        model.eval()

        v = model.visual
        self.is_vit = isinstance(v, open_clip.transformer.VisionTransformer)
        self.text_width = model.transformer.width
        if isinstance(model.text_projection, nn.Linear):
            self.embed_dim = model.text_projection.out_features
        elif model.text_projection is not None:
            self.embed_dim = model.text_projection.shape[1]
        else:
            self.embed_dim = self.text_width
        self.vision_width = v.transformer.width if self.is_vit else None
        self.context_length = model.context_length
        cfg = preprocess_cfg or open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", getattr(v, "image_size", 224))
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.image_size = size[0] if size[0] == size[1] else size
        self._size_hw = size
        self.mean = tuple(float(m) for m in cfg["mean"])
        self.std = tuple(float(s) for s in cfg["std"])
        self.interpolation = cfg.get("interpolation", "bicubic")
        pool_ok = model.text_pool_type in ("argmax", "eos", "first")
        #: causal text tower pooled at a token position: positions after the last EOT can be dropped (exact)
        self.can_truncate = pool_ok and _sp.causal_mask_ok(model)
        #: ... and its blocks are open_clip's plain ones: the shared-prefix path is available
        self.can_share_prefix = self.can_truncate and _sp.blocks_ok(model.transformer)

    # ----------------------------------------------------------------------------------------------- basics
    def train(self, mode: bool = True):  # noqa: D102 - frozen: always eval (no dropout, no patch dropout)
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` as a float tensor (100 for OpenAI weights)."""
        return self.model.logit_scale.detach().exp().float()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """open_clip tokenizer of this model -> LongTensor [N, context_length] on the model's device."""
        return self.tokenizer(list(texts)).to(self.device)

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position that the text tower pools (``text_global_pool`` of the installed open_clip)."""
        pool = self.model.text_pool_type
        n, length = tokens.shape
        if pool == "argmax":
            return tokens.argmax(dim=-1)
        if pool == "eos":
            return (tokens == self.model.text_eos_id).int().argmax(dim=-1)
        if pool == "first":
            return torch.zeros(n, dtype=torch.long, device=tokens.device)
        if pool == "last":
            return torch.full((n,), length - 1, dtype=torch.long, device=tokens.device)
        raise FedlitError(f"backbone '{self.name}' uses text pool type '{pool}', which has no single EOT position")

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] -> embeddings [N, L, text_width] (the frozen lookup table)."""
        return self.model.token_embedding(tokens.to(self.device))

    # ----------------------------------------------------------------------------------------------- text
    def set_text_path(self, text_path: str) -> None:
        """Choose ``shared_prefix`` (default) or ``plain`` for prompt encoding (:data:`TEXT_PATHS`)."""
        if text_path not in TEXT_PATHS:
            raise FedlitError(f"backbone.text_path='{text_path}': use one of {', '.join(TEXT_PATHS)}")
        self.text_path = text_path

    @property
    def shares_prefix(self) -> bool:
        """Whether prompt encoders should take the shared-prefix path (chosen and available)."""
        return self.text_path == "shared_prefix" and self.can_share_prefix

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's own ``encode_text`` (reference path, full context length, not normalised) -> [N, embed_dim]."""
        return self.model.encode_text(tokens.to(self.device))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] -> text features [N, embed_dim] (not normalised), cut at the batch's last EOT:
        equals :meth:`encode_text` (causal tower) at a fraction of the cost."""
        tokens = tokens.to(self.device)
        return self.encode_text_embeddings(self.token_embedding(tokens), self.eot_index(tokens))

    def encode_text_shared(self, prefix, suffix, eot_idx, deep_prompts=None, deep_start: int = 1,
                           first_deep_block: int = 1, length: int | None = None) -> torch.Tensor:
        """Features ``[P, C, embed_dim]`` of prompts ``prefix[p] ‖ suffix[c]``, the shared prefix encoded once per
        distinct context (see :func:`fedlit.backbones.shared_prefix.encode_shared_prefix`)."""
        if not self.can_share_prefix:
            raise FedlitError(f"backbone '{self.name}': its text tower is not a plain causal open_clip transformer; "
                              "use backbone.text_path=plain")
        return _sp.encode_shared_prefix(self, prefix, suffix, eot_idx, deep_prompts, deep_start, first_deep_block,
                                        length)

    @staticmethod
    def _run_blocks(transformer, x, attn_mask, prompts, start: int, first: int) -> torch.Tensor:
        """open_clip ``Transformer.forward`` block by block; ``prompts[j]`` overwrite tokens before block j+first."""
        blocks = transformer.resblocks
        prompts = _sp.deep_prompt_list(prompts, blocks, first)
        for i, blk in enumerate(blocks):
            j = i - first
            if 0 <= j < len(prompts) and prompts[j] is not None:
                x = _replace(x, prompts[j], start)
            if transformer.batch_first:
                x = blk(x, attn_mask=attn_mask)
            else:  # older open_clip / OpenAI layout: sequence first
                x = blk(x.transpose(0, 1).contiguous(), attn_mask=attn_mask).transpose(0, 1)
        return x

    def encode_text_embeddings(
        self,
        emb: torch.Tensor,
        eot_idx: torch.Tensor,
        deep_prompts: _TensorList | None = None,
        deep_start: int = 1,
        first_deep_block: int = 1,
        length: int | None = None,
    ) -> torch.Tensor:
        """CoOp injection path: embeddings [N, L, W] -> text features [N, embed_dim] (not normalised).

        ``deep_prompts[j]`` ([n, W] or [N, n, W]) replaces positions ``deep_start:deep_start+n`` at the input of
        text block ``j + first_deep_block``. On a causal tower the sequence is first cut after the batch's last
        EOT (and after the deep prompts' positions): the pooled features are unchanged, the work shrinks.
        ``length`` (``max(eot_idx) + 1`` when known, e.g. cached by the prompt template) saves a device sync.
        """
        m = self.model
        dtype = m.transformer.get_cast_dtype()
        if self.can_truncate:
            n_deep = max((p.shape[-2] for p in deep_prompts or [] if p is not None), default=0)
            last = length if length is not None else int(eot_idx.max()) + 1
            emb = emb[:, : max(last, deep_start + n_deep if n_deep else 0)]
        length = emb.shape[1]
        x = emb.to(dtype) + m.positional_embedding[:length].to(dtype)
        mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
        x = self._run_blocks(m.transformer, x, mask, deep_prompts, deep_start, first_deep_block)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_idx.to(x.device)]
        proj = m.text_projection
        if isinstance(proj, nn.Module):
            return proj(x)
        return x @ proj if proj is not None else x

    # ----------------------------------------------------------------------------------------------- vision
    def _vit_tokens(self, images, visual_prompts, deep_visual_prompts, prompt_position, first_deep_block):
        """ViT tokens after the last block, prompt tokens removed: [B, 1+M, vision_width]."""
        if prompt_position != "append_after_ln_pre":  # FedTPG's VLP: prompts appended after ln_pre
            vp.check_position(prompt_position)
        after_ln = prompt_position == "append_after_ln_pre"
        v = self.model.visual
        x = v.conv1(images.to(device=v.conv1.weight.device, dtype=v.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, grid**2, width]
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        if callable(visual_prompts):  # prompts generated from the patch tokens after the positional embedding (FedMVP)
            visual_prompts = visual_prompts(x[:, 1:])
        if after_ln:
            x = v.ln_pre(x)
        x, start, n = vp.insert(x, visual_prompts, 1, "append" if after_ln else prompt_position)
        deep = vp.check_deep(deep_visual_prompts, n)
        if not after_ln:
            x = v.ln_pre(x)
        x = self._run_blocks(v.transformer, x, None, deep, start, first_deep_block)
        return vp.remove(x, start, n)

    @staticmethod
    def _global_pool(v, x: torch.Tensor) -> torch.Tensor:
        if v.pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        if v.pool_type == "tok":
            return x[:, 0]
        return x

    def _vit_pool(self, x: torch.Tensor) -> torch.Tensor:
        """open_clip ``VisionTransformer._pool`` + ``proj``."""
        v = self.model.visual
        if v.attn_pool is not None:
            if v.attn_pool_contrastive is not None:
                x = v.ln_post(x)
                tokens = v.attn_pool(x)
                pooled = v.attn_pool_contrastive(x if v.attn_pool_type == "parallel" else tokens)
            else:
                pooled = self._global_pool(v, v.ln_post(v.attn_pool(x)))
        elif v.final_ln_after_pool:
            pooled = v.ln_post(self._global_pool(v, x))
        else:
            pooled = self._global_pool(v, v.ln_post(x))
        return pooled @ v.proj if v.proj is not None else pooled

    def _no_prompts(self, visual_prompts, deep_visual_prompts) -> None:
        if visual_prompts is not None or deep_visual_prompts:
            raise FedlitError(
                f"backbone '{self.name}' has a {type(self.model.visual).__name__} image tower; visual prompts "
                "need a ViT tower (e.g. ViT-B-16)")

    def encode_image(
        self,
        images: torch.Tensor,
        visual_prompts: torch.Tensor | None = None,
        deep_visual_prompts: _TensorList | None = None,
        prompt_position: str = "after_cls",
        first_deep_block: int = 1,
    ) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> image features [B, embed_dim] (not normalised).

        ``visual_prompts`` [n, Wv] or [B, n, Wv]: extra tokens (VPT-shallow), or a function of the patch tokens after the
        positional embedding [B, M, Wv] returning them (FedMVP's PromptFormer); ``deep_visual_prompts[j]`` replaces
        them at the input of block ``j + first_deep_block``. Without prompts this equals ``model.encode_image``.
        """
        if not self.is_vit:
            self._no_prompts(visual_prompts, deep_visual_prompts)
            return self.model.encode_image(images.to(self.device))
        x = self._vit_tokens(images, visual_prompts, deep_visual_prompts, prompt_position, first_deep_block)
        return self._vit_pool(x)

    def encode_image_tokens(
        self,
        images: torch.Tensor,
        visual_prompts: torch.Tensor | None = None,
        deep_visual_prompts: _TensorList | None = None,
        prompt_position: str = "after_cls",
        first_deep_block: int = 1,
    ) -> torch.Tensor:
        """All output tokens, each projected: [B, 1+M, embed_dim]; token 0 is CLS, 1..M the patches (FedOTP).

        ViT: ``ln_post`` on every token, then ``@ proj``. ModifiedResNet: attention pooling with every position
        as a query (token 0 = the mean-query = ``encode_image``).
        """
        if not self.is_vit:
            self._no_prompts(visual_prompts, deep_visual_prompts)
            return self._resnet_tokens(images)
        v = self.model.visual
        if v.attn_pool is not None:
            raise FedlitError(f"backbone '{self.name}' pools with attention; per-patch tokens are not available")
        x = self._vit_tokens(images, visual_prompts, deep_visual_prompts, prompt_position, first_deep_block)
        x = v.ln_post(x)
        return x @ v.proj if v.proj is not None else x

    def encode_image_value_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """LoCoOp's / GalLoP's local features [B, 1+M, embed_dim]: token 0 = ``encode_image``, 1..M each patch
        through the last block's **value path** (MaskCLIP-style, no attention; FOCoOp repository
        ``src/models/clip_w_local/modified_clip_model_locoop.py``).

        ViT: with x the input of the last block, ``u = x + out_proj(v_proj(ln_1(x)))``, ``u + mlp(ln_2(u))``, then
        ``ln_post`` and ``@ proj``. ModifiedResNet: ``c_proj(v_proj(x))`` on every position of layer4's output
        (no positional embedding).
        """
        if not self.is_vit:
            x = self._resnet_layer4(images, "local features")
            ap = self.model.visual.attnpool
            local = ap.c_proj(ap.v_proj(x.flatten(2).transpose(1, 2)))
            return torch.cat([ap(x).unsqueeze(1), local], dim=1)
        v = self.model.visual
        if v.attn_pool is not None:
            raise FedlitError(f"backbone '{self.name}' pools with attention; per-patch tokens are not available")
        last = v.transformer.resblocks[-1]
        attn = getattr(last, "attn", None)
        if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
            raise FedlitError(f"backbone '{self.name}': the value path needs nn.MultiheadAttention blocks")
        seen = []
        hook = last.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        try:
            x = self._vit_tokens(images, None, None, "after_cls", 1)
        finally:
            hook.remove()
        h = seen[0] if v.transformer.batch_first else seen[0].transpose(0, 1)
        w = attn.embed_dim
        u = F.linear(last.ln_1(h), attn.in_proj_weight[2 * w:], attn.in_proj_bias[2 * w:])
        u = h + last.ls_1(attn.out_proj(u))
        u = u + last.ls_2(last.mlp(last.ln_2(u)))
        local = v.ln_post(u[:, 1:])
        local = local @ v.proj if v.proj is not None else local
        return torch.cat([self._vit_pool(x).unsqueeze(1), local], dim=1)

    def _resnet_layer4(self, images: torch.Tensor, what: str) -> torch.Tensor:
        """A ModifiedResNet tower's layer-4 feature map of ``images`` (``what``: the caller's need, for the error)."""
        v = self.model.visual
        if not hasattr(v, "attnpool") or not hasattr(v, "stem"):
            raise FedlitError(f"backbone '{self.name}': {what} need a ViT or ModifiedResNet tower")
        x = v.stem(images.to(device=v.conv1.weight.device, dtype=v.conv1.weight.dtype))
        return v.layer4(v.layer3(v.layer2(v.layer1(x))))

    def _resnet_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self._resnet_layer4(images, "per-patch tokens")
        ap = self.model.visual.attnpool
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)  # (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + ap.positional_embedding[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=ap.num_heads,
            q_proj_weight=ap.q_proj.weight, k_proj_weight=ap.k_proj.weight, v_proj_weight=ap.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([ap.q_proj.bias, ap.k_proj.bias, ap.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=ap.c_proj.weight, out_proj_bias=ap.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False,
        )
        return x.permute(1, 0, 2)

    # ----------------------------------------------------------------------------------------------- images
    def normalize_images(self, x: torch.Tensor, pixel_norm: dict | None = None) -> torch.Tensor:
        """Float images [B, 3, H, W] in [0, 1] -> resized (bicubic, antialiased) to ``image_size`` and mean/std
        normalised, on the model's device. ``pixel_norm`` (a dataset's own pre-processing, see
        :class:`~fedlit.data.registry.ImageSplit`) replaces that: its mean/std at the native size, then its resize
        (torchvision's tensor ``Resize``: antialiased, no clamp unless it says ``clamp``)."""
        x = x.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if pixel_norm is not None:
            mean = torch.tensor(pixel_norm["mean"], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(pixel_norm["std"], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
            if tuple(x.shape[-2:]) != self._size_hw:
                x = F.interpolate(x, size=self._size_hw, mode=pixel_norm["resize"], antialias=True,
                                  align_corners=False)
                if pixel_norm.get("clamp"):
                    x = x.clamp(0.0, 1.0)
            return x
        if tuple(x.shape[-2:]) != self._size_hw:
            x = F.interpolate(x, size=self._size_hw, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _transform(self, train: bool):
        from torchvision import transforms as T

        bicubic = T.InterpolationMode.BICUBIC
        if train:  # Dassl / CoOp: random_resized_crop (0.08, 1) + random_flip + normalize
            head = [T.RandomResizedCrop(self._size_hw, scale=(0.08, 1.0), interpolation=bicubic),
                    T.RandomHorizontalFlip()]
        else:  # CLIP: resize shortest side, centre crop
            head = [T.Resize(min(self._size_hw), interpolation=bicubic), T.CenterCrop(self._size_hw)]
        return T.Compose([T.Lambda(_to_rgb), *head, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def train_transform(self):
        """torchvision transform for PIL images: RandomResizedCrop(scale=(0.08, 1)) + flip + ToTensor + normalise."""
        return self._transform(train=True)

    def test_transform(self):
        """torchvision transform for PIL images: Resize (bicubic) + CenterCrop + ToTensor + normalise."""
        return self._transform(train=False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, image_size={self.image_size}"
