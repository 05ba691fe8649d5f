"""FedMaPLe: MaPLe (Khattak et al., CVPR 2023) multi-modal prompts, trained by every client and averaged.

Text side (spec §6): the prompt text is ``"{ctx_init} {class}."`` (``"a photo of a {class}."``); its first
``n_ctx = 2`` word positions (``"a photo"``) are learnable and initialised from their token embeddings, the rest
of the template (``"of a {class}."``) stays frozen in the suffix. Deep prompts: ``prompt_depth − 1`` further text
prompts ``[n_ctx, W_text]`` (N(0, 0.02²)) replace positions ``1..n_ctx`` at the input of text blocks
``1..depth−1``.

Vision side (coupling): every text prompt has its own ``Linear(W_text → W_vision)``; the shallow vision prompt is
``proj(ctx)``, inserted after the patch tokens (``prompt_position="append"``, MaPLe's convention) before the
first block, and the deep ones ``proj_j(p_j)`` replace those tokens at the input of vision blocks ``1..depth−1``.
[UNVERIFIED: the "append" position and the cloned initial couplings below follow MaPLe's code as recalled, not a
line of the spec; spec §6 fixes only the shapes and the per-layer couplings.]
Both towers are the SAME frozen backbone (``clip.encode_text_embeddings(..., deep_prompts=...)`` and
``clip.encode_image(x, visual_prompts=..., deep_visual_prompts=...)``). As in MaPLe's code the deep coupling layers
are clones of one initial ``Linear`` (identical initial weights), the shallow ``proj`` is drawn separately.
ViT-B/16, depth 9: 1 024 + 8·1 024 (text prompts) + 9·(512·768 + 768) (couplings) = 3 555 072 parameters.

``image_input = "images"``: the image tower is prompted, nothing is cached. ``vision_prompts=False`` drops the
coupling (text-only deep prompts on cached image features); with ``prompt_depth=1`` that is CoOp with MaPLe's
template.

Federation: the whole prompt learner is shared and averaged (FedAvg weighted by sample count). [UNVERIFIED: the
``fedavgmaple`` branch and the MaPLe trainer are not in the released FedPGP repository (spec §3.5).] Defaults are
those of FedPGP's federated MaPLe runs: SGD lr 0.001, 25 rounds × 2 local epochs, batch = shots, n_ctx 2, depth 9.
``prompt_depth`` must not exceed the backbone's layers (12 for ViT-B/16; 2 for the embedded fedlit-toy: pass
``--method.init_args.prompt_depth 2``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..backbones import FrozenCLIP
from ..errors import FedlitError
from ..prompts import PromptTemplate, Task, check_prompt_depth, clean_classname, encode_context, text_cache
from .base import FedMethod
from .roles import DASSL_CHAIN


def prefixed_template(clip: FrozenCLIP, task: Task, prefix_text: str | None, n_ctx: int) -> PromptTemplate:
    """Frozen parts of ``"{prefix_text} {class}."`` whose positions ``1..n_ctx`` are learnable (MaPLe: the first
    ``n_ctx`` tokens of ``ctx_init``; ``prefix_text=None`` → ``"X … X {class}."``), cached per backbone."""
    cache = text_cache(clip)
    key = ("prefixed", task.key, prefix_text, n_ctx)
    if key not in cache.templates:
        head = prefix_text if prefix_text else " ".join(["X"] * n_ctx)
        texts = [f"{head} {clean_classname(c)}." for c in task.classnames]
        tokens = clip.tokenize(texts).to(clip.device)
        eot = clip.eot_index(tokens)
        if int(eot.max()) >= tokens.shape[1] - 1:
            longest = max(task.classnames, key=len)
            raise FedlitError(f"prompt '{head} {longest}.' does not fit the text encoder's {tokens.shape[1]} "
                              "tokens; use a shorter ctx_init")
        with torch.no_grad():
            emb = clip.token_embedding(tokens)
        cache.templates[key] = PromptTemplate(prefix=emb[:, :1].detach(), suffix=emb[:, 1 + n_ctx:].detach(),
                                              eot=eot, tokens=tokens)
    return cache.templates[key]


def _init_head(clip: FrozenCLIP, n_ctx: int, ctx_init: str | None) -> torch.Tensor:
    """Initial shallow context: the first ``n_ctx`` token embeddings of ``ctx_init`` or N(0, 0.02²)."""
    if not ctx_init:
        return torch.randn(n_ctx, clip.text_width) * 0.02
    tokens = clip.tokenize([ctx_init])
    n_words = int(clip.eot_index(tokens)[0]) - 1
    if n_words < n_ctx:
        raise FedlitError(f"ctx_init '{ctx_init}' has {n_words} tokens, fewer than n_ctx={n_ctx}; "
                          "use a longer ctx_init or a smaller n_ctx")
    with torch.no_grad():
        return clip.token_embedding(tokens)[0, 1:1 + n_ctx].detach().float().clone()


class MaPLePrompt(nn.Module):
    """MaPLe's prompt learner: shallow ctx, deep text prompts, and their text→vision couplings."""

    def __init__(self, clip: FrozenCLIP, n_ctx: int = 2, ctx_init: str | None = "a photo of a", depth: int = 9,
                 vision: bool = True):
        super().__init__()
        self.n_ctx, self.ctx_init, self.depth, self.vision = n_ctx, ctx_init, depth, vision
        w = clip.text_width
        self.ctx = nn.Parameter(_init_head(clip, n_ctx, ctx_init))
        self.deep_text = nn.ParameterList([nn.Parameter(torch.randn(n_ctx, w) * 0.02) for _ in range(depth - 1)])
        if vision:
            self.proj = nn.Linear(w, clip.vision_width)
            one = nn.Linear(w, clip.vision_width)
            self.deep_proj = nn.ModuleList([copy.deepcopy(one) for _ in range(depth - 1)])

    def text_features(self, clip: FrozenCLIP, task: Task) -> torch.Tensor:
        tpl = prefixed_template(clip, task, self.ctx_init, self.n_ctx)
        return encode_context(clip, tpl, self.ctx, deep_prompts=list(self.deep_text))

    def vision_prompts(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(shallow ``[n_ctx, W_vision]``, deep list) vision prompts coupled from the text prompts."""
        return self.proj(self.ctx), [f(p) for f, p in zip(self.deep_proj, self.deep_text)]

    def image_features(self, clip: FrozenCLIP, images: torch.Tensor) -> torch.Tensor:
        if not self.vision:
            return images  # cached pooled features
        shallow, deep = self.vision_prompts()
        return clip.encode_image(images, visual_prompts=shallow, deep_visual_prompts=deep, prompt_position="append")


class FedMaPLe(FedMethod):
    """Federated MaPLe: coupled multi-modal deep prompts, all shared and averaged.

    Args:
        n_ctx: learnable context tokens per layer (2).
        ctx_init: template head whose first ``n_ctx`` tokens initialise the context ("a photo of a";
            ``null``: N(0, 0.02²) and template "X X {class}.").
        prompt_depth: layers that receive prompts (9 for ViT-B/16; at most the backbone's layers).
        vision_prompts: couple vision prompts from the text prompts (MaPLe); False: text prompts only.
        lr, momentum, weight_decay, weighted: see :class:`FedMethod`.
    """

    name = "fedmaple"
    policy = DASSL_CHAIN  # run in FedPGP's Dassl code base: one local_trainer for all clients, drawn order
    image_input = "images"

    def __init__(self, n_ctx: int = 2, ctx_init: str | None = "a photo of a", prompt_depth: int = 9,
                 vision_prompts: bool = True, lr: float = 0.001, momentum: float = 0.9, weight_decay: float = 5e-4,
                 weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        if n_ctx < 1:
            raise FedlitError(f"method.init_args.n_ctx={n_ctx}: needs at least 1 context token")
        if prompt_depth < 1:
            raise FedlitError(f"method.init_args.prompt_depth={prompt_depth}: needs at least 1 (the input layer)")
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.prompt_depth = prompt_depth
        self.vision_prompts = vision_prompts
        if not vision_prompts:
            self.image_input = "features"  # image tower untouched: pooled features can be cached

    def build(self, clip: FrozenCLIP):
        if self.vision_prompts and not clip.is_vit:
            raise FedlitError(f"fedmaple couples vision prompts into a ViT image tower; backbone '{clip.name}' "
                              "has none (use a ViT backbone or --method.init_args.vision_prompts false)")
        check_prompt_depth(clip, self.prompt_depth, vision=self.vision_prompts)
        return MaPLePrompt(clip, self.n_ctx, self.ctx_init, self.prompt_depth, self.vision_prompts)

    def is_shared(self, key: str) -> bool:
        return True  # [UNVERIFIED] the whole prompt learner is averaged

    def text_features(self, prompt: MaPLePrompt, clip, task: Task) -> torch.Tensor:
        return prompt.text_features(clip, task)

    def image_features(self, prompt: MaPLePrompt, clip, x: torch.Tensor) -> torch.Tensor:
        return prompt.image_features(clip, x)
