"""The round protocol: every decision of a federated round, in one place, for every runtime.

    select the round's clients → what each is sent (the method's ``payload_for``) → [clients train] →
    check the updates (failure policy) → aggregate them in client order → keep each client's own state →
    is an evaluation due?

:class:`RoundProtocol` holds the global shared state and one :class:`ClientState` per client (its personal tensors
and optimiser state: what stays on the client). It is used by the Fabric orchestrator
(:mod:`fedlit.orchestrator`, clients trained in this process) and by the Flower strategy
(:mod:`fedlit.integrations.flower`, clients trained on SuperNodes), so both runtimes take the same decisions.
Nothing here trains or touches a device; every random draw is a function of ``(seed, round)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import FedlitError
from .methods.base import FedMethod, Update
from .trainer import FedTrainer

Tensors = dict[str, torch.Tensor]


def sample_clients(seed: int, rnd: int, num_clients: int, participation: float, first_round_all: bool = True) -> list[int]:
    """Clients of round ``rnd``: ``max(int(participation·K), 1)`` drawn without replacement, sorted.

    With ``first_round_all`` every client trains in round 0 (FedPGP/FedOTP), so each has personal state.
    """
    if participation >= 1.0 or (first_round_all and rnd == 0):
        return list(range(num_clients))
    m = max(int(participation * num_clients), 1)
    rng = np.random.default_rng([seed, rnd, 0x5A])
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


def shard(items: list[int], rank: int, world_size: int) -> list[int]:
    """The items a process (or SuperNode) handles: round-robin, so every rank gets a near-equal share."""
    return items[rank::world_size]


def failed_update(cid: int, error: str, num_samples: int) -> Update:
    """The update of a client that failed (raised, diverged, or never answered)."""
    return Update(cid, {}, {}, num_samples, float("nan"), error=error)


def check_failures(on_client_failure: str, updates: list[Update], rnd: int) -> None:
    """The failure policy: with ``on_client_failure=stop`` the first failed client stops the run."""
    failed = sorted((u for u in updates if not u.ok), key=lambda u: u.cid)
    if failed and on_client_failure == "stop":
        u = failed[0]
        raise FedlitError(f"client {u.cid} failed in round {rnd + 1}: {u.error} "
                          f"(trainer.on_client_failure=skip leaves such clients out instead)")


@dataclass
class ClientState:
    """What one client keeps between rounds, never sent to the server: its personal tensors (FedPGP's U/V, a
    linear head …) and its optimiser state / schedule step (FedTPG's code base). Empty until it trains."""

    personal: Tensors = field(default_factory=dict)
    optim: Tensors = field(default_factory=dict)

    def after(self, update: Update) -> ClientState:
        """The state after a successful ``update`` (what it did not produce stays as it was)."""
        return ClientState(update.personal or self.personal, self.optim if update.optim is None else update.optim)


class RoundProtocol:
    """The server's view of a federation: global state, per-client state, and the round's decisions.

    Args:
        method: the method (sampling-independent hooks: ``payload_for``, ``aggregate``).
        trainer: the trainer settings (participation, evaluation cadence, failure policy).
        seed: the run's seed (client sampling).
        num_samples: each client's number of training samples (weights of failed updates, aggregation).
        global_state: the initial shared tensors.
        verbose: print the failure warnings (the process that logs, rank 0).
    """

    def __init__(self, method: FedMethod, trainer: FedTrainer, seed: int, num_samples: list[int],
                 global_state: Tensors, verbose: bool = True):
        self.method, self.cfg, self.seed, self.verbose = method, trainer, seed, verbose
        self.num_samples = list(num_samples)
        bad = [c for c in trainer.skip_clients if not 0 <= c < len(self.num_samples)]
        if bad or len(trainer.skip_clients) >= len(self.num_samples):
            raise FedlitError(f"trainer.skip_clients={trainer.skip_clients}: needs client ids in "
                              f"[0, {len(self.num_samples)}) and at least one client left")
        self.global_state = global_state
        self.clients: dict[int, ClientState] = {}  # only clients that trained hold state
        self.sent: dict[int, Tensors] = {}  # what each client of the current round was sent
        self.received: dict[int, Tensors] = {}  # on a SuperNode: what the server sent each hosted client
        #: every client's last successful upload (its shared tensors), kept only for methods with ``server_bank``
        #: (pFedMoAP's expert prompts); updated after aggregation, so a round's payloads see the previous rounds only
        self.bank: dict[int, Tensors] = {}

    @property
    def num_clients(self) -> int:
        return len(self.num_samples)

    # ------------------------------------------------------------------------------------ configure
    def select(self, rnd: int) -> list[int]:
        c = self.cfg
        chosen = sample_clients(self.seed, rnd, self.num_clients, c.participation, c.first_round_all)
        return [cid for cid in chosen if cid not in c.skip_clients]

    def evaluated(self) -> list[int]:
        """The clients an evaluation covers: all but ``trainer.skip_clients``."""
        return [cid for cid in range(self.num_clients) if cid not in self.cfg.skip_clients]

    def payload(self, cid: int) -> Tensors:
        """The tensors client ``cid`` is sent (server: the method's ``payload_for`` plus its ``server_payload``;
        node: what arrived)."""
        if cid in self.received:
            return self.received[cid]
        state = self.method.payload_for(cid, self.global_state)
        extra = self.method.server_payload(cid, self.global_state, self.bank, self.seed)
        clash = set(extra) & set(state)
        if clash:
            raise FedlitError(f"{self.method.name}: server_payload keys {sorted(clash)} clash with the shared state")
        return {**state, **extra} if extra else state

    def configure(self, rnd: int) -> dict[int, Tensors]:
        """The round's clients and what each is sent (remembered: aggregation hands it to the method)."""
        self.sent = {cid: self.payload(cid) for cid in self.select(rnd)}
        return self.sent

    def receive(self, global_state: Tensors, sent: dict[int, Tensors]) -> None:
        """On a SuperNode: the global state and the per-client payloads the server sent this message."""
        self.global_state, self.received = global_state, dict(sent)

    # ------------------------------------------------------------------------------------ client state
    def state_of(self, cid: int) -> ClientState:
        return self.clients.get(cid, ClientState())

    def load(self, cid: int, state: ClientState) -> None:
        """Set client ``cid``'s kept state (a deployment keeps it where the client lives)."""
        if state.personal or state.optim:
            self.clients[cid] = state
        else:
            self.clients.pop(cid, None)

    def has_personal(self, cid: int) -> bool:
        return bool(self.state_of(cid).personal)

    # ------------------------------------------------------------------------------------ updates
    def failed(self, cid: int, error: str, num_samples: int | None = None) -> Update:
        return failed_update(cid, error, self.num_samples[cid] if num_samples is None else num_samples)

    def check(self, updates: list[Update], rnd: int) -> None:
        """The failure policy (:func:`check_failures`) of the run's ``on_client_failure``."""
        check_failures(self.cfg.on_client_failure, updates, rnd)

    def aggregate(self, updates: list[Update]) -> list[Update]:
        """Sort by client, aggregate the successful updates (each with what it was sent) into the global state,
        keep each client's own state. Returns the sorted updates."""
        updates = sorted(updates, key=lambda u: u.cid)
        ok = [u for u in updates if u.ok]
        if self.verbose:
            for u in updates:
                if not u.ok:
                    print(f"warning: client {u.cid} left out of this round's aggregation: {u.error}", file=sys.stderr)
            if updates and not ok:
                print("warning: no client of this round succeeded; the global state stays as it was", file=sys.stderr)
        if not ok:
            return updates
        for u in ok:  # what each client was sent (unchanged since: the global state moves only here)
            if u.sent is None:
                u.sent = self.sent[u.cid] if u.cid in self.sent else self.payload(u.cid)
        self.global_state = self.method.aggregate(ok, self.global_state)
        for u in ok:
            self.clients[u.cid] = self.state_of(u.cid).after(u)
            if self.method.server_bank and u.shared:
                self.bank[u.cid] = {k: v.detach().to("cpu", copy=True) for k, v in u.shared.items()}
        return updates

    # ------------------------------------------------------------------------------------ schedule
    @property
    def rounds(self) -> int:
        """Rounds to run: one evaluation is the whole run of a method with nothing to train."""
        return self.cfg.rounds if self.method.trainable else 1

    def eval_due(self, rnd: int) -> bool:
        c = self.cfg
        scheduled = (rnd + 1) % c.eval_every == 0 and rnd + 1 >= c.eval_from
        return (scheduled or rnd == c.rounds - 1 or rnd >= c.rounds - c.eval_last
                or not self.method.trainable)

    def checkpoint_due(self, rnd: int) -> bool:
        c = self.cfg
        return bool(c.checkpoint_every) and ((rnd + 1) % c.checkpoint_every == 0 or rnd == c.rounds - 1)

    def round_scalars(self, selected: list[int], updates: list[Update], exchanges: int = 1) -> dict[str, float]:
        """The round's train/… and transfer/… scalars (upload: successful clients; download: every selected one;
        ``exchanges`` per round: the steps of a step-synchronous round). The loss is the mean over the clients that
        took a step (Central's data-less clients take none)."""
        ok = [u for u in updates if u.ok]
        stepped = [u.loss for u in ok if u.steps]
        numel = _nbytes(self.global_state)
        down = sum(_nbytes(self.sent[c]) if c in self.sent else numel for c in selected)
        lr = self.method.lr
        return {
            "train/loss": float(np.mean(stepped)) if stepped else float("nan"),
            "train/clients": len(selected),
            "train/failed_clients": len(updates) - len(ok),
            "train/lr": float(np.mean([lr if u.lr is None else u.lr for u in ok])) if ok else lr,
            "transfer/bytes_up": numel * len(ok) * exchanges,
            "transfer/bytes_down": down * exchanges,
        }


def _nbytes(tensors: Tensors) -> int:
    return sum(v.numel() * v.element_size() for v in tensors.values())


__all__ = ["ClientState", "RoundProtocol", "sample_clients", "shard"]
