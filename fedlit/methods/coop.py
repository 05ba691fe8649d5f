"""CoOp (Zhou et al., IJCV 2022) trained by each client on its own data only — no server.

The learnable context (``n_ctx`` × text width, N(0, 0.02²) or the embeddings of ``ctx_init``) is
*personal*: it never leaves the client. By default, as in the official FedPGP/FedOTP code (``--model local``,
spec §3.5), every round restarts it from its initial weights, so the reported model has trained ``E`` local
epochs (the last round's), not ``R·E``. ``persistent=True`` keeps it across rounds instead (``R`` rounds of ``E``
epochs = ``R·E`` epochs of local CoOp training).
"""

from __future__ import annotations

from ..prompts import ContextPrompt, Task
from .base import FedMethod
from .roles import DASSL_CHAIN


class CoOp(FedMethod):
    """Local-only CoOp.

    Args:
        n_ctx: number of context tokens (16 in FedPGP/FedOTP, 4 in FedTPG).
        ctx_init: initialise the context from these words' token embeddings (e.g. "a photo of a").
        persistent: keep each client's context across rounds (default False: the official baseline restarts it
            from the initial weights every round).
        lr, momentum, weight_decay, weighted: see :class:`FedMethod`.
    """

    name = "coop"
    # one Dassl local_trainer for every client (FedOTP@9948611 federated_main.py:161), clients in np.random.choice
    # order every round (FedOTP federated_main.py:240-241, 447-448)
    policy = DASSL_CHAIN

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None, persistent: bool = False, lr: float = 0.002,
                 momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.persistent = persistent
        self.restart_personal = not persistent

    def build(self, clip):
        return ContextPrompt(clip, self.n_ctx, self.ctx_init)

    def is_shared(self, key: str) -> bool:
        return False  # local training only: the context is personal

    def text_features(self, prompt: ContextPrompt, clip, task: Task):
        return prompt.text_features(clip, task)
