"""One text pass for several clients: the text side of lock-step training (``trainer.lockstep``).

Every CoOp-style method computes its class text features with :func:`fedlit.prompts.encode_context`, once or a few
times per step, from contexts that depend on the client's own tensors only. :class:`TextBatch` lets ``M`` clients'
losses share that pass without any method knowing about it:

1. **record** — each client's loss runs once with ``encode_context`` answering a placeholder (the call's
   ``(template, context, deep prompts)`` are kept, contexts with their autograd graph to the client's tensors);
   those losses are thrown away;
2. **encode** — the recorded calls are encoded together: calls on the same template are concatenated along the
   context axis and take ``encode_context`` itself (the shared-prefix path when the backbone has it); calls on
   different templates of the same context length (FedTPG: each client trains among its own classes) are
   encoded as one batch of sequences on the plain path;
3. **replay** — each client's loss runs again, ``encode_context`` answering, in call order, its slice of the joint
   result (checked to be the call recorded: same template, same context shape).

The loss a client gets is its own loss evaluated on its own context's features, so summing the clients' losses and
back-propagating once gives each client exactly the gradient of its own loss (up to float rounding: the joint pass
is a larger batched matmul). What a method computes besides the text pass (a prompt generator, the logits) runs
twice; the text pass, which dominates, runs once for all clients.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import prompts
from .prompts import PromptTemplate, encode_context


@dataclass
class _Call:
    clip: object
    tpl: PromptTemplate
    ctx: torch.Tensor  # [P, n, W]
    single: bool
    deep: list | None  # per block: [P, n, W] or None
    first: int
    normalize: bool
    grad: bool

    @property
    def head(self) -> int:
        """Class-independent tokens after the context, kept in the shared prefix (as :func:`encode_context`)."""
        return max(self.tpl.common - 1 - self.ctx.shape[1], 0) if self.clip.shares_prefix else 0

    def key(self) -> tuple:
        deep = None if self.deep is None else tuple(None if p is None else tuple(p.shape[1:]) for p in self.deep)
        return id(self.clip), self.ctx.shape[1:], deep, self.first, self.normalize, self.grad, self.head


def _as_call(clip, tpl, ctx, deep_prompts, first_deep_block, normalize) -> _Call:
    single = ctx.dim() == 2
    ctxs = ctx.unsqueeze(0) if single else ctx
    p = ctxs.shape[0]
    deep = None
    if deep_prompts:
        deep = [None if d is None else (d.unsqueeze(0) if d.dim() == 2 else d).expand(p, -1, -1) for d in deep_prompts]
    return _Call(clip, tpl, ctxs, single, deep, first_deep_block, normalize, torch.is_grad_enabled())


class TextBatch:
    """Record → encode → replay the ``encode_context`` calls of several clients' losses (module docstring)."""

    def __init__(self):
        self.calls: list[_Call] = []
        self.results: list[torch.Tensor] = []
        self._next = 0

    # ------------------------------------------------------------------------------------------ the three phases
    @contextlib.contextmanager
    def recording(self):
        """Calls of ``encode_context`` inside are recorded and answered with a placeholder."""
        self.calls, self.results, self._next = [], [], 0
        with _hooked(self._record):
            yield

    def encode(self) -> None:
        """Encode every recorded call, grouped (module docstring)."""
        groups: dict[tuple, list[int]] = {}
        for i, call in enumerate(self.calls):
            groups.setdefault(call.key(), []).append(i)
        self.results = [None] * len(self.calls)
        for idx in groups.values():
            calls = [self.calls[i] for i in idx]
            with torch.set_grad_enabled(calls[0].grad):
                feats = _encode_group(calls)
            for i, f in zip(idx, feats):
                self.results[i] = f[0] if self.calls[i].single else f

    @contextlib.contextmanager
    def replaying(self):
        """Calls of ``encode_context`` inside are answered with the encoded results, in recorded order."""
        self._next = 0
        with _hooked(self._replay):
            yield
        if self._next != len(self.calls):
            raise RuntimeError(f"lock-step replay made {self._next} text passes, the recording {len(self.calls)}")

    # ------------------------------------------------------------------------------------------ the hooks
    def _record(self, clip, tpl, ctx, deep_prompts=None, first_deep_block=1, normalize=True):
        call = _as_call(clip, tpl, ctx, deep_prompts, first_deep_block, normalize)
        self.calls.append(call)
        d = clip.embed_dim
        shape = (tpl.prefix.shape[0], d) if call.single else (call.ctx.shape[0], tpl.prefix.shape[0], d)
        return torch.full(shape, d ** -0.5, device=ctx.device)

    def _replay(self, clip, tpl, ctx, deep_prompts=None, first_deep_block=1, normalize=True):
        i = self._next
        call = self.calls[i] if i < len(self.calls) else None
        if call is None or call.tpl is not tpl or call.ctx.shape != (ctx.unsqueeze(0) if ctx.dim() == 2 else ctx).shape:
            raise RuntimeError(f"lock-step replay: text pass {i} differs from the recorded one")
        self._next += 1
        return self.results[i]


@contextlib.contextmanager
def _hooked(fn):
    if prompts.ENCODE_HOOK is not None:
        raise RuntimeError("lock-step text batches do not nest")
    prompts.ENCODE_HOOK = fn
    try:
        yield
    finally:
        prompts.ENCODE_HOOK = None


def _encode_group(calls: list[_Call]) -> list[torch.Tensor]:
    """Features ``[P_i, C_i, D]`` of each call of a group (same context length, deep layout, options)."""
    first = calls[0]
    sizes = [c.ctx.shape[0] for c in calls]
    deep = None
    if first.deep is not None:
        deep = [None if first.deep[j] is None else torch.cat([c.deep[j] for c in calls]) for j in range(len(first.deep))]
    if all(c.tpl is first.tpl for c in calls):
        feats = encode_context(first.clip, first.tpl, torch.cat([c.ctx for c in calls]), deep, first.first,
                               first.normalize)
        return list(feats.split(sizes))
    return _encode_mixed(calls, deep)


def _encode_mixed(calls: list[_Call], deep: list | None) -> list[torch.Tensor]:
    """Contexts on different templates (same context length): the shared-prefix path with a suffix set per context
    (class lists padded to the longest by repeating their last class) when the backbone has it, else one batch of
    ``Σ P_i·C_i`` sequences on the plain path."""
    clip, n = calls[0].clip, calls[0].ctx.shape[1]
    if clip.shares_prefix:
        return _encode_mixed_shared(calls, deep)
    length = max(max(c.tpl.length for c in calls), 1 + n) if clip.can_truncate else None
    embs, eots, counts = [], [], []
    for c in calls:
        p, k = c.ctx.shape[0], c.tpl.prefix.shape[0]
        emb = torch.cat([c.tpl.prefix.unsqueeze(0).expand(p, -1, -1, -1),
                         c.ctx.to(c.tpl.prefix.dtype).unsqueeze(1).expand(-1, k, -1, -1),
                         c.tpl.suffix.unsqueeze(0).expand(p, -1, -1, -1)], dim=2)
        if length is not None:
            emb = emb[:, :, :length]
        embs.append(emb.reshape(p * k, emb.shape[2], emb.shape[3]))
        eots.append(c.tpl.eot.repeat(p))
        counts.append(k)
    if deep is not None:  # [ΣP, n, W] → one row per sequence
        reps = torch.tensor([k for c, k in zip(calls, counts) for _ in range(c.ctx.shape[0])], device=embs[0].device)
        deep = [None if d is None else d.repeat_interleave(reps, dim=0) for d in deep]
    feats = clip.encode_text_embeddings(torch.cat(embs), torch.cat(eots), deep, 1, calls[0].first, length=length)
    if calls[0].normalize:
        feats = feats / feats.norm(dim=-1, keepdim=True)
    out, start = [], 0
    for c, k in zip(calls, counts):
        p = c.ctx.shape[0]
        out.append(feats[start:start + p * k].reshape(p, k, -1))
        start += p * k
    return out


def _encode_mixed_shared(calls: list[_Call], deep: list | None) -> list[torch.Tensor]:
    head = calls[0].head
    counts = [c.tpl.prefix.shape[0] for c in calls]
    most = max(counts)
    prefixes, suffixes, eots = [], [], []
    for c, k in zip(calls, counts):
        p, tpl = c.ctx.shape[0], c.tpl
        prefixes.append(torch.cat([tpl.prefix[:1].expand(p, -1, -1), c.ctx.to(tpl.prefix.dtype),
                                   tpl.suffix[:1, :head].expand(p, -1, -1)], dim=1))
        rows = torch.arange(most, device=tpl.eot.device).clamp(max=k - 1)
        suffixes.append(tpl.suffix[rows, head:].unsqueeze(0).expand(p, -1, -1, -1))
        eots.append(tpl.eot[rows].unsqueeze(0).expand(p, -1))
    length = max(c.tpl.length for c in calls)
    feats = calls[0].clip.encode_text_shared(torch.cat(prefixes), torch.cat(suffixes), torch.cat(eots), deep, 1,
                                             calls[0].first, length=length)
    if calls[0].normalize:
        feats = feats / feats.norm(dim=-1, keepdim=True)
    sizes = [c.ctx.shape[0] for c in calls]
    return [f[:, :k] for f, k in zip(feats.split(sizes), counts)]


__all__ = ["TextBatch"]
