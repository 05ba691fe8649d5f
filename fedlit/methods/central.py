"""Central: CoOp trained on the pooled data of all clients — the upper bound every federated table needs.

No official code implements it (the suites that print a "centralized upper bound" row do not ship it), so fedlit
follows the recommended reading of the protocol papers:

- **Data**: the union of every client's training images — exactly the images the federated run trains on (same
  partition seed, same K-shot draw, same base-class restriction); the only difference is pooling.
  :meth:`Central.arrange_clients` gives the pooled set to client 0 and leaves the other clients with no training
  images but with their own test splits, so evaluation (Local on each client's test split, Base, Novel) is the
  federated evaluator unchanged. All clients must train among the same class list (one dataset, or pooled
  datasets sharing one label space); FedTPG-style "own classes" federations are refused with a one-line error.
- **Model / loss**: one CoOp context (16 random N(0, 0.02²) tokens, the FedPGP/FedOTP-family length; 4 for
  FedTPG-family suites), cross-entropy on all training classes.
- **Budget**: ``rounds × local_epochs`` passes over the pooled data with the suite's PromptFL optimiser, lr and
  batch. The one learner keeps its SGD momentum across rounds (``persistent_optimizer``), so the run is one
  continuous SGD run; the learning rate is constant.

Run with ``trainer.participation: 1.0`` (the config's value): a round where client 0 is not drawn trains nothing.
The other clients take zero steps each round, so their logged per-client loss is NaN.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import FedlitError
from .coop import CoOp


class Central(CoOp):
    """CoOp on the pooled training data of every client (one learner, no aggregation).

    Args:
        n_ctx: context tokens (16 for the FedOTP/FedPGP-family suites, 4 for FedTPG-family suites).
        ctx_init: initialise the context from these words' token embeddings (None: N(0, 0.02²)).
        lr, momentum, weight_decay: the suite's PromptFL SGD (0.001, 0.9, 5e-4; constant lr).
        weighted: unused (one learner); kept for config compatibility with PromptFL.
    """

    name = "central"
    policy = CoOp.policy.replace(optimizer_state="per_client")  # one continuous SGD run over rounds × local epochs

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None, lr: float = 0.001, momentum: float = 0.9,
                 weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         weighted=weighted)

    def is_shared(self, key: str) -> bool:
        return True  # the one model every client is evaluated with

    def arrange_clients(self, federation):
        """Client 0 holds the union of every client's training images (labels in the common task's space); the
        others keep their test splits and hold no training image."""
        tasks = {federation.task_of(c.cid).classnames for c in federation.clients}
        if len(tasks) > 1:
            raise FedlitError(f"method 'central' pools the clients' training data, but they train among {len(tasks)} "
                              "different class lists; use a partition whose clients share one class list "
                              "(e.g. disjoint, dirichlet or domain)")
        clients = federation.clients
        pooled = replace(clients[0], train_idx=np.concatenate([c.train_idx for c in clients]),
                         train_y=np.concatenate([c.train_y for c in clients]))
        empty = [replace(c, train_idx=c.train_idx[:0], train_y=c.train_y[:0]) for c in clients[1:]]
        return replace(federation, clients=[pooled, *empty])

    def aggregate(self, updates, global_state):
        """The pooled learner's context (the clients without data took no step)."""
        trained = [u for u in updates if u.num_samples > 0 and u.shared]
        return dict(trained[0].shared) if trained else global_state


__all__ = ["Central"]
