"""One text pass for several clients: the text side of lock-step training (``trainer.lockstep``).

Every CoOp-style method computes its class text features with :func:`fedlit.prompts.encode_context`, once or a few
times per step, from contexts that depend on the client's own tensors only. :class:`FusedText` is an explicit
text-encoding service that lets ``M`` clients' losses share that pass without any method knowing about it, each
loss running ONCE:

1. each client's loss runs in a worker thread of its own, one worker at a time (a strict hand-off, so the order of
   every operation — and of every draw from the global RNG — is fixed);
2. a worker whose loss asks for a text pass (with gradient) hands the call ``(template, context, deep prompts)`` to
   the service and waits; the next worker runs;
3. when every worker waits or is done, the service encodes the waiting calls together — calls on the same template
   concatenated along the context axis through ``encode_context`` itself (the shared-prefix path when the backbone
   has it); calls on different templates of the same context length (FedTPG: each client trains among its own
   classes) as one batch of sequences — and hands each worker its slice; the workers go on, in order.

The service is reached through the backbone (``clip.text_service``, set only while :meth:`FusedText.run` runs) and
answers only its own worker threads: every other text pass — the service's joint pass, passes without gradient,
other threads — runs directly. The loss a client gets is its own loss evaluated on its own context's features, so
summing the clients' losses and back-propagating once gives each client exactly the gradient of its own loss (up to
float rounding: the joint pass is a larger batched matmul). Grad mode and autocast are per thread: each job sets
its own (:func:`fedlit.engine.train_lockstep` wraps the loss in the run's autocast).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

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


def encode_calls(calls: list[_Call]) -> list[torch.Tensor]:
    """Every call's features, the calls grouped by context length / deep layout / options into joint passes."""
    groups: dict[tuple, list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault(call.key(), []).append(i)
    out: list = [None] * len(calls)
    for idx in groups.values():
        group = [calls[i] for i in idx]
        with torch.set_grad_enabled(group[0].grad):
            feats = _encode_group(group)
        for i, f in zip(idx, feats):
            out[i] = f[0] if calls[i].single else f
    return out


class _Worker:
    """One job in a thread of its own, advanced by the service in strict hand-off (``advance`` returns when the job
    waits for a text pass or is done)."""

    def __init__(self, job: Callable[[], Any], service: "FusedText"):
        self.job, self.service = job, service
        self.call: _Call | None = None  # the text pass it waits for
        self.answer: Any = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        self.service._workers[threading.get_ident()] = self
        try:
            self.result = self.job()
        except BaseException as e:  # handed to the caller of FusedText.run
            self.error = e
        finally:
            self.done = True
            self._back.release()

    def advance(self) -> None:
        if not self._thread.is_alive() and not self.done:
            self._thread.start()
        else:
            self._go.release()
        self._back.acquire()

    def wait_for(self, call: _Call):
        """In the worker's thread: hand ``call`` to the service, wait for its features."""
        self.call = call
        self._back.release()
        self._go.acquire()
        self.call, answer, self.answer = None, self.answer, None
        if isinstance(answer, BaseException):
            raise RuntimeError("lock-step: the joint text pass failed") from answer
        return answer


class FusedText:
    """The fused text-encoding service of lock-step training (module docstring)."""

    def __init__(self):
        self._workers: dict[int, _Worker] = {}
        self.passes = 0  # joint text passes made (one per wave of waiting calls)

    def run(self, clip, jobs: list[Callable[[], Any]], joint: Callable[[], contextlib.AbstractContextManager]
            = contextlib.nullcontext) -> list[tuple[Any, BaseException | None]]:
        """Run ``jobs`` (e.g. each client's loss of one step) with their text passes fused; ``joint()`` is the
        context the joint passes run in (the run's autocast). Returns ``(result, error)`` per job, in order."""
        if getattr(clip, "text_service", None) is not None:
            raise RuntimeError("lock-step text services do not nest")
        workers = [_Worker(job, self) for job in jobs]
        clip.text_service = self
        try:
            waiting = workers
            while waiting:
                for w in waiting:
                    w.advance()
                waiting = [w for w in waiting if not w.done]
                if not waiting:
                    break
                try:
                    with joint():
                        feats = encode_calls([w.call for w in waiting])
                    self.passes += 1
                except BaseException as e:
                    feats = [e] * len(waiting)
                for w, f in zip(waiting, feats):
                    w.answer = f
        finally:
            clip.text_service = None
            self._workers.clear()
        return [(w.result, w.error) for w in workers]

    def answers(self) -> bool:
        """Whether the calling thread is one of this service's workers (its text passes come here)."""
        return threading.get_ident() in self._workers

    def request(self, clip, tpl, ctx, deep_prompts=None, first_deep_block=1, normalize=True) -> torch.Tensor:
        """A worker's ``encode_context`` call: handed to the next joint pass."""
        call = _as_call(clip, tpl, ctx, deep_prompts, first_deep_block, normalize)
        return self._workers[threading.get_ident()].wait_for(call)


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


__all__ = ["FusedText", "encode_calls"]
