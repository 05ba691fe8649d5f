"""Text-prompt machinery shared by every CoOp-style method.

A *task* is an ordered list of class names to classify among (a client's classes, all base classes,
all novel classes …). For a task and a context length ``n_ctx`` the frozen parts of the prompt
``[SOS] X X … X {class} . [EOT]`` — the SOS embedding, the class-name/suffix embeddings and the EOT
positions — are computed **once** (:class:`PromptTemplate`, cached per backbone) and every step only
splices the learned context between them and runs the text transformer in one batched pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .backbones import FrozenCLIP
from .data.task import Task


def clean_classname(name: str) -> str:
    return name.replace("_", " ")


@dataclass
class PromptTemplate:
    """Frozen token embeddings of ``"X X … X {class}."`` for one task, split around the context."""

    prefix: torch.Tensor  # [C, 1, W]  SOS
    suffix: torch.Tensor  # [C, L-1-n_ctx, W]  class tokens, ".", EOT, padding
    eot: torch.Tensor  # [C]
    tokens: torch.Tensor  # [C, L]

    def splice(self, ctx: torch.Tensor) -> torch.Tensor:
        """Insert a context ``[n_ctx, W]`` (shared by all classes) or ``[C, n_ctx, W]``."""
        c = self.prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(c, -1, -1)
        ctx = ctx.to(self.prefix.dtype)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)


@dataclass
class TextCache:
    """Per-backbone cache of frozen text work, keyed by (task, n_ctx) or (task, template)."""

    templates: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)


_CACHES: dict[int, TextCache] = {}


def text_cache(clip: FrozenCLIP) -> TextCache:
    return _CACHES.setdefault(id(clip), TextCache())


def prompt_template(clip: FrozenCLIP, task: Task, n_ctx: int) -> PromptTemplate:
    """The frozen SOS/suffix embeddings of ``task`` for a context of ``n_ctx`` tokens (cached)."""
    cache = text_cache(clip)
    key = (task.key, n_ctx)
    if key not in cache.templates:
        texts = [" ".join(["X"] * n_ctx) + " " + clean_classname(c) + "." for c in task.classnames]
        tokens = clip.tokenize(texts).to(clip.device)
        eot = clip.eot_index(tokens)
        if int(eot.max()) >= tokens.shape[1] - 1:  # EOT forced into the last slot: truncated
            longest = max(task.classnames, key=len)
            from .errors import FedlitError

            raise FedlitError(
                f"prompt '{' '.join(['X'] * n_ctx)} {longest}.' does not fit the text encoder's "
                f"{tokens.shape[1]} tokens; use a smaller n_ctx"
            )
        with torch.no_grad():
            emb = clip.token_embedding(tokens)
        cache.templates[key] = PromptTemplate(
            prefix=emb[:, :1].detach(), suffix=emb[:, 1 + n_ctx :].detach(), eot=eot, tokens=tokens
        )
    return cache.templates[key]


@torch.no_grad()
def handcrafted_features(clip: FrozenCLIP, task: Task, template: str = "a photo of a {}.") -> torch.Tensor:
    """L2-normalised text features of a fixed template per class (zero-shot CLIP), cached."""
    cache = text_cache(clip)
    key = (task.key, template)
    if key not in cache.features:
        tokens = clip.tokenize([template.format(clean_classname(c)) for c in task.classnames])
        feats = clip.encode_text(tokens.to(clip.device)).float()
        cache.features[key] = feats / feats.norm(dim=-1, keepdim=True)
    return cache.features[key]


def init_context(clip: FrozenCLIP, n_ctx: int, ctx_init: str | None, std: float = 0.02) -> torch.Tensor:
    """Initial context vectors: the token embeddings of ``ctx_init`` (CoOp) or N(0, std²)."""
    if ctx_init:
        tokens = clip.tokenize([ctx_init]).to(clip.device)
        n = int(clip.eot_index(tokens)[0]) - 1
        if n != n_ctx:
            from .errors import FedlitError

            raise FedlitError(f"ctx_init '{ctx_init}' has {n} tokens but n_ctx={n_ctx}; make them agree")
        with torch.no_grad():
            return clip.token_embedding(tokens)[0, 1 : 1 + n_ctx].detach().float().clone()
    return torch.randn(n_ctx, clip.text_width) * std


def check_prompt_depth(clip: FrozenCLIP, depth: int, vision: bool) -> None:
    """Deep prompts need ``depth`` ≤ the layers of the text tower (and of the vision tower when prompted)."""
    layers = len(clip.model.transformer.resblocks)
    if vision:
        layers = min(layers, len(clip.model.visual.transformer.resblocks))
    if depth > layers:
        from .errors import FedlitError

        raise FedlitError(f"method.init_args.prompt_depth={depth} exceeds the {layers} transformer layers of "
                          f"backbone '{clip.name}'; use --method.init_args.prompt_depth {layers} or less")


class ContextPrompt(nn.Module):
    """CoOp's learnable context: ``n_ctx`` vectors shared by all classes (class-token position "end")."""

    def __init__(self, clip: FrozenCLIP, n_ctx: int = 16, ctx_init: str | None = None):
        super().__init__()
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(init_context(clip, n_ctx, ctx_init))

    def text_features(self, clip: FrozenCLIP, task: Task, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features ``[C, D]`` of all classes of ``task`` in one batched pass."""
        tpl = prompt_template(clip, task, self.n_ctx)
        emb = tpl.splice(self.ctx if ctx is None else ctx)
        feats = clip.encode_text_embeddings(emb, tpl.eot)
        return feats / feats.norm(dim=-1, keepdim=True)
