"""FedPGP (Cui, Li, Wang, Shi, ICML 2024): global prompt + low-rank personal term + prompt-wise contrastive loss.

Prompt of client i (spec §3.1, paper eq. 7–9): ``P_i = σ + U_i V_i`` with ``σ ∈ R^{N×n_ctx×W}`` **global**
(sent and averaged, FedAvg weighted by sample count) and ``U_i ∈ R^{N×n_ctx×r}``, ``V_i ∈ R^{N×r×W}``
**personal** (never sent); all three N(0, 0.02²). Local loss (spec §3.2, eq. 12–13)::

    z_C = frozen anchor features, z_G = TextEnc([SOS, σ, class]), z_i = TextEnc([SOS, σ+UV, class])
    pos_c = cos(z_C[c], z_G[c]) ; neg_c = cos(z_G[c], z_i[c])
    L_con = mean −log( exp(pos/τ) / (exp(pos/τ) + exp(neg/τ)) )
    L     = CE(100 · f(x)·z_iᵀ, y) + μ · L_con

Compute: the official step runs the text encoder four times; here ``z_C`` is constant and cached once
per class list, ``z_UV`` (computed but unused by the official code) is skipped, and ``z_G`` and ``z_i``
go through the encoder in **one** batched pass.

Anchor ``z_C`` (named option ``anchor``):
- ``"official"`` (default): CLIP features of the literal ``"X X … X {class}."`` prompt (n_ctx "X"
  tokens) — what the released code computes (its ``ctx_init`` path crashes, spec §3.2).
- ``"template"``: ``"a photo of a {class}."``. Whether this is what the paper means by the CLIP anchor is
  **unverified** (the paper text available to us does not say which prompt ``z_C`` uses).

Number of prompts ``N`` (``num_prompts``): the official base-to-novel script sets N=2, but then the logits
have ``N·C`` columns while labels index only the first ``C`` (a bug, spec §3.2); every other FedPGP script
uses N=1, the default here. For ``N > 1`` fedlit keeps the logits shape-correct by **averaging the N
prompts' logits** (equivalently, classifying with the mean of the N normalised class embeddings, which
:meth:`FedPGP.text_features` returns — not unit-norm for N > 1); the contrastive loss is averaged over
all ``N·C`` prompt rows, as in the official code.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FedlitError
from ..prompts import Task, encode_context, handcrafted_features, prompt_template
from .base import FedMethod
from .roles import DASSL_CHAIN

ANCHOR_TEMPLATE = "a photo of a {}."


def contrastive_loss(z_c: torch.Tensor, z_g: torch.Tensor, z_i: torch.Tensor, tau: float) -> torch.Tensor:
    """FedPGP's prompt-wise contrastive loss; ``z_c`` ``[C, D]`` (or broadcastable), ``z_g``/``z_i`` ``[..., C, D]``.

    ``mean −log(exp(pos/τ) / (exp(pos/τ) + exp(neg/τ)))`` with ``pos = cos(z_C, z_G)``, ``neg = cos(z_G, z_i)``,
    computed as ``softplus((neg − pos)/τ)`` (the same value, numerically stable).
    """
    z_c, z_g, z_i = z_c.float(), z_g.float(), z_i.float()
    pos = F.cosine_similarity(z_c.to(z_g.device).expand_as(z_g), z_g, dim=-1)
    neg = F.cosine_similarity(z_g, z_i, dim=-1)
    return F.softplus((neg - pos) / tau).mean()


class PGPPrompt(nn.Module):
    """σ (global), U and V (personal): ``N`` prompts of ``n_ctx`` tokens, rank ``r``."""

    def __init__(self, width: int, n_ctx: int = 16, rank: int = 8, num_prompts: int = 1, std: float = 0.02):
        super().__init__()
        self.n_ctx = n_ctx
        self.sigma = nn.Parameter(torch.randn(num_prompts, n_ctx, width) * std)
        self.U = nn.Parameter(torch.randn(num_prompts, n_ctx, rank) * std)
        self.V = nn.Parameter(torch.randn(num_prompts, rank, width) * std)

    def personal_context(self) -> torch.Tensor:
        """``P = σ + U V`` → ``[N, n_ctx, W]``."""
        return self.sigma + self.U @ self.V


def encode_contexts(clip, task: Task, ctx: torch.Tensor) -> torch.Tensor:
    """Normalised text features ``[M, C, D]`` of ``M`` contexts ``[M, n_ctx, W]`` in one encoder pass."""
    return encode_context(clip, prompt_template(clip, task, ctx.shape[1]), ctx)


class FedPGP(FedMethod):
    """FedPGP: a shared global prompt plus a personal low-rank term U_i V_i, with a prompt-wise contrastive loss.

    Args:
        n_ctx: context tokens (16).
        rank: bottleneck r of the personal term ``U V`` (8 in every script; argparse default 4).
        num_prompts: N (1; see the module docstring for N > 1).
        mu: weight μ of the contrastive loss (0.5).
        tau: temperature τ (0.5).
        anchor: ``official`` ("X X … X {class}.") or ``template`` ("a photo of a {class}.") for z_C.
        lr, momentum, weight_decay: local SGD (0.001, 0.9, 5e-4; constant lr as in the official runs).
        weighted: FedAvg of σ weighted by client sample count (official).
    """

    name = "fedpgp"
    # one SGD state handed on (FedPGP@d43045b trainers/fedpgp.py:330-332, federated_main.py:170); round 0 in index
    # order, then np.random.choice order (federated_main.py:330-334)
    policy = DASSL_CHAIN
    eval_protocol = "personalized"

    def __init__(self, n_ctx: int = 16, rank: int = 8, num_prompts: int = 1, mu: float = 0.5, tau: float = 0.5,
                 anchor: Literal["official", "template"] = "official", lr: float = 0.001, momentum: float = 0.9,
                 weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        for key, val in (("n_ctx", n_ctx), ("rank", rank), ("num_prompts", num_prompts)):
            if val < 1:
                raise FedlitError(f"method.init_args.{key}={val}: must be >= 1")
        if tau <= 0:
            raise FedlitError(f"method.init_args.tau={tau}: the temperature must be > 0")
        if mu < 0:
            raise FedlitError(f"method.init_args.mu={mu}: the contrastive weight must be >= 0")
        if anchor not in ("official", "template"):
            raise FedlitError(f"method.init_args.anchor='{anchor}': use 'official' or 'template'")
        self.n_ctx, self.rank, self.num_prompts = n_ctx, rank, num_prompts
        self.mu, self.tau, self.anchor = mu, tau, anchor

    def build(self, clip):
        return PGPPrompt(clip.text_width, self.n_ctx, self.rank, self.num_prompts)

    def is_shared(self, key: str) -> bool:
        return key == "sigma"  # U, V stay on the client

    def anchor_features(self, clip, task: Task) -> torch.Tensor:
        """Frozen, normalised z_C ``[C, D]`` (cached per class list by :func:`handcrafted_features`)."""
        template = " ".join(["X"] * self.n_ctx) + " {}." if self.anchor == "official" else ANCHOR_TEMPLATE
        return handcrafted_features(clip, task, template)

    def text_features(self, prompt: PGPPrompt, clip, task: Task) -> torch.Tensor:
        """Class embeddings of the personalised prompt ``σ + UV``, averaged over the N prompts."""
        return encode_contexts(clip, task, prompt.personal_context()).mean(dim=0)

    def loss(self, module, x, y, task: Task, classes=None):
        prompt, clip = module.prompt, module.clip
        n = self.num_prompts
        z = encode_contexts(clip, task, torch.cat([prompt.sigma, prompt.personal_context()]))  # [2N, C, D]
        z_g, z_i = z[:n], z[n:]
        ce = F.cross_entropy(self.logits(prompt, clip, x, task, prepared=z_i.mean(dim=0)).float(), y)
        if self.mu == 0:
            return ce
        return ce + self.mu * contrastive_loss(self.anchor_features(clip, task), z_g, z_i, self.tau)


__all__ = ["FedPGP", "PGPPrompt", "contrastive_loss", "encode_contexts"]
