"""Text-prompt machinery shared by every CoOp-style method.

A *task* is an ordered list of class names to classify among (a client's classes, all base classes,
all novel classes …). For a task and a context length ``n_ctx`` the frozen parts of the prompt
``[SOS] X X … X {class} . [EOT]`` — the SOS embedding, the class-name/suffix embeddings and the EOT
positions — are computed **once** (:class:`PromptTemplate`, cached per backbone) and every step only
splices the learned context between them and runs the text transformer in one batched pass.

:func:`encode_context` is the one entry point every CoOp-style method uses for that pass: ``P`` contexts ×
``C`` classes, with deep prompts, on the backbone's ``text_path`` — ``shared_prefix`` (the positions shared by
every class, ``[SOS][ctx]`` and any common class-name head, are encoded once per context) or ``plain`` (one
sequence per (context, class)). Both cut the sequence after the last EOT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

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

    @cached_property
    def length(self) -> int:
        """The last EOT position + 1: where every text pass of this template stops (a Python int, so that the
        pass needs no device sync to find it)."""
        return int(self.eot.max()) + 1

    @cached_property
    def common(self) -> int:
        """Number of leading positions whose token is the same for every class (≤ the first EOT): the prefix
        the shared-prefix path encodes once per context."""
        t = self.tokens
        same = (t == t[:1]).all(dim=0)
        run = int(same.int().cumprod(0).sum())
        return max(1, min(run, int(self.eot.min())))


def encode_context(clip: FrozenCLIP, tpl: PromptTemplate, ctx: torch.Tensor, deep_prompts=None,
                   first_deep_block: int = 1, normalize: bool = True) -> torch.Tensor:
    """Text features of a template with contexts spliced at positions ``1 … n``.

    ``ctx`` ``[n, W]`` (shared by all classes) → ``[C, D]``; ``[P, n, W]`` (``P`` contexts: CoCoOp's per image,
    FedPGP's σ and σ+UV, FedOTP's N prompts) → ``[P, C, D]``. ``deep_prompts[j]`` (``[n, W]`` or ``[P, n, W]``)
    replaces positions ``1 … n`` at the input of text block ``j + first_deep_block``. L2-normalised unless
    ``normalize=False``. Runs in one batched pass on ``clip.text_path``.
    """
    service = getattr(clip, "text_service", None)  # lock-step: fedlit.text_batch.FusedText, for its own workers
    if service is not None and torch.is_grad_enabled() and service.answers():
        return service.request(clip, tpl, ctx, deep_prompts, first_deep_block, normalize)
    single = ctx.dim() == 2
    ctxs = (ctx.unsqueeze(0) if single else ctx).to(tpl.prefix.dtype)
    n_pre, n = ctxs.shape[0], ctxs.shape[1]
    c = tpl.prefix.shape[0]
    deep = list(deep_prompts) if deep_prompts else None
    if clip.shares_prefix:
        head = max(tpl.common - 1 - n, 0)  # class-independent tokens after the context (MaPLe's "of a")
        prefix = torch.cat([tpl.prefix[:1].expand(n_pre, -1, -1), ctxs,
                            tpl.suffix[:1, :head].expand(n_pre, -1, -1)], dim=1)
        feats = clip.encode_text_shared(prefix, tpl.suffix[:, head:], tpl.eot, deep, 1, first_deep_block,
                                        length=tpl.length)
    else:
        emb = torch.cat([tpl.prefix.unsqueeze(0).expand(n_pre, -1, -1, -1),
                         ctxs.unsqueeze(1).expand(-1, c, -1, -1),
                         tpl.suffix.unsqueeze(0).expand(n_pre, -1, -1, -1)], dim=2)
        if clip.can_truncate:  # cut before materialising P·C full-length sequences
            emb = emb[:, :, : max(tpl.length, 1 + n)]
        emb = emb.reshape(n_pre * c, emb.shape[2], emb.shape[3])
        if deep is not None:
            deep = [p if p is None or p.dim() == 2 else p.expand(n_pre, -1, -1).repeat_interleave(c, dim=0)
                    for p in deep]
        feats = clip.encode_text_embeddings(emb, tpl.eot.repeat(n_pre), deep, 1, first_deep_block, length=tpl.length)
        feats = feats.reshape(n_pre, c, -1)
    if normalize:
        feats = feats / feats.norm(dim=-1, keepdim=True)
    return feats[0] if single else feats


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
        feats = clip.encode_tokens(tokens).float()  # cut at the last EOT: equals clip.encode_text
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


def check_prompt_depth(clip: FrozenCLIP, depth: int, vision: bool, only_vision: bool = False,
                       key: str = "prompt_depth") -> None:
    """Deep prompts need ``depth`` ≤ the layers of the text tower (and of the vision tower when prompted);
    ``only_vision``: a vision-only prompt depth (IVLP's independent vision prompts), ≤ the vision tower's layers."""
    text = len(clip.model.transformer.resblocks)
    layers = text if not (vision or only_vision) else len(clip.model.visual.transformer.resblocks)
    if vision and not only_vision:
        layers = min(layers, text)
    if depth > layers:
        from .errors import FedlitError

        raise FedlitError(f"method.init_args.{key}={depth} exceeds the {layers} transformer layers of "
                          f"backbone '{clip.name}'; use --method.init_args.{key} {layers} or less")


class ContextPrompt(nn.Module):
    """CoOp's learnable context: ``n_ctx`` vectors shared by all classes (class-token position "end")."""

    def __init__(self, clip: FrozenCLIP, n_ctx: int = 16, ctx_init: str | None = None):
        super().__init__()
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(init_context(clip, n_ctx, ctx_init))

    def text_features(self, clip: FrozenCLIP, task: Task, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features ``[C, D]`` of all classes of ``task`` in one batched pass."""
        return encode_context(clip, prompt_template(clip, task, self.n_ctx), self.ctx if ctx is None else ctx)
