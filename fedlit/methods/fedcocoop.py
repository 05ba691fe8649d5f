"""FedCoCoOp: CoCoOp (Zhou et al., CVPR 2022) trained by every client and averaged by the server.

CoCoOp makes CoOp's context conditional on the image: a small meta-net ``π = Linear(D→D/16)-ReLU-Linear(D/16→W)``
maps the (L2-normalised) image feature to a bias that is added to *every* context token, so each image gets its own
prompts ``[SOS] ctx_1+π(x) … ctx_n+π(x) {class} . [EOT]`` and therefore its own class text features ``[C, D]``
(spec §6). With ``n_ctx = 16`` (FedPGP's federated CoCoOp: random init, fp32) and ViT-B/16 (D = W = 512) the
prompt learner has 8 192 + 33 312 = 41 504 parameters.

The image tower is untouched (``image_input = "features"``: pooled image features are cached). The text tower
runs once per step over all ``B·C`` per-image prompts in one batched pass, cut after the longest prompt's EOT
token (the text tower is causal, so the padding cannot change the pooled features). Because logits need the image,
:meth:`FedCoCoOp.prepare` returns ``None``.

Federation: the **whole prompt learner** (ctx + meta-net) is shared and averaged (FedAvg weighted by sample count,
as in the FedPGP code base's ``fedavgcocoop`` runs). [UNVERIFIED: the ``fedavgcocoop`` branch and the CoCoOp trainer
are not in the released FedPGP repository (spec §3.5); averaging every prompt-learner tensor is the natural reading
and the assumption of spec §6/§11.6.] Defaults are those of FedPGP's federated CoCoOp runs (spec §3.5): SGD lr 0.001,
momentum 0.9, weight decay 5e-4, 25 rounds × 2 local epochs, batch = shots.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..backbones import FrozenCLIP
from ..prompts import Task, encode_context, init_context, prompt_template
from .base import FedMethod, fp32
from .roles import DASSL_CHAIN


class CoCoOpPrompt(nn.Module):
    """CoCoOp's prompt learner: a shared context ``[n_ctx, W]`` plus the meta-net ``D → D/ratio → W``."""

    def __init__(self, clip: FrozenCLIP, n_ctx: int = 4, ctx_init: str | None = "a photo of a", ratio: int = 16):
        super().__init__()
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(init_context(clip, n_ctx, ctx_init))
        d, w = clip.embed_dim, clip.text_width
        hidden = max(d // ratio, 1)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(d, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, w)),
        ])).to(clip.device)

    def conditional_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """``ctx + π(x)`` for every image: normalised features ``[B, D]`` → contexts ``[B, n_ctx, W]``."""
        bias = self.meta_net(image_features.to(self.meta_net.linear1.weight.dtype))  # [B, W]
        return self.ctx.unsqueeze(0) + bias.unsqueeze(1)

    def text_features(self, clip: FrozenCLIP, task: Task, image_features: torch.Tensor) -> torch.Tensor:
        """Per-image normalised class text features ``[B, C, D]`` from normalised image features ``[B, D]``,
        the text tower run once over all ``B·C`` prompts."""
        ctx = self.conditional_context(image_features)  # [B, n, W]: one shared prefix per image
        return encode_context(clip, prompt_template(clip, task, self.n_ctx), ctx)


class FedCoCoOp(FedMethod):
    """Federated CoCoOp: image-conditional context; ctx and meta-net shared and averaged.

    Args:
        n_ctx: number of context tokens (16: what FedPGP's federated CoCoOp sets, ``federated_main.py:95-98``;
            CoCoOp's own ``ctxv1`` config uses 4).
        ctx_init: initialise the context from these words' token embeddings (``null``, FedPGP's ``CTX_INIT = ""``:
            N(0, 0.02²); CoCoOp's ``ctxv1``: "a photo of a").
        meta_ratio: meta-net bottleneck ``D / meta_ratio`` (16 in CoCoOp).
        lr, momentum, weight_decay, weighted: see :class:`FedMethod` (FedPGP's federated runs: lr 0.001).
    """

    name = "fedcocoop"
    policy = DASSL_CHAIN  # run in FedPGP's Dassl code base: one local_trainer for all clients, drawn order
    image_input = "features"

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None, meta_ratio: int = 16,
                 lr: float = 0.001, momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        if n_ctx < 1 or meta_ratio < 1:
            from ..errors import FedlitError

            raise FedlitError(f"fedcocoop: n_ctx={n_ctx} and meta_ratio={meta_ratio} must both be >= 1")
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.meta_ratio = meta_ratio

    def build(self, clip):
        return CoCoOpPrompt(clip, self.n_ctx, self.ctx_init, self.meta_ratio)

    def is_shared(self, key: str) -> bool:
        return True  # [UNVERIFIED] the whole prompt learner (ctx + meta-net) is averaged

    def prepare(self, prompt, clip, task: Task):
        return None  # the class text features depend on the image

    def logits(self, prompt: CoCoOpPrompt, clip, x: torch.Tensor, task: Task, prepared=None) -> torch.Tensor:
        img = self.image_features(prompt, clip, x)
        img = img / img.norm(dim=-1, keepdim=True)
        text = prompt.text_features(clip, task, img)  # [B, C, D]
        with fp32(img):  # logits in fp32 whatever the autocast
            return clip.logit_scale * torch.einsum("bd,bcd->bc", img.float(), text.float())
