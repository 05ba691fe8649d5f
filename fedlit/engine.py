"""The client engine: what a client does with what it was sent, in round mode (local epochs, one client at a time
or several in lock-step) and, through the same batch sampler and step, in step mode (:mod:`fedlit.steps`).

:class:`ClientRuntime` is everything local training needs — the federation (a client's data indices), the feature
bank, the method, the resolved :class:`~fedlit.run_plan.RunPlan`, the seed, the initial personal tensors and the
optimiser-state store — and nothing of the server's: client code is handed a runtime, never the orchestrator
(``tests/test_architecture.py`` holds it to that). The simulation's orchestrator, Flower's ClientApp and the
benchmarks all build one.

:class:`LocalRun` is one client-round: its state loaded into a :class:`~fedlit.client.ClientModule`, its optimiser,
its batches (:meth:`ClientRuntime.epoch_rows`: order, epochs, ``drop_last`` rule and augmentation views are functions
of ``(seed, round, client, epoch)`` only), its step count and losses, and the :class:`~fedlit.methods.base.Update` it
ends with. :func:`train_alone` runs one; :func:`train_lockstep` runs several on their own modules at once:

    at step t, the clients that still have a batch (the active set) each compute their loss, once; the text passes
    of all of them are one joint pass (:class:`~fedlit.text_batch.FusedText`); the SUM of their losses is
    back-propagated once (each client's tensors get exactly its own loss's gradient); each active client's own
    optimiser steps. A client whose batches are exhausted leaves the active set: no step, no momentum update.

Each client keeps its own tensors and optimiser, so momentum, weight decay, schedules and persistent optimiser
state are per client as in the sequential loop, and the final prompts equal it up to float rounding.
Methods that prompt the image tower (``image_input = "images"``) train one client at a time (the plan's
``lockstep`` is 1 for them: a joint text pass would not save their image-tower passes on per-client prompts).
:class:`Clients` runs a process's clients of a round that way, a raising client turned into a failed update.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import checkpoint as ckpt
from .dp_sgd import noise_generator, private_backward, with_steps
from .errors import FedlitError
from .heap import release_free_memory
from .methods.base import FedMethod, Update
from .optimizer_state import OptimizerLifecycle
from .rounds import ClientState, check_failures, failed_update
from .run_plan import RunPlan
from .text_batch import FusedText

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientRuntime:
    """What a client's local training needs (module docstring)."""

    fabric: object  #: the run's Lightning Fabric (device, autocast, backward, optimiser setup)
    federation: object  #: :class:`~fedlit.data.federation.Federation`: each client's data indices and tasks
    bank: object  #: :class:`~fedlit.features.FeatureBank`: what the method's forward takes, cached where exact
    method: FedMethod
    plan: RunPlan
    seed: int
    init_personal: Tensors  #: every client starts from these personal tensors
    optim: OptimizerLifecycle  #: the optimiser-state store (``chain``'s one state; the policy's rules)

    @property
    def device(self):
        return self.fabric.device

    def epoch_rows(self, cid: int, rnd: int, epoch: int, positions: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Client ``cid``'s batches in local epoch ``epoch`` of round ``rnd``, as sample positions: a permutation of
        ``positions`` (default: all its samples) drawn from (seed, round, client, epoch), cut by the plan's
        last-batch rule. Round mode and step mode share it."""
        positions = np.arange(self.federation.clients[cid].num_samples) if positions is None else positions
        order = np.random.default_rng([self.seed, rnd, cid, epoch]).permutation(len(positions))
        for s in self.plan.batch_starts(len(order)):
            yield positions[order[s : s + self.plan.settings.batch_size]]

    def inputs(self, cid: int, rnd: int, epoch: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch ``(x, y)`` of client ``cid`` at sample positions ``rows`` (with this epoch's
        augmentation views, :meth:`~fedlit.features.FeatureBank.train_views`)."""
        client = self.federation.clients[cid]
        x = self.bank.inputs("train", client.train_idx[rows],
                             views=self.bank.train_views((self.seed, rnd, cid, epoch), client.num_samples, rows))
        return x, torch.as_tensor(client.train_y[rows], device=self.device)

    def optimizer(self, module, own: ClientState):
        """The optimiser of one client-round on ``module`` under the plan's optimiser-state policy
        (:mod:`fedlit.optimizer_state`): (Fabric-wrapped optimizer, whether the client keeps a state, lr)."""
        optimizer, lr = self.optim.build(module, own)
        return self.fabric.setup_optimizers(optimizer), self.optim.tracked, lr


class LocalRun:
    """One client's local training in round ``rnd`` on ``module``: ``sent`` is what the server sent it this round,
    ``own`` what it kept (:class:`~fedlit.rounds.ClientState`)."""

    def __init__(self, rt: ClientRuntime, module, cid: int, rnd: int, sent: Tensors, own: ClientState):
        self.rt, self.cid, self.rnd, self.module, self.own = rt, cid, rnd, module, own
        self.client = rt.federation.clients[cid]
        start = rt.init_personal if rt.plan.restart_personal else (own.personal or rt.init_personal)
        module.load_prompt_state(sent, start)  # official CoOp baseline: every round from the initial weights
        self.received = {k: v.to(rt.device) for k, v in sent.items()}
        self.task, self.classes = rt.federation.task_of(cid), rt.federation.held_classes(cid)
        module.train()
        self.optimizer, self.tracked, self.lr = rt.optimizer(module, own)
        # ``cosine_steps``: the client's optimiser steps before this round, and its schedule's length
        self.lr_step0 = int(own.optim.get("lr_steps", 0))
        self.lr_total = rt.plan.settings.local_epochs * len(rt.plan.batch_starts(self.client.num_samples))
        self.last_lr = self.lr
        self.losses: list[float] = []
        self.steps = 0
        self.error: str | None = None
        self.batches = self._batches()

    def _batches(self):
        """The client's batches ``(x, y)`` over all its local epochs, in order; the method's ``end_local_epoch``
        after each epoch's last step (the generator resumes once the epoch is done). Under the plan's
        ``step_per: epoch_last_batch`` only each epoch's last batch (FedLAPT's code steps once per epoch, on the
        last batch; the forwards of the other batches change nothing and are not run)."""
        epochs = self.rt.plan.settings.local_epochs
        for epoch in range(epochs):
            batches = self.rt.epoch_rows(self.cid, self.rnd, epoch)
            if self.rt.plan.step_per == "epoch_last_batch":
                batches = list(batches)[-1:]
            for rows in batches:
                yield self.rt.inputs(self.cid, self.rnd, epoch, rows)
            if self.error is None:
                self.rt.method.end_local_epoch(self.module.prompt, epoch, epochs)

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
        self.rt.method.before_optimizer_step(self.module.prompt)
        if self.rt.plan.lr_schedule == "cosine_steps":  # a per-step schedule (FedLAPT's LambdaLR)
            lr = self.rt.method.policy.lr_at_step(self.lr, self.lr_step0 + self.steps, self.lr_total)
            for group in self.optimizer.param_groups:
                group["lr"] = group.get("fixed_lr", lr)
            self.last_lr = lr  # what the round reports (``train/lr``): its last step's
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        self.steps += 1

    def update(self) -> Update:
        n = self.client.num_samples
        if self.error is not None:
            return Update(self.cid, {}, {}, n, float("nan"), self.steps, error=self.error)
        shared, personal = self.module.export()
        optim = self.rt.optim.finish(self.optimizer, self.own, self.steps)  # chain: the state goes on to the next client
        return Update(self.cid, shared, personal, n, float(np.mean(self.losses)) if self.losses else float("nan"),
                      self.steps, optim=optim, lr=self.last_lr)


def train_alone(fabric, run: LocalRun) -> Update:
    """The sequential loop: one client's steps, one after the other (under ``trainer.privacy``:
    :func:`train_private`)."""
    if run.rt.plan.privacy is not None:
        return train_private(fabric, run)
    for batch in run.batches:
        with fabric.autocast():
            loss = run.loss(batch)
        if run.diverged(loss):
            break
        fabric.backward(loss)
        run.step(loss)
    return run.update()


def train_private(fabric, run: LocalRun) -> Update:
    """:func:`train_alone` under client-side DP-SGD (``trainer.privacy``, :mod:`fedlit.dp_sgd`): every step's
    gradient is the clipped per-sample sum plus noise; the client's DP step count goes into its ``optim`` state."""
    rt = run.rt
    settings, side = rt.plan.privacy, text_side(rt.method)
    for batch in run.batches:
        gen = noise_generator(rt.seed, run.rnd, run.cid, run.steps)
        with fabric.autocast():
            loss = private_backward(run.module, batch, run.steps, run.task, run.classes, run.received, settings,
                                    rt.plan.noise_multiplier, gen, text_side=side)
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
    return method.per_sample_text_side or plain


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


class Clients:
    """A process's clients of a round on one runtime: one at a time, or in lock-step groups of the plan's
    ``lockstep`` (0 = all of them); a client that raises becomes a failed update (``on_client_failure``).
    ``module`` is the process's client module (built once); lock-step lanes are built like it on demand."""

    def __init__(self, rt: ClientRuntime, module, make_module, verbose: bool = True):
        self.rt, self.module, self.make_module, self.verbose = rt, module, make_module, verbose
        self._lanes: list = []
        self._lockstep_warned = False

    def update(self, cid: int, rnd: int, sent: Tensors, own: ClientState) -> Update:
        """Client ``cid``'s round: load (``sent`` ∪ its own state) → local epochs → an Update; a raising client
        (not a :class:`FedlitError`) becomes a failed update."""
        ckpt.fault_point(f"client:{rnd + 1}:{cid}")
        try:
            update = train_alone(self.rt.fabric, LocalRun(self.rt, self.module, cid, rnd, sent, own))
        except FedlitError:
            raise
        except Exception as e:  # a bug or bad data in one client must not kill a long grid
            update = failed_update(cid, f"{type(e).__name__}: {e}", self.rt.federation.clients[cid].num_samples)
        check_failures(self.rt.plan.on_client_failure, [update], rnd)
        release_free_memory()  # the step buffers' pages: resident memory stays flat with many clients
        return update

    def train(self, cids: list[int], rnd: int, sent: dict[int, Tensors], state_of) -> list[Update]:
        """The round's updates of ``cids`` (``state_of(cid)``: what each kept)."""
        size = self.rt.plan.lockstep
        size = len(cids) if size == 0 else size
        if size <= 1 or len(cids) < 2:
            return [self.update(cid, rnd, sent[cid], state_of(cid)) for cid in cids]
        return [u for i in range(0, len(cids), size) for u in self.lockstep(cids[i:i + size], rnd, sent, state_of)]

    def lockstep(self, cids: list[int], rnd: int, sent: dict[int, Tensors], state_of) -> list[Update]:
        """:func:`train_lockstep` on ``cids``; if the joint computation raises, they train one at a time instead
        (so a raising client fails alone, as in the sequential loop)."""
        for cid in cids:
            ckpt.fault_point(f"client:{rnd + 1}:{cid}")
        try:
            runs = [LocalRun(self.rt, lane, cid, rnd, sent[cid], state_of(cid))
                    for lane, cid in zip(self.lanes(len(cids)), cids)]
            updates = train_lockstep(self.rt.fabric, runs)
        except FedlitError:
            raise
        except Exception as e:  # attribute the failure to its client: rerun the group sequentially (nothing was kept)
            if not self._lockstep_warned and self.verbose:
                self._lockstep_warned = True
                print(f"fedlit: warning: a lock-step group of {len(cids)} clients failed in round {rnd + 1} "
                      f"({type(e).__name__}: {str(e)[:160]}); its clients are retrained one at a time "
                      "(said once per run)")
            return [self.update(cid, rnd, sent[cid], state_of(cid)) for cid in cids]
        check_failures(self.rt.plan.on_client_failure, updates, rnd)
        release_free_memory()
        return updates

    def lanes(self, count: int) -> list:
        """``count`` client modules for lock-step training: the process's module and copies built like it (the
        global RNG untouched; their tensors are loaded from each client's state before training)."""
        while len(self._lanes) < count - 1:
            with torch.random.fork_rng(devices=[]):
                self._lanes.append(self.make_module())
        return [self.module, *self._lanes[: count - 1]]


__all__ = ["ClientRuntime", "Clients", "LocalRun", "text_side", "train_alone", "train_lockstep",
           "train_private"]
