"""PromptFolio (Pan, Huang, Shi, NeurIPS 2024): a "prompt portfolio" mixing a global and a local prompt.

Two CoOp contexts of ``n_ctx`` tokens (N(0, 0.02²), generic, class token at the end): ``global_ctx`` p_G (shared,
averaged by the server) and ``local_ctx`` p_L (personal, never sent). Every step encodes both over all C classes
(one batched text pass here) and classifies with their mixture::

    t_G(c) = norm(TextEnc([SOS, p_G, name_c, ".", EOT]))      t_L(c) = norm(TextEnc([SOS, p_L, name_c, ".", EOT]))
    t(c)   = (1 − θ)·t_G(c) + θ·t_L(c)        θ = ``frac`` (0 fully global, 1 fully local; 0.4 in the README)
    logits = logit_scale · norm(f(x)) · t(c)ᵀ ;  L = CE(logits, y)

The mixture is **not** re-normalised (as in the official code: the effective logit scale shrinks where t_G and t_L
disagree); ``renormalize=True`` normalises it. Both prompts get gradients every step; the same mixture is used at
test time. Before the first aggregation every client starts from the same (p_G, p_L).

Server: p_G ← Σ_i n_i·p_G,i / Σ_j n_j over the clients of the round. The official code indexes the list of uploads
(in sampling order) by client id, so each upload gets some other client's weight; fedlit receives the uploads sorted
by client id and weights each by its own n_i. The two agree when all n_i are equal, as in the official protocol
(every client holds exactly ``num_shots`` images).

Not reproduced (they live in the official round loop / data code, not in the method): pure-fp16 SGD, the SGD
momentum and cosine scheduler shared by all clients (the lr is constant here), the pooled Dirichlet split whose
client test set contains its own training images, evaluation of the sampled clients only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FedlitError
from ..prompts import Task
from .base import FedMethod
from .fedpgp import encode_contexts
from .roles import DASSL_FORK


def mix_features(t_global: torch.Tensor, t_local: torch.Tensor, frac: float, renormalize: bool = False) -> torch.Tensor:
    """``(1 − frac)·t_G + frac·t_L`` (optionally re-normalised to unit length)."""
    t = (1.0 - frac) * t_global + frac * t_local
    return t / t.norm(dim=-1, keepdim=True) if renormalize else t


class FolioPrompt(nn.Module):
    """Global and local context, ``[n_ctx, W]`` each."""

    def __init__(self, width: int, n_ctx: int = 8, std: float = 0.02):
        super().__init__()
        self.global_ctx = nn.Parameter(torch.randn(n_ctx, width) * std)
        self.local_ctx = nn.Parameter(torch.randn(n_ctx, width) * std)


class PromptFolio(FedMethod):
    """PromptFolio: a "prompt portfolio" mixing a shared global and a personal local prompt.

    Args:
        n_ctx: context tokens per prompt (8, the official ``--n_ctx``; a third-party port uses 16).
        frac: mixing weight θ of the local prompt (0.4, the README's ``--frac_p``).
        renormalize: re-normalise the mixed class feature (False: the official un-normalised mixture).
        lr, momentum, weight_decay: local SGD (0.002 — the YAML value that overrides ``--lr`` — 0.9, 5e-4).
        weighted: FedAvg of p_G weighted by client sample count (official).
    """

    name = "promptfolio"
    policy = DASSL_FORK  # Dassl fork: one optimiser for all clients (spec part 2 §0.3 Q-a)

    def __init__(self, n_ctx: int = 8, frac: float = 0.4, renormalize: bool = False, lr: float = 0.002,
                 momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        if n_ctx < 1:
            raise FedlitError(f"method.init_args.n_ctx={n_ctx}: must be >= 1")
        if not 0.0 <= frac <= 1.0:
            raise FedlitError(f"method.init_args.frac={frac}: the mixing weight must be in [0, 1]")
        self.n_ctx, self.frac, self.renormalize = n_ctx, frac, renormalize

    def build(self, clip):
        return FolioPrompt(clip.text_width, self.n_ctx)

    def is_shared(self, key: str) -> bool:
        return key == "global_ctx"  # the local prompt never leaves the client

    def text_features(self, prompt: FolioPrompt, clip, task: Task) -> torch.Tensor:
        """The mixed class features ``[C, D]`` (both prompts in one encoder pass)."""
        z = encode_contexts(clip, task, torch.stack([prompt.global_ctx, prompt.local_ctx]))
        return mix_features(z[0], z[1], self.frac, self.renormalize)


__all__ = ["PromptFolio", "FolioPrompt", "mix_features"]
