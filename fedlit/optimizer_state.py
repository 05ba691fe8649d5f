"""The optimiser's lifecycle across clients and rounds (``trainer.optimizer_state``), in ``round`` mode.

- ``fresh``: a new optimiser for every client-round (momentum starts from zero at every client).
- ``per_client``: each client keeps its own optimiser state across the rounds it takes part in (FedTPG's code base);
  the state is personal (:class:`~fedlit.rounds.ClientState` ``optim``) and checkpointed with the client.
- ``chain``: ONE optimiser state for the whole run, handed from client to client in training order and across
  rounds — what a Dassl code base does by building one ``local_trainer`` (one SGD optimiser and scheduler) and
  swapping every client's tensors into it with ``load_state_dict`` (FedPGP@d43045b ``federated_main.py:170``,
  ``trainers/fedpgp.py:330-332``; Dassl ``engine/trainer.py:301-304``). ``load_state_dict`` copies into the same
  parameter objects, so the momentum buffers, keyed by parameter, survive the swap: client k+1's first step is
  ``buf ← 0.9·buf_k + g``. The scheduler (Dassl ``single_step``, γ = 1, stepped per local epoch) keeps the lr
  constant, so nothing else carries. The chained state is the server's in the checkpoint (``optim_chain/…``).
  A client that fails hands nothing on: the next one continues from the last successful client's state.

Nothing here touches a device or the run's random state; :func:`training_order` is a function of (seed, round).
"""

from __future__ import annotations

import numpy as np
import torch

from .client import load_optimizer_state, optimizer_state_tensors

PREFIX = "optim_chain/"


def training_order(seed: int, rnd: int, cids: list[int], drawn: bool, first_round_all: bool) -> list[int]:
    """The order a round's clients train in under ``chain``: ``cids`` as selected, or — for a method whose
    official loop trains in ``np.random.choice`` order (``drawn``) — a permutation drawn from (seed, round);
    round 0 stays in index order where every client trains first (``list(range(K))`` in the official code)."""
    if not drawn or (rnd == 0 and first_round_all) or len(cids) < 2:
        return list(cids)
    perm = np.random.default_rng([seed, rnd, 0x0D0E]).permutation(len(cids))
    return [cids[i] for i in perm]


class OptimizerLifecycle:
    """Builds each client-round's optimiser under ``policy`` and keeps what carries over (``chain``'s one state)."""

    def __init__(self, policy: str, method):
        self.policy, self.method = policy, method
        self.chain: dict[str, torch.Tensor] = {}

    @property
    def tracked(self) -> bool:
        """Whether a client keeps an ``optim`` state (its own optimiser, or its participations for a schedule)."""
        return self.policy == "per_client" or self.method.lr_schedule != "constant"

    def build(self, module, own) -> tuple[torch.optim.Optimizer, float]:
        """The optimiser of one client-round on ``module`` (client state ``own``) and its lr."""
        optimizer = module.configure_optimizers()
        if self.policy == "per_client" and own.optim:
            load_optimizer_state(optimizer, own.optim)
        elif self.policy == "chain" and self.chain:
            load_optimizer_state(optimizer, self.chain)
        lr = self.method.lr_at(int(own.optim.get("participations", 0)) if self.tracked else 0)
        for group in optimizer.param_groups:  # a group the method gave a ``fixed_lr`` keeps it (pFedMoAP's gating)
            group["lr"] = group.get("fixed_lr", lr)
        return optimizer, lr

    def finish(self, optimizer: torch.optim.Optimizer, own, steps: int = 0) -> dict[str, torch.Tensor] | None:
        """After a successful client-round of ``steps`` optimiser steps: hand the state on (``chain``) and return
        the client's own ``optim`` (with ``lr_steps``, its steps over all rounds, under a ``cosine_steps``
        schedule)."""
        if self.policy == "chain":
            self.chain = optimizer_state_tensors(optimizer)
        if not self.tracked:
            return None
        out = {**(optimizer_state_tensors(optimizer) if self.policy == "per_client" else {}),
               "participations": own.optim.get("participations", torch.tensor(0)) + 1}
        if self.method.lr_schedule == "cosine_steps":
            out["lr_steps"] = own.optim.get("lr_steps", torch.tensor(0)) + steps
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The chained state for the checkpoint's server section."""
        return {PREFIX + k: v for k, v in self.chain.items()}

    def load_state(self, server: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Take the chained state out of a checkpoint's server section; returns the rest."""
        self.chain = {k[len(PREFIX):]: v.clone() for k, v in server.items() if k.startswith(PREFIX)}
        return {k: v for k, v in server.items() if not k.startswith(PREFIX)}


__all__ = ["OptimizerLifecycle", "training_order", "PREFIX"]
