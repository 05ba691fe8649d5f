"""pFedPG (Yang, Wang, Wang, ICCV 2023): a server-side prompt generator personalises visual prompts.

Client (spec/pfedpg.md §2.1, §2.4): the frozen image tower with K = 10 shallow visual prompts after CLS
(``[c, P_n, z]``) and a personal linear head H_n (never sent); each round the client receives its generated
prompt P_n, trains (P_n, H_n) with SGD (lr 0.25, wd 0.001, batch 64, 5 epochs) and returns P̃_n. The head
persists locally across rounds; the prompt is reset to the generator's output every round.

Server (§2.2–2.3), on this method object, built lazily once the number of clients and the prompt shape are known:
a client-agnostic prompt basis P_base [K, l], one descriptor d_n per client, and a cross-attention generator

    P_n = G(d_n, P_base) = P_base + W^O · softmax((d_n W^Q)(P_base W^K)ᵀ / √l_k) (P_base W^V)

(query from d_n, key/value from P_base; the residual and the broadcast of the single query's output over the K rows
follow all three re-implementations, spec §2.2/§5 [inferred]). Update (pFedHN convention, §2.3): the client's
ΔP_n = P̃_n − P_n is the surrogate of −γ∇L, so φ = {G, P_base, D} receives the vector-Jacobian product
``(∂P_n/∂φ)ᵀ (P_n − P̃_n)`` (averaged over the round's clients [inferred]) and takes one optimiser step
(Adam, lr 0.001, §2.5; the optimiser type is not stated [inferred]). Evaluation uses the generated P_n with the
client's head (what the orchestrator loads through :meth:`client_state`; spec §2.4 leaves this open).

Inferred / unknown in the paper (constructor defaults here): one descriptor vector per client
(``descriptor_tokens=1``), single head (``n_heads=1``), l_k = l_v = l (``attn_dim=None``), biasless Q/K/V and a
biased output projection, residual on; P_base initialised like VPT prompts (uniform ±√(6/(3p²+l))), descriptors
uniform(−1, 1) (PFPT's baseline code), the projections with PyTorch's default init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..errors import FedlitError
from .base import Update
from .vpt import PROMPT_KEY, VPTMethod, VisualPromptHead, patch_size_of, vpt_init_bound


class PromptGenerator(nn.Module):
    """Cross-attention generator: ``forward(cid) → P_cid [K, l]``.

    Args:
        num_clients: N (one descriptor each).
        n_prompts: K.
        width: l, the prompt / descriptor width (the image tower's width).
        attn_dim: l_k = l_v, the internal attention width (split over ``n_heads``).
        n_heads: attention heads.
        descriptor_tokens: rows T of each descriptor: 1 (one vector; its output is broadcast over the K prompts)
            or K (one query per prompt).
        residual: P_n = P_base + attention output (else the attention output alone).
        base_bound: P_base ~ uniform(±base_bound).
    """

    def __init__(self, num_clients: int, n_prompts: int, width: int, attn_dim: int, n_heads: int = 1,
                 descriptor_tokens: int = 1, residual: bool = True, base_bound: float = 0.0625):
        super().__init__()
        if attn_dim % n_heads:
            raise FedlitError(f"method.attn_dim={attn_dim} is not divisible by method.n_heads={n_heads}")
        if descriptor_tokens not in (1, n_prompts):
            raise FedlitError(f"method.descriptor_tokens={descriptor_tokens}: use 1 or n_prompts={n_prompts}")
        self.n_prompts, self.width, self.n_heads, self.residual = n_prompts, width, n_heads, residual
        self.prompt_base = nn.Parameter(torch.empty(n_prompts, width).uniform_(-base_bound, base_bound))
        self.descriptors = nn.ParameterList(
            [nn.Parameter(torch.empty(descriptor_tokens, width).uniform_(-1.0, 1.0)) for _ in range(num_clients)])
        self.q = nn.Linear(width, attn_dim, bias=False)
        self.k = nn.Linear(width, attn_dim, bias=False)
        self.v = nn.Linear(width, attn_dim, bias=False)
        self.o = nn.Linear(attn_dim, width)

    @property
    def num_clients(self) -> int:
        return len(self.descriptors)

    def forward(self, cid: int) -> torch.Tensor:
        if not 0 <= cid < self.num_clients:
            raise FedlitError(f"pfedpg: client {cid} has no descriptor (the generator was built for "
                              f"{self.num_clients} clients)")
        d, base, h = self.descriptors[cid], self.prompt_base, self.n_heads
        q = self.q(d).unflatten(-1, (h, -1)).transpose(0, 1)  # [h, T, dk]
        k = self.k(base).unflatten(-1, (h, -1)).transpose(0, 1)  # [h, K, dk]
        v = self.v(base).unflatten(-1, (h, -1)).transpose(0, 1)  # [h, K, dv]
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [h, T, K]
        out = self.o((attn @ v).transpose(0, 1).flatten(-2))  # [T, l]
        out = out.expand(self.n_prompts, -1)  # T = 1: one output row for every prompt
        return base + out if self.residual else out


class PFedPG(VPTMethod):
    """pFedPG: personalised visual prompts generated by the server; personal linear heads.

    Args:
        n_prompts: K visual prompt tokens (10; 3 for Dermoscopic-FL, spec §2.5).
        server_lr: learning rate α of G, P_base and D (0.001, spec §2.5).
        server_optimizer: ``adam`` (PFPT's baseline code), ``adamw`` (MSungK reimpl.) or ``sgd`` (Eq. 5 read as
            plain gradient descent); the paper does not say [inferred: adam].
        server_weight_decay: weight decay of the server optimiser (0 [inferred]).
        attn_dim: l_k = l_v; ``None`` = the prompt width l [inferred].
        n_heads: attention heads of G (1 [inferred]).
        descriptor_tokens: rows of each client descriptor, 1 or ``n_prompts`` (1 [inferred]).
        residual: P_n = P_base + attention output (True [inferred, all re-implementations]).
        normalize_features, lr, momentum, weight_decay, weighted: client head and optimiser, see :class:`~fedlit.methods.vpt.VPTMethod`
            (``weighted`` is unused: the server update averages the clients' VJPs uniformly [inferred]).
    """

    name = "pfedpg"
    default_augment = "none"  # no official code reachable (spec §5): fedlit's earlier behaviour kept

    def __init__(self, n_prompts: int = 10, server_lr: float = 0.001,
                 server_optimizer: Literal["adam", "adamw", "sgd"] = "adam", server_weight_decay: float = 0.0,
                 attn_dim: int | None = None, n_heads: int = 1, descriptor_tokens: int = 1, residual: bool = True,
                 normalize_features: bool = True, lr: float = 0.25, momentum: float = 0.9, weight_decay: float = 0.001,
                 weighted: bool = True):
        super().__init__(n_prompts=n_prompts, normalize_features=normalize_features, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, weighted=weighted)
        if server_optimizer not in ("adam", "adamw", "sgd"):
            raise FedlitError(f"method.server_optimizer={server_optimizer!r}: use adam, adamw or sgd")
        self.server_lr = server_lr
        self.server_optimizer = server_optimizer
        self.server_weight_decay = server_weight_decay
        self.attn_dim = attn_dim
        self.n_heads = n_heads
        self.descriptor_tokens = descriptor_tokens
        self.residual = residual
        self._generator: PromptGenerator | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._base_bound = 0.0625

    def is_shared(self, key: str) -> bool:
        return key == PROMPT_KEY  # the head is personal, never sent

    def build(self, clip):
        module: VisualPromptHead = super().build(clip)
        self._base_bound = vpt_init_bound(patch_size_of(clip), clip.vision_width)
        return module

    # ------------------------------------------------------------------------------ server state
    @property
    def generator(self) -> PromptGenerator | None:
        return self._generator

    def _ensure_server(self, prompt_shape: Sequence[int], num_clients: int | None = None) -> PromptGenerator:
        """Build G, P_base, D and the server optimiser once (deterministically from the run's seed, so every
        process of a multi-process run builds the same server)."""
        if self._generator is not None:
            return self._generator
        n = num_clients if num_clients is not None else self._num_clients
        if n is None:
            raise FedlitError("pfedpg: the number of clients is unknown; call "
                              "method.setup_federation(train_task, num_clients) first")
        k, width = int(prompt_shape[0]), int(prompt_shape[1])
        seed = torch.initial_seed()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed + 0x9FED) % 2**63)
            self._generator = PromptGenerator(n, k, width, self.attn_dim or width, self.n_heads,
                                              self.descriptor_tokens, self.residual, self._base_bound)
        params = list(self._generator.parameters())
        if self.server_optimizer == "sgd":
            self._optimizer = torch.optim.SGD(params, lr=self.server_lr, weight_decay=self.server_weight_decay)
        elif self.server_optimizer == "adamw":
            self._optimizer = torch.optim.AdamW(params, lr=self.server_lr, weight_decay=self.server_weight_decay)
        else:
            self._optimizer = torch.optim.Adam(params, lr=self.server_lr, weight_decay=self.server_weight_decay)
        return self._generator

    def server_state_dict(self) -> dict[str, torch.Tensor]:
        """Generator parameters (``generator.*``) and the server optimiser's per-parameter state
        (``optimizer.<param>.<field>``), detached CPU copies."""
        if self._generator is None:
            return {}
        out = {f"generator.{k}": v.detach().to("cpu", copy=True) for k, v in self._generator.state_dict().items()}
        names = {id(p): name for name, p in self._generator.named_parameters()}
        for p, st in self._optimizer.state.items():
            for field, val in st.items():
                t = val if torch.is_tensor(val) else torch.tensor(val)
                out[f"optimizer.{names[id(p)]}.{field}"] = t.detach().to("cpu", copy=True)
        return out

    def load_server_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        gen = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
        if "prompt_base" not in gen:
            raise FedlitError("pfedpg: server state has no generator.prompt_base; not a pFedPG checkpoint")
        n = sum(1 for k in gen if k.startswith("descriptors."))
        if self._generator is None:
            self._ensure_server(tuple(gen["prompt_base"].shape), num_clients=n)
        elif self._generator.num_clients != n or tuple(self._generator.prompt_base.shape) != tuple(gen["prompt_base"].shape):
            raise FedlitError("pfedpg: the checkpoint's generator does not match this federation "
                              f"({n} clients, prompt {tuple(gen['prompt_base'].shape)})")
        self._generator.load_state_dict(gen, strict=True)
        params = dict(self._generator.named_parameters())
        self._optimizer.state.clear()
        for k, v in state.items():
            if not k.startswith("optimizer."):
                continue
            name, field = k[len("optimizer."):].rsplit(".", 1)
            self._optimizer.state[params[name]][field] = v.clone()

    # ------------------------------------------------------------------------------ server side
    def client_state(self, cid: int, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Client ``cid``'s generated prompt P_cid = G(d_cid, P_base) (detached, CPU)."""
        ref = global_state[PROMPT_KEY]
        gen = self._ensure_server(tuple(ref.shape))
        with torch.no_grad():
            p = gen(cid)
        return {**global_state, PROMPT_KEY: p.detach().to("cpu", ref.dtype, copy=True)}

    def aggregate(self, updates: Sequence[Update], global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimiser step on φ = {G, P_base, D} with ∇φ = mean_n (∂P_n/∂φ)ᵀ (P_n − P̃_n), P_n the prompt
        client n was sent (``update.sent``) and P̃_n the prompt it returned. Returns the new global
        state: the client-agnostic basis P_base (what a client outside the federation would get)."""
        ref = global_state[PROMPT_KEY]
        gen = self._ensure_server(tuple(ref.shape))
        updates = [u for u in updates if PROMPT_KEY in u.shared]
        if not updates:
            return global_state
        params = list(gen.parameters())
        grads: list[torch.Tensor | None] = [None] * len(params)
        with torch.enable_grad():
            for u in updates:
                sent = u.sent
                if sent is None or PROMPT_KEY not in sent:
                    raise FedlitError(f"pfedpg: the update of client {u.cid} does not carry the prompt it was sent "
                                      "(update.sent); aggregate updates through the round protocol (fedlit.rounds)")
                p_n = gen(u.cid)
                delta = (sent[PROMPT_KEY].float() - u.shared[PROMPT_KEY].float()).to(p_n.device) / len(updates)
                g = torch.autograd.grad(p_n, params, grad_outputs=delta, allow_unused=True)
                grads = [a if b is None else (b if a is None else a + b) for a, b in zip(grads, g)]
        for p, g in zip(params, grads):
            p.grad = g  # None for the descriptors of clients not in this round: the optimiser skips them
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return {**global_state, PROMPT_KEY: gen.prompt_base.detach().to("cpu", ref.dtype, copy=True)}
