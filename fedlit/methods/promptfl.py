"""PromptFL (Guo et al., 2023): CoOp's context trained by every client and averaged by the server.

Shared: the whole context. Aggregation: FedAvg weighted by client sample count (``weighted=True``, as in
the FedPGP/FedOTP code bases) or the unweighted mean of the official PromptFL code and FedTPG
(``weighted=False``).
"""

from __future__ import annotations

from .coop import CoOp


class PromptFL(CoOp):
    """Federated CoOp: the context is shared and aggregated every round.

    Args:
        n_ctx, ctx_init, lr, momentum, weight_decay, weighted: see :class:`~fedlit.methods.coop.CoOp`.
    """

    name = "promptfl"

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None, lr: float = 0.002, momentum: float = 0.9,
                 weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init, persistent=True, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, weighted=weighted)

    def is_shared(self, key: str) -> bool:
        return True
