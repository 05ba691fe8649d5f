"""FedSEPT (ACM MM 2026, per its README): subspace-decomposed prompt experts, a per-input router, local DP-SGD.

**default = code** (yuCoryx/FedSEPT@d2fc0a4d1a1e; the released code runs; spec methods-3-b.md §1). Client
component: M experts, each a CoOp context ``ctx_m = A_m · B₀ + R`` (``[n, W]``) with

- ``A`` ``[M, n, r]`` (N(0, 0.02²)): the expert coefficients, the **only shared tensor** (FedAvg by n_i; spec §1.6);
- ``B₀`` ``[r, W]`` (N(0, 0.02²)): the fixed public basis, a non-persistent buffer drawn from a generator keyed by
  ``basis_seed`` (every client and process derives the same one; never sent);
- ``R`` ``[n, W]`` (zeros): the private residual, one for all experts (personal);
- the router (personal): the detached normalised image feature as one token, attended by a learned query. With one
  key the attention weight is 1, so the router is ``π(x) = softmax(W_h · LN(W_o · drop(W_v f + b_v) + b_o) + b_h)``
  (the query/key path gets no gradient in the official code and is not built here); ``drop`` is the official
  dropout (p = ``router_dropout``, 0.1) on each head's single attention weight in training, i.e. a per-sample,
  per-head dropout of that head's value path. Head N(0, 0.01²), bias 0; the router has weight decay 0 (§1.2).

Forward (§1.3; fp32): ``z(b, c) = Σ_m π_m(b) · 100 ⟨f_b, t_m(c)⟩``, ``t_m`` the normalised text features of
``[SOS, ctx_m, name_c, ".", EOT]``; loss ``mean_b CE_b + λ_div · reg``, ``reg`` = the mean over ordered pairs
m ≠ m' of cos²(vec A_m, vec A_m').

DP (§1.4, ``dp_epsilon > 0``; the code's default and the script's setting): per-sample DP-SGD on ``A`` only
(:mod:`fedlit.privacy`): per-sample gradients of ``ℓ_b = CE_b + λ_div·reg`` by batched VJPs (``dp_microbatch``
rows per backward call), joint clipping at ``dp_clip``, ``ĝ = (Σ c_b g_b + N(0, σ_i²C²)) / B``; the ordinary
backward fills ``R`` and the router, ĝ replaces ``A``'s gradient. σ_i per client from Opacus' RDP
``get_noise_multiplier`` with ``q_i = min(1, B/n_i)`` and ``T_i = R·E·S_i`` (``dp_calibration: full_participation``,
the code's; ``expected`` counts the rounds the client is expected to join) unless ``dp_sigma > 0``.
``results.json`` → ``privacy`` reports σ_i, q_i, T_i, the steps taken and the ε spent per client (the ε of ``A``'s
gradient mechanism, conditional on the non-private ``R``/router: not an end-to-end guarantee, §1.4).

Not reproduced (fedlit's loop): the optimiser shared by all clients (momentum leak, Q-a: fresh SGD per
client-round here), the evaluation cadence {0, 5, …} ∪ last 5 (``trainer.eval_every``), the README's "λ_gate" (no
counterpart in the code).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import privacy
from ..errors import FedlitError
from ..prompts import Task, encode_context, prompt_template
from .base import FedMethod, fp32

CLIENT_KEY = "fedsept_client"


class Router(nn.Module):
    """The single-token attention router in closed form (module docstring)."""

    def __init__(self, dim: int, experts: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise FedlitError(f"method.init_args.router_heads={heads} does not divide the feature width {dim}")
        self.heads, self.dropout = heads, dropout
        self.value, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, experts)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        v = self.value(f.detach())
        if self.training and self.dropout > 0:
            keep = (torch.rand(v.shape[0], self.heads, 1, device=v.device) >= self.dropout).to(v)
            v = (v.unflatten(-1, (self.heads, -1)) * keep / (1 - self.dropout)).flatten(-2)
        return torch.softmax(self.head(self.norm(self.out(v))), dim=-1)


class SEPTPrompt(nn.Module):
    """``A`` (shared), ``R`` and the router (personal), ``B₀`` (fixed, not state) and ``dp_steps`` (personal)."""

    def __init__(self, width: int, dim: int, experts: int, n_ctx: int, rank: int, heads: int, dropout: float,
                 basis_seed: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(experts, n_ctx, rank) * 0.02)
        gen = torch.Generator().manual_seed(basis_seed)
        self.register_buffer("B0", torch.randn(rank, width, generator=gen) * 0.02, persistent=False)
        self.R = nn.Parameter(torch.zeros(n_ctx, width))
        self.router = Router(dim, experts, heads, dropout)
        self.register_buffer("dp_steps", torch.zeros((), dtype=torch.long))
        self.cid: int | None = None
        self.override = privacy.GradientOverride()

    def contexts(self) -> torch.Tensor:
        """``[M, n, W]``: ``A_m · B₀ + R``."""
        return self.A @ self.B0 + self.R


def diversity(a: torch.Tensor) -> torch.Tensor:
    """Mean over ordered pairs m ≠ m' of cos²(vec A_m, vec A_m') (0 for one expert)."""
    m = a.shape[0]
    if m < 2:
        return a.sum() * 0
    v = F.normalize(a.flatten(1), dim=1)
    cos2 = (v @ v.t()).pow(2)
    return (cos2.sum() - cos2.diagonal().sum()) / (m * (m - 1))


def fused_logits(f: torch.Tensor, t: torch.Tensor, pi: torch.Tensor, scale: float) -> torch.Tensor:
    """``z(b, c) = Σ_m π_m(b) · scale · ⟨f_b, t_m(c)⟩`` from normalised ``f [B, D]``, ``t [M, C, D]``, ``π [B, M]``."""
    return scale * torch.einsum("bm,bd,mcd->bc", pi, f, t)


class FedSEPT(FedMethod):
    """FedSEPT: shared low-rank expert coefficients × a public basis + a private residual, routed per input.

    Args:
        num_experts: M (4). rank: r (16). n_ctx: context tokens (16). router_heads: 4. router_dropout: 0.1.
        lambda_div: weight of the expert-diversity term (10). basis_seed: seed of the public basis B₀.
        dp_epsilon: target ε of the per-sample DP-SGD on A (1.0; 0 = no DP). dp_delta: δ (1e-5).
        dp_clip: joint clipping norm C (1.0). dp_sigma: fixed noise multiplier (> 0 overrides the calibration).
        dp_microbatch: per-sample rows per batched backward call (8).
        dp_calibration: ``full_participation`` (official: T_i = R·E·S_i) or ``expected`` (the rounds the client is
            expected to join at ``trainer.participation``).
        dp_reg_in_per_sample: λ_div·reg inside every clipped per-sample loss (official) or added unclipped to ĝ
            (it does not depend on the data).
        lr, momentum, weight_decay: SGD (0.001, 0.9, 5e-4; the router without weight decay).
        weighted: FedAvg of A by sample count (official).
    """

    name = "fedsept"

    def __init__(self, num_experts: int = 4, rank: int = 16, n_ctx: int = 16, router_heads: int = 4,
                 router_dropout: float = 0.1, lambda_div: float = 10.0, basis_seed: int = 1, dp_epsilon: float = 1.0,
                 dp_delta: float = 1e-5, dp_clip: float = 1.0, dp_sigma: float = 0.0, dp_microbatch: int = 8,
                 dp_calibration: Literal["full_participation", "expected"] = "full_participation",
                 dp_reg_in_per_sample: bool = True, lr: float = 0.001, momentum: float = 0.9,
                 weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        for key, val in (("num_experts", num_experts), ("rank", rank), ("n_ctx", n_ctx),
                         ("router_heads", router_heads)):
            if val < 1:
                raise FedlitError(f"method.init_args.{key}={val}: must be >= 1")
        if dp_calibration not in ("full_participation", "expected"):
            raise FedlitError(f"method.init_args.dp_calibration={dp_calibration!r}: use 'full_participation' or "
                              "'expected'")
        if dp_epsilon < 0 or dp_clip <= 0 or not 0 < dp_delta < 1:
            raise FedlitError("method.init_args: need dp_epsilon >= 0, dp_clip > 0 and 0 < dp_delta < 1")
        if not 0 <= router_dropout < 1:
            raise FedlitError(f"method.init_args.router_dropout={router_dropout}: must be in [0, 1)")
        self.num_experts, self.rank, self.n_ctx = num_experts, rank, n_ctx
        self.router_heads, self.router_dropout, self.lambda_div, self.basis_seed = (router_heads, router_dropout,
                                                                                    lambda_div, basis_seed)
        self.dp_epsilon, self.dp_delta, self.dp_clip, self.dp_sigma = dp_epsilon, dp_delta, dp_clip, dp_sigma
        self.dp_microbatch, self.dp_calibration, self.dp_reg_in_per_sample = (dp_microbatch, dp_calibration,
                                                                              dp_reg_in_per_sample)
        self._plan: dict | None = None
        self._sigmas: dict[int, float] = {}
        self._steps: dict[int, int] = {}
        self._gens: dict[int, torch.Generator] = {}

    @property
    def dp(self) -> bool:
        return self.dp_epsilon > 0 or self.dp_sigma > 0

    @property
    def lockstep(self) -> bool:
        return not self.dp  # per-sample gradients need each client's own graph

    # ----------------------------------------------------------------------------- the component
    def build(self, clip):
        module = SEPTPrompt(clip.text_width, clip.embed_dim, self.num_experts, self.n_ctx, self.rank,
                            self.router_heads, self.router_dropout, self.basis_seed)
        for p in module.router.parameters():
            p.fedsept_router = True
        return module

    def is_shared(self, key: str) -> bool:
        return key == "A"

    def configure_optimizer(self, params):
        router = [p for p in params if getattr(p, "fedsept_router", False)]
        rest = [p for p in params if not getattr(p, "fedsept_router", False)]
        groups = [{"params": rest}] + ([{"params": router, "weight_decay": 0.0}] if router else [])
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def server_payload(self, cid, global_state, bank, seed: int = 0) -> dict[str, torch.Tensor]:
        return {CLIENT_KEY: torch.tensor(cid)} if self.dp else {}  # the client's id: its own σ_i and noise stream

    def receive_payload(self, prompt: SEPTPrompt, extra: dict[str, torch.Tensor]) -> None:
        unknown = set(extra) - {CLIENT_KEY}
        if unknown:
            raise RuntimeError(f"fedsept was sent unknown tensors {sorted(unknown)}")
        prompt.cid = int(extra[CLIENT_KEY]) if CLIENT_KEY in extra else None

    # ----------------------------------------------------------------------------- classification
    def text_features(self, prompt: SEPTPrompt, clip, task: Task) -> torch.Tensor:
        """``[M, C, D]``: every expert's normalised class features in one text pass."""
        return encode_context(clip, prompt_template(clip, task, self.n_ctx), prompt.contexts())

    def logits(self, prompt: SEPTPrompt, clip, x: torch.Tensor, task: Task, prepared=None) -> torch.Tensor:
        t = prepared if prepared is not None else self.text_features(prompt, clip, task)
        f = self.image_features(prompt, clip, x)
        with fp32(f):
            f = F.normalize(f.float(), dim=-1)
            return fused_logits(f, t.float(), prompt.router(f), float(clip.logit_scale))

    def loss(self, module, x, y, task, classes=None):
        prompt: SEPTPrompt = module.prompt
        prompt.override.clear()
        logits = module(x, task)
        with fp32(logits):
            ce = F.cross_entropy(logits.float(), y, reduction="none")
            reg = self.lambda_div * diversity(prompt.A.float())
            if self.dp and prompt.training and torch.is_grad_enabled():
                self._private_step(prompt, ce + reg if self.dp_reg_in_per_sample else ce, reg)
            return ce.mean() + reg

    # ----------------------------------------------------------------------------- DP
    def plan_rounds(self, trainer, num_samples) -> None:
        self._plan = {"rounds": trainer.rounds, "local_epochs": trainer.local_epochs,
                      "batch_size": trainer.batch_size, "participation": min(trainer.participation, 1.0),
                      "first_round_all": trainer.first_round_all, "steps_per_epoch":
                          [max(len(trainer.batch_starts(n, trainer.drop_last_of(self))), 1) for n in num_samples], "num_samples": list(num_samples)}

    def client_plan(self, cid: int) -> dict:
        """σ_i, q_i and T_i of client ``cid`` (§1.4)."""
        if self._plan is None:
            raise FedlitError("fedsept: DP needs the run's plan (plan_rounds) before training")
        p = self._plan
        n, s = p["num_samples"][cid], p["steps_per_epoch"][cid]
        q = min(1.0, p["batch_size"] / max(n, 1))
        rounds = p["rounds"]
        if self.dp_calibration == "expected" and p["participation"] < 1:
            rounds = (1 + (rounds - 1) * p["participation"]) if p["first_round_all"] else rounds * p["participation"]
        steps = max(1, int(round(rounds * p["local_epochs"] * s)))
        if cid not in self._sigmas:
            self._sigmas[cid] = self.dp_sigma if self.dp_sigma > 0 else privacy.noise_multiplier(
                self.dp_epsilon, self.dp_delta, q, steps)
        return {"sigma": self._sigmas[cid], "sample_rate": q, "planned_steps": steps}

    def _private_step(self, prompt: SEPTPrompt, per_sample: torch.Tensor, reg: torch.Tensor) -> None:
        cid = -1 if prompt.cid is None else prompt.cid
        sigma = self.client_plan(cid)["sigma"] if cid >= 0 else self.dp_sigma
        gen = self._gens.setdefault(cid, torch.Generator().manual_seed(0x5E97 + cid))
        g = privacy.dp_gradients(per_sample, [prompt.A], self.dp_clip, sigma, gen, chunk=self.dp_microbatch)
        if not self.dp_reg_in_per_sample:
            g = [g[0] + torch.autograd.grad(reg, prompt.A, retain_graph=True)[0].float()]
        prompt.override.set([prompt.A], g)
        prompt.dp_steps += 1

    def aggregate(self, updates, global_state):
        for u in updates:
            if "dp_steps" in u.personal:
                self._steps[u.cid] = int(u.personal["dp_steps"])
        return super().aggregate(updates, global_state)

    def run_report(self) -> dict:
        if not self.dp or self._plan is None:
            return {"privacy": {"dp": False}} if not self.dp else {}
        clients = {}
        for cid in range(len(self._plan["num_samples"])):
            plan = self.client_plan(cid)
            steps = self._steps.get(cid, 0)
            clients[str(cid)] = {**plan, "steps": steps,
                                 "epsilon_spent": privacy.epsilon(plan["sigma"], plan["sample_rate"], steps,
                                                                  self.dp_delta)}
        return {"privacy": {"dp": True, "mechanism": "per-sample DP-SGD on A (joint clipping)",
                            "epsilon_target": self.dp_epsilon, "delta": self.dp_delta, "clip": self.dp_clip,
                            "calibration": self.dp_calibration, "clients": clients,
                            "caveat": "epsilon of A's gradient mechanism, conditional on the non-private R/router"}}


__all__ = ["FedSEPT", "Router", "SEPTPrompt", "diversity", "fused_logits"]
