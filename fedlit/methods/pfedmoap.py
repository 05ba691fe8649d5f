"""pFedMoAP (Luo, Chen, Wu, ICLR 2025): a local prompt plus attention gating over prompt experts from other clients.

Client component (spec methods-2.md §3.2–3.3): a CoOp context p ``[n_ctx, W]`` (N(0, 0.02²), generic; **shared**:
FedAvg input and expert for the others) and a gating network (**personal**, never sent): one multi-head attention
block of width d' = ``gating_dim`` (128) with h = ``gating_heads`` (8) heads: four ``Linear(d', d')`` with bias
(query, key, value, output), PyTorch's default init, shared initial weights for every client. Features are reduced
by ``pool(v) = v[::r]`` (every r-th coordinate of the normalised CLIP feature, r = D / d'; no learned projection).
With E = M − 1 downloaded expert prompts p_1 … p_E::

    f      = norm(ImgEnc(x))                 t_0(c) = norm(TextEnc(p))   (live)    t_k(c) = norm(TextEnc(p_k)) (no grad)
    z_loc  = 100 · f · t_0ᵀ
    for each class c (queries: the B images; keys = values: the M features t_0(c), t_1(c) … t_E(c)), per head:
        a_b,k = softmax_k( s · ⟨W_q pool(f_b), W_k pool(t_k(c))⟩ )          s = ``scaling`` = 10 (not 1/√d_k)
        g_b(c) = W_o · concat_heads( Σ_k a_b,k · W_v pool(t_k(c)) )          (not normalised)
    z_moe(b, c) = 100 · ⟨pool(f_b), g_b(c)⟩ ;   z = λ·z_loc + z_moe (λ = ``lmbda`` = 0.5) ;  L = CE(z, y)

With no experts (round 1, or a single client) z = z_loc: plain CoOp, and the gating net gets no gradient. The expert
text features are computed once per download (and class list) without gradient, in one batched text pass.

Server (§3.4–3.5), through the round protocol's bank of every client's last uploaded prompt
(:attr:`~fedlit.methods.base.FedMethod.server_bank`, checkpointed): each participation starts the local prompt from
the FedAvg prompt p̄ (Σ n_i p_i / Σ n_j); the client also receives E = min(``num_experts``, K) − 1 prompts of other
clients from the bank (:meth:`PFedMoAP.server_payload`), chosen by ``expert_rule``:

- ``random`` (default: what the official code executes; its call site never passes the rule): one client order
  shuffled once per run (from the seed); the first E clients in that order that are not the client and have trained.
- ``nearest`` (what the README/``train.sh`` intend): the E clients whose prompts are closest in Frobenius distance
  to the client's own latest upload (p̄ before its first one). The official branch returns positions in the
  candidate list instead of client ids (wrong for K > M); here the distances are mapped back to client ids.

With K = M = 10 (``train.sh``) both rules give every other client. Evaluation (``eval_prompt``): ``own`` (official)
classifies with the client's own last trained prompt p_i (a personal copy, ``own_ctx``), its gating net and freshly
selected experts; ``global`` uses p̄ instead. Optimisers (§3.6): prompt SGD lr 0.002, gating SGD lr
``gating_lr`` = 0.01 (constant), both momentum 0.9, wd 5e-4, both stepping on every batch.

Official behaviours fedlit cannot reproduce (they live in the official sequential round loop), and the clean
behaviour chosen instead:

- **Intra-round order dependence**: the official bank is updated in place, so a client late in a round may get this
  round's prompts as experts. Here every payload is built from the bank as it stood at the start of the round
  (the previous rounds' uploads): *start-of-round bank*.
- **Round-2 gating leak**: the official personal gating nets start as empty dicts and the "is stored" test compares
  them with an empty list, so it always passes; a gating net is first stored after a client's second round
  (ljaiverson/pFedMoAP@a481de3 ``federated_main.py:215, 365-366, 385-386``). So in round 2, the first round with
  experts, each client loads nothing and starts from the gating net the previous client has just trained. (Round 1
  has no experts: the gating net gets no gradient and is the same for everyone.) Here every client starts its first
  round with experts from the shared initial gating net (*no leak*).
- **First participation under partial participation**: the official client keeps the previous client's expert
  features and its gating net is not stored. Here it downloads its own experts and keeps its gating net.
- **Evaluation timing**: the official code evaluates a sampled client right after its training with the experts it
  trained with; here every client is evaluated after aggregation with freshly selected experts (the official
  treatment of non-sampled clients).
- Q-a/Q-b (momentum and cosine schedule shared by all clients; fresh optimiser and constant lr per client-round
  here), fp16 prompt and gating net (fp32 here), the ignored CLI ``--lr`` (the YAML's 0.002 is the default here).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from ..errors import FedlitError
from ..prompts import Task, encode_context, prompt_template
from .base import FedMethod, fp32
from .roles import DASSL_FORK

PROMPT_KEY = "ctx"
EXPERTS_KEY = "experts"


def encode_contexts(clip, task: Task, ctx: torch.Tensor) -> torch.Tensor:
    """Normalised text features ``[P, C, D]`` of ``P`` contexts ``[P, n_ctx, W]`` in one encoder pass."""
    return encode_context(clip, prompt_template(clip, task, ctx.shape[1]), ctx)


def pool(v: torch.Tensor, r: int) -> torch.Tensor:
    """Keep every ``r``-th coordinate of the last dimension (the official feature reduction)."""
    return v[..., ::r]


class GatingNet(nn.Module):
    """Multi-head attention of width ``dim``: images query the M expert features of each class.

    ``forward(f [B, d'], t [M, C, d'], scale) → g [B, C, d']`` with scores ``scale · ⟨q, k⟩`` per head.
    """

    def __init__(self, dim: int = 128, heads: int = 8):
        super().__init__()
        if dim % heads:
            raise FedlitError(f"method.init_args.gating_dim={dim} is not divisible by gating_heads={heads}")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, f: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
        h = self.heads
        q = self.q(f).unflatten(-1, (h, -1))  # [B, h, dk]
        k = self.k(t).unflatten(-1, (h, -1))  # [M, C, h, dk]
        v = self.v(t).unflatten(-1, (h, -1))
        a = torch.softmax(scale * torch.einsum("bhd,mchd->bchm", q, k), dim=-1)  # over the M experts
        return self.o(torch.einsum("bchm,mchd->bchd", a, v).flatten(-2))  # [B, C, d']


def moap_logits(f: torch.Tensor, t_local: torch.Tensor, t_experts: torch.Tensor | None, gate: GatingNet, r: int,
                scale: float, lmbda: float, logit_scale: float) -> torch.Tensor:
    """``z = λ·z_loc + z_moe`` (``z_loc`` alone without experts) from normalised image features ``f [B, D]``, the
    local class features ``t_local [C, D]`` and the experts' ``t_experts [E, C, D]``."""
    z_loc = logit_scale * f @ t_local.t()
    if t_experts is None or t_experts.shape[0] == 0:
        return z_loc
    keys = torch.cat([t_local.unsqueeze(0), t_experts.to(t_local.dtype)])  # [M, C, D]
    pf = pool(f, r)
    g = gate(pf, pool(keys, r), scale)
    z_moe = logit_scale * torch.einsum("bd,bcd->bc", pf, g)
    return lmbda * z_loc + z_moe


class MoAPPrompt(nn.Module):
    """The local prompt ``ctx`` (shared), the personal gating net ``gate`` and ``own_ctx`` (personal: the client's
    last trained prompt, what it evaluates with). ``experts`` (what the server sent, not state) and their cached
    text features per class list are set by :meth:`PFedMoAP.receive_payload`."""

    def __init__(self, width: int, n_ctx: int, gating_dim: int, heads: int, std: float = 0.02):
        super().__init__()
        self.ctx = nn.Parameter(torch.randn(n_ctx, width) * std)
        self.register_buffer("own_ctx", self.ctx.detach().clone())
        self.gate = GatingNet(gating_dim, heads)
        self.experts: torch.Tensor | None = None
        self.expert_features: dict[tuple[str, ...], torch.Tensor] = {}


class PFedMoAP(FedMethod):
    """pFedMoAP: local prompt + attention gating over other clients' prompts (server-side expert bank).

    Args:
        n_ctx: context tokens (16).
        lmbda: weight λ of the local logits (0.5).
        scaling: attention score scale s (10, used instead of 1/√d_k).
        num_experts: M, experts per class including the local prompt (10; capped at the number of clients).
        gating_dim: d', the gating width; features keep every (D/d')-th coordinate (128).
        gating_heads: attention heads (8).
        expert_rule: ``random`` (official executed: fixed random client order) or ``nearest`` (intended; Frobenius
            distance to the client's latest prompt, mapped to client ids).
        eval_prompt: ``own`` (official: evaluate with the client's last trained prompt) or ``global`` (p̄).
        gating_lr: constant SGD lr of the gating net (0.01).
        lr, momentum, weight_decay: SGD of the prompt (0.002, 0.9, 5e-4; the gating net shares momentum and wd).
        weighted: FedAvg of the prompt weighted by client sample count (official).
    """

    name = "pfedmoap"
    policy = DASSL_FORK  # Dassl fork: prompt and gating momentum carry (spec part 2 §0.3 Q-a)
    server_bank = True

    def __init__(self, n_ctx: int = 16, lmbda: float = 0.5, scaling: float = 10.0, num_experts: int = 10,
                 gating_dim: int = 128, gating_heads: int = 8, expert_rule: Literal["random", "nearest"] = "random",
                 eval_prompt: Literal["own", "global"] = "own", gating_lr: float = 0.01, lr: float = 0.002,
                 momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        if n_ctx < 1:
            raise FedlitError(f"method.init_args.n_ctx={n_ctx}: must be >= 1")
        if num_experts < 1:
            raise FedlitError(f"method.init_args.num_experts={num_experts}: must be >= 1 (1 = no experts, CoOp)")
        if gating_dim < 1 or gating_heads < 1 or gating_dim % gating_heads:
            raise FedlitError(f"method.init_args.gating_dim={gating_dim} must be a positive multiple of "
                              f"gating_heads={gating_heads}")
        if expert_rule not in ("random", "nearest"):
            raise FedlitError(f"method.init_args.expert_rule={expert_rule!r}: use 'random' or 'nearest'")
        if eval_prompt not in ("own", "global"):
            raise FedlitError(f"method.init_args.eval_prompt={eval_prompt!r}: use 'own' or 'global'")
        self.n_ctx, self.lmbda, self.scaling, self.num_experts = n_ctx, lmbda, scaling, num_experts
        self.gating_dim, self.gating_heads, self.expert_rule = gating_dim, gating_heads, expert_rule
        self.eval_prompt, self.gating_lr = eval_prompt, gating_lr
        self._num_clients: int | None = None
        self._r = 1

    # ----------------------------------------------------------------------------- the component
    def setup_federation(self, train_task: Task, num_clients: int) -> None:
        self._num_clients = num_clients

    def build(self, clip):
        dim = clip.embed_dim
        if dim % self.gating_dim:
            raise FedlitError(f"method.init_args.gating_dim={self.gating_dim} does not divide the feature width "
                              f"{dim} of {clip.name} (the gating net keeps every (D/d')-th coordinate)")
        self._r = dim // self.gating_dim
        module = MoAPPrompt(clip.text_width, self.n_ctx, self.gating_dim, self.gating_heads)
        for p in module.gate.parameters():  # marked on the tensor: the method object serves many client modules
            p.moap_gate = True
        return module

    def is_shared(self, key: str) -> bool:
        return key == PROMPT_KEY  # the gating net and the evaluation copy stay on the client

    def finish_local(self, prompt: MoAPPrompt) -> None:
        with torch.no_grad():
            prompt.own_ctx.copy_(prompt.ctx)

    def configure_optimizer(self, params):
        gate = [p for p in params if getattr(p, "moap_gate", False)]
        rest = [p for p in params if not getattr(p, "moap_gate", False)]
        groups = [{"params": rest}]
        if gate:
            groups.append({"params": gate, "lr": self.gating_lr, "fixed_lr": self.gating_lr})
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    # ----------------------------------------------------------------------------- server side
    def expert_ids(self, cid: int, global_state: dict[str, torch.Tensor], bank: dict[int, dict[str, torch.Tensor]],
                   seed: int = 0) -> list[int]:
        """The clients whose prompts client ``cid`` receives (sorted; the gating is order-invariant)."""
        k = self._num_clients or (max(bank, default=-1) + 1)
        m = min(self.num_experts, k) - 1
        candidates = sorted(j for j, s in bank.items() if j != cid and PROMPT_KEY in s)
        if m <= 0 or not candidates:
            return []
        if self.expert_rule == "random":
            order = np.random.default_rng([seed, 0x40AB]).permutation(max(k, max(candidates) + 1)).tolist()
            chosen = [j for j in order if j in set(candidates)][:m]
        else:
            ref = (bank[cid] if cid in bank and PROMPT_KEY in bank[cid] else global_state)[PROMPT_KEY].float()
            dist = torch.stack([(bank[j][PROMPT_KEY].float() - ref).norm() for j in candidates])
            chosen = [candidates[i] for i in torch.argsort(dist, stable=True)[:m].tolist()]
        return sorted(chosen)

    def server_payload(self, cid, global_state, bank, seed: int = 0) -> dict[str, torch.Tensor]:
        """``experts``: the chosen clients' last prompts ``[E, n_ctx, W]`` (nothing while none has trained)."""
        ids = self.expert_ids(cid, global_state, bank, seed)
        if not ids:
            return {}
        return {EXPERTS_KEY: torch.stack([bank[j][PROMPT_KEY].detach().to("cpu") for j in ids])}

    # ----------------------------------------------------------------------------- client side
    def receive_payload(self, prompt: MoAPPrompt, extra: dict[str, torch.Tensor]) -> None:
        unknown = set(extra) - {EXPERTS_KEY}
        if unknown:
            raise RuntimeError(f"pfedmoap was sent unknown tensors {sorted(unknown)}")
        prompt.experts = extra.get(EXPERTS_KEY)
        prompt.expert_features = {}  # computed on first use, once per download and class list

    def _expert_features(self, prompt: MoAPPrompt, clip, task: Task) -> torch.Tensor | None:
        if prompt.experts is None or prompt.experts.shape[0] == 0:
            return None
        key = tuple(task.classnames)
        if key not in prompt.expert_features:
            with torch.no_grad():
                feats = encode_contexts(clip, task, prompt.experts.to(prompt.ctx.device, prompt.ctx.dtype))
            prompt.expert_features[key] = feats.detach()
        return prompt.expert_features[key]

    def _context(self, prompt: MoAPPrompt) -> torch.Tensor:
        return prompt.ctx if prompt.training or self.eval_prompt == "global" else prompt.own_ctx

    def text_features(self, prompt: MoAPPrompt, clip, task: Task) -> torch.Tensor:
        """The local prompt's class features ``[C, D]`` (the z_loc classifier)."""
        return encode_contexts(clip, task, self._context(prompt).unsqueeze(0))[0]

    def prepare(self, prompt: MoAPPrompt, clip, task: Task):
        return self.text_features(prompt, clip, task), self._expert_features(prompt, clip, task)

    def logits(self, prompt: MoAPPrompt, clip, x: torch.Tensor, task: Task, prepared=None) -> torch.Tensor:
        t_local, t_experts = prepared if prepared is not None else self.prepare(prompt, clip, task)
        f = self.image_features(prompt, clip, x)
        with fp32(f):
            f = f.float()
            f = f / f.norm(dim=-1, keepdim=True)
            return moap_logits(f, t_local.float(), None if t_experts is None else t_experts.float(), prompt.gate,
                               self._r, self.scaling, self.lmbda, float(clip.logit_scale))


__all__ = ["PFedMoAP", "MoAPPrompt", "GatingNet", "moap_logits", "pool"]
