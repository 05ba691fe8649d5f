"""IVLP: independent vision-language prompting (Khattak et al., MaPLe paper's baseline), federated as FedMGP does.

MaPLe without the coupling: the text and the image tower each get their own learnable tokens.

- **Text**: ``n_ctx_text`` tokens at positions ``1..n_ctx_text`` of the CoOp template. With an init phrase and
  ``n_ctx_text ≤ 4`` (the official rule) the tokens start as the phrase's first ``n_ctx_text`` token embeddings and
  the *whole* phrase is written into the template, so "a photo of a" with 2 tokens learns "a photo" and keeps
  "of a {class}." as frozen text; otherwise N(0, 0.02²) with "X" placeholders. Deep text prompts: at the input of
  text blocks ``1..depth_text−1`` those positions are replaced by a fresh learnable block (N(0, 0.02²)).
- **Vision**: ``n_ctx_vision`` tokens (N(0, 0.02²)) appended after [CLS, patches] once the positional embedding
  has been added (no positional embedding of their own), before ``ln_pre``; deep vision prompts replace them at the
  input of vision blocks ``1..depth_vision−1``. The image feature is the CLS token after ``ln_post``·proj.
  ``n_ctx_vision: 0`` or ``prompt_depth_vision: 0`` is the official language-only IVLP
  (``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml``: both 0): no vision tensors, the image
  tower untouched (pooled features are cached). The vision depth is bounded by the vision tower's layers only (the
  official ``vision_depth``), not by the text tower's.
- **Federation** (FedMGP's IVLP learner): every tensor is shared and averaged, FedAvg weighted by the clients'
  training-sample counts (``weighted=False``: the unweighted mean of FedTPG's VLP baseline, see ``fedvlp``).

Defaults are FedMGP's federated IVLP (2 + 2 tokens, depth 1, "a photo of a", SGD lr 0.001 constant); the central
IVLP of the MaPLe repository uses depth 12 (``prompt_depth_text/vision: 12``, lr 0.0035, cosine). The official
code runs fp16 CLIP; fedlit uses the trainer's precision. ``image_input = "images"``: nothing is cached.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import FrozenCLIP
from ..errors import FedlitError
from ..prompts import Task, check_prompt_depth
from .base import FedMethod
from .fedmaple import _init_head, prefixed_template

#: the official rule: an init phrase is used only for at most this many text tokens
MAX_INIT_TOKENS = 4


class IVLPPrompt(nn.Module):
    """Shallow + deep text prompts and shallow + deep vision prompts, independent of each other."""

    def __init__(self, clip: FrozenCLIP, n_text: int = 2, n_vision: int = 2, depth_text: int = 1,
                 depth_vision: int = 1, ctx_init: str | None = "a photo of a"):
        super().__init__()
        self.n_text = n_text
        self.ctx_init = ctx_init if ctx_init and n_text <= MAX_INIT_TOKENS else None
        self.ctx = nn.Parameter(_init_head(clip, n_text, self.ctx_init))
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.randn(n_text, clip.text_width) * 0.02) for _ in range(depth_text - 1)])
        vision = n_vision > 0 and depth_vision > 0  # else language-only: no vision tensors
        self.vis_ctx = nn.Parameter(torch.randn(n_vision, clip.vision_width) * 0.02) if vision else None
        self.deep_vision = nn.ParameterList(
            [nn.Parameter(torch.randn(n_vision, clip.vision_width) * 0.02) for _ in range(depth_vision - 1)]
            if vision else [])

    def text_features(self, clip: FrozenCLIP, task: Task) -> torch.Tensor:
        tpl = prefixed_template(clip, task, self.ctx_init, self.n_text)
        feats = clip.encode_text_embeddings(tpl.splice(self.ctx), tpl.eot, deep_prompts=list(self.deep_text))
        return feats / feats.norm(dim=-1, keepdim=True)

    def image_features(self, clip: FrozenCLIP, images: torch.Tensor) -> torch.Tensor:
        if self.vis_ctx is None:
            return clip.encode_image(images)
        return clip.encode_image(images, visual_prompts=self.vis_ctx, deep_visual_prompts=list(self.deep_vision),
                                 prompt_position="append")


class IVLP(FedMethod):
    """Federated independent vision-language prompts (FedMGP's IVLP baseline).

    Args:
        n_ctx_text, n_ctx_vision: prompt tokens per layer in the text / image tower (2 / 2).
        prompt_depth_text, prompt_depth_vision: layers that receive prompts (1 / 1 federated; 12 / 12 in MaPLe's
            central IVLP; each at most its own tower's layers — 2 on the embedded fedlit-toy).
            ``n_ctx_vision`` or ``prompt_depth_vision`` 0: language-only (the official language-only config).
        ctx_init: init phrase of the text tokens ("a photo of a"; used only when ``n_ctx_text ≤ 4``).
        lr, momentum, weight_decay: local SGD (0.001 constant, 0.9, 5e-4).
        weighted: FedAvg weighted by sample count (FedMGP); False: unweighted mean.
    """

    name = "ivlp"
    image_input = "images"

    def __init__(self, n_ctx_text: int = 2, n_ctx_vision: int = 2, prompt_depth_text: int = 1,
                 prompt_depth_vision: int = 1, ctx_init: str | None = "a photo of a", lr: float = 0.001,
                 momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        for key, val, low in (("n_ctx_text", n_ctx_text, 1), ("n_ctx_vision", n_ctx_vision, 0),
                              ("prompt_depth_text", prompt_depth_text, 1),
                              ("prompt_depth_vision", prompt_depth_vision, 0)):
            if val < low:
                raise FedlitError(f"method.init_args.{key}={val}: must be >= {low}"
                                  + (" (0 = language-only)" if low == 0 else ""))
        self.n_ctx_text, self.n_ctx_vision = n_ctx_text, n_ctx_vision
        self.prompt_depth_text, self.prompt_depth_vision = prompt_depth_text, prompt_depth_vision
        self.ctx_init = ctx_init
        self.language_only = n_ctx_vision == 0 or prompt_depth_vision == 0
        if self.language_only:
            self.image_input = "features"  # image tower untouched: pooled features can be cached

    def build(self, clip: FrozenCLIP):
        if not clip.is_vit and not self.language_only:
            raise FedlitError(f"ivlp prompts a ViT image tower; backbone '{clip.name}' has none (use e.g. ViT-B-16)")
        check_prompt_depth(clip, self.prompt_depth_text, vision=False, key="prompt_depth_text")
        if not self.language_only:
            check_prompt_depth(clip, self.prompt_depth_vision, vision=True, only_vision=True,
                               key="prompt_depth_vision")
        return IVLPPrompt(clip, self.n_ctx_text, self.n_ctx_vision, self.prompt_depth_text, self.prompt_depth_vision,
                          self.ctx_init)

    def is_shared(self, key: str) -> bool:
        return True  # every text and vision prompt is averaged

    def text_features(self, prompt: IVLPPrompt, clip, task: Task) -> torch.Tensor:
        return prompt.text_features(clip, task)

    def image_features(self, prompt: IVLPPrompt, clip, x: torch.Tensor) -> torch.Tensor:
        if self.language_only:
            return super().image_features(prompt, clip, x)
        return prompt.image_features(clip, x)


__all__ = ["IVLP", "IVLPPrompt"]
