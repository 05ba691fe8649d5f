"""FedPHA (Fang et al., ICML 2025): a fixed-length global prompt plus local prompts of per-client length, kept
apart by an SVD-based projection and a bidirectional alignment — as the official code computes it.

Prompts: global ``G ∈ R^{n_g×W}`` (shared, FedAvg weighted by sample count) and local ``L ∈ R^{ℓ×W}`` (personal),
both N(0, 0.02²). Projection, recomputed every step and differentiable (float32)::

    G = U S Vᵀ                   reduced SVD, V ∈ R^{W×k}, k = min(n_g, W)
    c = ⌊k·(1 − ρ)⌋              ρ = ``ratio`` = 0.8  →  c = 3 for n_g = 16
    V₂ = columns c … k−1 of V    P = V₂ V₂ᵀ ;  L̃ = L·P

``projection="official"`` (default) is what the released code executes: V₂ spans the k − c *weakest directions of
G's row space* (rank 13), although the code calls it a null space. ``projection="null_space"`` is the paper's
description: the full SVD, so V₂ also holds the orthogonal complement of G's rows, ``P = I − V₁V₁ᵀ`` with V₁ the c
strongest right-singular vectors. ``svd_grad=True`` (official) back-propagates the pull term through the SVD into
G; ``False`` detaches P.

Loss (three text passes over the C classes, batched in one encoder call when the lengths agree)::

    t_L, t_G, t_P = norm(TextEnc(L)), norm(TextEnc(G)), norm(TextEnc(L̃))
    L = CE(s·f·t_Lᵀ, y) + CE(s·f·t_Gᵀ, y) + λ_pull·MSE(t_L, t_P) + λ_push·mean_c max(0, α − ‖t_L(c) − t_G(c)‖₂)

with λ_pull = λ_push = 1 (hard-coded officially), α = 1, MSE over all C·D entries. **Inference uses t_L only**.

Heterogeneous lengths (``local_lengths``, the official HE trainer): client i's local prompt has ``ℓ_i`` rows (the
parameter holds ``max ℓ`` rows, client i uses the first ℓ_i; the server tells each client its length with the
global prompt). The official HE code tokenises every prompt with ℓ_max = max(n_g, max ℓ_i) placeholders, splices a
shorter context and zero-pads, so the feature is read ℓ_max − ℓ positions **after** the real EOT, in the zero padding
(``true_eot=False``, faithful); ``true_eot=True`` reads it at the prompt's own EOT.

Not reproduced (round-loop / trainer behaviour): fp16 prompts, SGD momentum shared by all clients. The official loop
trains every client every round (the config sets ``participation: 1.0``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FedlitError
from ..prompts import Task, prompt_template
from .base import FedMethod
from .fedpgp import encode_contexts
from .roles import DASSL_FORK


def projection_matrix(g: torch.Tensor, ratio: float, mode: str = "official") -> torch.Tensor:
    """``P`` (``[W, W]``) from the global prompt ``g`` ``[n_g, W]`` (float32 SVD), see the module docstring."""
    g = g.float()
    full = mode == "null_space"
    _, _, vh = torch.linalg.svd(g, full_matrices=full)
    k = min(g.shape)
    c = math.floor(k * (1.0 - ratio))
    v2 = vh[c:].t()  # official: columns c … k−1 of the reduced V; null_space: c … W−1 of the full V
    return v2 @ v2.t()


def push_loss(t_local: torch.Tensor, t_global: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean_c max(0, α − ‖t_L(c) − t_G(c)‖₂)``."""
    return F.relu(alpha - (t_local.float() - t_global.float()).norm(dim=-1)).mean()


def encode_padded(clip, task: Task, ctx: torch.Tensor, n_max: int, true_eot: bool) -> torch.Tensor:
    """Normalised features ``[C, D]`` of a context ``[ℓ, W]`` in the official HE layout (template with ``n_max``
    placeholders, context spliced, zero-padded, EOT of the ``n_max`` template) or at its own EOT."""
    n = ctx.shape[0]
    if true_eot or n == n_max:
        tpl = prompt_template(clip, task, n)
        emb, eot = tpl.splice(ctx), tpl.eot
    else:
        tpl = prompt_template(clip, task, n_max)
        emb = tpl.splice(ctx)
        pad = emb.new_zeros(emb.shape[0], n_max - n, emb.shape[2])
        emb, eot = torch.cat([emb, pad], dim=1), tpl.eot
    feats = clip.encode_text_embeddings(emb, eot)
    return feats / feats.norm(dim=-1, keepdim=True)


class PHAPrompt(nn.Module):
    """Global ``[n_g, W]``, local ``[max ℓ, W]`` and the length ℓ of the client currently loaded."""

    def __init__(self, width: int, n_global: int, n_local: int, std: float = 0.02):
        super().__init__()
        self.global_ctx = nn.Parameter(torch.randn(n_global, width) * std)
        self.local_ctx = nn.Parameter(torch.randn(n_local, width) * std)
        self.register_buffer("local_len", torch.tensor(n_local))

    def local(self) -> torch.Tensor:
        return self.local_ctx[: int(self.local_len)]


class FedPHA(FedMethod):
    """FedPHA: a fixed-length global prompt and per-client-length local prompts, kept apart by SVD projection.

    Args:
        n_ctx: tokens of the global prompt and (without ``local_lengths``) of the local prompt (16).
        local_lengths: per-client local prompt lengths (the HE trainer; e.g. Office31 [16,16,16,32,32,16]); one per
            client. None: every local prompt has ``n_ctx`` tokens.
        ratio: ρ of the projection (0.8).
        alpha: margin α of the push term (1.0).
        lambda_pull, lambda_push: weights of the two alignment terms (1, 1 — hard-coded officially).
        projection: ``official`` (weak directions of G's row space, as executed) or ``null_space`` (the paper).
        svd_grad: back-propagate through the SVD into G (official); False detaches the projection.
        true_eot: HE only — read each prompt at its own EOT (fix); False: the official ℓ_max EOT offset.
        lr, momentum, weight_decay: local SGD (0.001 constant, 0.9, 5e-4).
        weighted: FedAvg of G weighted by client sample count (official).
    """

    name = "fedpha"
    policy = DASSL_FORK  # Dassl fork: one optimiser for all clients (spec part 2 §0.3 Q-a)

    def __init__(self, n_ctx: int = 16, local_lengths: list[int] | None = None, ratio: float = 0.8, alpha: float = 1.0,
                 lambda_pull: float = 1.0, lambda_push: float = 1.0,
                 projection: Literal["official", "null_space"] = "official", svd_grad: bool = True,
                 true_eot: bool = False, lr: float = 0.001, momentum: float = 0.9, weight_decay: float = 5e-4,
                 weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        if n_ctx < 1 or any(n < 1 for n in local_lengths or []):
            raise FedlitError(f"method.init_args: prompt lengths must be >= 1 (n_ctx={n_ctx}, "
                              f"local_lengths={local_lengths})")
        if not 0.0 <= ratio <= 1.0:
            raise FedlitError(f"method.init_args.ratio={ratio}: must be in [0, 1]")
        if projection not in ("official", "null_space"):
            raise FedlitError(f"method.init_args.projection='{projection}': use 'official' or 'null_space'")
        self.n_ctx, self.local_lengths = n_ctx, list(local_lengths) if local_lengths else None
        self.ratio, self.alpha, self.lambda_pull, self.lambda_push = ratio, alpha, lambda_pull, lambda_push
        self.projection, self.svd_grad, self.true_eot = projection, svd_grad, true_eot

    @property
    def n_max(self) -> int:
        return max([self.n_ctx, *(self.local_lengths or [])])

    def setup_federation(self, train_task: Task, num_clients: int) -> None:
        if self.local_lengths is not None and len(self.local_lengths) != num_clients:
            raise FedlitError(f"method.init_args.local_lengths has {len(self.local_lengths)} lengths for "
                              f"{num_clients} clients; give one per client")

    def build(self, clip):
        return PHAPrompt(clip.text_width, self.n_ctx, max(self.local_lengths or [self.n_ctx]))

    def is_shared(self, key: str) -> bool:
        return key in ("global_ctx", "local_len")  # local_len: the client's length, set by payload_for

    def payload_for(self, cid: int, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.local_lengths is None:
            return global_state
        return {**global_state, "local_len": torch.tensor(self.local_lengths[cid])}

    def aggregate(self, updates, global_state):
        avg = super().aggregate([replace(u, shared={"global_ctx": u.shared["global_ctx"]}) for u in updates],
                                global_state)
        return {**global_state, "global_ctx": avg["global_ctx"]}

    def encode(self, clip, task: Task, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised class features of each context (``[ℓ, W]``) in the layout of :func:`encode_padded`."""
        n_max = self.n_max if self.local_lengths is not None else self.n_ctx
        if all(c.shape[0] == n_max for c in contexts):  # homogeneous: one batched encoder pass
            return list(encode_contexts(clip, task, torch.stack([c.float() for c in contexts])))
        return [encode_padded(clip, task, c, n_max, self.true_eot) for c in contexts]

    def text_features(self, prompt: PHAPrompt, clip, task: Task) -> torch.Tensor:
        return self.encode(clip, task, [prompt.local()])[0]  # inference: the local prompt only

    def loss(self, module, x, y, task: Task, classes=None):
        prompt, clip = module.prompt, module.clip
        p = projection_matrix(prompt.global_ctx if self.svd_grad else prompt.global_ctx.detach(), self.ratio,
                              self.projection)
        local = prompt.local()
        projected = local.float() @ p
        t_l, t_g, t_p = self.encode(clip, task, [local, prompt.global_ctx, projected])
        ce = (F.cross_entropy(self.logits(prompt, clip, x, task, prepared=t_l).float(), y)
              + F.cross_entropy(self.logits(prompt, clip, x, task, prepared=t_g).float(), y))
        pull = F.mse_loss(t_l.float(), t_p.float())
        return ce + self.lambda_pull * pull + self.lambda_push * push_loss(t_l, t_g, self.alpha)


__all__ = ["FedPHA", "PHAPrompt", "projection_matrix", "push_loss", "encode_padded"]
