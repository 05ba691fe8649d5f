"""ProGrad (Zhu et al., ICCV 2023): CoOp whose gradient is projected so that it never conflicts with the zero-shot
"general knowledge" direction; a client policy on PromptFL (FedAvg), as FLiP federates it (spec 3c §2).
**Default = code** (the official centralised trainer ``BeierZhu/Prompt-align@1b76203``; it runs and produced the tables).

Teacher: zero-shot CLIP with ProGrad's per-dataset templates (:data:`PROGRAD_TEMPLATES`,
``ProGrad.public/trainers/prograd.py:201-216``), ``z⁰ = s·f̂·t̂⁰ᵀ`` on the same (cached, frozen) image feature.
Losses: ``L_ce = CE(z, y)``; ``L_kd = T²·mean_b Σ_c −softmax(z⁰/T)_c·log softmax(z/T)_c`` (T = 1; prograd.py:280-293).

``mode: projection`` (official, ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py:311-350``): every local step, per
trainable tensor, ``g_kd = ∇L_kd`` and ``g = ∇(task loss)``; if ``⟨g, ĝ_kd⟩ < 0`` (ĝ_kd = g_kd/‖g_kd‖, Frobenius)
the step uses ``g − λ⟨g, ĝ_kd⟩ĝ_kd``, else ``g``; SGD then adds weight decay and momentum. The KD loss reaches the
update only through the projection. The task loss is whatever the client minimises: CE, plus FedProx's term when
``trainer.prox_mu`` > 0 (the official code has only CE). ``prograd_scope: flat`` projects the concatenation of all
tensors at once instead (only ``ctx`` is trained here, so the two agree). Step mode (FedSGD) projects in
:meth:`client_gradient` before sharing.

``mode: flip_kd`` is FLiP's degenerate "ProGrad" (spec 3c §2.6): no projection, ``loss = CE + λ·L_kd`` (CoOp + KD).
``ctx_init_mode: prograd`` is the official init (the template words "a photo of a" fill the last positions of the
n tokens, the first ones are zeros); default ``random`` (N(0, 0.02²), the shipped FLiP/embedded setting).
Official hyper-parameters: RN50, n 16, SGD lr 0.002, batch 32, λ 1 (0.8 for 8/16-shot Flowers, DTD, EuroSAT).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import FedlitError
from ..prompts import ContextPrompt, Task, handcrafted_features
from .base import fp32
from .promptfl import PromptFL

#: ProGrad's zero-shot template per dataset (fedlit dataset names); others use "a photo of a {}."
PROGRAD_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.",
    "food101": "a type of food, a photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}


def prograd_template(task_name: str) -> str:
    base = task_name[: -len("-client")] if task_name.endswith("-client") else task_name
    return PROGRAD_TEMPLATES.get(base, "a photo of a {}.")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T²·mean_b Σ_c −softmax(teacher/T)·log softmax(student/T)`` (ProGradLoss's soft-label CE)."""
    p = F.softmax(teacher.float() / temperature, dim=-1)
    return -(p * F.log_softmax(student.float() / temperature, dim=-1)).sum(-1).mean() * temperature ** 2


def project(g: torch.Tensor, g_kd: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """ProGrad's rule: ``g − λ⟨g, ĝ_kd⟩ĝ_kd`` when ``⟨g, ĝ_kd⟩ < 0``, else ``g`` (flattened inner products)."""
    norm = g_kd.norm()
    if not torch.isfinite(norm) or norm == 0:
        return g
    unit = g_kd / norm
    dot = (g.flatten() * unit.flatten()).sum()
    return g - lam * dot * unit if dot < 0 else g


def project_all(grads: dict[str, torch.Tensor], kd: dict[str, torch.Tensor], lam: float = 1.0,
                scope: str = "per_tensor") -> dict[str, torch.Tensor]:
    """:func:`project` per tensor (official) or on the concatenation of all tensors (``flat``)."""
    keys = [k for k in grads if k in kd]
    if scope == "per_tensor":
        return {**grads, **{k: project(grads[k], kd[k].to(grads[k]), lam) for k in keys}}
    g = torch.cat([grads[k].flatten().float() for k in keys])
    out = project(g, torch.cat([kd[k].flatten().float().to(g.device) for k in keys]), lam)
    res, i = dict(grads), 0
    for k in keys:
        n = grads[k].numel()
        res[k] = out[i : i + n].view_as(grads[k]).to(grads[k].dtype)
        i += n
    return res


def prograd_context(clip, n_ctx: int, phrase: str = "a photo of a") -> torch.Tensor:
    """Official init: zeros, with the phrase's first k token embeddings (k = its number of words) in the last k
    positions."""
    words = phrase.split()
    if len(words) > n_ctx:
        raise FedlitError(f"method.init_args.n_ctx={n_ctx} is shorter than the init phrase '{phrase}'")
    tokens = clip.tokenize([phrase]).to(clip.device)
    with torch.no_grad():
        emb = clip.token_embedding(tokens)[0, 1 : 1 + len(words)].float()
    ctx = torch.zeros(n_ctx, clip.text_width)
    ctx[n_ctx - len(words):] = emb.cpu()
    return ctx


class ProGrad(PromptFL):
    """ProGrad's gradient projection (or FLiP's CE + KD) on a shared CoOp context.

    Args:
        mode: ``projection`` (official) | ``flip_kd`` (FLiP: CE + λ·KD, no projection).
        lam: λ of the projection (1.0) or of the KD term in ``flip_kd``.
        temperature: KD temperature T (1).
        prograd_scope: ``per_tensor`` (official) | ``flat``.
        ctx_init_mode: ``random`` (N(0, 0.02²)) | ``prograd`` (official: zeros + "a photo of a" at the end).
        n_ctx, lr, momentum, weight_decay, weighted: see :class:`~fedlit.methods.coop.CoOp`.
    """

    name = "prograd"

    def __init__(self, mode: Literal["projection", "flip_kd"] = "projection", lam: float = 1.0,
                 temperature: float = 1.0, prograd_scope: Literal["per_tensor", "flat"] = "per_tensor",
                 ctx_init_mode: Literal["random", "prograd"] = "random", n_ctx: int = 16, lr: float = 0.002,
                 momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(n_ctx=n_ctx, lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        for key, val, allowed in (("mode", mode, ("projection", "flip_kd")),
                                  ("prograd_scope", prograd_scope, ("per_tensor", "flat")),
                                  ("ctx_init_mode", ctx_init_mode, ("random", "prograd"))):
            if val not in allowed:
                raise FedlitError(f"method.init_args.{key}={val!r}: use one of {', '.join(allowed)}")
        if temperature <= 0 or lam < 0:
            raise FedlitError("method.init_args.temperature must be > 0 and lam >= 0")
        self.mode, self.lam, self.temperature = mode, lam, temperature
        self.prograd_scope, self.ctx_init_mode = prograd_scope, ctx_init_mode

    def build(self, clip):
        prompt = ContextPrompt(clip, self.n_ctx)
        if self.ctx_init_mode == "prograd":
            with torch.no_grad():
                prompt.ctx.copy_(prograd_context(clip, self.n_ctx))
        return prompt

    @property
    def lockstep(self) -> bool:
        return self.mode == "flip_kd"  # the projection takes a KD gradient inside the loss: one client at a time

    def teacher_logits(self, clip, x: torch.Tensor, task: Task) -> torch.Tensor:
        hand = handcrafted_features(clip, task, prograd_template(task.name))
        with fp32(x):
            f = x.float() / x.float().norm(dim=-1, keepdim=True)
            return clip.logit_scale * f @ hand.t().to(f.device)

    def loss(self, module, x, y, task: Task, classes=None):
        logits = module(x, task)
        with fp32(logits):
            ce = F.cross_entropy(logits.float(), y)
            kd = kd_loss(logits, self.teacher_logits(module.clip, x, task).detach(), self.temperature)
        if self.mode == "flip_kd":
            return ce + self.lam * kd
        params = {k: p for k, p in module.prompt.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(kd, list(params.values()), retain_graph=True, allow_unused=True)
        module.prompt.kd_grads = {k: g.detach() for k, g in zip(params, grads) if g is not None}
        return ce

    def _projected(self, grads: dict[str, torch.Tensor], prompt) -> dict[str, torch.Tensor]:
        kd = getattr(prompt, "kd_grads", None) or {}
        prompt.kd_grads = None
        return project_all(grads, kd, self.lam, self.prograd_scope) if kd else grads

    def before_optimizer_step(self, prompt) -> None:
        if self.mode != "projection":
            return
        params = {k: p for k, p in prompt.named_parameters() if p.grad is not None}
        new = self._projected({k: p.grad for k, p in params.items()}, prompt)
        for k, p in params.items():
            p.grad = new[k]

    def client_gradient(self, prompt, grads, gen):
        if self.mode != "projection":
            return grads
        if self.per_sample_gradients:
            raise FedlitError("prograd mode=projection has no per-sample step mode; use mode=flip_kd")
        return self._projected(grads, prompt)


__all__ = ["ProGrad", "PROGRAD_TEMPLATES", "kd_loss", "project", "project_all", "prograd_context"]
