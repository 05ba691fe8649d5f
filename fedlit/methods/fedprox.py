"""Prompt+Prox (FedProx, Li et al. 2020, on PromptFL): PromptFL plus a proximal term on the client.

Local loss: ``CE + μ/2 · ‖ctx − ctx_global‖²`` where ``ctx_global`` is the context received this round.
The term is computed on the **live** parameters (paper intent: it pulls the local context towards the
global one). ``prox_detached=True`` reproduces the official FedOTP-codebase behaviour, where both
tensors come from ``state_dict()`` (detached): the term is logged but has zero gradient, so the run is
numerically FedAvg (spec §4.6). The term itself lives in :meth:`fedlit.client.ClientModule.proximal_term`
and any method gets it with ``trainer.prox_mu``.
"""

from __future__ import annotations

from .promptfl import PromptFL


class FedProx(PromptFL):
    """PromptFL + FedProx's proximal term.

    Args:
        mu: proximal weight μ (> 0).
        prox_detached: reproduce the official zero-gradient term (default False: the fixed, live term).
        n_ctx, ctx_init, lr, momentum, weight_decay, weighted: see :class:`~fedlit.methods.coop.CoOp`.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01, prox_detached: bool = False, n_ctx: int = 16, ctx_init: str | None = None,
                 lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(n_ctx=n_ctx, ctx_init=ctx_init, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         weighted=weighted)
        if mu < 0:
            from ..errors import FedlitError

            raise FedlitError(f"method.init_args.mu={mu}: the proximal weight must be >= 0")
        self.mu = mu
        self.prox_mu = mu
        self.prox_detached = prox_detached
