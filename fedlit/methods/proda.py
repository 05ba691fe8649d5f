"""ProDA (Lu et al., CVPR 2022): a collection of K prompts whose class embeddings are modelled as a Gaussian and
trained with a surrogate of the expected classification loss, federated with FedAvg (spec 3c §4).
**Default = paper**, as read by the third-party Dassl trainer FLiP ports (spec 3c §4.2-4.3): the official code was
never released, and FLiP's port can only run with K = 1 (it is then CoOp, spec 3c §4.4).

Prompt model: ``ctx [K, n, W]`` (N(0, 0.02²)), all shared (FedAvg weighted by n_i). Class-token position per prompt
(``positions: front_middle_end``): the first K/4 put the class name first, the next K/4 in the middle of the
context, the rest at the end (K = 1: end); ``end_only`` (FLiP) puts it at the end for all. Each local step uses a
**prompt batch** of ``prompt_batch`` prompts: a random permutation of the K prompts, drawn when the cursor is at 0
and consumed b_p at a time; the cursor restarts at every local update (FLiP resets it with the server's state).

Training (cached frozen image features f, normalised; t_{c,k} the normalised features of the step's P prompts)::

    μ_c = mean_k t_{c,k};  δ = t − μ;  Σ_ij[d] = Σ_k δ_{i,k,d} δ_{j,k,d} / (P + 1);  A_b[i,j] = Σ_d f_b[d]² Σ_ij[d]
    z_{b,c} = s⟨f_b, μ_c⟩ + ½ s² (A_b[y,y] + A_b[c,c] − 2 A_b[y,c])          L = CE(z, y) + w_div·L_div

(:func:`surrogate_logits`); ``L_div = mean_{k≠k'} |⟨u_k, u_k'⟩|`` over the K class-agnostic prompts
"[SOS] ctx_k . [EOT]" (:func:`diversity`); ``div_weight`` 0 (third-party: computed, not added) | 1 (FLiP).
Inference: ``μ_c`` over all K prompts (mean of normalised features, not re-normalised), ``z = s⟨f, μ_c⟩``.

Presets: default K 32, n 16, b_p 4 (the third-party signature; the paper's values are unverified). FLiP's ProDA is
``num_prompts: 1, prompt_batch: 1, positions: end_only, n_ctx: 4`` — exactly CoOp (a warning says so).
Not resumable bit for bit: the prompt-batch permutations come from a counter of draws on the method.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FedlitError
from ..prompts import Task, clean_classname, encode_context, prompt_template, text_cache
from .base import FedMethod, fp32

AGNOSTIC = Task(name="proda-class-agnostic", classnames=("",))


def surrogate_logits(f: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """ProDA's Gaussian surrogate logits ``[B, C]`` from normalised image features ``f [B, D]``, the step's
    prompt features ``t [P, C, D]`` and labels ``y [B]`` (module docstring)."""
    mu = t.mean(dim=0)
    delta = t - mu
    p = t.shape[0]
    f2 = f * f
    d_y = delta[:, y]  # [P, B, D]
    a_cc = torch.einsum("bd,pcd->bc", f2, delta * delta) / (p + 1)
    a_yc = torch.einsum("bd,pcd,pbd->bc", f2, delta, d_y) / (p + 1)
    a_yy = a_yc.gather(1, y[:, None])
    return scale * f @ mu.t() + 0.5 * scale ** 2 * (a_yy + a_cc - 2 * a_yc)


def diversity(u: torch.Tensor) -> torch.Tensor:
    """``mean_{k≠k'} |⟨u_k, u_k'⟩|`` of normalised features ``u [K, D]`` (0 for K = 1)."""
    k = u.shape[0]
    if k < 2:
        return u.sum() * 0
    gram = (u @ u.t()).abs()
    return (gram.sum() - gram.diagonal().sum()) / (k * (k - 1))


def class_positions(num_prompts: int, positions: str) -> list[str]:
    """Class-token position of each prompt: K/4 ``front``, K/4 ``middle``, the rest ``end`` (or all ``end``)."""
    if positions == "end_only" or num_prompts == 1:
        return ["end"] * num_prompts
    q = num_prompts // 4
    return ["front"] * q + ["middle"] * q + ["end"] * (num_prompts - 2 * q)


def _gather_index(name_lens: list[int], n: int, length: int, where: str) -> torch.Tensor:
    """``[C, L]`` positions into ``[frozen tokens (L) ‖ context (n)]`` that place the class name ``where``."""
    rows = []
    for nl in name_lens:
        idx = list(range(length))
        ctx = [length + j for j in range(n)]
        name = [1 + n + i for i in range(nl)]
        if where == "front":
            idx[1 : 1 + nl + n] = name + ctx
        elif where == "middle":
            h = n // 2
            idx[1 : 1 + n + nl] = ctx[:h] + name + ctx[h:]
        else:
            idx[1 : 1 + n] = ctx
        rows.append(idx)
    return torch.tensor(rows)


class ProDAPrompt(nn.Module):
    """``K`` contexts with per-prompt class positions; the frozen token parts are cached per task."""

    def __init__(self, clip, num_prompts: int, n_ctx: int, positions: str):
        super().__init__()
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(torch.randn(num_prompts, n_ctx, clip.text_width) * 0.02)
        self.where = class_positions(num_prompts, positions)
        self.cursor, self.order = 0, None

    def _index(self, clip, task: Task):
        cache = text_cache(clip).templates
        key = (task.key, "proda", self.n_ctx)
        if key not in cache:
            tpl = prompt_template(clip, task, self.n_ctx)
            names = clip.tokenize([clean_classname(c) for c in task.classnames])
            lens = (clip.eot_index(names) - 1).tolist()
            length = tpl.tokens.shape[1]
            cache[key] = {w: _gather_index(lens, self.n_ctx, length, w).to(clip.device)
                          for w in ("front", "middle", "end")}
        return prompt_template(clip, task, self.n_ctx), cache[key]

    def text_features(self, clip, task: Task, which: list[int] | None = None) -> torch.Tensor:
        """Normalised features ``[P, C, D]`` of prompts ``which`` (default: all K)."""
        which = list(range(self.ctx.shape[0])) if which is None else which
        tpl, index = self._index(clip, task)
        if all(self.where[k] == "end" for k in which):
            return encode_context(clip, tpl, self.ctx[which])
        frozen = clip.token_embedding(tpl.tokens).detach()  # [C, L, W]
        c, length, w = frozen.shape
        seqs = []
        for k in which:
            src = torch.cat([frozen, self.ctx[k].to(frozen.dtype).unsqueeze(0).expand(c, -1, -1)], dim=1)
            seqs.append(src.gather(1, index[self.where[k]].unsqueeze(-1).expand(-1, -1, w)))
        emb = torch.stack(seqs).reshape(len(which) * c, length, w)
        feats = clip.encode_text_embeddings(emb, tpl.eot.repeat(len(which)), length=tpl.length)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return feats.reshape(len(which), c, -1)


class ProDA(FedMethod):
    """ProDA's prompt distribution on FedAvg.

    Args:
        num_prompts: K (32). n_ctx: tokens per prompt (16). prompt_batch: b_p prompts per step (4).
        positions: ``front_middle_end`` (third-party) | ``end_only`` (FLiP).
        div_weight: weight of the diversity term (0 third-party, 1 FLiP).
        lr, momentum, weight_decay, weighted: local SGD (0.002, 0.9, 5e-4), FedAvg weighting.
    """

    name = "proda"

    def __init__(self, num_prompts: int = 32, n_ctx: int = 16, prompt_batch: int = 4,
                 positions: Literal["front_middle_end", "end_only"] = "front_middle_end", div_weight: float = 0.0,
                 lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        if num_prompts < 1 or n_ctx < 1 or not 1 <= prompt_batch <= num_prompts:
            raise FedlitError(f"method.init_args: need num_prompts >= 1, n_ctx >= 1 and 1 <= prompt_batch <= "
                              f"num_prompts (got {num_prompts}, {n_ctx}, {prompt_batch})")
        if positions not in ("front_middle_end", "end_only"):
            raise FedlitError(f"method.init_args.positions={positions!r}: use front_middle_end or end_only")
        if prompt_batch == 1:
            warnings.warn("proda with prompt_batch 1 (FLiP's setting): the Gaussian term vanishes; with "
                          "num_prompts 1 this is exactly CoOp", stacklevel=2)
        self.num_prompts, self.n_ctx, self.prompt_batch = num_prompts, n_ctx, prompt_batch
        self.positions, self.div_weight = positions, div_weight
        self._draws = 0

    @property
    def lockstep(self) -> bool:
        return False  # the prompt-batch cursor advances once per loss call

    def build(self, clip):
        return ProDAPrompt(clip, self.num_prompts, self.n_ctx, self.positions)

    def receive_payload(self, prompt, extra) -> None:
        super().receive_payload(prompt, extra)
        prompt.cursor, prompt.order = 0, None

    def next_prompts(self, prompt: ProDAPrompt) -> list[int]:
        if prompt.cursor == 0 or prompt.order is None:
            gen = torch.Generator().manual_seed(0x9D0A + self._draws)
            self._draws += 1
            prompt.order = torch.randperm(self.num_prompts, generator=gen).tolist()
        which = prompt.order[prompt.cursor : prompt.cursor + self.prompt_batch]
        prompt.cursor += self.prompt_batch
        if prompt.cursor + self.prompt_batch > self.num_prompts:  # cycle done (a short remainder is skipped)
            prompt.cursor = 0
        return which

    def text_features(self, prompt: ProDAPrompt, clip, task: Task) -> torch.Tensor:
        return prompt.text_features(clip, task).mean(dim=0)  # mean of normalised features (not re-normalised)

    def loss(self, module, x, y, task: Task, classes=None):
        clip, prompt = module.clip, module.prompt
        t = prompt.text_features(clip, task, self.next_prompts(prompt))
        with fp32(t):
            f = x.float() / x.float().norm(dim=-1, keepdim=True)
            loss = F.cross_entropy(surrogate_logits(f, t.float(), y, clip.logit_scale), y)
            if self.div_weight > 0 and self.num_prompts > 1:
                u = encode_context(clip, prompt_template(clip, AGNOSTIC, self.n_ctx), prompt.ctx)[:, 0]
                loss = loss + self.div_weight * diversity(u.float())
        return loss


__all__ = ["ProDA", "ProDAPrompt", "surrogate_logits", "diversity", "class_positions"]
