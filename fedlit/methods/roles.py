"""A method's roles besides its prompt model: how its clients train (:class:`ClientPolicy`) and what its server does
(:class:`ServerAlgorithm`). A :class:`~fedlit.methods.base.FedMethod` is the prompt model (what is trained, how it
classifies) and names one of each: ``policy = DASSL_CHAIN`` (the Dassl code bases' loop), ``server = FedAvg()``.

- :class:`ClientPolicy` — frozen: the optimiser's lifecycle across clients and rounds, the training order, the
  last-batch rule, the augmentation, the restart rule, the lr schedule (per participation or per step), the step
  cadence (every batch, or once per epoch: FedLAPT), the proximal term, round or step mode and
  the step loop. These are the method's *official* loop; the run plan (:mod:`fedlit.run_plan`) resolves the
  trainer's ``method`` settings to them and applies the trainer's overrides (``trainer.optimizer_state``,
  ``drop_last``, ``augment``, ``prox_mu``, ``privacy`` …), so every policy part combines with every prompt model.
- :class:`ServerAlgorithm` — how uploads combine (:class:`FedAvg`: weighted by sample count or uniform) and the
  shared gradient of a step-synchronous round; methods with a server of their own (pFedPG's generator, pFedMoAP's
  expert bank, FedPHA's rank-wise write-back) override the method's server hooks.

A method class may still set the legacy flags (``official_optimizer_state = "chain"``, ``train_order``,
``default_drop_last``, ``default_augment``, ``restart_personal``, ``lr_schedule``, ``schedule_rounds``, ``prox_mu``,
``prox_detached``, ``sync``, ``loop_defaults``, ``persistent_optimizer``): they are folded into its policy when the
class is defined (:func:`fold_legacy_flags`), and read / written on an instance through the policy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..aggregation import fedavg, uniform_mean, weighted_mean


@dataclass(frozen=True)
class ClientPolicy:
    """How a method's clients train, as its official loop does (module docstring)."""

    #: ``fresh`` (a new optimiser per client-round), ``chain`` (one optimiser state handed from client to client in
    #: training order, across rounds: one Dassl ``local_trainer`` for every client) or ``per_client`` (each client
    #: keeps its own across its participations: FedTPG's code base)
    optimizer_state: str = "fresh"
    #: ``sorted`` (client index order) or ``drawn`` (``np.random.choice`` order every round; round 0 in index order)
    train_order: str = "sorted"
    drop_last: str = "dassl"  #: ``dassl`` (Dassl's loaders) or ``never`` (FedTPG's loaders)
    augment: str = "dassl"  #: ``dassl`` (random resized crop + flip, a fresh view every epoch) or ``none``
    restart_personal: bool = False  #: every local update from the initial personal tensors (official CoOp baseline)
    #: ``constant``, ``cosine`` over a client's participations (FedTPG), or ``cosine_steps``: a per-optimiser-step
    #: cosine over ``local_epochs × batches per epoch`` steps, each client's step count kept across its rounds
    #: (FedLAPT's per-client ``LambdaLR``; :meth:`lr_at_step`)
    lr_schedule: str = "constant"
    schedule_rounds: int = 500
    #: ``batch`` (an optimiser step after every batch) or ``epoch_last_batch`` (one step per local epoch, on the
    #: epoch's last batch only: FedLAPT's code, whose loss / backward / step sit outside the batch loop)
    step_per: str = "batch"
    prox_mu: float = 0.0  #: FedProx's μ (``trainer.prox_mu`` overrides it for any method)
    prox_detached: bool = False  #: the official FedOTP-code-base term on detached tensors (no gradient)
    sync: str = "round"  #: ``round`` (local epochs, then aggregation) or ``step`` (FedSGD: DP-FPL)
    #: the official step-mode loop (``step_start`` / ``optimizer_state`` / ``personal_grad``), as (key, value) pairs
    step_loop: tuple[tuple[str, str], ...] = ()

    def lr_at(self, lr: float, participations: int) -> float:
        """The learning rate of a client in its ``participations``-th participation (0-based)."""
        if self.lr_schedule == "cosine":
            return 0.5 * lr * (1.0 + math.cos(math.pi * participations / self.schedule_rounds))
        return lr

    def lr_at_step(self, lr: float, step: int, total: int) -> float:
        """``cosine_steps``: the lr of a client's ``step``-th optimiser step (0-based, counted over all its rounds) of a
        schedule ``total`` steps long — ``lr·(m + (1 − m)·½(1 + cos(π·step/total)))``, m = 1e-8 (FedLAPT's
        ``cosine_annealing(step, E·len(loader), 1, 1e-8)``; past ``total`` the cosine rises again, as the official
        ``LambdaLR`` does). Other schedules: ``lr``."""
        if self.lr_schedule != "cosine_steps":
            return lr
        m = 1e-8
        return lr * (m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1))))

    def replace(self, **changes) -> ClientPolicy:
        return dataclasses.replace(self, **changes)


#: the Dassl code bases (FedPGP, FedOTP, PromptFL, CoOp, FedCoCoOp, FedMaPLe …): one local_trainer for every client,
#: clients trained in ``np.random.choice`` order
DASSL_CHAIN = ClientPolicy(optimizer_state="chain", train_order="drawn")
#: the Dassl forks of the 2025 methods (PromptFolio, FedPHA, pFedMoAP, pFedMMA): one optimiser, clients in index order
DASSL_FORK = ClientPolicy(optimizer_state="chain")
#: FedTPG's code base: per-client momentum and cosine lr over participations, no drop_last, no augmentation
FEDTPG_CLIENT = ClientPolicy(optimizer_state="per_client", drop_last="never", augment="none", lr_schedule="cosine")
#: the FOCoOp repository's baselines (FedLoCoOp, FedGalLoP; PengyangZhou/FOCoOp main_fpl.py, client_base.py): one SGD
#: optimiser per client created once and kept (its momentum persists across rounds), no drop_last, Resize + CenterCrop
FOCOOP_REPO = ClientPolicy(optimizer_state="per_client", drop_last="never", augment="none")


class ServerAlgorithm:
    """What the server does with a round's uploads (default: nothing is combined)."""

    def aggregate(self, updates: Sequence, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return global_state

    def combine_gradients(self, grads: Sequence[dict[str, torch.Tensor]],
                          num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
        """Step mode: the shared gradient every client applies."""
        return {}


@dataclass(frozen=True)
class FedAvg(ServerAlgorithm):
    """FedAvg: the mean of the uploads, weighted by each client's number of training samples (FedPGP/FedOTP) or
    uniform (FedTPG); in step mode the same mean of the shared gradients (FedSGD)."""

    weighted: bool = True

    def aggregate(self, updates: Sequence, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        states = [u.shared for u in updates]
        if not states or not states[0]:
            return global_state
        return fedavg(states, [u.num_samples for u in updates]) if self.weighted else uniform_mean(states)

    def combine_gradients(self, grads: Sequence[dict[str, torch.Tensor]],
                          num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
        if not grads or not grads[0]:
            return {}
        return fedavg(grads, num_samples) if self.weighted else uniform_mean(grads)


@dataclass(frozen=True)
class BatchWeightedFedAvg(ServerAlgorithm):
    """The mean of the uploads weighted by each client's number of training batches per epoch (the FOCoOp
    repository's ``len(train_loader)`` weights, spec 3b §2.4 / §2.9): ``batches[cid]``, from
    :func:`training_batches`."""

    batches: tuple[int, ...]

    def aggregate(self, updates: Sequence, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        states = [u.shared for u in updates]
        if not states or not states[0]:
            return global_state
        return weighted_mean(states, [float(self.batches[u.cid]) for u in updates])


def batch_weighted(batches: Sequence[int], weights: str) -> ServerAlgorithm:
    """The FOCoOp-repository server of ``weights``: ``batches`` (official) → :class:`BatchWeightedFedAvg` once the
    counts are known (:func:`training_batches`), ``samples`` → FedAvg by sample count."""
    return BatchWeightedFedAvg(tuple(batches)) if weights == "batches" and batches else FedAvg(True)


def training_batches(trainer, method, num_samples: Sequence[int], min_size: int = 1) -> tuple[int, ...]:
    """Each client's training batches per epoch under the run's last-batch rule, counting the batches of at least
    ``min_size`` images (FOCoOp's loop skips batches of one: ``min_size=2``), at least 1 a client."""
    rule, bs = trainer.drop_last_of(method), trainer.batch_size
    return tuple(max(sum(1 for s in trainer.batch_starts(int(n), rule) if min(bs, int(n) - s) >= min_size), 1)
                 for n in num_samples)


#: legacy flag → (policy field, how a value maps to it)
LEGACY = {
    "official_optimizer_state": "optimizer_state", "train_order": "train_order", "default_drop_last": "drop_last",
    "default_augment": "augment", "restart_personal": "restart_personal", "lr_schedule": "lr_schedule",
    "schedule_rounds": "schedule_rounds", "prox_mu": "prox_mu", "prox_detached": "prox_detached", "sync": "sync",
}


def fold_legacy_flags(cls) -> None:
    """Move the legacy flags a method class sets (module docstring) into its ``policy``."""
    changes = {}
    for flag, key in LEGACY.items():
        if flag in cls.__dict__ and not isinstance(cls.__dict__[flag], property | legacy_property):
            changes[key] = cls.__dict__[flag]
            delattr(cls, flag)
    if "loop_defaults" in cls.__dict__ and not isinstance(cls.__dict__["loop_defaults"], property):
        changes["step_loop"] = tuple(sorted(cls.__dict__["loop_defaults"].items()))
        delattr(cls, "loop_defaults")
    if "persistent_optimizer" in cls.__dict__ and not isinstance(cls.__dict__["persistent_optimizer"], property):
        if cls.__dict__["persistent_optimizer"]:
            changes["optimizer_state"] = "per_client"
        delattr(cls, "persistent_optimizer")
    if changes:
        cls.policy = cls.policy.replace(**changes)


class legacy_property:
    """``method.<flag>`` (and ``MethodClass.<flag>``) read from / written into the policy: an instance writes its
    own policy, the class keeps its own."""

    def __init__(self, key: str, doc: str):
        self.key, self.__doc__ = key, doc

    def __get__(self, obj, cls=None):
        return getattr((cls if obj is None else obj).policy, self.key)

    def __set__(self, obj, value) -> None:
        obj.policy = obj.policy.replace(**{self.key: value})


__all__ = ["BatchWeightedFedAvg", "ClientPolicy", "DASSL_CHAIN", "DASSL_FORK", "FEDTPG_CLIENT", "FOCOOP_REPO", "FedAvg", "LEGACY",
           "ServerAlgorithm", "fold_legacy_flags", "legacy_property"]
