"""FedDnC ("Divide and Conquer", README: ICDM 2026): two decoupled CoOp prompt streams fused per sample by confidence
(spec 3a §2). **Default = paper**: the released code (``Lynn0925/FedDnC@d2df6c4``) cannot have produced its tables —
its evaluation never leaves training mode, so every reported number is the P_b stream alone (spec 3a §2.5), and Base /
Novel are measured on client 0's classes (§2.6). ``eval_logits: official_b_only`` reproduces the first quirk;
``global_eval_set: official_client0`` the second: the code's DataManager keeps no whole test split, so its "global"
pass falls back to the first client's federated test set — "Base" = the global model on client 0's own test split
(its ~5 base classes, classified among all base classes; = client 0's Local) and "Novel" = on client 0's share of the
novel classes (the novel half split like the base half, same seed), classified among all novel classes
(:mod:`fedlit.data.federation`, sets ``client0/base`` / ``client0/novel``; the run plan and ``results.json`` ``plan``
say which ran). Default ``full_split`` (the whole base and novel test splits): client 0's 5 of 51 classes cannot be
what the paper's Base / Novel columns mean, and its numbers would depend on which classes client 0 drew.

Streams ``ctx_b``, ``ctx_n`` ``[N, L, W]`` (N = 2 replicas, L = 4): P_b ~ N(0, 0.02²); P_n = a copy of P_b with its
first tokens replaced by the embeddings of "a photo of a" in every replica. Both are shared. ``t_s(c)`` = the mean
over the N replicas of the normalised text features (not re-normalised); ``z_s = s·f̂·t_sᵀ``; ``t_zs`` = frozen
"a photo of a {c}." features. Local loss (the code, feddnc.py ``forward_backward``; spec §2.3)::

    L = CE(z_b, y) + μ·mean((P_b − P_b⁰)²) + λ·T²·KL(softmax(z_zs/T) ‖ softmax(z_n/T))
        + λ_a·mean_c(1 − cos(t_n, t_zs)) + β·mean_c cos(sg(t_b), t_n)

(KL batch-mean, T = 4; P_b⁰ = P_b as received; μ 0.01, λ 1, λ_a = λ, β 0.1). Server: P_b ← FedAvg (n_i); P_n ← plain
FedAvg in the first round, then ``(1 − η)·P_n^prev + η·FedAvg`` with η = 1 − ``ema_alpha`` (0.1), or
``min(0.4, 0.4/shots)`` when ``ema_alpha < 0``. Inference (``eval_logits: fused``, the paper):
``c_s = max softmax(z_s/T_c)``, ``T_c = max(1, 8/shots)``, ``α = clip(c_b/(c_b + c_n + 1e-8), 0.3, min(0.9, 0.5 +
0.05·shots))`` (or ``fixed_alpha``), ``z = α·z_b + (1 − α)·z_n``. Image tower untouched: cached features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FedlitError
from ..prompts import Task, encode_context, handcrafted_features, prompt_template
from .base import FedMethod, fp32

ZS_TEMPLATE = "a photo of a {}."


def fusion_weight(z_b: torch.Tensor, z_n: torch.Tensor, shots: int) -> torch.Tensor:
    """Per-sample α ``[B, 1]`` from the two streams' confidences (module docstring)."""
    t_c = max(1.0, 8.0 / shots)
    c_b = F.softmax(z_b / t_c, dim=-1).max(dim=-1).values
    c_n = F.softmax(z_n / t_c, dim=-1).max(dim=-1).values
    return (c_b / (c_b + c_n + 1e-8)).clamp(0.3, min(0.9, 0.5 + 0.05 * shots)).unsqueeze(-1)


def ema_rate(ema_alpha: float, shots: int) -> float:
    """η of the P_n update: ``1 − ema_alpha``, or ``min(0.4, 0.4/shots)`` when ``ema_alpha < 0``."""
    return 1.0 - ema_alpha if ema_alpha >= 0 else min(0.4, 0.4 / max(shots, 1))


class DnCPrompt(nn.Module):
    def __init__(self, clip, n_ctx: int = 4, replicas: int = 2, init: str = "a photo of a"):
        super().__init__()
        self.n_ctx = n_ctx
        ctx_b = torch.randn(replicas, n_ctx, clip.text_width) * 0.02
        tokens = clip.tokenize([init]).to(clip.device)
        k = min(int(clip.eot_index(tokens)[0]) - 1, n_ctx)
        with torch.no_grad():
            phrase = clip.token_embedding(tokens)[0, 1 : 1 + k].float().cpu()
        ctx_n = ctx_b.clone()
        ctx_n[:, :k] = phrase
        self.ctx_b, self.ctx_n = nn.Parameter(ctx_b), nn.Parameter(ctx_n)
        self.anchor: torch.Tensor | None = None

    def streams(self, clip, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t_b, t_n)`` ``[C, D]``: replica means of normalised features, one batched text pass."""
        n = self.ctx_b.shape[0]
        feats = encode_context(clip, prompt_template(clip, task, self.n_ctx), torch.cat([self.ctx_b, self.ctx_n]))
        return feats[:n].mean(dim=0), feats[n:].mean(dim=0)


class FedDnC(FedMethod):
    """FedDnC's two streams.

    Args:
        n_ctx: L, tokens per replica (4 base-to-novel, 16 LODO). replicas: N (2).
        mu, lambda_kd, lambda_align, beta_div, temperature: loss weights μ (0.01), λ (1), λ_a (−1 → λ), β (0.1), T (4).
        ema_alpha: P_n's EMA keep-rate α (0.9 → η 0.1; < 0: η = min(0.4, 0.4/shots)).
        shots: the run's shots per class (the fusion's T_c and α ceiling, the η rule).
        eval_logits: ``fused`` (paper) | ``official_b_only`` (the released code: P_b alone).
        global_eval_set: ``full_split`` (default: the whole base / novel test splits) | ``official_client0`` (the
            released code: every client's Base / Novel on client 0's test split and novel share).
        fixed_alpha: a fixed fusion weight instead of the confidence rule (the README's ablation); None.
        lr, momentum, weight_decay, weighted: local SGD (0.002, 0.9, 5e-4), FedAvg weighting.
    """

    name = "feddnc"

    def __init__(self, n_ctx: int = 4, replicas: int = 2, mu: float = 0.01, lambda_kd: float = 1.0,
                 lambda_align: float = -1.0, beta_div: float = 0.1, temperature: float = 4.0, ema_alpha: float = 0.9,
                 shots: int = 8, eval_logits: str = "fused", fixed_alpha: float | None = None,
                 global_eval_set: str = "full_split", lr: float = 0.002, momentum: float = 0.9,
                 weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        if eval_logits not in ("fused", "official_b_only"):
            raise FedlitError(f"method.init_args.eval_logits={eval_logits!r}: use fused or official_b_only")
        if global_eval_set not in ("full_split", "official_client0"):
            raise FedlitError(f"method.init_args.global_eval_set={global_eval_set!r}: use full_split or "
                              "official_client0")
        self.global_eval_set = global_eval_set
        if n_ctx < 1 or replicas < 1 or shots < 1 or temperature <= 0 or ema_alpha > 1:
            raise FedlitError("method.init_args: need n_ctx, replicas, shots >= 1, temperature > 0, ema_alpha <= 1")
        if fixed_alpha is not None and not 0 <= fixed_alpha <= 1:
            raise FedlitError(f"method.init_args.fixed_alpha={fixed_alpha}: a weight in [0, 1]")
        self.n_ctx, self.replicas, self.mu, self.lambda_kd = n_ctx, replicas, mu, lambda_kd
        self.lambda_align = lambda_kd if lambda_align < 0 else lambda_align
        self.beta_div, self.temperature, self.ema_alpha, self.shots = beta_div, temperature, ema_alpha, shots
        self.eval_logits, self.fixed_alpha = eval_logits, fixed_alpha
        self._aggregations = 0

    def build(self, clip):
        return DnCPrompt(clip, self.n_ctx, self.replicas)

    def receive_payload(self, prompt, extra) -> None:
        super().receive_payload(prompt, extra)
        prompt.anchor = None  # P_b⁰ is taken at the first loss after the load

    # ------------------------------------------------------------------ classification
    def text_features(self, prompt: DnCPrompt, clip, task: Task) -> torch.Tensor:
        return prompt.streams(clip, task)[0]  # P_b's classifier (the fused one depends on the image)

    def prepare(self, prompt, clip, task: Task):
        return torch.stack(prompt.streams(clip, task))  # [2, C, D]

    def _logits(self, clip, x, t_b, t_n):
        f = x.float() / x.float().norm(dim=-1, keepdim=True)
        return clip.logit_scale * f @ t_b.float().t(), clip.logit_scale * f @ t_n.float().t()

    def logits(self, prompt, clip, x, task: Task, prepared=None):
        t_b, t_n = prepared if prepared is not None else self.prepare(prompt, clip, task)
        with fp32(x):
            z_b, z_n = self._logits(clip, x, t_b, t_n)
            if self.eval_logits == "official_b_only":
                return z_b
            alpha = fusion_weight(z_b, z_n, self.shots) if self.fixed_alpha is None else self.fixed_alpha
            return alpha * z_b + (1 - alpha) * z_n

    def loss(self, module, x, y, task: Task, classes=None):
        clip, prompt = module.clip, module.prompt
        if prompt.anchor is None:
            prompt.anchor = prompt.ctx_b.detach().clone()
        t_b, t_n = prompt.streams(clip, task)
        zs = handcrafted_features(clip, task, ZS_TEMPLATE).to(t_b.device)
        with fp32(x):
            z_b, z_n = self._logits(clip, x, t_b, t_n)
            z_zs = self._logits(clip, x, zs, zs)[0]
            temp = self.temperature
            kd = F.kl_div(F.log_softmax(z_n / temp, -1), F.softmax(z_zs / temp, -1), reduction="batchmean")
            loss = (F.cross_entropy(z_b, y) + self.mu * (prompt.ctx_b.float() - prompt.anchor.float()).pow(2).mean()
                    + self.lambda_kd * temp ** 2 * kd
                    + self.lambda_align * (1 - F.cosine_similarity(t_n.float(), zs, dim=-1)).mean()
                    + self.beta_div * F.cosine_similarity(t_b.detach().float(), t_n.float(), dim=-1).mean())
        return loss

    # ------------------------------------------------------------------ server
    def aggregate(self, updates, global_state):
        if not updates:
            return global_state
        avg = dict(super().aggregate(updates, global_state))  # FedAvg (weighted or uniform), then P_n's EMA
        if self._aggregations > 0:
            eta = ema_rate(self.ema_alpha, self.shots)
            avg["ctx_n"] = (1 - eta) * global_state["ctx_n"].to(avg["ctx_n"]) + eta * avg["ctx_n"]
        self._aggregations += 1
        return avg

    def server_state_dict(self):
        return {"aggregations": torch.tensor(self._aggregations)}

    def load_server_state_dict(self, state):
        self._aggregations = int(state.get("aggregations", torch.tensor(0)))


__all__ = ["FedDnC", "fusion_weight", "ema_rate"]
