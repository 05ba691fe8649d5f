"""A client's local training in a round, one client at a time or several in lock-step (``trainer.lockstep``).

:class:`LocalRun` is one client-round: its state loaded into a :class:`~fedlit.client.ClientModule`, its optimiser,
its batches (the order, epochs, ``drop_last`` rule and augmentation views are functions of
``(seed, round, client, epoch)`` only), its step count and losses, and the :class:`~fedlit.methods.base.Update` it
ends with. :func:`train_alone` runs one; :func:`train_lockstep` runs several on their own modules at once:

    at step t, the clients that still have a batch (the active set) each compute their loss, once; the text passes
    of all of them are one joint pass (:class:`~fedlit.text_batch.FusedText`); the SUM of their losses is
    back-propagated once (each client's tensors get exactly its own loss's gradient); each active client's own
    optimiser steps. A client whose batches are exhausted leaves the active set: no step, no momentum update.

Each client keeps its own tensors and optimiser, so momentum, weight decay, schedules and persistent optimiser
state are per client as in the sequential loop, and the final prompts equal it up to float rounding.
Methods that prompt the image tower (``image_input = "images"``: MaPLe, VPT, IVLP, FedVLP, pFedPG, pFedMMA) train
one client at a time: their per-step cost is the image tower on their own prompts, which a joint text pass does
not save (:attr:`~fedlit.methods.base.FedMethod.lockstep`).
"""

from __future__ import annotations

import numpy as np
import torch

from .dp_sgd import client_sizes, noise_generator, private_backward, sigma_of, with_steps
from .methods.base import FedMethod, Update
from .text_batch import FusedText


class LocalRun:
    """One client's local training in round ``rnd`` on ``module``; ``orch`` is the orchestrator (federation,
    protocol, bank, trainer settings). ``sent``: what the server sent it (default: the protocol's payload)."""

    def __init__(self, orch, module, cid: int, rnd: int, sent: dict[str, torch.Tensor] | None = None):
        client, dev = orch.fed.clients[cid], orch.fabric.device
        self.cid, self.rnd, self.module, self.orch, self.client = cid, rnd, module, orch, client
        sent = orch.protocol.payload(cid) if sent is None else sent
        self.own = own = orch.protocol.state_of(cid)
        restart = orch.method.restart_personal  # official CoOp baseline: local training from the initial weights
        module.load_prompt_state(sent, orch.init_personal if restart else (own.personal or orch.init_personal))
        self.received = {k: v.to(dev) for k, v in sent.items()}
        self.task, self.classes = orch.fed.task_of(cid), orch.fed.held_classes(cid)
        module.train()
        self.optimizer, self.tracked, self.lr = orch._client_optimizer(own, module)
        self.y_all = torch.as_tensor(client.train_y, device=dev)
        self.losses: list[float] = []
        self.steps = 0
        self.error: str | None = None
        self.batches = self._batches()

    def _batches(self):
        """The client's batches ``(x, y)`` over all its local epochs, in order."""
        orch, cfg, client = self.orch, self.orch.cfg, self.client
        for epoch in range(cfg.local_epochs):
            draw = (orch.seed, self.rnd, self.cid, epoch)
            order = np.random.default_rng(list(draw)).permutation(client.num_samples)
            for s in cfg.batch_starts(len(order)):
                rows = order[s : s + cfg.batch_size]
                x = orch.bank.inputs("train", client.train_idx[rows],
                                     views=orch.bank.train_views(draw, client.num_samples, rows))
                yield x, self.y_all[rows]
            if self.error is None:  # after the epoch's last step (the generator resumes once it is done)
                orch.method.end_local_epoch(self.module.prompt, epoch, cfg.local_epochs)

    def loss(self, batch) -> torch.Tensor:
        return self.module.training_step(batch, self.steps, self.task, self.classes, self.received)

    def diverged(self, loss: torch.Tensor) -> bool:
        """A non-finite loss ends the client's round as a failed update (no step on it)."""
        if not torch.isfinite(loss):
            self.error = f"loss became {loss.item()}"
            return True
        return False

    def step(self, loss: torch.Tensor) -> None:
        """The optimiser step after the gradient of ``loss`` is in the client's tensors (the method's
        :meth:`~fedlit.methods.base.FedMethod.before_optimizer_step` may change it first)."""
        self.orch.method.before_optimizer_step(self.module.prompt)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        self.steps += 1

    def update(self) -> Update:
        n = self.client.num_samples
        if self.error is not None:
            return Update(self.cid, {}, {}, n, float("nan"), self.steps, error=self.error)
        shared, personal = self.module.export()
        optim = self.orch.optim.finish(self.optimizer, self.own)  # chain: the state goes on to the next client
        return Update(self.cid, shared, personal, n, float(np.mean(self.losses)) if self.losses else float("nan"),
                      self.steps, optim=optim, lr=self.lr)


def train_alone(fabric, run: LocalRun) -> Update:
    """The sequential loop: one client's steps, one after the other."""
    if run.orch.cfg.privacy is not None:
        return train_private(fabric, run)
    for batch in run.batches:
        with fabric.autocast():
            loss = run.loss(batch)
        if run.diverged(loss):
            break
        fabric.backward(loss)
        run.step(loss)
    return run.update()


# ------------------------------------------------------------------------------------------------ trainer.privacy
def train_private(fabric, run: LocalRun) -> Update:
    """:func:`train_alone` under client-side DP-SGD (``trainer.privacy``, :mod:`fedlit.dp_sgd`): every step's
    gradient is the clipped per-sample sum plus noise; the client's DP step count goes into its ``optim`` state."""
    o = run.orch
    settings, method = o.cfg.privacy, o.method
    sigma = sigma_of(settings, o.cfg, tuple(client_sizes(o.cfg, o.fed.clients).values()))
    for batch in run.batches:
        gen = noise_generator(o.seed, run.rnd, run.cid, run.steps)
        with fabric.autocast():
            loss = private_backward(run.module, batch, run.steps, run.task, run.classes, run.received, settings,
                                    sigma, gen, text_side=text_side(method))
        if run.diverged(loss):
            break
        run.step(loss)
    update = run.update()
    if update.ok:
        update.optim = with_steps(update.optim, run.own.optim, run.steps)
    return update


def text_side(method: FedMethod) -> bool:
    """Whether a method's per-sample gradients come from one text forward and one batched backward
    (:func:`fedlit.privacy.per_sample_gradients`): it declares ``per_sample_text_side``, or its loss is the base
    cross-entropy of CLIP logits on cached features against its text features (FedProx's term is added apart)."""
    if method.image_input == "images":
        return False
    plain = all(getattr(type(method), h) is getattr(FedMethod, h) for h in ("loss", "logits", "prepare",
                                                                           "image_features"))
    return bool(getattr(method, "per_sample_text_side", False)) or plain


def train_lockstep(fabric, runs: list[LocalRun]) -> list[Update]:
    """Several clients' local training at once (module docstring); their updates in the order of ``runs``."""
    text = FusedText()
    active = list(runs)
    while active:
        stepping = [(r, b) for r in active if (b := next(r.batches, None)) is not None]
        if not stepping:
            break
        if len(stepping) == 1:  # nothing to share
            with fabric.autocast():
                losses = [stepping[0][0].loss(stepping[0][1])]
        else:
            jobs = [lambda r=r, b=b: _autocast_loss(fabric, r, b) for r, b in stepping]
            done = text.run(runs[0].module.clip, jobs, joint=fabric.autocast)
            for _, error in done:
                if error is not None:
                    raise error
            losses = [loss for loss, _ in done]
        kept = [(r, loss) for (r, _), loss in zip(stepping, losses) if not r.diverged(loss)]
        if kept:
            fabric.backward(torch.stack([loss for _, loss in kept]).sum())
        for r, loss in kept:
            r.step(loss)
        active = [r for r, _ in kept]
    return [r.update() for r in runs]


def _autocast_loss(fabric, run: LocalRun, batch) -> torch.Tensor:
    """A client's loss in a lock-step worker thread (autocast is per thread)."""
    with fabric.autocast():
        return run.loss(batch)


__all__ = ["LocalRun", "text_side", "train_alone", "train_lockstep", "train_private"]
