"""PLOT (Chen et al., ICLR 2023): N prompts per class matched to the image's local features by optimal transport,
federated with FedAvg as the FLiP suite does (spec 3c §1). **Default = code** (the official centralised PLOT,
``CHENGY12/PLOT@728539f plot-coop/trainers/plot.py:230-282``; it runs and produced the paper's tables).

Prompt model: ``N`` generic CoOp contexts ``ctx [N, n_ctx, W]`` (N(0, 0.02²), class token at the end), **all shared**
and averaged (FedAvg weighted by n_i; FLiP federates every ``prompt_learner`` tensor, spec 3c §1.5). For image ``b`` and
class ``c``: ``S_mk = ⟨f_m, t_kc⟩`` between the M normalised local features (RN50: the attention pool with every
position as a query; ViT: the patch tokens; the pooled/CLS token excluded) and the N normalised prompt features;
balanced entropic Sinkhorn on the cost ``1 − S`` with marginals ``1/M``, ``1/N``, ε = 0.1, stopping when
``mean|Δr| < 0.01`` or after 100 iterations (plot.py:193-227: the same update order and criterion as
:func:`fedlit.methods.fedotp.sinkhorn_log`, here in fp32 log domain, which cannot underflow); the plan is a constant
for back-prop; ``logits = s · Σ_mk T_mk S_mk``. On ImageNet only the official code adds CoOp's pooled logits (pooled
image feature vs the re-normalised mean of the N prompt features): ``imagenet_pooled: auto`` (default) does so for
tasks of the ``imagenet`` datasets, ``always`` / ``never`` force it. Loss: cross-entropy; the same forward at test.

It is :class:`~fedlit.methods.fedotp.FedOTP` with every prompt global, balanced Sinkhorn and PLOT's threshold.
Official hyper-parameters (spec 3c §1.4): RN50, N 4, n 16, SGD lr 0.002. FLiP's collapsed PLOT (its README runs
``num_prompt = 1``, ``num_context = 4``) is ``num_prompts: 1, n_ctx: 4``: with one prompt the plan is uniform and the
logit is ``s · mean_m ⟨f_m, t_c⟩`` (CoOp on the mean local cosine) — a named option, not the default.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..prompts import Task
from .base import fp32
from .fedotp import FedOTP, OTPrompt

Pooled = Literal["auto", "always", "never"]


class PLOT(FedOTP):
    """PLOT prompts (all shared) on FedAvg.

    Args:
        num_prompts: N, prompts per class (4 official; 1 = FLiP's collapsed PLOT).
        n_ctx: context tokens per prompt (16 official; 4 FLiP).
        eps, thresh, max_iter: Sinkhorn ε (0.1), stopping threshold on ``mean|Δr|`` (0.01), iterations (100).
        imagenet_pooled: add CoOp's pooled logits on ImageNet tasks (``auto``, official) | ``always`` | ``never``.
        ot_precision: ``fp32_log`` (default) | ``official_fp16`` (the fp16 kernel, which can underflow to NaN).
        lr, momentum, weight_decay, weighted: local SGD (0.002, 0.9, 5e-4) and FedAvg weighting.
    """

    name = "plot"

    def __init__(self, num_prompts: int = 4, n_ctx: int = 16, eps: float = 0.1, thresh: float = 0.01,
                 max_iter: int = 100, imagenet_pooled: Pooled = "auto", ot_precision: str = "fp32_log",
                 lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(n_ctx=n_ctx, num_prompts=num_prompts, num_global=num_prompts, ot="sinkhorn", eps=eps,
                         thresh=thresh, max_iter=max_iter, ot_precision=ot_precision, use_cls=False, lr=lr,
                         momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        if imagenet_pooled not in ("auto", "always", "never"):
            from ..errors import FedlitError

            raise FedlitError(f"method.init_args.imagenet_pooled={imagenet_pooled!r}: use auto, always or never")
        self.imagenet_pooled = imagenet_pooled

    def is_shared(self, key: str) -> bool:
        return True  # every prompt is global (ctx_local is empty)

    def pooled_term(self, task: Task) -> bool:
        if self.imagenet_pooled == "auto":
            return task.name.startswith("imagenet")
        return self.imagenet_pooled == "always"

    def logits(self, prompt: OTPrompt, clip, x: torch.Tensor, task: Task, prepared=None) -> torch.Tensor:
        text = prepared if prepared is not None else prompt.text_features(clip, task)  # [N, C, D]
        out = super().logits(prompt, clip, x, task, prepared=text)
        if not self.pooled_term(task):
            return out
        with fp32(out):
            pool = x[:, 0].float()
            pool = pool / pool.norm(dim=-1, keepdim=True)
            mean = text.float().mean(dim=0)
            mean = mean / mean.norm(dim=-1, keepdim=True)
            return out + clip.logit_scale * pool @ mean.t()


__all__ = ["PLOT"]
