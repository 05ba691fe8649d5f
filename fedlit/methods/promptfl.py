"""PromptFL (Guo et al., 2023): CoOp's context trained by every client and averaged by the server.

Shared: the whole context. Aggregation: FedAvg weighted by client sample count (``weighted=True``, as in
the FedPGP/FedOTP code bases) or the unweighted mean of the official PromptFL code and FedTPG
(``weighted=False``).
"""

from __future__ import annotations

from .coop import CoOp


class PromptFL(CoOp):
    """Federated CoOp: the context is shared and aggregated every round."""

    name = "promptfl"

    def is_shared(self, key: str) -> bool:
        return True
