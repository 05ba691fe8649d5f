"""PromptSRC (Khattak et al., ICCV 2023): IVLP deep prompts regularised towards frozen CLIP, with Gaussian prompt
aggregation (GPA), federated with FedAvg (spec 3c §3). **Default = code** (the official centralised trainer
``muzairkhattak/PromptSRC@bb95c77 trainers/promptsrc.py``; it runs and produced the tables).

Prompt model (``architecture: ivlp``): :class:`~fedlit.methods.ivlp.IVLP` with depth 9 in both towers, 4 + 4
tokens, text init "a photo of a"; every tensor shared (FedAvg weighted by n_i). Loss, every step
(promptsrc.py:285-313), with f̂/t̂ the normalised prompted image/class features, f̃ the normalised *un-prompted* image
feature and t̃ the textual-diversity target::

    L = CE(z, y) + λ_t·L1(t̂, t̃) + λ_v·L1(f̂, f̃) + KL_sum(softmax z̃ ‖ softmax z) / (B·C)

``z = s·f̂t̂ᵀ``, ``z̃ = s·f̃t̃ᵀ``; L1 = mean absolute difference; λ_t 25, λ_v 10; ``kl_norm: numel`` (official: the
summed KL over B·C) | ``batch`` (per-image mean). t̃: for each class the *unnormalised* frozen text features of the 60
ImageNet templates (open_clip's ``OPENAI_IMAGENET_TEMPLATES[:60]``, the same set in another order,
promptsrc.py:113-128) are averaged, then normalised (:func:`ensemble_features`).

GPA (``gpa``): ``client_epochs`` (official: after each local epoch e = 1…E, Σ ← Σ + g_e·θ_e with
``g_e = N(e; μ, σ²)/Σ_e' N(e'; μ, σ²)``; training continues from θ_e; after the last epoch θ ← Σ, which is what the
client uploads; a no-op at E = 1; μ 15, σ 1 = the base-to-novel YAML) | ``server_rounds_fedback`` (FLiP,
spec 3c §3.6: after aggregating round r the server keeps ``W_r = W_{r−1} + g_r·FedAvg_r`` with g over rounds
0…``gpa_rounds``−1 and sends W_r to the clients; W and the round counter are server state) | ``none``.

FLiP's degenerate PromptSRC (spec 3c §3.6) is ``architecture: flip_text_only``: a CoOp context of 4 tokens, no vision
or deep prompts, on cached image features; its image term is ``L1(f, f̃)`` of two frozen features, a constant with
no gradient, so it is left out. It runs on any tower (RN50 included); ``ivlp`` needs a ViT.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import FedlitError
from ..prompts import ContextPrompt, Task, clean_classname, text_cache
from .base import fp32
from .ivlp import IVLP


@torch.no_grad()
def ensemble_features(clip, task: Task, templates: list[str] | None = None) -> torch.Tensor:
    """Normalised mean of the *unnormalised* frozen text features over ``templates`` (default: PromptSRC's 60
    ImageNet templates), ``[C, D]``, cached per class list."""
    if templates is None:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES[:60]]
    cache = text_cache(clip).features
    key = (task.key, "ensemble", tuple(templates))
    if key not in cache:
        total = 0.0
        for tpl in templates:
            tokens = clip.tokenize([tpl.format(clean_classname(c)) for c in task.classnames])
            total = total + clip.encode_tokens(tokens).float()
        mean = total / len(templates)
        cache[key] = mean / mean.norm(dim=-1, keepdim=True)
    return cache[key]


def gauss_weights(n: int, mean: float, std: float, start: int = 1) -> list[float]:
    """``N(i; μ, σ²)`` over ``i = start … start+n−1``, normalised to sum 1 (GPA's weights)."""
    g = [math.exp(-0.5 * ((i - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for i in range(start, start + n)]
    total = sum(g)
    return [v / total for v in g]


def scl_kl(logits: torch.Tensor, zs_logits: torch.Tensor, norm: str = "numel") -> torch.Tensor:
    """``KL(softmax zs ‖ softmax logits)`` summed over batch and classes, divided by B·C (``numel``) or B."""
    kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(zs_logits.float(), -1), reduction="sum",
                  log_target=True)
    return kl / (logits.numel() if norm == "numel" else logits.shape[0])


class PromptSRC(IVLP):
    """PromptSRC's self-regulating losses and GPA on IVLP prompts (or FLiP's text-only variant).

    Args:
        architecture: ``ivlp`` (official) | ``flip_text_only`` (FLiP: a CoOp context, cached features).
        n_ctx_text, n_ctx_vision, prompt_depth_text, prompt_depth_vision, ctx_init: IVLP prompts (4, 4, 9, 9,
            "a photo of a"); ``flip_text_only`` uses ``n_ctx_text`` random tokens only.
        text_weight, image_weight: λ_t (25), λ_v (10).
        kl_norm: ``numel`` (official) | ``batch``.
        gpa: ``client_epochs`` (official) | ``server_rounds_fedback`` (FLiP) | ``none``.
        gpa_mean, gpa_std: μ (15), σ (1), in epochs (client) or rounds (server, 0-based as FLiP).
        gpa_rounds: rounds the server weights span (``server_rounds_fedback``; = trainer.rounds).
        lr, momentum, weight_decay, weighted: local SGD (0.0025, 0.9, 5e-4), FedAvg weighting.
    """

    name = "promptsrc"

    def __init__(self, architecture: Literal["ivlp", "flip_text_only"] = "ivlp", n_ctx_text: int = 4,
                 n_ctx_vision: int = 4, prompt_depth_text: int = 9, prompt_depth_vision: int = 9,
                 ctx_init: str | None = "a photo of a", text_weight: float = 25.0, image_weight: float = 10.0,
                 kl_norm: Literal["numel", "batch"] = "numel",
                 gpa: Literal["client_epochs", "server_rounds_fedback", "none"] = "client_epochs",
                 gpa_mean: float = 15.0, gpa_std: float = 1.0, gpa_rounds: int = 0, lr: float = 0.0025,
                 momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(n_ctx_text, n_ctx_vision, prompt_depth_text, prompt_depth_vision, ctx_init, lr=lr,
                         momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        for key, val, allowed in (("architecture", architecture, ("ivlp", "flip_text_only")),
                                  ("kl_norm", kl_norm, ("numel", "batch")),
                                  ("gpa", gpa, ("client_epochs", "server_rounds_fedback", "none"))):
            if val not in allowed:
                raise FedlitError(f"method.init_args.{key}={val!r}: use one of {', '.join(allowed)}")
        if gpa_std <= 0:
            raise FedlitError(f"method.init_args.gpa_std={gpa_std}: must be > 0")
        if gpa == "server_rounds_fedback" and gpa_rounds < 1:
            raise FedlitError("method.init_args.gpa=server_rounds_fedback needs method.init_args.gpa_rounds "
                              "(the number of rounds, e.g. the value of trainer.rounds)")
        self.architecture, self.kl_norm, self.gpa = architecture, kl_norm, gpa
        self.text_weight, self.image_weight = text_weight, image_weight
        self.gpa_mean, self.gpa_std, self.gpa_rounds = gpa_mean, gpa_std, gpa_rounds
        self.image_input = "images" if architecture == "ivlp" else "features"
        self._gpa_state: dict[str, torch.Tensor] = {}  # server_rounds_fedback: W and the round counter

    def build(self, clip):
        if self.architecture == "flip_text_only":
            return ContextPrompt(clip, self.n_ctx_text)
        if not clip.is_vit:
            raise FedlitError(f"promptsrc prompts a ViT image tower; backbone '{clip.name}' has none (use e.g. "
                              "ViT-B-16, or method.init_args.architecture flip_text_only)")
        return super().build(clip)

    def text_features(self, prompt, clip, task: Task) -> torch.Tensor:
        return prompt.text_features(clip, task)

    def image_features(self, prompt, clip, x):
        return x if self.architecture == "flip_text_only" else prompt.image_features(clip, x)

    # ------------------------------------------------------------------ loss
    def loss(self, module, x, y, task: Task, classes=None):
        clip, prompt = module.clip, module.prompt
        text = self.text_features(prompt, clip, task)
        img = self.image_features(prompt, clip, x)
        with torch.no_grad():
            frozen = x if self.architecture == "flip_text_only" else clip.encode_image(x)
        target = ensemble_features(clip, task)
        with fp32(img):
            img = img.float() / img.float().norm(dim=-1, keepdim=True)
            frozen = frozen.float() / frozen.float().norm(dim=-1, keepdim=True)
            logits = clip.logit_scale * img @ text.float().t()
            zs = clip.logit_scale * frozen @ target.t().to(frozen.device)
            loss = F.cross_entropy(logits, y) + scl_kl(logits, zs.detach(), self.kl_norm)
            loss = loss + self.text_weight * F.l1_loss(text.float(), target.to(text.device))
            if self.architecture == "ivlp":
                loss = loss + self.image_weight * F.l1_loss(img, frozen)
        return loss

    # ------------------------------------------------------------------ GPA
    def receive_payload(self, prompt, extra) -> None:
        super().receive_payload(prompt, extra)
        prompt.gpa_sum = None  # a new local update starts its own per-epoch average

    def end_local_epoch(self, prompt, epoch: int, epochs: int) -> None:
        if self.gpa != "client_epochs":
            return
        g = gauss_weights(epochs, self.gpa_mean, self.gpa_std)[epoch]
        state = {k: v.detach().float() * g for k, v in prompt.state_dict().items()}
        acc = getattr(prompt, "gpa_sum", None)
        prompt.gpa_sum = state if acc is None else {k: acc[k] + state[k] for k in acc}
        if epoch == epochs - 1:
            sd = prompt.state_dict()
            prompt.load_state_dict({k: prompt.gpa_sum[k].to(sd[k].dtype) for k in sd})
            prompt.gpa_sum = None

    def aggregate(self, updates, global_state):
        avg = super().aggregate(updates, global_state)
        if self.gpa != "server_rounds_fedback" or not avg:
            return avg
        r = int(self._gpa_state.get("round", torch.tensor(0)))
        g = gauss_weights(self.gpa_rounds, self.gpa_mean, self.gpa_std, start=0)[r] if r < self.gpa_rounds else 0.0
        prev = {k: self._gpa_state.get(f"W/{k}", torch.zeros_like(v)) for k, v in avg.items()}
        new = {k: prev[k] + g * avg[k].float() for k in avg}
        self._gpa_state = {"round": torch.tensor(r + 1), **{f"W/{k}": v for k, v in new.items()}}
        return {k: v.to(avg[k].dtype) for k, v in new.items()}

    def server_state_dict(self):
        return dict(self._gpa_state)

    def load_server_state_dict(self, state):
        self._gpa_state = dict(state)


__all__ = ["PromptSRC", "ensemble_features", "gauss_weights", "scl_kl"]
