"""FedVLP: independent vision-language prompts (IVLP style), the FedTPG code base's ``--model_name vlp`` baseline.

Spec §2.5: ``text_ctx ∈ R^{depth×n_ctx×W_text}`` and ``vis_ctx ∈ R^{depth×n_ctx×W_vision}``, both N(0, 0.02²), no
coupling between them (unlike MaPLe). Text: prompt ``"X X X X {class}."``; ``text_ctx[0]`` replaces the "X" tokens
**after** the positional embedding is added (the context gets no positional embedding, as in FedTPG's VLP) and
``text_ctx[l]`` replaces them again at the input of block ``l`` (``l < depth``). Vision: ``vis_ctx[0]`` is
**appended after the patch tokens, after** ``ln_pre`` (``prompt_position="append_after_ln_pre"``; MaPLe's
convention is before it) and ``vis_ctx[l]`` replaces those tokens (previous outputs discarded) at the input of block
``l``. ``official_layout=False`` puts both before (the text context with positional embedding, the visual prompts
through ``ln_pre``). Both tensors are shared; the server takes the **unweighted** mean over participating clients
(FedTPG's aggregation), and evaluation follows FedTPG's protocol (``eval_protocol = "global"``). Training, as in
every model of the FedTPG code base: cross-entropy over the client's own classes, relabelled (``own_classes``).

``image_input = "images"``: the image tower is prompted, nothing is cached. Defaults are FedTPG's (spec §2.4):
n_ctx 4, depth 1, SGD lr 0.003, momentum 0.9, weight decay 1e-5, and its client: a per-client cosine lr over
``schedule_rounds`` participations with momentum kept across rounds (``lr_schedule: constant`` /
``persistent_optimizer: false`` turn them off).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import FrozenCLIP
from ..data.task import client_task
from ..errors import FedlitError
from ..prompts import Task, check_prompt_depth, encode_context, prompt_template
from .base import FedMethod


class VLPPrompt(nn.Module):
    """Independent text ``[depth, n_ctx, W_text]`` and vision ``[depth, n_ctx, W_vision]`` prompts."""

    def __init__(self, clip: FrozenCLIP, n_ctx: int = 4, depth: int = 1, std: float = 0.02,
                 official_layout: bool = True):
        super().__init__()
        self.n_ctx, self.depth, self.official_layout = n_ctx, depth, official_layout
        self.text_ctx = nn.Parameter(torch.randn(depth, n_ctx, clip.text_width) * std)
        self.vis_ctx = nn.Parameter(torch.randn(depth, n_ctx, clip.vision_width) * std)

    def text_features(self, clip: FrozenCLIP, task: Task) -> torch.Tensor:
        tpl = prompt_template(clip, task, self.n_ctx)
        deep = [self.text_ctx[i] for i in range(1, self.depth)]
        ctx = self.text_ctx[0]
        if self.official_layout:  # written after the positional embedding: pre-subtract what the encoder adds
            ctx = ctx - clip.model.positional_embedding[1 : 1 + self.n_ctx].to(ctx.dtype)
        return encode_context(clip, tpl, ctx, deep_prompts=deep)

    def image_features(self, clip: FrozenCLIP, images: torch.Tensor) -> torch.Tensor:
        deep = [self.vis_ctx[i] for i in range(1, self.depth)]
        return clip.encode_image(images, visual_prompts=self.vis_ctx[0], deep_visual_prompts=deep,
                                 prompt_position="append_after_ln_pre" if self.official_layout else "append")


class FedVLP(FedMethod):
    """Federated independent vision-language prompts (FedTPG's VLP baseline).

    Args:
        n_ctx: prompt tokens per layer and modality (4).
        prompt_depth: layers that receive prompts (1: input layer only).
        lr, momentum, weight_decay: SGD (FedTPG: 0.003, 0.9, 1e-5).
        weighted: aggregate weighted by sample count (False: FedTPG's unweighted mean).
        lr_schedule, schedule_rounds, persistent_optimizer: the FedTPG code base's client — per-client cosine
            lr over ``schedule_rounds`` participations and momentum kept across rounds (see :class:`FedTPG`).
        own_classes: train with cross-entropy over the client's own classes, relabelled (FedTPG's code base,
            default); ``False``: over all training classes of its task.
        official_layout: FedTPG's VLP layout — text context after the positional embedding, visual prompts
            after ``ln_pre`` (default); ``False``: both before (MaPLe's convention).
    """

    name = "fedvlp"
    default_drop_last = "never"  # FedTPG's loaders keep every last batch (dm_federated.py:91-97)
    default_augment = "none"  # FedTPG's code base: no augmentation (spec §1.4)
    image_input = "images"
    eval_protocol = "global"

    def __init__(self, n_ctx: int = 4, prompt_depth: int = 1, lr: float = 0.003, momentum: float = 0.9,
                 weight_decay: float = 1e-5, weighted: bool = False,
                 lr_schedule: Literal["cosine", "constant"] = "cosine", schedule_rounds: int = 500,
                 persistent_optimizer: bool = True, own_classes: bool = True, official_layout: bool = True):
        super().__init__(lr=lr, momentum=momentum, weight_decay=weight_decay, weighted=weighted)
        self.own_classes, self.official_layout = own_classes, official_layout
        self.set_client_schedule(lr_schedule, schedule_rounds, persistent_optimizer)
        if n_ctx < 1:
            raise FedlitError(f"method.init_args.n_ctx={n_ctx}: needs at least 1 prompt token")
        if prompt_depth < 1:
            raise FedlitError(f"method.init_args.prompt_depth={prompt_depth}: needs at least 1 (the input layer)")
        self.n_ctx = n_ctx
        self.prompt_depth = prompt_depth

    def build(self, clip: FrozenCLIP):
        if not clip.is_vit:
            raise FedlitError(f"fedvlp prompts a ViT image tower; backbone '{clip.name}' has none (use e.g. ViT-B-16)")
        check_prompt_depth(clip, self.prompt_depth, vision=True)
        return VLPPrompt(clip, self.n_ctx, self.prompt_depth, official_layout=self.official_layout)

    def is_shared(self, key: str) -> bool:
        return True  # text and vision prompts

    def text_features(self, prompt: VLPPrompt, clip, task: Task) -> torch.Tensor:
        return prompt.text_features(clip, task)

    def image_features(self, prompt: VLPPrompt, clip, x: torch.Tensor) -> torch.Tensor:
        return prompt.image_features(clip, x)

    def loss(self, module, x, y, task: Task, classes=None) -> torch.Tensor:
        if self.own_classes:
            task, y = client_task(task, classes, y)
        return F.cross_entropy(self.logits(module.prompt, module.clip, x, task).float(), y)
